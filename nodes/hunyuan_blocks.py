"""ComfyUI's HunyuanVideo blocks (flux's DoubleStreamBlock and SingleStreamBlock) with their
elementwise steps as one kernel each.

Around the linear layers the host modulates (LayerNorm, then a per-sample shift and scale), norms q
and k per head on a strided view of the qkv output, rotates them in float32 temporaries inside
flux.math.attention, concatenates the image and text q/k/v of the double block, and adds gated
residuals. Models that the pack loads or quantizes get subclasses whose forwards do the host's
steps with those replaced by dvdq_core.hunyuan_ops (the same math; on the CPU the same PyTorch
ops): the q/k norm and rotation write the attention's [B, H, L, D] input directly (no torch.cat for
q and k), and the text / single-stream residuals are still updated in place as the host's `+=` do.

As for Wan (nodes/wan_blocks.py; what both share is nodes/block_fusion.py), the forwards are the pack's
own versions of the host's (same steps, same order), installed only where the host's code is the one
they follow: the block forwards, `attention` and `apply_mod` of comfy.ldm.flux, and the QKNorm /
RMSNorm forwards (eps 1e-6) have the signature and the names fingerprinted here (ComfyUI 0.3.x).
Otherwise the model keeps the host's forwards and a warning says so. Only the blocks inside a HunyuanVideo model
switch (Flux shares the classes).
I2V guiding frames (`modulation_dims`: the first latent frame's tokens modulated by one vector, the
rest by another, which the host applies to slices in place) run fused too, for a batch of one and
the two forms HunyuanVideo.forward_orig passes (dvdq_core.hunyuan_ops.kernel_dims), with the host's
roundings. A call the fused forward does not take runs the host's forward: other `modulation_dims`
(or a larger batch with them), no rotary embedding, q/k norms that are not the host's plain RMSNorm,
or flux's `attention` / `apply_mod` replaced after fusing; the log says which, once per reason.
DVDQ_FUSE_BLOCKS=0 (or DVDQ_FUSE_WAN=0) turns it off.
"""
import logging
import sys

import torch
from torch import nn

from ..dvdq_core.hunyuan_ops import gated_add, gated_add_, head_norm_rope, kernel_dims, modulated_norm
from .block_fusion import (
    bare_layer_norm,
    fused_subclass,
    host_attr,
    host_changed,
    host_function_mismatch,
    plain_norm,
    restore_classes,
    switched_off,
)

log = logging.getLogger("dvdq")

# what our forwards expect of the host's (signature, names used[, constants])
DOUBLE_BLOCK = (("self", "img", "txt", "vec", "pe", "attn_mask", "modulation_dims_img", "modulation_dims_txt",
                 "transformer_options"),
                {"apply_mod", "attention", "cat", "dtype", "flipped_img_txt", "float16", "gate", "img_attn", "img_mlp",
                 "img_mod", "img_norm1", "img_norm2", "nan_to_num", "norm", "num_heads", "permute", "proj", "qkv",
                 "scale", "shape", "shift", "torch", "txt_attn", "txt_mlp", "txt_mod", "txt_norm1", "txt_norm2",
                 "view"})
SINGLE_BLOCK = (("self", "x", "vec", "pe", "attn_mask", "modulation_dims", "transformer_options"),
                {"apply_mod", "attention", "cat", "dtype", "float16", "gate", "hidden_size", "linear1", "linear2",
                 "mlp_act", "mlp_hidden_dim", "modulation", "nan_to_num", "norm", "num_heads", "permute", "pre_norm",
                 "scale", "shape", "shift", "split", "torch", "view"})
ATTENTION = (("q", "k", "v", "pe", "mask", "transformer_options"),
             {"dtype", "optimized_attention", "reshape", "shape", "to", "type_as"})
APPLY_MOD = (("tensor", "m_mult", "m_add", "modulation_dims"), {"addcmul", "torch"})
QK_NORM = (("self", "q", "k", "v"), {"key_norm", "query_norm", "to"})
RMS_EPS = 1e-6  # the host's RMSNorm.forward passes this constant (RMS_NORM checks it is there)
RMS_NORM = (("self", "x"), {"comfy", "common_dit", "ldm", "rms_norm", "scale"}, {RMS_EPS})
_FUSED_CLASSES = {}  # host class -> our subclass
_HOST = {}  # the host functions fingerprinted when fusing (calls go to the host's forward if they change)


