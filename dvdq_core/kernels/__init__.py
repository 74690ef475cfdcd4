"""Triton backend of DVD-Quant: packed 4-bit weights x 4..8-bit (or 16-bit) activations.

BACKEND (registered by dvdq_core.backends as "triton") says what each op takes, as data and shape rules;
its ops:
  linear_forward(layer, x2d, a_bits) -> y2d
the Wan block's elementwise steps that dvdq_core.wan_ops dispatches to:
  norm_rope / modulated_norm / gated_residual(*args)
and HunyuanVideo's (dvdq_core.hunyuan_ops; its modulation is modulated_norm, or with an I2V guiding
frame's modulation_dims modulated_norm_dims):
  head_norm_rope / modulated_norm_dims / gated_add / gated_add_inplace(*args)
Ask `dvdq_core.backends.unsupported_reason("triton", op, *args)` whether a call can run here.

Importing this package needs neither triton nor a GPU; triton is imported on the first forward.
Each is a torch custom op (`torch.ops.dvdq.w4_linear`, ...) so torch.compile treats it as one
opaque call with a known output shape instead of tracing the launches.
"""

import functools
import re
import sys

import torch

from ..activations import scale_granularity
from ..backends import Backend, Capabilities
from ..lowrank import branch_of
from . import configs, ops

__all__ = ["BACKEND", "linear_forward", "norm_rope", "modulated_norm", "gated_residual", "head_norm_rope",
           "modulated_norm_dims", "gated_add", "gated_add_inplace", "configs", "ops"]

_SUPPORTED_METHODS = ("dvdq", "quarot", "minmax")
MIN_CAPABILITY = (8, 0)
MIN_TRITON = (3, 1)


def _on_input_device(fn):
    """fn with its first argument's GPU as the current device: Triton launches on the current device,
    not on the tensors', and a multi-GPU setup may run the model on another GPU than the current one."""
    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        if getattr(x, "is_cuda", False) and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return call


def _define_op():
    name = "dvdq::w4_linear"
    if hasattr(torch.ops.dvdq, "w4_linear"):  # imported a second time under another name
        return torch.ops.dvdq.w4_linear  # (a second copy of the pack, e.g. tests): the first one serves
    op = torch.library.custom_op(name, mutates_args=())(_on_input_device(_w4_linear))

    @op.register_fake
    def _(x2d, qweight, w_scale, w_zero, bias, a_bits, hb, sb, auto_scale, share, pow2, gelu, lora_down=None,
          lora_up=None, lora_bias=None):
        return x2d.new_empty((x2d.shape[0], qweight.shape[0]))

    return op


def _w4_linear(x2d: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
               bias: torch.Tensor | None, a_bits: int, hb: int, sb: int, auto_scale: bool, share: int,
               pow2: bool, gelu: bool, lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
               lora_bias: torch.Tensor | None = None) -> torch.Tensor:
    return ops.w4_linear_impl(x2d, qweight, w_scale, w_zero, bias, a_bits, hb, sb, auto_scale, share=share, pow2=pow2,
                              gelu=gelu, lora_down=lora_down, lora_up=lora_up, lora_bias=lora_bias)


_w4_linear_op = _define_op()


def _block_op(name, fn, fake, mutates_args=()):
    """A torch custom op dvdq::<name> (opaque to torch.compile, output shape from `fake`)."""
    if hasattr(torch.ops.dvdq, name):
        return getattr(torch.ops.dvdq, name)
    op = torch.library.custom_op("dvdq::" + name, mutates_args=mutates_args)(_on_input_device(fn))
    op.register_fake(fake)
    return op


def _norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, freqs: torch.Tensor,
               heads: int) -> torch.Tensor:
    return ops.norm_rope(x, weight, eps, freqs, heads)


def _modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return ops.modulated_norm(x, shift, scale, eps)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return ops.gated_residual(x, y, gate)


