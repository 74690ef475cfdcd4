"""ComfyUI's HunyuanVideo blocks (flux's DoubleStreamBlock and SingleStreamBlock) with their
elementwise steps as one kernel each.

Around the linear layers the host modulates (LayerNorm, then a per-sample shift and scale), norms q
and k per head on a strided view of the qkv output, rotates them in float32 temporaries inside
flux.math.attention, concatenates the image and text q/k/v of the double block, and adds gated
residuals. Models that the pack loads or quantizes get subclasses whose forwards do the host's
steps with those replaced by dvdq_core.hunyuan_ops (the same math; on the CPU the same PyTorch
ops): the q/k norm and rotation write the attention's [B, H, L, D] input directly (no torch.cat for
q and k), and the residuals are updated in place where the host's `+=` do.

As for Wan (nodes/wan_blocks.py; what both share is nodes/block_fusion.py), the forwards are the pack's
own versions of the host's (same steps, same order), installed only where the host's code is one
they follow: the block forwards, `attention`, `apply_rope` and `apply_mod` of comfy.ldm.flux, and the
QKNorm / RMSNorm forwards have the signature and the names fingerprinted here (FORMS), in one of the
forms of ComfyUI 0.3.x (0.3.64), 0.8.0 and 0.33.0; the flags of the form found say what the forward
does differently (0.8.0 on: the image residual in place, optional modulation, the single block's
mlp_hidden_dim_first / yak_mlp, comfy-kitchen's rotation; 0.33.0: text tokens first, attention
patches, comfy.ops' RMSNorm). Otherwise the model keeps the host's forwards and a warning says so.
Only the blocks inside a HunyuanVideo model switch (Flux shares the classes).
I2V guiding frames (`modulation_dims`: the first latent frame's tokens modulated by one vector, the
rest by another, which the host applies to slices in place) run fused too, for a batch of one and
the two forms HunyuanVideo.forward_orig passes (dvdq_core.hunyuan_ops.kernel_dims), with the host's
roundings. A call the fused forward does not take runs the host's forward: other `modulation_dims`
(or a larger batch with them), no rotary embedding, q/k norms that are not the host's plain RMSNorm,
flux's `attention` / `apply_rope` / `apply_mod` replaced after fusing, a block without its own
modulation (vec then brings the vectors) or transformer_options with attn1_patch /
attn1_output_patch; the log says which, once per reason.
DVDQ_FUSE_BLOCKS=0 (or DVDQ_FUSE_WAN=0) turns it off.
"""
import logging
import sys

import torch
from torch import nn

from ..dvdq_core.hunyuan_ops import gated_add, gated_add_, head_norm_rope, kernel_dims, modulated_norm
from ..dvdq_core.wan_ops import rms_default_eps
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

# What our forwards expect of the host's code: for each host function its forms, oldest first, each as
# (signature, names used[, constants]) and the flags the fused forwards follow it by. ComfyUI 0.3.x (0.3.64):
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
# 0.8.0: blocks with an optional modulation (modulation=False: vec brings the vectors) that update the image
# residual in place (`img += ...`); the single block's mlp_hidden_dim_first / yak_mlp; the rotation by
# flux.math.apply_rope (comfy-kitchen's: product, then addcmul_). 0.33.0 also: text tokens first in the double
# block, transformer_options' attn1_patch / attn1_output_patch, q/k norms of comfy.ops (torch's RMSNorm).
PATCHES = {"patches", "attn1_patch", "attn1_output_patch"}
DOUBLE_BLOCK_080 = (DOUBLE_BLOCK[0], DOUBLE_BLOCK[1] | {"modulation"})
DOUBLE_BLOCK_033 = (DOUBLE_BLOCK[0], DOUBLE_BLOCK[1] - {"flipped_img_txt"} | {"modulation", "copy", "get"}, PATCHES)
SINGLE_BLOCK_080 = (SINGLE_BLOCK[0], SINGLE_BLOCK[1] - {"mlp_hidden_dim"} | {"mlp_hidden_dim_first", "yak_mlp"})
SINGLE_BLOCK_033 = (SINGLE_BLOCK[0], SINGLE_BLOCK_080[1] | {"copy", "get"}, PATCHES)
ATTENTION_APPLY_ROPE = (ATTENTION[0], {"apply_rope", "optimized_attention", "shape"})
APPLY_ROPE = ((("xq", "xk", "freqs_cis"), {"apply_rope", "comfy_kitchen", "ops", "torch"}),  # comfy-kitchen's own
              (("xq", "xk", "freqs_cis"), {"apply_rope1"}),  # 0.8.0 without comfy-kitchen
              (("xq", "xk", "freqs_cis"), {"_apply_rope", "apply_rope", "ck", "comfy", "in_training",
                                          "model_management", "quant_ops"}))  # 0.33.0: comfy-kitchen's
