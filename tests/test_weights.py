import pytest
import torch

from dvdq_core import bgr_quantize, minmax_quantize
from dvdq_core.weights import pack_codes, unpack_codes


def _row_sse(q, w):
    return ((q.dequantize() - w) ** 2).sum(1)


@pytest.mark.parametrize("dist,target", [("normal", 0.65), ("t3", 0.55)])
def test_bgr_beats_minmax(dist, target):
    g = torch.Generator().manual_seed(1)
    if dist == "normal":
        w = torch.randn(512, 5120, generator=g)
    else:  # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3)
        chi2 = (torch.randn(512, 5120, 3, generator=g) ** 2).sum(-1)
        w = torch.randn(512, 5120, generator=g) / (chi2 / 3).sqrt()
    eb, em = _row_sse(bgr_quantize(w, 4), w), _row_sse(minmax_quantize(w, 4), w)
    assert eb.sum() <= target * em.sum(), (eb.sum() / em.sum()).item()
    assert (eb <= em * (1 + 1e-6) + 1e-12).all(), "BGR must never be worse than min-max on a row"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_and_zero_in_range(bits):
    w = torch.randn(33, 70)
    for fn in (bgr_quantize, minmax_quantize):
        q = fn(w, bits)
        u = q.unpacked()
        assert u.shape == (33, 70) and int(u.max()) <= 2**bits - 1
        assert int(q.zero.max()) <= 2**bits - 1 and (q.scale > 0).all()
        assert q.codes.shape == ((33, 35) if bits <= 4 else (33, 70))
    # more bits, less error
    assert _row_sse(bgr_quantize(w, 8), w).sum() < _row_sse(bgr_quantize(w, 4), w).sum()


def test_constant_and_zero_rows_are_exact():
    w = torch.randn(4, 16)
    w[1] = 0.0
    w[2] = 3.5
    w[3] = -2.0
    q = bgr_quantize(w, 4).dequantize()
    assert torch.allclose(q[1:], w[1:], atol=1e-6)


@pytest.mark.parametrize("bits,k", [(4, 64), (4, 33), (2, 7), (8, 10)])
def test_pack_unpack_roundtrip(bits, k):
    u = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    p = pack_codes(u, bits)
    assert p.dtype == torch.uint8 and p.shape[1] == ((k + 1) // 2 if bits <= 4 else k)
    assert torch.equal(unpack_codes(p, bits, k), u)
    if bits <= 4:  # column 2j in the low nibble
        assert int(p[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)


@pytest.mark.parametrize("bad", [1, 9, 16, 0, 4.0, "4"])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="2 to 8"):
        bgr_quantize(torch.randn(4, 8), bad)


def test_non_2d_weight():
    with pytest.raises(ValueError, match="2-D"):
        minmax_quantize(torch.randn(4, 8, 2))
    with pytest.raises(ValueError, match="floating-point"):
        minmax_quantize(torch.ones(4, 8, dtype=torch.int32))
