"""8-bit attention, data-free: softmax(q k^T * scale) v with QK^T in INT8 and P.V in FP8 (or 16-bit).

Every scale comes from the tensors of the call (nothing calibrated, nothing stored):
- K is smoothed by its per-channel mean over the tokens (k - mean): each row of q k^T changes by a
  constant, which softmax ignores, and the INT8 grid then covers the spread instead of the offset
  (DiT keys carry large per-channel offsets).
- Q is quantized per token (one scale per row; free in the kernel, whose score tile is scaled per row
  anyway) and the smoothed K per block of `block_n` tokens (the kernel's tile), both symmetric INT8
  (codes in [-127, 127]). The softmax scale and log2(e) ride on Q's scales: the kernel runs exp2.
- Online softmax as FlashAttention: per key block, running row max m and sum l in float32.
- P.V, form "fp8": P = exp2(s - m + 8) (<= 256) rounded to FP8 e4m3; V smoothed by its per-channel
  mean too (added back at the end) and rounded to FP8 e4m3 with one scale per channel (its absmax over
  the tokens / 448). Each block's product is summed into a float32 accumulator outside the MMA (the
  FP8 MMA's own accumulator keeps fewer bits). l sums the unrounded P, so 256 cancels.
  Form "fp16": P rounded to V's dtype (bf16/fp16), V as it is, float32 accumulation.
- The output has q's dtype.

`attention_reference` is that math in float32 PyTorch, block by block in the kernel's order, so the
Triton kernel (dvdq_core/kernels/_attention.py) matches it up to float rounding. `attention_q8` picks
the kernel where `why_not` says it can run, else the reference (with a one-time warning).
"""
import math
import warnings

import torch

EPS = 1e-8
LOG2E = 1.4426950408889634
Q_MAX = 127.0  # INT8 codes of q and k
V_MAX = 448.0  # largest finite FP8 e4m3 value: V's per-channel scale maps its absmax there
P_SHIFT = 8.0  # fp8 form: P = 2**(s - m + 8) <= 256, inside e4m3's normal range down to 2**-6 * 2**-8
PV_FORMS = ("auto", "fp8", "fp16")
HEAD_DIMS = (32, 64, 128)
DEFAULT_BLOCK_N = 64  # the reference's key block where none is given (the kernel passes its own)

_WARNED = set()


def _is_fp8_card(device) -> bool:
    """FP8 P.V on sm_90 only: the card it was built and measured on (Ada and Blackwell have FP8 MMA too,
    untested: they take the 16-bit form)."""
    from .kernels import configs
    cap = torch.cuda.get_device_capability(device)
    return configs.target_capability(cap) == (9, 0)


def resolve_pv(pv: str, device) -> str:
    if pv not in PV_FORMS:
        raise ValueError(f"pv must be one of {', '.join(PV_FORMS)}, got {pv!r}")
    if pv == "fp8" and device.type == "cuda" and not _is_fp8_card(device):
        if "fp8 card" not in _WARNED:  # the FP8 dot needs Hopper's (and is built and measured there only)
            _WARNED.add("fp8 card")
            warnings.warn("DVD-Quant 8-bit attention: P.V in FP8 runs on H100/H200 (sm_90) only; this card takes "
                          "the 16-bit P.V form", RuntimeWarning, stacklevel=2)
        return "fp16"
    if pv != "auto":
        return pv
    return "fp8" if device.type == "cuda" and _is_fp8_card(device) else "fp16"


def shape_reason(q, k, v, mask=None) -> str | None:
    """What the 8-bit attention cannot take about the call itself (shapes, dtypes, mask), or None."""
    if mask is not None:
        return "the call has an attention mask"
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v are not all tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v of {q.dim()}, {k.dim()}, {v.dim()} dims are not [batch, heads, tokens, head dim]"
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                "(grouped-query or cross-width attention is not supported)")
    if d not in HEAD_DIMS:
        return f"head dim {d} is not {', '.join(map(str, HEAD_DIMS))}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "an empty sequence"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} are not all bf16 or all fp16"
    if len({t.device for t in (q, k, v)}) != 1:
        return "q, k and v are on different devices"
    return None


def why_not(q, k, v, mask=None) -> str | None:
    """Why the GPU kernel cannot run this call here (a sentence for the user), or None when it can."""
    why = shape_reason(q, k, v, mask)
    if why is not None:
        return why
    if q.device.type != "cuda":
        return f"the tensors are on {q.device.type}, and the 8-bit attention kernel runs on CUDA GPUs only"
    if torch.version.hip is not None:
        return "ROCm GPUs are not supported by the 8-bit attention kernel"
    from . import kernels
    cap = kernels._capability(q.device)
    if cap < kernels.MIN_CAPABILITY:
        return f"GPU compute capability {cap[0]}.{cap[1]} < 8.0"
    return kernels._triton_missing()