# The Wan block's elementwise steps (dvdq_core.wan_ops has the references and the shapes)
norm_rope = _block_op("norm_rope", _norm_rope, lambda x, weight, eps, freqs, heads: x.new_empty(
    (x.shape[0], x.shape[1], heads, x.shape[2] // heads)))
# The fakes give what ops returns: a contiguous tensor of x's shape (ops makes x contiguous first; an
# empty_like of a strided x, e.g. Wan's transposed patch embedding, would not match it under torch.compile)
modulated_norm = _block_op("modulated_norm", _modulated_norm, lambda x, shift, scale, eps: x.new_empty(x.shape))
gated_residual = _block_op("gated_residual", _gated_residual, lambda x, y, gate: x.new_empty(x.shape))


def _head_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, pe: torch.Tensor, heads: int,
                    x2: torch.Tensor | None, weight2: torch.Tensor | None) -> torch.Tensor:
    return ops.head_norm_rope(x, weight, eps, pe, heads, x2, weight2)


def _modulated_norm_dims(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         first_tokens: int) -> torch.Tensor:
    return ops.modulated_norm(x, shift, scale, eps, first_tokens=first_tokens, round_product=True)


def _gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, first_tokens: int) -> torch.Tensor:
    return ops.gated_residual(x, y, gate, round_product=True, first_tokens=first_tokens)


def _gated_add_inplace(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, first_tokens: int) -> None:
    ops.gated_residual(x, y, gate, out=x, round_product=True, first_tokens=first_tokens)


# HunyuanVideo's block steps (dvdq_core.hunyuan_ops has the references and the shapes). first_tokens:
# 0 = the vectors spread as Wan's (one per sample in practice); > 0 = two vectors, the first for that
# many tokens (an I2V guiding frame), the second for the rest (ops._vector_rows)
head_norm_rope = _block_op("head_norm_rope", _head_norm_rope, lambda x, weight, eps, pe, heads, x2, weight2: x.new_empty(
    (x.shape[0], heads, x.shape[1] + (0 if x2 is None else x2.shape[1]), x.shape[2] // heads)))
modulated_norm_dims = _block_op("modulated_norm_dims", _modulated_norm_dims,
                                lambda x, shift, scale, eps, first_tokens: x.new_empty(x.shape))
gated_add = _block_op("gated_add", _gated_add, lambda x, y, gate, first_tokens: x.new_empty(x.shape))
gated_add_inplace = _block_op("gated_add_inplace", _gated_add_inplace, lambda x, y, gate, first_tokens: None,
                              mutates_args=("x",))


def linear_forward(layer, x2d: torch.Tensor, a_bits: int) -> torch.Tensor:
    """Output of a QuantLinear for a 2-D input (the registry checks BACKEND's capabilities first; this does not)."""
    k = x2d.shape[1]
    hb, sb = ops.effective_blocks(layer, k)
    # the core's rule: which scale this step uses ("pow2": per-channel powers of two folded into the codes;
    # None: no auto-scale, as "pow2-fast" at 6/8 bits)
    granularity = scale_granularity(layer.granularity, int(a_bits))
    auto_scale = bool(layer.auto_scale) and granularity is not None
    pow2 = auto_scale and granularity == "pow2"
    share = int(getattr(layer, "shares_input", 0))  # q/k/v reading one input: quantize it once (ops)
    gelu = getattr(layer, "act", None) == "gelu_tanh"  # the next GELU, fused into the GEMM's epilogue (dvdq_core.fusion)
    # a LoRA branch beside the layer (dvdq_core/lowrank.py), joined before the GELU: its down-projection in the
    # activation pass, its up-projection in the GEMM's epilogue (ops.lora_impl_for)
    lowrank = branch_of(layer)
    branch = () if lowrank is None else (lowrank.down, lowrank.up, lowrank.bias)
    return _w4_linear_op(x2d, layer.weight, layer.w_scale, layer.w_zero, layer.bias, int(a_bits), hb, sb, auto_scale,
                         share, pow2, gelu, *branch)


@functools.lru_cache(maxsize=None)  # asked on every forward; the answer holds for the process
def _triton_missing(platform: str = sys.platform):
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        why = f"triton is not importable ({type(exc).__name__}: {exc})"
        if platform == "win32":  # no `triton` wheel for Windows: its community build is what ComfyUI users install
            return (why + "; on Windows install `triton-windows` into ComfyUI's Python, in the version that "
                    "matches your PyTorch (see that project's README; the kernels are tested on Linux only), "
                    "or use the reference backend")
        return (why + f"; install triton>={MIN_TRITON[0]}.{MIN_TRITON[1]} (the version that matches your PyTorch) or "
                "use the reference backend")
    version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:  # the kernels would fail to compile deep inside Triton instead
        return (f"triton {triton.__version__} is older than the {MIN_TRITON[0]}.{MIN_TRITON[1]} the kernels need; "
                "update PyTorch (it brings its Triton) or use the reference backend")
    return None


def _linear_shape(layer, x2d: torch.Tensor, a_bits: int):
    """What the linear kernel needs beyond the data in BACKEND (methods, bits, dtypes, device)."""
    if layer.auto_scale and layer.granularity == "channel":
        return "granularity 'channel' is reference-only (use 'pow2', 'pow2-fast' or 'block' for the GPU kernels)"
    if getattr(layer, "act", None) not in (None, "gelu_tanh"):
        return f"fused activation {layer.act!r} is not implemented by the kernels"
    if x2d.dim() != 2:
        return f"expected a 2-D input, got {x2d.dim()} dims"
    k = x2d.shape[1]
    if k != layer.in_features:
        return f"input width {k} != in_features {layer.in_features}"
    if k % 64:
        return f"in_features {k} is not a multiple of 64"
    if layer.weight.dtype != torch.uint8 or tuple(layer.weight.shape) != (layer.out_features, (k + 1) // 2):
        return "the weight is not packed 4-bit codes of shape [out_features, in_features / 2]"
    for name, v in (("had_block", layer.had_block), ("scale_block", layer.scale_block)):
        v = int(v)
        if v < 1 or v & (v - 1):
            return f"{name} {v} is not a power of two"
    hb, sb = ops.effective_blocks(layer, k)
    if hb > 256:
        return f"Hadamard block {hb} > 256 is not supported by the kernels"
    if layer.auto_scale and sb < 64:
        return f"scale block {sb} < 64 is not supported by the kernels (the GEMM's K-tile is at least 64)"
    return _lowrank_shape(branch_of(layer), x2d, layer.out_features)


def _lowrank_shape(lowrank, x2d: torch.Tensor, n: int):
    """A low-rank branch (lowrank.branch_of) the kernels can fuse: factors of the layer's shape in the input's
    dtype (QuantLinear.forward converts them)."""
    if lowrank is None:
        return None
    rank, k = lowrank.down.shape[0], x2d.shape[1]
    if tuple(lowrank.down.shape) != (rank, k) or tuple(lowrank.up.shape) != (n, rank) or \
            (lowrank.bias is not None and tuple(lowrank.bias.shape) != (n,)):
        return "the low-rank branch's factors (SVD branch / LoRAs after quantization) do not fit the layer"
    if any(t is not None and t.dtype != x2d.dtype for t in (lowrank.down, lowrank.up, lowrank.bias)):
        return "the low-rank branch's factors (SVD branch / LoRAs after quantization) are not in the input's dtype"
    return None


def _capability(device):
    """The card's compute capability, or what Triton compiles for where lower (TRITON_OVERRIDE_ARCH): both must do."""
    card = torch.cuda.get_device_capability(device)
    return min(card, configs.target_capability(card))


def _tokens(x: torch.Tensor, *vectors, first_tokens: int = 0):
    """x [B, S, C] and modulation vectors [B, F, C] (one per sample, frame or token) of its dtype with
    unit channel stride; first_tokens > 0: two vectors per sample, the first for that many tokens
    (ops._vector_rows). (No shapes in the sentences that repeat per call: the warning is once per sentence.)"""
    if x.dim() != 3:
        return f"the input of shape {tuple(x.shape)} is not [batch, tokens, channels]"
    b, s, c = x.shape
    for v in vectors:
        if v.dtype != x.dtype:
            return f"modulation vectors in {v.dtype} need the host's type promotion (activations in {x.dtype})"
        if v.dim() != 3 or v.shape[0] != b or v.shape[2] != c or v.shape[1] < 1 or v.stride(2) != 1:
            return f"a modulation vector of shape {tuple(v.shape)} is not [{b}, frames, {c}]"
        if first_tokens > 0 and v.shape[1] != 2:
            return "modulation vectors split at a token must be two per sample"
        if not first_tokens and 1 < v.shape[1] != s and s // v.shape[1] == 1:  # the host's repeat_e leaves these
            return f"{v.shape[1]} modulation vectors do not spread over {s} tokens"  # unspread
    if first_tokens < 0:
        return "a negative count of first tokens"
    return None


def _heads(x: torch.Tensor, heads: int, unit_channel_stride: bool = True):
    """x [B, L, H x D] (with unit channel stride where the kernel reads x in place), D an even power
    of two, at most 256 heads."""
    if x.dim() != 3 or heads < 1 or x.shape[-1] % heads or (x.shape[-1] // heads) % 2:
        return f"the input of shape {tuple(x.shape)} is not [batch, tokens, heads x even head dim]"
    if unit_channel_stride and x.stride(2) != 1:
        return f"the input of shape {tuple(x.shape)} does not have unit channel stride"
    d = x.shape[-1] // heads
    if d & (d - 1) or heads > 256:
        return f"head dim {d} is not a power of two or there are more than 256 heads"
    return None


def _norm_rope_shape(x: torch.Tensor, weight, eps, freqs: torch.Tensor, heads: int):
    why = _heads(x, heads, unit_channel_stride=False)  # (ops.norm_rope makes x contiguous)
    if why is not None:
        return why
    b, s, c = x.shape
    d = c // heads
    if freqs.dtype != torch.float32 or freqs.dim() != 6 or freqs.shape[0] not in (1, b) or \
            tuple(freqs.shape[1:]) != (s, 1, d // 2, 2, 2) or freqs.stride()[3:] != (4, 2, 1):
        return f"rotary frequencies of shape {tuple(freqs.shape)} / {freqs.dtype} are not [1 or B, S, 1, D/2, 2, 2] float32"
    if weight is not None and tuple(weight.shape) != (c,):
        return f"norm weight of shape {tuple(weight.shape)} is not [{c}]"
    return None


def _modulated_norm_shape(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps, first_tokens: int = 0):
    if shift.shape != scale.shape:
        return f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} differ in shape"
    return _tokens(x, shift, scale, first_tokens=first_tokens)


def _gated_residual_shape(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, first_tokens: int = 0):
    if y.shape != x.shape or y.dtype != x.dtype:
        return f"the residual's branch ({tuple(y.shape)}, {y.dtype}) does not match x ({tuple(x.shape)}, {x.dtype})"
    return _tokens(x, gate, first_tokens=first_tokens)


def _gated_add_inplace_shape(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, first_tokens: int):
    if not x.is_contiguous():
        return "the residual updated in place is not contiguous"
    return _gated_residual_shape(x, y, gate, first_tokens)


def _head_norm_rope_shape(x: torch.Tensor, weight: torch.Tensor, eps, pe: torch.Tensor, heads: int,
                          x2: torch.Tensor | None = None, weight2: torch.Tensor | None = None):
    why = _heads(x, heads)
    if why is None and x2 is not None:
        if x2.dtype != x.dtype or x2.dim() != 3 or x2.shape[0] != x.shape[0] or x2.shape[2] != x.shape[2]:
            return f"the second part ({tuple(x2.shape)}, {x2.dtype}) does not match the first ({tuple(x.shape)}, {x.dtype})"
        why = _heads(x2, heads)
    if why is not None:
        return why
    b, l, c = x.shape
    total, d = l + (0 if x2 is None else x2.shape[1]), c // heads
    if pe.dtype != torch.float32 or pe.dim() != 6 or pe.shape[0] not in (1, b) or \
            tuple(pe.shape[1:]) != (1, total, d // 2, 2, 2) or pe.stride()[3:] != (4, 2, 1):
        return f"rotary frequencies of shape {tuple(pe.shape)} / {pe.dtype} are not [1 or B, 1, L, D/2, 2, 2] float32"
    for w in (weight, weight2) if x2 is not None else (weight,):
        if w is None or tuple(w.shape) != (d,):
            return f"norm weight of shape {None if w is None else tuple(w.shape)} is not [{d}]"
    return None


def _capabilities(shape_rule, **linear):
    return Capabilities(devices=("cuda",), rocm=False, min_capability=MIN_CAPABILITY,
                        dtypes=(torch.bfloat16, torch.float16), shape_rule=shape_rule, **linear)


# The kernels as the core's "triton" backend (dvdq_core.backends): what each op takes, as data, and the
# shape rules above for the rest
BACKEND = Backend(
    "triton", 10, label="the Triton kernels", available=_triton_missing, capability=_capability,
    capabilities={
        "linear": _capabilities(_linear_shape, w_bits=(4,), a_bits=(4, 5, 6, 7, 8, 16), methods=_SUPPORTED_METHODS),
        "norm_rope": _capabilities(_norm_rope_shape),
        "modulated_norm": _capabilities(_modulated_norm_shape),
        "gated_residual": _capabilities(_gated_residual_shape),
        "head_norm_rope": _capabilities(_head_norm_rope_shape),
        "modulated_norm_dims": _capabilities(_modulated_norm_shape),
        "gated_add": _capabilities(_gated_residual_shape),
        "gated_add_inplace": _capabilities(_gated_add_inplace_shape),
    },
    load=lambda: {"linear": linear_forward, "norm_rope": norm_rope, "modulated_norm": modulated_norm,
                  "gated_residual": gated_residual, "head_norm_rope": head_norm_rope,
                  "modulated_norm_dims": modulated_norm_dims, "gated_add": gated_add,
                  "gated_add_inplace": gated_add_inplace})


# 8-bit attention (dvdq_core.attention checks the call and holds the reference; _attention.py the kernels).
# Its own op, outside BACKEND: attention is not a QuantLinear step and has its own fallback rules.
def _attention_q8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fp8: bool,
                  blhd: bool) -> torch.Tensor:
    from . import _attention  # needs triton
    cfg = configs.attention_config(_capability(q.device) if q.is_cuda else (0, 0), fp8, ops.interpreting())
    return _attention.attention(q, k, v, scale, fp8, blhd, cfg)


def _attention_q8_fake(q, k, v, scale, fp8, blhd):
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d) if blhd else (b, h, lq, d))


attention_q8 = _block_op("attention_q8", _attention_q8, _attention_q8_fake)
