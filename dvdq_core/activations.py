"""ARQ's online activation math: auto-scaling and dynamic per-token quantization (reference)."""
import torch

EPS = 1e-8
ACT_BITS = (4, 5, 6, 7, 8, 16)  # 16 means "not quantized"
# granularity "pow2": at POW2_BITS, per-channel power-of-two scales no more than 2**POW2_OCTAVES
# below the layer's largest. A code q in [-8, 7] times 2**(e_j - e_min) then fits int8
# (-128..112), so the GPU kernels fold the scales into the codes and the GEMM needs one int32 sum
# over all of K instead of a float promotion per K-block. Other bit-widths have no such room (an
# 8-bit code fills int8): there "pow2" means "block", and "pow2-fast" means no auto-scale at all (the
# GEMM then also runs without promotion: faster, at a small measured quality cost, bench/RESULTS.md).
POW2_BITS = 4
POW2_OCTAVES = 4


def check_act_bits(bits: int) -> int:
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of 4..8 or 16 (unquantized), got {bits!r}")
    return bits


def scale_granularity(granularity: str, bits: int) -> str | None:
    """The granularity a step at `bits` activation bits actually uses: "pow2" and "pow2-fast" are
    "pow2" at POW2_BITS; at other bit-widths "pow2" is "block" and "pow2-fast" is None (no auto-scale)."""
    if granularity in ("pow2", "pow2-fast"):
        return "pow2" if bits == POW2_BITS else ("block" if granularity == "pow2" else None)
    return granularity


def ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(v)) of positive float32 values, as int32 (no float log: frexp is exact)."""
    m, e = torch.frexp(v)  # v = m * 2**e, m in [0.5, 1)
    return (e - (m == 0.5).to(e.dtype)).to(torch.int32)


def auto_scale(xr: torch.Tensor, granularity: str, block: int) -> torch.Tensor:
    """Per-input-channel scale vector l (length K) from the live activations xr [M, K].

    "channel": l_j = max_i |xr_ij|.  "block": l is constant within K-blocks of `block` channels,
    the max over all tokens and channels of the block (what an integer GEMM can apply per K-block).
    "pow2": l_j = 2**e_j, e_j = max(ceil(log2(max_i |xr_ij|)), E - POW2_OCTAVES), E the largest
    (call scale_granularity first: "pow2" is for POW2_BITS only).
    """
    amax = xr.abs().amax(dim=0).float()
    if granularity == "block":
        k = amax.shape[0]
        amax = amax.reshape(k // block, block).amax(dim=1, keepdim=True).expand(k // block, block).reshape(k)
    elif granularity == "pow2":
        e = ceil_log2(amax.clamp_min(EPS))
        e = torch.maximum(e, e.max() - POW2_OCTAVES)
        return torch.ldexp(torch.ones_like(amax), e)
    elif granularity != "channel":
        raise ValueError(f"scale granularity must be 'block', 'channel' or 'pow2', got {granularity!r}")
    return amax.clamp_min(EPS)


def quantize_per_token(xr: torch.Tensor, bits: int, l: torch.Tensor = None):
    """Symmetric dynamic per-token (row) quantization of xr / l, l the auto-scale (per channel,
    length K; None means l = 1). Returns int8 codes and float32 row scales s:

    s_i = max(max_j |xr_ij| / l_j, EPS) / qmax,  q_ij = clamp(round(xr_ij * r_ij), -qmax - 1, qmax)
    with r_ij = 1 / (l_j * s_i) rounded to float32: one multiplication per element instead of two
    divisions (the kernels compute r once per row and scale block, the same float32 value).
    The dequantized value is q * s * l.
    """
    qmax = 2 ** (bits - 1) - 1
    xr = xr.float()
    amax = (xr.abs() if l is None else xr.abs() / l).amax(dim=-1).clamp_min(EPS)
    # a tensor divisor: on CUDA, torch divides by a Python number as a multiply by its reciprocal,
    # which is not the IEEE division the kernels (and the CPU) do
    s = amax / torch.full_like(amax, qmax)
    ls = s.unsqueeze(-1) if l is None else l * s.unsqueeze(-1)
    q = torch.round(xr * (1.0 / ls)).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, s
