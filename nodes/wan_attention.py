"""Wan's self-attention with its q/k RMS norm and rotary embedding as one kernel each.

ComfyUI's WanSelfAttention rotates q and k in float32 through full-size temporaries
(`apply_rope1`), about a tenth of a Wan 14B step on an H100 (bench/RESULTS.md). Models that the
pack loads or quantizes get a subclass whose forward is the host's with `norm_q(q(x))` +
`apply_rope1` replaced by dvdq_core.rope.norm_rope (the same math; on the CPU literally the host's
ops). Structure only: nothing is stored in files; DVDQ_FUSE_ROPE=0 turns it off.

The forward is a copy of the host's, so it is only installed where the host's forward is the one it
copies: same signature and the same names used (a fingerprint of ComfyUI 0.3.x). If ComfyUI changes
it, the model keeps the host's forward and a warning says so (correct, only slower).
"""
import inspect
import logging
import os
import sys

from torch import nn

from dvdq_core.rope import norm_rope

log = logging.getLogger("dvdq")

HOST_FORWARD_PARAMS = ("self", "x", "freqs", "transformer_options")
HOST_FORWARD_NAMES = frozenset({"apply_rope1", "head_dim", "k", "norm_k", "norm_q", "num_heads", "o",
                                "optimized_attention", "q", "shape", "v", "view"})
_FUSED_CLASSES = {}


def _names(code) -> set:
    """Global and attribute names a function uses, nested functions included."""
    out = set(code.co_names)
    for c in code.co_consts:
        if inspect.iscode(c):
            out |= _names(c)
    return out


def host_forward_mismatch(cls) -> str | None:
    """None when cls.forward is the forward FusedRope copies, else what differs."""
    params = tuple(inspect.signature(cls.forward).parameters)
    if params != HOST_FORWARD_PARAMS:
        return f"its forward takes {params}, expected {HOST_FORWARD_PARAMS}"
    names = _names(cls.forward.__code__)
    if names != HOST_FORWARD_NAMES:
        return f"its forward uses {sorted(names ^ HOST_FORWARD_NAMES)} differently"
    return None


def _normed_rotated(norm: nn.Module, y, freqs, heads: int):
    """norm(y) then the rotation, as one norm_rope call where the norm is a plain weighted RMSNorm."""
    weight = getattr(norm, "weight", None)
    plain = (not isinstance(norm, nn.Identity) and weight is not None and not getattr(norm, "comfy_cast_weights", False)
             and not getattr(norm, "weight_function", None) and not getattr(norm, "bias_function", None))
    if plain:
        return norm_rope(y, weight.to(device=y.device, dtype=y.dtype), norm.eps, freqs, heads)
    # Identity (qk_norm off), or a norm whose weight the host casts or patches (low VRAM, LoRA): its
    # own forward, then the rotation alone
    return norm_rope(norm(y), None, None, freqs, heads)


def _fused_class(cls):
    if cls not in _FUSED_CLASSES:
        host = sys.modules[cls.__module__]

        class FusedRope(cls):
            """The host's forward (ComfyUI's WanSelfAttention) with norm + apply_rope1 fused."""

            def forward(self, x, freqs, transformer_options={}):
                b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
                q = _normed_rotated(self.norm_q, self.q(x), freqs, n)
                k = _normed_rotated(self.norm_k, self.k(x), freqs, n)
                x = host.optimized_attention(q.view(b, s, n * d), k.view(b, s, n * d), self.v(x).view(b, s, n * d),
                                             heads=self.num_heads, transformer_options=transformer_options)
                return self.o(x)

        FusedRope.__name__ = FusedRope.__qualname__ = "DVDQ" + cls.__name__
        _FUSED_CLASSES[cls] = FusedRope
    return _FUSED_CLASSES[cls]


def fuse_wan_rope(diffusion_model: nn.Module) -> int:
    """Switch every ComfyUI WanSelfAttention (not the cross-attentions, which override forward and
    have no rotation) to the fused forward; returns how many. Idempotent."""
    if os.environ.get("DVDQ_FUSE_ROPE", "1") == "0":
        return 0
    try:
        from comfy.ldm.wan.model import WanSelfAttention
    except ImportError:  # another host layout: nothing of ours to replace
        return 0
    targets = [m for m in diffusion_model.modules()
               if isinstance(m, WanSelfAttention) and type(m).forward is WanSelfAttention.forward]
    if not targets:
        return 0
    why = host_forward_mismatch(WanSelfAttention)
    if why is not None:
        log.warning("DVD-Quant: ComfyUI's WanSelfAttention changed (%s); the fused q/k norm + rotary "
                    "embedding is off for this model. It runs correctly at the host's speed; please report "
                    "the ComfyUI version.", why)
        return 0
    for m in targets:
        m.__class__ = _fused_class(type(m))
    return len(targets)


def unfuse_wan_rope(diffusion_model: nn.Module) -> int:
    """Undo fuse_wan_rope (benchmarks measure what it saves); returns how many modules."""
    restored = 0
    for m in diffusion_model.modules():
        for host_cls, fused in _FUSED_CLASSES.items():
            if type(m) is fused:
                m.__class__ = host_cls
                restored += 1
    return restored
