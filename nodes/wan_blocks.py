"""ComfyUI's Wan block and self-attention with their elementwise steps as one kernel each.

Around the linear layers, ComfyUI's WanAttentionBlock modulates (LayerNorm, then a per-sample
shift and scale broadcast through PyTorch's slow non-vectorised path) and adds gated residuals, and
WanSelfAttention rotates q and k in float32 through full-size temporaries (`apply_rope1`). Together
about a fifth of a Wan 14B step on an H100 (docs/kernel-notes.md). Models that the pack loads or
quantizes get subclasses whose forwards do the host's steps with those replaced by
dvdq_core.wan_ops (the same math; on the CPU the same PyTorch ops). Structure only: nothing is
stored in files; DVDQ_FUSE_BLOCKS=0 (or its earlier name DVDQ_FUSE_WAN=0) turns it off, here and
for HunyuanVideo (nodes/hunyuan_blocks.py).

The forwards are the pack's own, written to compute what the host's compute (same steps in the same
order, with the fused ops), so they are only installed where the host's forward is the one they
follow: same signature and the same names used (the block's forms of ComfyUI 0.3.64, 0.8.0 and 0.33.0;
nodes/block_fusion.py has what the model families share). If ComfyUI changes one, the model keeps the host's forward and a
warning says so (correct, only slower).
Subclasses with forwards of their own (VACE, audio blocks, the cross-attentions) are left alone.
0.33.0's WanFeedForward (which applies the GELU itself through comfy.ops.linear_input_act) gets a
forward that lets the first quantized layer apply it instead, as the GELU fold of dvdq_core.fusion does
for the older Sequential, wherever one of its layers is ours.
"""
import logging
import sys

import torch
from torch import nn

from ..dvdq_core.fusion import gelu_fold_on
from ..dvdq_core.linear import QuantLinear
from ..dvdq_core.wan_ops import gated_residual, modulated_norm, norm_rope
from .block_fusion import (
    bare_layer_norm,
    fused_subclass,
    host_changed,
    host_forward_mismatch,
    plain_norm,
    restore_classes,
    switched_off,
)

log = logging.getLogger("dvdq")

# what our forwards expect of the host's (signature, names used)
SELF_ATTENTION = (("self", "x", "freqs", "transformer_options"),
                  {"apply_rope1", "head_dim", "k", "norm_k", "norm_q", "num_heads", "o", "optimized_attention", "q",
                   "shape", "v", "view"})
BLOCK = (("self", "x", "e", "freqs", "context", "context_img_len", "transformer_options"),
         {"addcmul", "cast_to", "chunk", "comfy", "cross_attn", "device", "dtype", "ffn", "model_management",
          "modulation", "ndim", "norm1", "norm2", "norm3", "repeat_e", "self_attn", "torch", "unbind", "unsqueeze"})
# the block's later forms: 0.8.0 makes x contiguous before norm1; 0.33.0 also runs the "attn2_patch"
# patches of transformer_options after the cross-attention
BLOCK_CONTIGUOUS = (BLOCK[0], BLOCK[1] | {"contiguous"})
BLOCK_ATTN2_PATCH = (BLOCK[0], BLOCK[1] | {"contiguous", "get"}, {"patches", "attn2_patch"})
# 0.33.0's self-attention runs the "attn1_patch" patches after the attention
SELF_ATTENTION_ATTN1_PATCH = (SELF_ATTENTION[0], SELF_ATTENTION[1] | {"get"}, {"patches", "attn1_patch"})
# 0.33.0's feed-forward [Linear, GELU(tanh), Linear] applies the GELU itself: linear_input_act(self[2], self[0](x))
FEED_FORWARD = (("self", "x"), {"comfy", "ops", "linear_input_act"}, {"gelu_tanh"})
FORMS = {  # (expected, whether the host runs transformer_options' patches there), newest first
    "self_attention": ((SELF_ATTENTION_ATTN1_PATCH, True), (SELF_ATTENTION, False)),
    "block": ((BLOCK_ATTN2_PATCH, True), (BLOCK_CONTIGUOUS, False), (BLOCK, False)),
    "feed_forward": ((FEED_FORWARD, False),),
}
_FUSED_CLASSES = {}  # host class -> our subclass


def _normed_rotated(norm: nn.Module, y, freqs, heads: int):
    """norm(y) then the rotation: one norm_rope call where the norm is a plain weighted RMSNorm."""
    weight = getattr(norm, "weight", None)
    if not isinstance(norm, nn.Identity) and weight is not None and plain_norm(norm):
        return norm_rope(y, weight.to(device=y.device, dtype=y.dtype), norm.eps, freqs, heads)
    return norm_rope(norm(y), None, None, freqs, heads)  # qk_norm off, or the host's own norm forward


def _modulated(norm: nn.Module, x, shift, scale, repeat_e):
    """shift + norm(x) * (1 + scale): one kernel where the norm is a bare LayerNorm."""
    if bare_layer_norm(norm, x):
        return modulated_norm(x, shift, scale, norm.eps)
    return torch.addcmul(repeat_e(shift, x), norm(x), 1 + repeat_e(scale, x))  # the host's expression


def _patches(transformer_options, name):
    return transformer_options.get("patches", {}).get(name, ())