def _modulated(norm: nn.Module, x, mod, dims):
    """The host's apply_mod(norm(x), 1 + mod.scale, mod.shift, dims): one kernel where the norm is a bare
    LayerNorm (wan_blocks), else the host's own apply_mod."""
    if bare_layer_norm(norm, x):
        return modulated_norm(x, mod.shift, mod.scale, norm.eps, dims)
    return _HOST["apply_mod"](norm(x), 1 + mod.scale, mod.shift, dims)


_PATCHED_NORMS = "q/k norms that ComfyUI patches (a LoRA on them)"


def _qk_weights(qk_norm: nn.Module):
    """(query weight, key weight) of the host's QKNorm of two plain host RMSNorms, else None."""
    norms = (getattr(qk_norm, "query_norm", None), getattr(qk_norm, "key_norm", None))
    if getattr(type(qk_norm), "forward", None) is not _HOST["QKNorm"] or \
            any(getattr(type(n), "forward", None) is not _HOST["RMSNorm"] or not plain_norm(n) for n in norms):
        return None
    return norms[0].scale, norms[1].scale


_SAID = set()  # the reasons already logged


def _host_reason(host, pe, x, vec, *modulation_dims) -> str | None:
    """Why this call goes to the host's forward (see the module docstring), None when the fused one
    takes it; x: the block's (image) tokens, vec: what its Modulation takes ([B, C], or [B, F, C])."""
    vectors = vec.shape[1] if vec.ndim == 3 else 1
    if pe is None:
        return "a call without rotary embedding"
    if any(d is not None and kernel_dims(d, x.shape[0], vectors) is None for d in modulation_dims):
        return ("per-frame modulation other than an image-to-video start frame at batch size 1 (only that form "
                "is fused)")
    if host.attention is not _HOST["attention"] or host.apply_mod is not _HOST["apply_mod"]:
        return "flux's attention or apply_mod replaced after loading (by another extension?)"
    return None


def _to_host(reason: str) -> None:
    """Log once per reason that calls run the host's forward: correct, at the host's speed."""
    if reason not in _SAID:
        _SAID.add(reason)
        log.warning("DVD-Quant: HunyuanVideo blocks run ComfyUI's own forward (correct, slower) for %s.", reason)


def _v(qkv, heads: int):
    """v as the host takes it from the qkv output: [B, H, L, D], a view."""
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)[2]


def _attention(host, q, k, v, mask, transformer_options):
    """flux.math.attention after its rotation (q and k come rotated): the host's optimized_attention."""
    math = sys.modules[host.attention.__module__]
    return math.optimized_attention(q, k, v, q.shape[1], skip_reshape=True, mask=mask,
                                    transformer_options=transformer_options)


