"""The elementwise steps of a HunyuanVideo block (ComfyUI's flux DoubleStreamBlock and
SingleStreamBlock) around its linear layers, each as one kernel.

Like Wan's (wan_ops), the host's steps are memory-bound chains of PyTorch ops: the q/k of each
head are RMS-normed on a strided view of the qkv projection's output, rotated in float32
temporaries and, in the double block, concatenated image then text; the gates broadcast a
per-sample vector. Here:

- modulated_norm: `apply_mod(norm(x), 1 + scale, shift, dims)`. Without dims that is
  `torch.addcmul(shift, layer_norm(x), 1 + scale)`, wan_ops.modulated_norm's formula with the same
  roundings, which runs as is; with dims (below) the host multiplies, then adds, in place: the
  product is rounded to the dtype before the sum, and the kernel does so too.
- head_norm_rope: the q (or k) columns of the qkv output [B, L, 3 H D] -> per-head RMS norm with
  the weight, rotary embedding -> [B, H, L, D]; with a second part (the double block's other stream)
  both land in one [B, H, L + L2, D] buffer, the first part first (image tokens first in ComfyUI
  0.3.x and 0.8.0, text first in 0.33.0). The rotation's reference is flux.math.attention's sum of
  products (0.3.x) or, with addcmul, comfy-kitchen's apply_rope (0.8.0 on): product, then addcmul_.
- gated_add / gated_add_: `x + apply_mod(y, gate, None, dims)` and `x += ...`: unlike Wan's addcmul
  (one rounding) the host rounds the product to the dtype before the sum, with dims or without; the
  kernel does too (for bf16/fp16 the result is then the host's bit for bit). gated_add_ updates x in
  place as the host's `txt +=` / `x +=` do.

dims: the host's `modulation_dims`. With an I2V guiding frame ("v2 (replace)", `guiding_frame_index`)
HunyuanVideo.forward_orig gives two modulation vectors per sample and, for the image tokens (and in
the single-stream blocks the image + text tokens), `[(0, T0, 0), (T0, None, 1)]`: the first latent
frame's T0 tokens use vector 0, the rest vector 1; for the text tokens `[(0, None, 1)]`. The kernels
take these two forms for a batch of one (kernel_dims): the host's `tensor[:, a:b] *= m[:, i]`
broadcasts the [B, C] vectors as [1, B, C], over the tokens, which is per sample only for B = 1;
other batches, and any other dims, run the references (the host's loop).

The `*_reference` functions are the host's ops (ComfyUI's formulas, same order, views and dtypes;
`modulate` is flux's apply_mod, written out): the path on the CPU, bit for bit the host's; on a GPU the Triton
kernels (dvdq_core/kernels/) give the same values up to float rounding, and a call they cannot take uses the
reference and says once why.

Shapes: x, y [B, L, C]; shift, scale, gate [B, 1, C] in x's dtype (one vector per sample), or [B, 2, C]
with dims; pe [B or 1, 1, L, D/2, 2, 2] float32 (the 2 x 2 rotation of each channel pair, ComfyUI's
flux layout).
"""
import functools

import torch
import torch.nn.functional as F

from . import wan_ops
from .wan_ops import _fused

__all__ = ["modulated_norm", "head_norm_rope", "gated_add", "gated_add_", "modulate", "kernel_dims",
           "modulated_norm_reference", "head_norm_rope_reference", "gated_add_reference", "gated_add_inplace_reference"]


def modulate(t: torch.Tensor, mult: torch.Tensor, add: torch.Tensor | None = None, dims=None) -> torch.Tensor:
    """The host's modulation (what flux's `apply_mod` computes in ComfyUI 0.3.x; tests/host compares
    the two on the same inputs). Without dims: add + t * mult rounded once (addcmul), or t * mult.
    With dims, for each (start, end, i): t's tokens [start, end) are scaled by mult[:, i] in place
    (rounded to t's dtype), then shifted by add[:, i] (rounded again); returns t."""
    if dims is None:
        return t * mult if add is None else torch.addcmul(add, t, mult)
    for start, end, i in dims:
        part = t[:, start:end]
        part.mul_(mult[:, i])
        if add is not None:
            part.add_(add[:, i])
    return t


def _entry(e) -> bool:
    return isinstance(e, (tuple, list)) and len(e) == 3 and all(v is None or type(v) is int for v in e)


def kernel_dims(dims, batch: int, vectors: int) -> tuple[slice, int] | None:
    """The kernels' form of the host's modulation_dims for x of `batch` samples and [batch, vectors, C]
    modulation vectors: (the vectors they read, first_tokens). [(0, None, i)] -> (i:i+1, 0): vector
    i for every token; [(0, T0, 0), (T0, None, 1)] with 0 < T0 -> (0:2, T0): vector 0 for the first T0
    tokens, vector 1 for the rest. None for any other dims and for a batch other than one (the host's
    `[B, n, C] *= [B, C]` broadcasts the batch of vectors over the tokens)."""
    if batch != 1 or not isinstance(dims, (tuple, list)) or not all(_entry(e) for e in dims):
        return None
    if len(dims) == 1:
        a, b, i = dims[0]
        if a == 0 and b is None and i is not None and 0 <= i < vectors:
            return slice(i, i + 1), 0
    elif len(dims) == 2:
        (a0, b0, i0), (a1, b1, i1) = dims
        if a0 == 0 and b0 is not None and b0 > 0 and a1 == b0 and b1 is None and (i0, i1) == (0, 1) and vectors >= 2:
            return slice(0, 2), b0
    return None


