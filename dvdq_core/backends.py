"""Compute backends: one registry of what runs each op, as data, in priority order.

A backend is a name, a priority, an `available()` check (None, or why it cannot run at all: a missing
or too old Triton), its implementations (loaded on first use) and, for each op it implements, the
Capabilities a call must meet: devices, input dtypes, CUDA compute capability, bit-widths and methods
as data, and a shape rule for what data cannot say. Every failed check is a sentence: the warning a user
reads when a call falls back, or the error when a named backend cannot run it.

Built in:
  triton     dvdq_core/kernels (CUDA GPUs), priority 10
  reference  PyTorch on any device, the ground truth, priority 0: QuantLinear's math below; for the
             fused block steps the op module's own `*_reference` (the host's formulas, wan_ops and
             hunyuan_ops), which is why its implementation of those ops is None ("the caller's").
Ops: "linear" (args: layer, x2d, a_bits; the layer's `lowrank` branch, if any, is the implementation's
to apply too, before its fused activation) and the block steps of wan_ops / hunyuan_ops (args as the
kernels take them, input first).

Choosing: a layer's `backend` ("auto", "reference", "triton"), overridden for everything in its scope by
`use_backend(name)` (tests and benchmarks). "auto" takes the first backend in priority order that can
run the call, and warns once why a preferred one could not; a named backend that cannot run a call raises.
"""
import contextlib
import importlib
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .activations import EPS, auto_scale, quantize_per_token, scale_granularity
from .hadamard import rotate
from .lowrank import branch_of
from .weights import minmax_quantize

log = logging.getLogger("dvdq")

OPS = ("linear", "norm_rope", "modulated_norm", "gated_residual", "head_norm_rope", "modulated_norm_dims",
       "gated_add", "gated_add_inplace")


@dataclass(frozen=True)
class Capabilities:
    """What a call must meet for a backend to run one op; an empty tuple means any."""
    devices: tuple = ()  # device types of the input ("cuda")
    rocm: bool = True  # False: not on a ROCm build of PyTorch
    min_capability: tuple | None = None  # CUDA compute capability (major, minor), as the backend counts it
    dtypes: tuple = ()  # input dtypes
    w_bits: tuple = ()  # linear: weight bit-widths
    a_bits: tuple = ()  # linear: activation bit-widths
    methods: tuple = ()  # linear: quantization methods
    shape_rule: Callable | None = None  # (*args) -> None or why not: what the data cannot say


@dataclass
class Backend:
    name: str
    priority: int
    capabilities: dict  # {op: Capabilities}
    load: Callable[[], dict] = dict  # -> {op: implementation (None: the caller's reference)}
    available: Callable[[], str | None] = lambda: None
    capability: Callable = torch.cuda.get_device_capability  # a CUDA device's (major, minor) for min_capability
    label: str = ""  # how the sentences name it, plural ("the Triton kernels")
    _impl: dict | None = field(default=None, repr=False)

    def impl(self, op):
        if self._impl is None:
            self._impl = self.load()
        return self._impl[op]


_REGISTRY = {}
_LOCK = threading.Lock()
# use_backend's choice: a plain module global, which torch.compile guards on (a ContextVar would break
# the graph at every dispatch)
_FORCED = [None]
_WARNED = set()


def register(backend: Backend):
    """Add or replace a backend (by name)."""
    with _LOCK:
        _REGISTRY[backend.name] = backend


def _triton_backend():
    try:  # imported relatively: the pack never puts its folder on sys.path; importing needs no triton
        return importlib.import_module(".kernels", __package__).BACKEND
    except Exception as e:
        why = f"the Triton kernels could not be loaded ({type(e).__name__}: {e})"
        return Backend("triton", 10, {op: Capabilities() for op in OPS}, available=lambda: why, label="the Triton kernels")


def get(name: str) -> Backend:
    backends = _REGISTRY
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(sorted(backends))}")
    return backends[name]


def _ordered():
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def list_backends() -> dict:
    """{name: {"priority", "available", "reason", "ops"}} in priority order."""
    out = {}
    for b in _ordered():
        why = b.available()
        out[b.name] = {"priority": b.priority, "available": why is None, "reason": why, "ops": sorted(b.capabilities)}
    return out