def _fused_class(cls, kind: str, host, patches: bool):
    """cls (ComfyUI's class or a subclass keeping its forward) with the fused forward; host: the module
    of ComfyUI's class, whose names the forward uses (a subclass may live in another package);
    patches: the host's forward runs transformer_options' attn1_patch / attn2_patch (0.33.0 and later)."""
    if kind == "feed_forward":
        class Fused(cls):
            """The host's WanFeedForward, self[2](gelu_tanh(self[0](x))), with the GELU applied by the first layer's
            kernel where that layer is ours (the fold dvdq_core.fusion makes for Sequentials: one read and write
            of the widest tensor less). It calls our layers directly, not through comfy.ops.linear_input_act:
            0.33.0's sends them to linear(gelu(x)) too, but the newer form read in upstream code casts the
            layer's weight itself on its fp16-accumulation path, which our packed codes cannot take."""

            def forward(self, x):
                if isinstance(self[0], QuantLinear) and self[0].act == "gelu_tanh":
                    return self[2](self[0](x))
                return self[2](torch.nn.functional.gelu(self[0](x), approximate="tanh"))
    elif kind == "self_attention":
        class Fused(cls):
            """The host's WanSelfAttention.forward with norm + apply_rope1 fused (dvdq_core.wan_ops)."""

            def forward(self, x, freqs, transformer_options={}):
                b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
                q = _normed_rotated(self.norm_q, self.q(x), freqs, n)
                k = _normed_rotated(self.norm_k, self.k(x), freqs, n)
                x = host.optimized_attention(q.view(b, s, n * d), k.view(b, s, n * d), self.v(x).view(b, s, n * d),
                                             heads=self.num_heads, transformer_options=transformer_options)
                for p in _patches(transformer_options, "attn1_patch") if patches else ():
                    x = p({"x": x, "q": q, "k": k, "transformer_options": transformer_options})
                return self.o(x)
    else:
        class Fused(cls):
            """The host's WanAttentionBlock.forward with the modulations and gated residuals fused."""

            def forward(self, x, e, freqs, context, context_img_len=257, transformer_options={}):
                mod = host.comfy.model_management.cast_to(self.modulation, dtype=x.dtype, device=x.device)
                e = (mod + e).chunk(6, dim=1) if e.ndim < 4 else (mod.unsqueeze(0) + e).unbind(2)
                y = self.self_attn(_modulated(self.norm1, x, e[0], e[1], host.repeat_e), freqs,
                                   transformer_options=transformer_options)
                x = gated_residual(x, y, e[2])
                del y
                x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len,
                                        transformer_options=transformer_options)
                for p in _patches(transformer_options, "attn2_patch") if patches else ():
                    x = p({"x": x, "transformer_options": transformer_options})
                y = self.ffn(_modulated(self.norm2, x, e[3], e[4], host.repeat_e))
                return gated_residual(x, y, e[5])
    return Fused


def fuse_wan(diffusion_model: nn.Module) -> tuple[int, str | None]:
    """Switch ComfyUI's WanSelfAttention and WanAttentionBlock modules (and subclasses that keep their
    forward) to the fused forwards. Returns (modules switched, None) or, where a class was left
    alone, a short reason for the UI as the second item (the log has the details). Idempotent."""
    off = switched_off()
    if off:
        return 0, off
    try:
        from comfy.ldm.wan.model import WanAttentionBlock, WanSelfAttention
    except ImportError:  # another host layout: nothing of ours to replace
        return 0, None
    import comfy.ldm.wan.model as host_wan
    feed_forward = getattr(host_wan, "WanFeedForward", None)  # 0.33.0 and later
    switched, off = 0, None
    for base, kind in ((WanSelfAttention, "self_attention"), (WanAttentionBlock, "block"), (feed_forward, "feed_forward")):
        if base is None:
            continue
        forms = FORMS[kind]
        targets = [m for m in diffusion_model.modules() if isinstance(m, base) and type(m).forward is base.forward]
        if kind == "feed_forward":  # only where one of its layers is ours (else the host's own path is right)
            targets = [m for m in targets if any(isinstance(lin, QuantLinear) for lin in (m[0], m[2]))]
        if not targets:
            continue
        matched = [attn2 for expected, attn2 in forms if host_forward_mismatch(base, expected) is None]
        if not matched:
            off = host_changed(f"Wan ({base.__name__})", host_forward_mismatch(base, forms[0][0]))
            continue
        host = sys.modules[base.__module__]
        for m in targets:
            m.__class__ = fused_subclass(_FUSED_CLASSES, type(m), lambda cls: _fused_class(cls, kind, host, matched[0]))
            if kind == "feed_forward" and isinstance(m[0], QuantLinear) and m[0].act is None and gelu_fold_on():
                m[0].act = "gelu_tanh"  # after the class switch (only our forward skips the GELU); unfuse_wan undoes it
        switched += len(targets)
    return switched, off


def unfuse_wan(diffusion_model: nn.Module) -> int:
    """Undo fuse_wan (benchmarks measure what it saves); returns how many modules."""
    ours = set(_FUSED_CLASSES.values())
    for m in diffusion_model.modules():
        if type(m) in ours and isinstance(m, nn.Sequential) and isinstance(m[0], QuantLinear) and m[0].act == "gelu_tanh":
            m[0].act = None  # the feed-forward's GELU back to the host's path
    return restore_classes(diffusion_model, _FUSED_CLASSES)

