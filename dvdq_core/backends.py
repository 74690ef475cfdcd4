"""Compute backends of QuantLinear: "reference" (PyTorch, any device, the ground truth) and
"triton" (the GPU kernels in dvdq_core/kernels/, registered when they load). "auto" picks triton where the
kernels support the layer and device, else the reference backend with a one-time warning saying why.
"""
import importlib
import warnings

import torch
import torch.nn.functional as F

from .activations import EPS, auto_scale, quantize_per_token, scale_granularity
from .hadamard import rotate
from .weights import minmax_quantize

_BACKENDS = {}
_WARNED = set()
_KERNELS = None  # the loaded kernels module, or the reason it could not be loaded


def register_backend(name: str, fn):
    """fn(layer, x2d, a_bits) -> y2d"""
    _BACKENDS[name] = fn


@torch.no_grad()
def reference_forward(layer, x2d: torch.Tensor, a_bits: int) -> torch.Tensor:
    """ARQ / baseline math of docs/design.md in float32."""
    x = x2d.float()
    if layer.method == "smoothquant":
        w = layer.float_weight.float()
        s = x.abs().amax(0).clamp_min(EPS).sqrt() / w.abs().amax(0).clamp_min(EPS).sqrt()
        x = x / s
        w = minmax_quantize(w * s, layer.w_bits).dequantize()
        scale = None
    else:
        if layer.rotate:
            x = rotate(x, layer.had_block)
        w = layer.dequantized_weight()
        scale = None
        granularity = scale_granularity(layer.granularity, a_bits)  # None: no auto-scale at this bit-width
        if layer.auto_scale and a_bits != 16 and granularity is not None:
            scale = auto_scale(x, granularity, layer.scale_block)
    if a_bits != 16:
        q, s_tok = quantize_per_token(x, a_bits, scale)
        x = q.float() * s_tok.unsqueeze(1)
        if scale is not None:
            x = x * scale
    y = x @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    y = y.to(x2d.dtype)
    if layer.act == "gelu_tanh":  # fused GELU (dvdq_core.fusion): the module's own op on the rounded output
        y = F.gelu(y, approximate="tanh")
    return y


register_backend("reference", reference_forward)


def load_kernels():
    """The core's Triton kernels (dvdq_core.kernels, imported relatively: the pack never puts its folder
    on sys.path), or the reason they could not be loaded."""
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = importlib.import_module(".kernels", __package__)
            register_backend("triton", _KERNELS.linear_forward)
        except Exception as e:  # triton missing or broken: say so when a layer would have used it
            _KERNELS = f"the Triton kernels could not be loaded ({type(e).__name__}: {e})"
    return _KERNELS


def warn_once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def triton_unsupported_reason(layer, x2d, a_bits):
    if x2d.device.type != "cuda":
        return f"the input is on {x2d.device.type}, and the Triton kernels run on CUDA GPUs only"
    k = load_kernels()
    if isinstance(k, str):
        return k
    return k.unsupported_reason(layer, a_bits, x2d)


def get_backend(name: str, layer, x2d, a_bits):
    if name == "reference":
        return _BACKENDS["reference"]
    if name in ("auto", "triton"):
        reason = triton_unsupported_reason(layer, x2d, a_bits)
        if reason is None:
            return _BACKENDS["triton"]
        if name == "triton":
            raise RuntimeError(f"DVD-Quant: the triton backend cannot run this layer: {reason}. "
                               "Use backend 'reference' or 'auto'.")
        warn_once(f"DVD-Quant: using the slow PyTorch reference backend because {reason}.")
        return _BACKENDS["reference"]
    if name in _BACKENDS:
        return _BACKENDS[name]
    raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(sorted(_BACKENDS))}")