def describe() -> str:
    """One line for logs and summaries: 'triton (available), reference (available)'."""
    return ", ".join(f"{n} ({'available' if v['available'] else 'unavailable: ' + v['reason']})"
                     for n, v in list_backends().items())


_LOGGED = []


def log_backends_once():
    if not _LOGGED:
        _LOGGED.append(True)
        log.info("DVD-Quant backends, in priority order: %s", describe())


@contextlib.contextmanager
def use_backend(name: str):
    """Run every op in this scope on backend `name` ("auto": the priority order, ignoring the layers' own
    choice); a call it cannot run raises. For tests and benchmarks: the choice is process-wide while the
    scope lasts (not per thread)."""
    if name != "auto":
        get(name)
    before, _FORCED[0] = _FORCED[0], name
    try:
        yield
    finally:
        _FORCED[0] = before


def _bits_text(bits) -> str:
    """(4, 5, 6, 7, 8, 16) -> '4..8 or 16'."""
    runs, bits = [], sorted(bits)
    for b in bits:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return " or ".join(f"{a}..{b}" if b > a + 1 else (f"{a} or {b}" if b > a else f"{a}") for a, b in runs)


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DEVICE_NAMES = {"cuda": "CUDA GPUs", "cpu": "the CPU"}


def bits_reason(caps: Capabilities, w_bits: int, a_bits: int) -> str | None:
    """Why a backend's linear capabilities refuse these bit-widths, or None."""
    if caps.w_bits and w_bits not in caps.w_bits:
        return f"weights of {w_bits} bits are not supported ({_bits_text(caps.w_bits)}-bit weights only)"
    if caps.a_bits and a_bits not in caps.a_bits:
        return f"activation bits {a_bits} are not supported ({_bits_text(caps.a_bits)})"
    return None


def input_of(op: str, args: tuple) -> torch.Tensor:
    """The activation an op's call works on: linear's x2d (its args are layer, x2d, a_bits), else the first."""
    return args[1] if op == "linear" else args[0]


def _label(b: Backend) -> str:
    return b.label or f"the {b.name} backend's kernels"


def unsupported_reason(name: str, op: str, *args) -> str | None:
    """None when backend `name` can run op(*args) here, else a short sentence why not: the machine's
    checks first (device, GPU, the backend's install), then the call's (call_reason)."""
    b = get(name)
    caps = b.capabilities.get(op)
    if caps is None:
        return f"the {name} backend does not implement {op}"
    x = input_of(op, args)
    if caps.devices and x.device.type not in caps.devices:
        where = " and ".join(_DEVICE_NAMES.get(d, d) for d in caps.devices)
        return f"the input is on {x.device.type}, and {_label(b)} run on {where} only"
    if any(isinstance(t, torch.Tensor) and t.device != x.device for t in args):
        return "the inputs are on different devices"
    if not caps.rocm and torch.version.hip is not None:
        return f"ROCm GPUs are not supported by {_label(b)}"
    if caps.min_capability and x.device.type == "cuda":
        cap, need = b.capability(x.device), caps.min_capability
        if cap < need:
            return f"GPU compute capability {cap[0]}.{cap[1]} < {need[0]}.{need[1]}"
    return b.available() or call_reason(name, op, *args)


def call_reason(name: str, op: str, *args) -> str | None:
    """The checks of the call itself, wherever it runs: methods and bit-widths (linear), input dtype,
    the shape rule. None when they pass."""
    caps = get(name).capabilities.get(op)
    if caps is None:
        return f"the {name} backend does not implement {op}"
    x = input_of(op, args)
    if op == "linear":
        layer, a_bits = args[0], args[2]
        method = getattr(layer, "method", "dvdq")
        if caps.methods and method not in caps.methods:
            return f"method {method!r} runs on the reference backend only (it keeps a float weight)"
        why = bits_reason(caps, int(layer.w_bits), int(a_bits))
        if why:
            return why
    if caps.dtypes and x.dtype not in caps.dtypes:
        return (f"input dtype {x.dtype} is not supported "
                f"({' or '.join(_DTYPE_NAMES.get(d, str(d)) for d in caps.dtypes)} only)")
    return caps.shape_rule(*args) if caps.shape_rule is not None else None


def warn_once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)  # the caller of QuantLinear / the op


