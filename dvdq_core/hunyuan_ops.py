"""The elementwise steps of a HunyuanVideo block (ComfyUI's flux DoubleStreamBlock and
SingleStreamBlock) around its linear layers, each as one kernel.

Like Wan's (wan_ops), the host's steps are memory-bound chains of PyTorch ops: the q/k of each
head are RMS-normed on a strided view of the qkv projection's output, rotated in float32
temporaries and, in the double block, concatenated image then text; the gates broadcast a
per-sample vector. Here:

- modulated_norm: wan_ops.modulated_norm as is: `apply_mod(norm(x), 1 + scale, shift)` is
  `torch.addcmul(shift, layer_norm(x), 1 + scale)`, Wan's formula with the same roundings.
- head_norm_rope: the q (or k) columns of the qkv output [B, L, 3 H D] -> per-head RMS norm with
  the weight (`scale`), rotary embedding -> [B, H, L, D]; with a second part (the double block's
  text) both land in one [B, H, L + L2, D] buffer, image tokens first.
- gated_add / gated_add_: `x + y * gate` and `x += y * gate`. Unlike Wan's addcmul (one rounding)
  the host rounds the product to the dtype before the sum; the kernel does too (for bf16/fp16 the
  result is then the host's bit for bit). gated_add_ updates x in place as the host's `txt +=` /
  `x +=` do.

The `*_reference` functions are the host's ops (ComfyUI's formulas, same order, views and dtypes):
the path on the CPU, bit for bit the host's; on a GPU the Triton kernels (kernels/) give the same
values up to float rounding, and a call they cannot take uses the reference and says once why.

Shapes: x, y [B, L, C]; shift, scale, gate [B, 1, C] in x's dtype (one vector per sample: per-frame
modulation, `modulation_dims`, stays with the host); pe [B or 1, 1, L, D/2, 2, 2] float32 (the
2 x 2 rotation of each channel pair, ComfyUI's flux layout).
"""
import torch
import torch.nn.functional as F

from .wan_ops import _fused, modulated_norm

__all__ = ["modulated_norm", "head_norm_rope", "gated_add", "gated_add_", "head_norm_rope_reference",
           "gated_add_reference", "gated_add_inplace_reference"]


def _head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """The host's view [B, H, L, D] of x [B, L, H * D] (its permute of the qkv output), RMS-normed per head
    as comfy.rmsnorm.rms_norm (weight cast to x's dtype)."""
    b, l, c = x.shape
    h = x.view(b, l, heads, c // heads).transpose(1, 2)
    return F.rms_norm(h, (c // heads,), weight=weight.to(device=h.device, dtype=h.dtype), eps=eps)


def head_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, pe: torch.Tensor, heads: int,
                             x2: torch.Tensor | None = None, weight2: torch.Tensor | None = None) -> torch.Tensor:
    """QKNorm (RMS norm per head, rounded to x's dtype), the double block's torch.cat of the image (x)
    and text (x2) parts, then flux.math.attention's rotation in float32 -> [B, H, L + L2, D] in x's dtype."""
    q = _head_norm(x, weight, eps, heads)
    if x2 is not None:
        q = torch.cat((q, _head_norm(x2, weight2, eps, heads)), dim=2)
    shape = q.shape
    q32 = q.to(dtype=pe.dtype).reshape(*shape[:-1], -1, 1, 2)
    return (pe[..., 0] * q32[..., 0] + pe[..., 1] * q32[..., 1]).reshape(*shape).type_as(q)


def gated_add_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x + y * gate


def gated_add_inplace_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x += y * gate
    return x


def head_norm_rope(x, weight, eps: float, pe, heads: int, x2=None, weight2=None) -> torch.Tensor:
    return _fused("head_norm_rope", "HunyuanVideo's per-head q/k norm and rotary embedding", head_norm_rope_reference,
                  x, weight, float(eps), pe, heads, x2, weight2)


def gated_add(x, y, gate) -> torch.Tensor:
    return _fused("gated_add", "HunyuanVideo's gated residual", gated_add_reference, x, y, gate)


def gated_add_(x, y, gate) -> torch.Tensor:
    """x += y * gate in place; returns x."""
    _fused("gated_add_inplace", "HunyuanVideo's gated residual (in place)", gated_add_inplace_reference, x, y, gate)
    return x
