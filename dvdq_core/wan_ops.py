"""The elementwise steps of a Wan block around its linear layers, each as one kernel.

As the host writes them these are memory-bound chains of PyTorch ops over the full activation
(B x S x C: 671 MB per tensor for one CFG step of Wan 14B at 480p), some in float32 temporaries,
some broadcasting a per-sample vector through PyTorch's slow non-vectorised path. Together about a
fifth of a Wan 14B step on an H100 (docs/kernel-notes.md). Each op here reads its inputs once and
writes its output once.

- norm_rope: q/k RMS norm (with weight) and the rotary embedding of the self-attention.
- modulated_norm: LayerNorm (no affine) then `shift + norm * (1 + scale)` (adaLN modulation).
- gated_residual: `x + y * gate` (the gated residual after attention and feed-forward).

The `*_reference` functions are the host's ops (ComfyUI's formulas): the ground truth, and the
path on the CPU, where results are bit for bit the host's. On a GPU the Triton kernels
(dvdq_core/kernels/) give the same values up to float rounding; a call they cannot take uses the reference
and says once why.

Shapes: x, y [B, S, C]; shift, scale, gate [B, F, C] in x's dtype: one vector per sample (F = 1), or
per frame / token (Wan 2.2 with per-frame timesteps), spread over the S tokens as ComfyUI's
`repeat_e` does (`per_token`); freqs [B or 1, S, 1, D/2, 2, 2] float32 (the 2 x 2 rotation
[[cos, -sin], [sin, cos]] of each channel pair, ComfyUI's layout).
"""
import torch
import torch.nn.functional as F

from . import backends


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, freqs: torch.Tensor,
                        heads: int) -> torch.Tensor:
    """RMS norm over the last dim (skipped when weight is None), then each head's channel pairs rotated
    in float32 -> [B, S, H, D] in x's dtype."""
    b, s, c = x.shape
    if weight is not None:
        x = F.rms_norm(x, (c,), weight=weight.to(x.dtype), eps=eps)
    pairs = x.view(b, s, heads, c // heads).to(freqs.dtype).reshape(b, s, heads, -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0]
    out.addcmul_(freqs[..., 1], pairs[..., 1])
    return out.reshape(b, s, heads, c // heads).type_as(x)


def per_token(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, F, C] vectors spread over x's S tokens (ComfyUI's repeat_e): F = 1 broadcasts; else each
    vector repeats S // F times, or S // F + 1 times cut at S when F does not divide S."""
    f, s = v.shape[1], x.shape[1]
    repeats = s // f if f > 1 else 1
    if repeats == 1:
        return v
    if repeats * f == s:
        return torch.repeat_interleave(v, repeats, dim=1)
    return torch.repeat_interleave(v, repeats + 1, dim=1)[:, :s]


def modulated_norm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.addcmul(per_token(shift, x), F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + per_token(scale, x))


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x, y, per_token(gate, x))


def _fused(name: str, what: str, reference, *args, reference_args: tuple | None = None):
    """Op `name` on the backend the registry picks for these args (dvdq_core.backends: on a GPU the
    kernels, where they cannot take the call the reference with a one-time warning; on the CPU the
    reference); the reference is called with reference_args where the kernel takes the call in
    another form (hunyuan_ops), else with args."""
    fn = backends.select(name, args, what=what)
    return reference(*(args if reference_args is None else reference_args)) if fn is None else fn(*args)


def rms_default_eps(dtype: torch.dtype) -> float:
    """torch's rms_norm epsilon where it is given None: its compute type's (float32's for bf16 / fp16)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def norm_rope(x, weight, eps, freqs, heads: int) -> torch.Tensor:
    """norm_rope_reference's result; eps None means torch's rms_norm default: the epsilon of its compute type
    (float32's for bf16 / fp16 inputs, not the input dtype's)."""
    eps = rms_default_eps(x.dtype) if eps is None else float(eps)
    return _fused("norm_rope", "the q/k norm and rotary embedding", norm_rope_reference, x, weight, eps, freqs, heads)


def modulated_norm(x, shift, scale, eps: float) -> torch.Tensor:
    return _fused("modulated_norm", "the modulated LayerNorm", modulated_norm_reference, x, shift, scale, float(eps))


def gated_residual(x, y, gate) -> torch.Tensor:
    return _fused("gated_residual", "the gated residual", gated_residual_reference, x, y, gate)