def _fp8(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to FP8 e4m3 (nearest even) and back."""
    return x.to(torch.float8_e4m3fn).float()


def _round_int8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """clamp(rint(x * (127 / amax)), -127, 127), float32 codes; as the kernel: one IEEE reciprocal-style
    division per scale, then one multiply per element."""
    return torch.round(x * (Q_MAX / amax)).clamp_(-Q_MAX, Q_MAX)


def quantize_qkv(q, k, v, scale: float, block_n: int, pv: str):
    """The codes and scales the kernel computes (float32 tensors holding integers / FP8 values):
    (q8 [B,H,L,D], qs [B,H,L,1], k8 [B,H,Lk,D], ks [B,H,NB], v8 [B,H,Lk,D], vs [B,H,1,D], vm [B,H,1,D])."""
    qf, kf, vf = q.float(), k.float(), v.float()
    qa = qf.abs().amax(-1, keepdim=True).clamp_min(EPS)
    q8 = _round_int8(qf, qa)
    qs = (qa / Q_MAX) * (scale * LOG2E)  # softmax scale and log2(e) on Q's scale: the scores are log2-based
    lk = kf.shape[2]
    nb = -(-lk // block_n)
    ksm = kf - kf.mean(2, keepdim=True)
    pad = torch.nn.functional.pad(ksm, (0, 0, 0, nb * block_n - lk))
    ka = pad.unflatten(2, (nb, block_n)).abs().amax((-1, -2)).clamp_min(EPS)  # [B, H, NB]
    k8 = _round_int8(pad.unflatten(2, (nb, block_n)), ka[..., None, None]).flatten(2, 3)[:, :, :lk]
    ks = ka / Q_MAX
    if pv == "fp8":
        vm = vf.mean(2, keepdim=True)
        vc = vf - vm
        va = vc.abs().amax(2, keepdim=True).clamp_min(EPS)
        v8 = _fp8(vc * (V_MAX / va))
        vs = va / V_MAX
    else:
        v8, vs, vm = vf, None, None
    return q8, qs, k8, ks, v8, vs, vm


@torch.no_grad()
def attention_reference(q, k, v, *, scale: float | None = None, pv: str = "fp8",
                        block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """The 8-bit attention in float32 PyTorch, key block by key block as the kernel runs it.
    q, k, v: [B, H, L, D] bf16/fp16 (any device); returns [B, H, L, D] in q's dtype."""
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"the reference computes pv 'fp8' or 'fp16', got {pv!r}")
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    q8, qs, k8, ks, v8, vs, vm = quantize_qkv(q, k, v, scale, block_n, pv)
    lk = k.shape[2]
    shift = P_SHIFT if pv == "fp8" else 0.0
    m = torch.full(q.shape[:3] + (1,), -math.inf, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(q.shape, device=q.device)
    for j, n0 in enumerate(range(0, lk, block_n)):
        kb, vb = k8[:, :, n0:n0 + block_n], v8[:, :, n0:n0 + block_n]
        s = (q8 @ kb.transpose(-1, -2)) * (qs * ks[:, :, j, None, None])  # integer dot: exact in float32
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - (m_new - shift))
        l = l * alpha + p.sum(-1, keepdim=True)
        p = _fp8(p) if pv == "fp8" else p.to(v.dtype).float()
        acc = acc * alpha + p @ vb
        m = m_new
    out = acc / l
    if pv == "fp8":
        out = out * vs + vm
    return out.to(q.dtype)


def _warn_once(msg: str):
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def attention_q8(q, k, v, *, scale: float | None = None, pv: str = "auto", backend: str = "auto",
                 out_layout: str = "bhld") -> torch.Tensor:
    """softmax(q k^T * scale) v with 8-bit QK^T (and FP8 or 16-bit P.V): q, k, v [B, H, L, D] bf16/fp16,
    any strides. Returns q's dtype, [B, H, L, D] ("bhld") or [B, L, H, D] contiguous ("blhd", the
    layout a [B, L, H * D] caller reshapes for free).
    pv: "fp8" (sm_90), "fp16" (P.V in the input's 16-bit type), "auto" (fp8 on sm_90, else fp16).
    backend: "triton" (raises where why_not says no), "reference" (float32 PyTorch, slow), "auto"."""
    if out_layout not in ("bhld", "blhd"):
        raise ValueError(f"out_layout must be 'bhld' or 'blhd', got {out_layout!r}")
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be auto, triton or reference, got {backend!r}")
    why = shape_reason(q, k, v)
    if why is not None:
        raise ValueError(f"DVD-Quant 8-bit attention cannot take this call: {why}")
    form = resolve_pv(pv, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend != "reference":
        why = why_not(q, k, v)
        if why is None:
            from . import kernels
            return kernels.attention_q8(q, k, v, scale, form == "fp8", out_layout == "blhd")
        if backend == "triton":
            raise RuntimeError(f"DVD-Quant: the 8-bit attention kernel cannot run this call: {why}")
        _warn_once(f"DVD-Quant: 8-bit attention runs on the PyTorch reference (correct, slow) because {why}.")
    out = attention_reference(q, k, v, scale=scale, pv=form)
    return out.transpose(1, 2).contiguous() if out_layout == "blhd" else out