OPS_RMS_NORM = (("self", "args", "kwargs"), {"bias_function", "comfy_cast_weights", "forward",
                                             "forward_comfy_cast_weights", "len", "run_every_op", "super",
                                             "weight_function"})
OPS_RMS_NORM_CAST = (("self", "input"), {"CastBiasWeightContext", "eps", "functional", "nn", "normalized_shape",
                                         "rms_norm", "torch", "weight"})
TORCH_RMS_NORM = (("self", "x"), {"F", "eps", "normalized_shape", "rms_norm", "weight"})
# flags: "v080" optional modulation, image residual in place, single block's mlp_hidden_dim_first / yak_mlp;
# "patches" attention patches; "txt_first" text tokens first; "addcmul" comfy-kitchen's rotation;
# "ops_norm" q/k norms of comfy.ops (weight `weight`, eps their own, torch's default where None)
FORMS = {
    "DoubleStreamBlock.forward": ((DOUBLE_BLOCK, ()), (DOUBLE_BLOCK_080, ("v080",)),
                                  (DOUBLE_BLOCK_033, ("v080", "patches", "txt_first"))),
    "SingleStreamBlock.forward": ((SINGLE_BLOCK, ()), (SINGLE_BLOCK_080, ("v080",)),
                                  (SINGLE_BLOCK_033, ("v080", "patches"))),
    "attention": ((ATTENTION, ()), (ATTENTION_APPLY_ROPE, ("addcmul",))),
    "apply_mod": ((APPLY_MOD, ()),),  # (0.33.0: m_mult[:, i:i + 1] for [:, i], the same for a batch of one)
    "QKNorm.forward": ((QK_NORM, ()),),
}
_FUSED_CLASSES = {}  # host class -> our subclass
_HOST = {}  # the host functions fingerprinted when fusing (calls go to the host's forward if they change)


def _modulated(norm: nn.Module, x, mod, dims):
    """The host's apply_mod(norm(x), 1 + mod.scale, mod.shift, dims): one kernel where the norm is a bare
    LayerNorm (wan_blocks), else the host's own apply_mod."""
    if bare_layer_norm(norm, x):
        return modulated_norm(x, mod.shift, mod.scale, norm.eps, dims)
    return _HOST["apply_mod"](norm(x), 1 + mod.scale, mod.shift, dims)


_PATCHED_NORMS = "q/k norms other than the host's plain RMSNorm (a LoRA on them, another class or dtype)"


def _qk_norm(qk_norm: nn.Module, d: int, x, ops_norm: bool):
    """(query weight, key weight, eps) of the host's QKNorm of two plain host RMSNorms over d channels, for
    activations like x, else None. ops_norm: comfy.ops' RMSNorm (0.33.0), which casts its weight only where
    comfy_cast_weights is set (else torch's rms_norm takes it as it is: another dtype or device -> None) and
    whose eps None is torch's default (its compute type's epsilon: float32's for bf16 / fp16)."""
    norms = (getattr(qk_norm, "query_norm", None), getattr(qk_norm, "key_norm", None))
    if getattr(type(qk_norm), "forward", None) is not _HOST["QKNorm"] or \
            any(getattr(type(n), "forward", None) is not _HOST["RMSNorm"] or not plain_norm(n) for n in norms):
        return None
    if not ops_norm:
        return norms[0].scale, norms[1].scale, RMS_EPS
    if any(n.weight is None or tuple(n.normalized_shape) != (d,) or n.eps != norms[0].eps or
           not (n.comfy_cast_weights or (n.weight.dtype == x.dtype and n.weight.device == x.device)) for n in norms):
        return None
    eps = norms[0].eps
    return norms[0].weight, norms[1].weight, rms_default_eps(x.dtype) if eps is None else eps


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
    if host.attention is not _HOST["attention"] or host.apply_mod is not _HOST["apply_mod"] or \
            getattr(sys.modules[host.attention.__module__], "apply_rope", None) is not _HOST.get("apply_rope"):
        return "flux's attention, apply_rope or apply_mod replaced after loading (by another extension?)"
    return None


def _early_reason(block, form, transformer_options) -> str | None:
    """Why a call goes to the host's forward before anything is computed (0.8.0 on): a block without its own
    modulation (vec brings the vectors), or attention patches in transformer_options (0.33.0)."""
    if "v080" in form and not block.modulation:
        return "blocks without their own modulation (modulation=False)"
    if "patches" in form:
        patches = transformer_options.get("patches", {})
        if patches.get("attn1_patch") or patches.get("attn1_output_patch"):
            return "attention patches (attn1_patch / attn1_output_patch in transformer_options)"
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