def choose(op: str, args: tuple, preferred: str = "auto", what: str | None = None):
    """(backend, why the backends before it in priority order cannot run the call, or None).
    `use_backend` overrides `preferred` (a layer's backend); a named backend that cannot run it raises."""
    name = _FORCED[0] or preferred
    if name != "auto":
        why = unsupported_reason(name, op, *args)
        if why is not None:
            raise RuntimeError(f"DVD-Quant: the {name} backend cannot run {what or op}: {why}. "
                               "Use backend 'auto' (or 'reference').")
        return get(name), None
    skipped = None
    for b in _ordered():
        if op not in b.capabilities:
            continue  # a backend that does not implement the op is not a fallback worth a warning
        why = unsupported_reason(b.name, op, *args)
        if why is None:
            return b, skipped
        skipped = skipped or why
    raise RuntimeError(f"DVD-Quant: no backend can run {what or op}: {skipped}")  # (reference takes every call)


def select(op: str, args: tuple, preferred: str = "auto", what: str | None = None):
    """The implementation that runs op(*args) (None: the caller's reference, for the block steps),
    with a one-time warning where a preferred backend could not take the call."""
    b, skipped = choose(op, args, preferred, what)
    # on the CPU the block steps' reference is the expected path (the host's own ops): no warning there
    if skipped and (op == "linear" or args[0].device.type == "cuda"):
        warn_once(f"DVD-Quant: {what or op} {'run' if op == 'linear' else 'runs'} on the {b.name} backend "
                  f"(correct{', slower' if b.name == 'reference' else ''}) because {skipped}.")
    return b.impl(op)


def linear_backend(layer, dtype, a_bits: int = 4, device=None) -> str:
    """Which backend runs a QuantLinear for inputs of `dtype` on `device` (default: its own): its name,
    with the reason where a preferred backend cannot ("reference (the input is on cpu, ...)")."""
    x = torch.zeros(1, layer.in_features, device=device or layer.weight.device, dtype=dtype)
    b, skipped = choose("linear", (layer, x, a_bits), layer.backend)
    return b.name if skipped is None else f"{b.name} ({skipped})"


def quantized_input(layer, x: torch.Tensor, a_bits: int) -> torch.Tensor:
    """x (float32, in the layer's basis: rotated, or divided by SmoothQuant's scales) as the layer's activation
    quantization gives it back: per-token codes times their scales, times ARQ's channel scales where it has them."""
    if a_bits == 16:
        return x
    scale = None
    granularity = scale_granularity(layer.granularity, a_bits)  # None: no auto-scale at this bit-width
    if layer.method != "smoothquant" and layer.auto_scale and granularity is not None:
        scale = auto_scale(x, granularity, layer.scale_block)
    q, s_tok = quantize_per_token(x, a_bits, scale)
    x = q.float() * s_tok.unsqueeze(1)
    return x * scale if scale is not None else x


@torch.no_grad()
def reference_forward(layer, x2d: torch.Tensor, a_bits: int) -> torch.Tensor:
    """ARQ / baseline math of docs/design.md in float32."""
    x = x2d.float()
    if layer.method == "smoothquant":
        w = layer.float_weight.float()
        s = x.abs().amax(0).clamp_min(EPS).sqrt() / w.abs().amax(0).clamp_min(EPS).sqrt()
        x = x / s
        w = minmax_quantize(w * s, layer.w_bits).dequantize()
    else:
        if layer.rotate:
            x = rotate(x, layer.had_block)
        w = layer.dequantized_weight()
    x = quantized_input(layer, x, a_bits)
    y = x @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    y = y.to(x2d.dtype)
    lowrank = branch_of(layer)
    if lowrank is not None:  # LoRAs after quantization, the SVD branch (dvdq_core.lowrank): before the fused GELU
        y = lowrank.add_to(y, x2d)
    if layer.act == "gelu_tanh":  # fused GELU (dvdq_core.fusion): the module's own op on the rounded output
        y = F.gelu(y, approximate="tanh")
    return y


register(Backend("reference", 0, {op: Capabilities() for op in OPS},
                 load=lambda: {op: (reference_forward if op == "linear" else None) for op in OPS},
                 label="the PyTorch reference"))
# registered at import (the kernels package needs neither triton nor a GPU to import; it imports this
# module's Backend above): dispatch then reads a plain dict, which torch.compile traces without a break
register(_triton_backend())