def _fused_class(cls, kind: str, host):
    """Our subclass of cls (a host block class, or a subclass keeping its forward); host: the module
    comfy.ldm.flux.layers."""
    if kind == "double":
        class Fused(cls):
            """The host's DoubleStreamBlock.forward (image tokens first) with the modulations, q/k norm +
            rotation (into one buffer for image and text) and gated residuals fused."""

            def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                        transformer_options={}):
                dims_i, dims_t = modulation_dims_img, modulation_dims_txt
                why = _host_reason(host, pe, img, vec, dims_i, dims_t) or \
                    (None if self.flipped_img_txt else "text tokens before the image tokens (flipped_img_txt off)")
                iw, tw = (None, None) if why else (_qk_weights(self.img_attn.norm), _qk_weights(self.txt_attn.norm))
                if why or iw is None or tw is None:
                    _to_host(why or _PATCHED_NORMS)
                    return super().forward(img, txt, vec, pe, attn_mask=attn_mask,
                                           modulation_dims_img=modulation_dims_img,
                                           modulation_dims_txt=modulation_dims_txt,
                                           transformer_options=transformer_options)
                img_mod1, img_mod2 = self.img_mod(vec)
                txt_mod1, txt_mod2 = self.txt_mod(vec)
                img_qkv = self.img_attn.qkv(_modulated(self.img_norm1, img, img_mod1, dims_i))
                txt_qkv = self.txt_attn.qkv(_modulated(self.txt_norm1, txt, txt_mod1, dims_t))
                c, h = img_qkv.shape[-1] // 3, self.num_heads
                iw, tw = [w.to(img_qkv) for w in iw], [w.to(txt_qkv) for w in tw]  # as the host's rms_norm casts
                q = head_norm_rope(img_qkv[..., :c], iw[0], RMS_EPS, pe, h, txt_qkv[..., :c], tw[0])
                k = head_norm_rope(img_qkv[..., c:2 * c], iw[1], RMS_EPS, pe, h, txt_qkv[..., c:2 * c], tw[1])
                v = torch.cat((_v(img_qkv, h), _v(txt_qkv, h)), dim=2)
                del img_qkv, txt_qkv
                attn = _attention(host, q, k, v, attn_mask, transformer_options)
                del q, k, v
                img_attn, txt_attn = attn[:, :img.shape[1]], attn[:, img.shape[1]:]
                img = gated_add(img, self.img_attn.proj(img_attn), img_mod1.gate, dims_i)
                img = gated_add(img, self.img_mlp(_modulated(self.img_norm2, img, img_mod2, dims_i)), img_mod2.gate,
                                dims_i)
                gated_add_(txt, self.txt_attn.proj(txt_attn), txt_mod1.gate, dims_t)
                gated_add_(txt, self.txt_mlp(_modulated(self.txt_norm2, txt, txt_mod2, dims_t)), txt_mod2.gate, dims_t)
                if txt.dtype == torch.float16:
                    txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
                return img, txt
    else:
        class Fused(cls):
            """The host's SingleStreamBlock.forward with the modulation, q/k norm + rotation and gated
            residual fused."""

            def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
                why = _host_reason(host, pe, x, vec, modulation_dims)
                w = None if why else _qk_weights(self.norm)
                if w is None:
                    _to_host(why or _PATCHED_NORMS)
                    return super().forward(x, vec, pe, attn_mask=attn_mask, modulation_dims=modulation_dims,
                                           transformer_options=transformer_options)
                mod, _ = self.modulation(vec)
                qkv, mlp = torch.split(self.linear1(_modulated(self.pre_norm, x, mod, modulation_dims)),
                                       [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
                c, h = self.hidden_size, self.num_heads
                w = [t.to(qkv) for t in w]  # as the host's rms_norm casts
                q = head_norm_rope(qkv[..., :c], w[0], RMS_EPS, pe, h)
                k = head_norm_rope(qkv[..., c:2 * c], w[1], RMS_EPS, pe, h)
                attn = _attention(host, q, k, _v(qkv, h), attn_mask, transformer_options)
                del q, k, qkv
                output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
                gated_add_(x, output, mod.gate, modulation_dims)
                if x.dtype == torch.float16:
                    x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
                return x
    return Fused


def host_mismatch(layers) -> str | None:
    """None when comfy.ldm.flux.layers (`layers`) has the code the fused forwards follow, else what differs
    (a name that is gone or not a function, e.g. RMSNorm = None in newer ComfyUI, counts as different)."""
    for what, expected in (("DoubleStreamBlock.forward", DOUBLE_BLOCK), ("SingleStreamBlock.forward", SINGLE_BLOCK),
                           ("attention", ATTENTION), ("apply_mod", APPLY_MOD), ("QKNorm.forward", QK_NORM),
                           ("RMSNorm.forward", RMS_NORM)):
        why = host_function_mismatch(host_attr(layers, what), expected)
        if why is not None:
            return f"{what}: {why}"
    return None


def fuse_hunyuan(diffusion_model: nn.Module) -> tuple[int, str | None]:
    """Switch the DoubleStreamBlock and SingleStreamBlock modules of a ComfyUI HunyuanVideo model (and
    subclasses that keep their forward) to the fused forwards. Returns (modules switched, None) or
    (0, a short reason for the UI) when they stay the host's (the log has the details). Idempotent."""
    off = switched_off()
    if off:
        return 0, off
    try:
        import comfy.ldm.flux.layers as layers
        from comfy.ldm.hunyuan_video.model import HunyuanVideo
    except ImportError:  # another host layout: nothing of ours to replace
        return 0, None
    if not isinstance(diffusion_model, HunyuanVideo):
        return 0, None
    kinds = (("double", layers.DoubleStreamBlock), ("single", layers.SingleStreamBlock))
    targets = [(m, kind) for m in diffusion_model.modules() for kind, base in kinds
               if isinstance(m, base) and type(m).forward is base.forward]
    if not targets:
        return 0, None
    why = host_mismatch(layers)
    if why is not None:
        return 0, host_changed("HunyuanVideo", why)
    _HOST.update(attention=layers.attention, apply_mod=layers.apply_mod, QKNorm=layers.QKNorm.forward,
                 RMSNorm=layers.RMSNorm.forward)
    for m, kind in targets:
        m.__class__ = fused_subclass(_FUSED_CLASSES, type(m), lambda cls: _fused_class(cls, kind, layers))
    return len(targets), None


def unfuse_hunyuan(diffusion_model: nn.Module) -> int:
    """Undo fuse_hunyuan (benchmarks measure what it saves); returns how many modules."""
    return restore_classes(diffusion_model, _FUSED_CLASSES)