def _fused_class(cls, kind: str, host, form: frozenset):
    """Our subclass of cls (a host block class, or a subclass keeping its forward); host: the module
    comfy.ldm.flux.layers; form: the flags of the host's code (FORMS)."""
    addcmul, ops_norm, v080 = "addcmul" in form, "ops_norm" in form, "v080" in form
    if kind == "double":
        txt_first = "txt_first" in form

        class Fused(cls):
            """The host's DoubleStreamBlock.forward with the modulations, q/k norm + rotation (into one buffer
            for both streams, in the host's order) and gated residuals fused."""

            def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                        transformer_options={}):
                dims_i, dims_t = modulation_dims_img, modulation_dims_txt
                why = _early_reason(self, form, transformer_options) or \
                    _host_reason(host, pe, img, vec, dims_i, dims_t) or \
                    (None if txt_first or self.flipped_img_txt else
                     "text tokens before the image tokens (flipped_img_txt off)")
                h = self.num_heads
                d = img.shape[-1] // h
                iw, tw = (None, None) if why else \
                    (_qk_norm(self.img_attn.norm, d, img, ops_norm), _qk_norm(self.txt_attn.norm, d, img, ops_norm))
                if why or iw is None or tw is None or iw[2] != tw[2]:
                    return self._host(why or _PATCHED_NORMS, img, txt, vec, pe, attn_mask, dims_i, dims_t,
                                      transformer_options)
                if v080:  # the host's img_in hands the first block a transposed view; the in-place gate kernel
                    img = img.contiguous()  # updates a contiguous one (the caller takes img from our return value)
                img_mod1, img_mod2 = self.img_mod(vec)
                txt_mod1, txt_mod2 = self.txt_mod(vec)
                img_qkv = self.img_attn.qkv(_modulated(self.img_norm1, img, img_mod1, dims_i))
                txt_qkv = self.txt_attn.qkv(_modulated(self.txt_norm1, txt, txt_mod1, dims_t))
                c, eps = img_qkv.shape[-1] // 3, iw[2]
                iw, tw = [w.to(img_qkv) for w in iw[:2]], [w.to(txt_qkv) for w in tw[:2]]  # as the host's norms cast
                # the host's order of the streams in the joint sequence: (first qkv, its weights), (second ...)
                (a, aw), (b, bw) = ((txt_qkv, tw), (img_qkv, iw)) if txt_first else ((img_qkv, iw), (txt_qkv, tw))
                q = head_norm_rope(a[..., :c], aw[0], eps, pe, h, b[..., :c], bw[0], addcmul=addcmul)
                k = head_norm_rope(a[..., c:2 * c], aw[1], eps, pe, h, b[..., c:2 * c], bw[1], addcmul=addcmul)
                v = torch.cat((_v(a, h), _v(b, h)), dim=2)
                del img_qkv, txt_qkv, a, b
                attn = _attention(host, q, k, v, attn_mask, transformer_options)
                del q, k, v
                n = txt.shape[1] if txt_first else img.shape[1]
                img_attn, txt_attn = (attn[:, n:], attn[:, :n]) if txt_first else (attn[:, :n], attn[:, n:])
                add = gated_add_ if v080 else gated_add  # 0.8.0 on: `img += ...`, else `img = img + ...`
                img = add(img, self.img_attn.proj(img_attn), img_mod1.gate, dims_i)
                img = add(img, self.img_mlp(_modulated(self.img_norm2, img, img_mod2, dims_i)), img_mod2.gate, dims_i)
                gated_add_(txt, self.txt_attn.proj(txt_attn), txt_mod1.gate, dims_t)
                gated_add_(txt, self.txt_mlp(_modulated(self.txt_norm2, txt, txt_mod2, dims_t)), txt_mod2.gate, dims_t)
                if txt.dtype == torch.float16:
                    txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
                return img, txt

            def _host(self, why, img, txt, vec, pe, attn_mask, dims_i, dims_t, transformer_options):
                _to_host(why)
                return super().forward(img, txt, vec, pe, attn_mask=attn_mask, modulation_dims_img=dims_i,
                                       modulation_dims_txt=dims_t, transformer_options=transformer_options)
    else:
        class Fused(cls):
            """The host's SingleStreamBlock.forward with the modulation, q/k norm + rotation and gated
            residual fused."""

            def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
                why = _early_reason(self, form, transformer_options) or \
                    _host_reason(host, pe, x, vec, modulation_dims)
                c, h = self.hidden_size, self.num_heads
                w = None if why else _qk_norm(self.norm, c // h, x, ops_norm)
                if w is None:
                    return self._host(why or _PATCHED_NORMS, x, vec, pe, attn_mask, modulation_dims,
                                      transformer_options)
                mod, _ = self.modulation(vec)
                first = self.mlp_hidden_dim_first if v080 else self.mlp_hidden_dim
                qkv, mlp = torch.split(self.linear1(_modulated(self.pre_norm, x, mod, modulation_dims)),
                                       [3 * self.hidden_size, first], dim=-1)
                (wq, wk), eps = [t.to(qkv) for t in w[:2]], w[2]  # as the host's norms cast
                q = head_norm_rope(qkv[..., :c], wq, eps, pe, h, addcmul=addcmul)
                k = head_norm_rope(qkv[..., c:2 * c], wk, eps, pe, h, addcmul=addcmul)
                attn = _attention(host, q, k, _v(qkv, h), attn_mask, transformer_options)
                del q, k, qkv
                if v080 and self.yak_mlp:
                    mlp = self.mlp_act(mlp[..., first // 2:]) * mlp[..., :first // 2]
                else:
                    mlp = self.mlp_act(mlp)
                output = self.linear2(torch.cat((attn, mlp), 2))
                gated_add_(x, output, mod.gate, modulation_dims)
                if x.dtype == torch.float16:
                    x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
                return x

            def _host(self, why, x, vec, pe, attn_mask, modulation_dims, transformer_options):
                _to_host(why)
                return super().forward(x, vec, pe, attn_mask=attn_mask, modulation_dims=modulation_dims,
                                       transformer_options=transformer_options)
    return Fused


def _match(fn, what: str, forms) -> tuple[tuple, str | None]:
    """(flags of the first of forms that fn has, None), or ((), what differs from the newest form)."""
    for expected, flags in forms:
        if host_function_mismatch(fn, expected) is None:
            return tuple(flags), None
    return (), f"{what}: {host_function_mismatch(fn, forms[-1][0])}"


def host_form(layers) -> tuple[dict | None, str | None]:
    """({"double": flags, "single": flags}, None) when comfy.ldm.flux.layers (`layers`), the apply_rope its
    attention calls and the RMSNorm its QKNorm uses have code the fused forwards follow (FORMS), else
    (None, what differs; a name that is gone or not a function counts as different)."""
    flags = {}
    for what, forms in FORMS.items():
        got, why = _match(host_attr(layers, what), what, forms)
        if why:
            return None, why
        flags[what] = set(got)
    common = flags["attention"]
    if "addcmul" in common:  # the rotation: flux.math.apply_rope
        math = sys.modules[layers.attention.__module__]
        _, why = _match(getattr(math, "apply_rope", None), "flux.math.apply_rope", [(f, ()) for f in APPLY_ROPE])
        if why:
            return None, why
    if getattr(layers, "RMSNorm", None) is not None:  # QKNorm's RMSNorm: flux.layers' (0.3.x, 0.8.0)
        _, why = _match(host_attr(layers, "RMSNorm.forward"), "RMSNorm.forward", [(RMS_NORM, ())])
        if why:
            return None, why
    else:  # 0.33.0: flux.layers.RMSNorm is None, QKNorm uses operations.RMSNorm (comfy.ops, torch's RMSNorm)
        import comfy.ops
        norm = getattr(comfy.ops.disable_weight_init, "RMSNorm", None)
        if not (isinstance(norm, type) and issubclass(norm, torch.nn.RMSNorm)):
            return None, "comfy.ops RMSNorm: not a torch RMSNorm"
        for fn, expected, what in ((norm.forward, OPS_RMS_NORM, "comfy.ops RMSNorm.forward"),
                                   (host_attr(norm, "forward_comfy_cast_weights"), OPS_RMS_NORM_CAST,
                                    "comfy.ops RMSNorm.forward_comfy_cast_weights"),
                                   (torch.nn.RMSNorm.forward, TORCH_RMS_NORM, "torch's RMSNorm.forward")):
            _, why = _match(fn, what, [(expected, ())])
            if why:
                return None, why
        common |= {"ops_norm"}
    return {"double": frozenset(flags["DoubleStreamBlock.forward"] | common),
            "single": frozenset(flags["SingleStreamBlock.forward"] | common)}, None


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
    forms, why = host_form(layers)
    if why is not None:
        return 0, host_changed("HunyuanVideo", why)
    if "ops_norm" in forms["double"]:
        import comfy.ops
        rms = comfy.ops.disable_weight_init.RMSNorm
    else:
        rms = layers.RMSNorm
    _HOST.update(attention=layers.attention, apply_mod=layers.apply_mod, QKNorm=layers.QKNorm.forward,
                 RMSNorm=rms.forward, apply_rope=getattr(sys.modules[layers.attention.__module__], "apply_rope", None))
    for m, kind in targets:
        m.__class__ = fused_subclass(_FUSED_CLASSES, type(m),
                                     lambda cls: _fused_class(cls, kind, layers, forms[kind]))
    return len(targets), None


def unfuse_hunyuan(diffusion_model: nn.Module) -> int:
    """Undo fuse_hunyuan (benchmarks measure what it saves); returns how many modules."""
    return restore_classes(diffusion_model, _FUSED_CLASSES)
