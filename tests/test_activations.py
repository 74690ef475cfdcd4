"""The reference per-token quantizer (dvdq_core.activations)."""
import pytest
import torch

from dvdq_core.activations import POW2_BITS, POW2_OCTAVES, auto_scale, quantize_per_token, scale_granularity


@pytest.mark.parametrize("granularity", ["block", "channel", "pow2", None])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_per_token_quantizer_within_half_a_step(granularity, bits):
    """q = round(xr * r), r = 1 / (l * s) in float32: q * s * l is within half a step s * l of xr,
    every non-zero row reaches qmax (the clamp never binds), and a zero row gives zero codes."""
    gen = torch.Generator().manual_seed(bits)
    xr = torch.randn(64, 256, generator=gen)
    xr[:, 5] *= 40.0  # a massive channel
    xr[:, 100:104] = xr[:, 100:104].to(torch.bfloat16).float()  # few mantissa bits: exact ties
    xr[3] = 0.0
    l = auto_scale(xr, granularity, 64) if granularity else None
    q, s = quantize_per_token(xr, bits, l)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64,)
    step = s.double()[:, None] * (l.double() if l is not None else 1.0)
    err = (q.double() * step - xr.double()).abs()
    assert (err <= 0.5 * step * (1 + 1e-6)).all()
    nonzero = torch.arange(64) != 3
    assert (q.abs().amax(1)[nonzero] == qmax).all() and q.min() >= -qmax
    assert (q[3] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_quantizer_is_one_multiply_by_the_reciprocal(bits):
    """The codes are round(xr * fl(1 / fl(l * s))), the formula the kernels implement; on near-ties
    of bf16 inputs this differs from round(xr / l / s) (the definition before)."""
    gen = torch.Generator().manual_seed(0)
    xr = torch.randn(256, 256, generator=gen).to(torch.bfloat16).float()
    l = auto_scale(xr, "block", 64)
    q, s = quantize_per_token(xr, bits, l)
    qmax = 2 ** (bits - 1) - 1
    r = 1.0 / (l * s[:, None])
    assert torch.equal(q, torch.round(xr * r).clamp(-qmax - 1, qmax).to(torch.int8))
    two_divisions = torch.round(xr / l / s[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    assert 0 < (q != two_divisions).sum() < 1e-3 * q.numel()


def test_pow2_scales():
    """Granularity "pow2": powers of two, each the smallest one >= the channel max (exact ties
    included) unless that is more than POW2_OCTAVES below the largest; then the window's floor."""
    xr = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    xr[:, 7] = 0.0
    xr[0, 7] = 10.0  # sets the top exponent: 4, so the floor is 2**0
    xr[:, 9] *= 1e-4  # far below: clamped to the floor
    xr[:, 11] = 0.0
    xr[0, 12] = 2.0  # an exact power of two stays itself
    xr[1:, 12] = 1.0
    l = auto_scale(xr, "pow2", 64)
    e = torch.log2(l)
    assert torch.equal(e, e.round())  # exact powers of two
    amax = xr.abs().amax(0)
    top = float(e.max())
    assert top == float(torch.ceil(torch.log2(amax[7])))
    assert (l >= amax).all()
    assert float(l[12]) == 2.0
    assert float(e[9]) == top - POW2_OCTAVES and float(e[11]) == top - POW2_OCTAVES
    inside = e > top - POW2_OCTAVES
    assert (l[inside] < 2 * amax[inside]).all()  # the smallest power of two >= the max


def test_pow2_codes_fold_into_int8():
    """What the kernels rely on: at POW2_BITS, q * 2**(e_j - e_min) fits int8 for every code."""
    xr = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-4, 2, 256)
    l = auto_scale(xr, "pow2", 64)
    q, s = quantize_per_token(xr, POW2_BITS, l)
    folded = q.int() * (l / l.min()).int()
    assert int(folded.min()) >= -128 and int(folded.max()) <= 127
    assert int(folded.abs().max()) > 64  # the window is used: the test would catch an overflow


def test_pow2_means_block_above_four_bits():
    assert scale_granularity("pow2", POW2_BITS) == "pow2"
    assert all(scale_granularity("pow2", b) == "block" for b in (5, 6, 7, 8))
    assert scale_granularity("block", 4) == "block" and scale_granularity("channel", 8) == "channel"


def test_pow2_fast_has_no_auto_scale_above_four_bits():
    assert scale_granularity("pow2-fast", POW2_BITS) == "pow2"
    assert all(scale_granularity("pow2-fast", b) is None for b in (5, 6, 7, 8))
