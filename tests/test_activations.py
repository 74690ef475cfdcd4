"""The reference per-token quantizer (dvdq_core.activations)."""
import pytest
import torch

from dvdq_core.activations import auto_scale, quantize_per_token


@pytest.mark.parametrize("granularity", ["block", "channel", None])
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