def _kernel_form(dims, x: torch.Tensor, v: torch.Tensor):
    """kernel_dims for x [B, L, C] and vectors v [B, F, C]."""
    if x.dim() != 3 or v.dim() != 3 or v.shape[0] != x.shape[0]:
        return None
    return kernel_dims(dims, x.shape[0], v.shape[1])


def modulated_norm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                             dims=None) -> torch.Tensor:
    """The host's `apply_mod(norm(x), 1 + scale, shift, dims)` with its LayerNorm (no affine)."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale, shift, dims)


def _head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """The host's view [B, H, L, D] of x [B, L, H * D] (its permute of the qkv output), RMS-normed per head
    as comfy.rmsnorm.rms_norm (weight cast to x's dtype)."""
    b, l, c = x.shape
    h = x.view(b, l, heads, c // heads).transpose(1, 2)
    return F.rms_norm(h, (c // heads,), weight=weight.to(device=h.device, dtype=h.dtype), eps=eps)


def head_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, pe: torch.Tensor, heads: int,
                             x2: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
                             addcmul: bool = False) -> torch.Tensor:
    """QKNorm (RMS norm per head, rounded to x's dtype), the double block's torch.cat of the first (x)
    and second (x2) parts, then the rotation in float32 -> [B, H, L + L2, D] in x's dtype: flux.math.attention's
    sum of the two products (ComfyUI 0.3.x), or with addcmul comfy-kitchen's apply_rope that newer hosts call
    (the first product, then addcmul_ of the second: on the CPU another rounding)."""
    q = _head_norm(x, weight, eps, heads)
    if x2 is not None:
        q = torch.cat((q, _head_norm(x2, weight2, eps, heads)), dim=2)
    shape = q.shape
    q32 = q.to(dtype=pe.dtype).reshape(*shape[:-1], -1, 1, 2)
    if addcmul:
        out = pe[..., 0] * q32[..., 0]
        out.addcmul_(pe[..., 1], q32[..., 1])
    else:
        out = pe[..., 0] * q32[..., 0] + pe[..., 1] * q32[..., 1]
    return out.reshape(*shape).type_as(q)


def gated_add_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, dims=None) -> torch.Tensor:
    """The host's `img + apply_mod(y, gate, None, dims)` (with dims y is scaled in place, as there)."""
    return x + modulate(y, gate, None, dims)


def gated_add_inplace_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, dims=None) -> torch.Tensor:
    """The host's `txt += apply_mod(y, gate, None, dims)`."""
    x += modulate(y, gate, None, dims)
    return x


def modulated_norm(x, shift, scale, eps: float, dims=None) -> torch.Tensor:
    if dims is None:
        return wan_ops.modulated_norm(x, shift, scale, eps)
    args = (x, shift, scale, float(eps), dims)
    form = _kernel_form(dims, x, shift)
    if form is None:
        return modulated_norm_reference(*args)
    return _fused("modulated_norm_dims", "HunyuanVideo's modulated LayerNorm with modulation_dims (I2V guiding frame)",
                  modulated_norm_reference, x, shift[:, form[0]], scale[:, form[0]], float(eps), form[1],
                  reference_args=args)


_head_norm_rope_addcmul = functools.partial(head_norm_rope_reference, addcmul=True)


def head_norm_rope(x, weight, eps: float, pe, heads: int, x2=None, weight2=None, addcmul: bool = False) -> torch.Tensor:
    """addcmul: the rotation as the reference's addcmul form (the kernel's is the same math either way)."""
    reference = _head_norm_rope_addcmul if addcmul else head_norm_rope_reference
    return _fused("head_norm_rope", "HunyuanVideo's per-head q/k norm and rotary embedding", reference,
                  x, weight, float(eps), pe, heads, x2, weight2)


def _gated(name: str, what: str, reference, x, y, gate, dims):
    """The gate kernel `name` (gated_add or gated_add_inplace) in the kernels' form of dims, else the reference."""
    form = (slice(None), 0) if dims is None else _kernel_form(dims, x, gate)
    if form is None:
        return reference(x, y, gate, dims)
    return _fused(name, what, reference, x, y, gate[:, form[0]], form[1], reference_args=(x, y, gate, dims))


def gated_add(x, y, gate, dims=None) -> torch.Tensor:
    """x + apply_mod(y, gate, None, dims). y: a temporary (the block's projection): with dims the host's
    ops (the CPU path) scale it in place."""
    return _gated("gated_add", "HunyuanVideo's gated residual", gated_add_reference, x, y, gate, dims)


def gated_add_(x, y, gate, dims=None) -> torch.Tensor:
    """x += apply_mod(y, gate, None, dims) in place; returns x. y: a temporary, as gated_add's."""
    _gated("gated_add_inplace", "HunyuanVideo's gated residual (in place)", gated_add_inplace_reference, x, y, gate,
           dims)
    return x
