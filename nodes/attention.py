"""DVD-Quant 8-bit Attention: the core's 8-bit attention as one model's ComfyUI attention.

ComfyUI's supported hook: `transformer_options["optimized_attention_override"]`, called by every
`optimized_attention(...)` of the model as `override(func, q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)` with `func` the host's own attention (ComfyUI
0.3.64, 0.8.0, 0.33.0). q, k, v arrive as [B, L, H x D], or [B, H, L, D] with skip_reshape; the result is
[B, L, H x D], or [B, H, L, D] with skip_output_reshape. The override is set in a clone's model_options, so
only that MODEL changes, whatever model it is (quantized or not). A call the kernel does not take goes
back to the attention that was there before (an earlier override, or `func`), with one warning per reason.

Each override counts its calls (`AttentionStats`: 8-bit, handed back, and why), which the node sends to the
web panel (`dvdq.attention`), and the Bit Switch Scheduler reads per step (nodes/steps.py).
The functions here only touch their arguments, so CI tests them with fakes.
"""
import logging
import threading
import time
from typing import NamedTuple

from ..dvdq_core import attention as core

log = logging.getLogger("dvdq")

ALWAYS, LOW_BIT_STEPS, NEVER = "always", "low-bit steps (δ-GBS)", "never"
MODES = (ALWAYS, LOW_BIT_STEPS, NEVER)
PV_FORMS = core.PV_FORMS
LOW_BITS_BELOW = 8  # "low-bit steps": the step's activation bits are below this (δ-GBS's 4-bit steps by default)
MIN_KEYS = 128  # shorter key sequences (text cross-attention of tiny models) stay on the host: nothing to gain
# reasons a call stays on the host's attention by design (no warning)
HIGH_BIT_STEP = "a high-bit step"
FULL_PRECISION = "the model asks for full precision"
FEW_KEYS = f"fewer than {MIN_KEYS} keys"
MODE_NEVER = "mode never"
QUIET = (HIGH_BIT_STEP, FULL_PRECISION, FEW_KEYS, MODE_NEVER)
EVENT = "dvdq.attention"
WRAPPER_KEY = "dvdq_attention"
_ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_WARNED = set()


def _bind(args, kwargs) -> dict:
    """The host attention's arguments by name (callers pass heads, mask, ... positionally or by keyword)."""
    bound = dict(zip(_ARGS, args))
    for name in _ARGS:
        if name in kwargs:
            bound[name] = kwargs[name]
    bound.setdefault("mask", None)
    return bound


def _to_bhld(x, heads, skip_reshape):
    if skip_reshape or x is None or getattr(x, "dim", lambda: 0)() != 3 or x.shape[-1] % heads:
        return x  # (a tensor that is not [B, L, H x D] is left for shape_reason to name)
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # a view: the kernel reads any strides


def _hand_back(why: str | None):
    if why is not None and why not in QUIET and why not in _WARNED:
        _WARNED.add(why)
        log.warning("DVD-Quant 8-bit Attention: this call runs on ComfyUI's attention because %s.", why)


class Route(NamedTuple):
    """Where one host attention call goes (route): `why` it stays on the host's attention (None: it does not),
    else q, k, v as [B, H, L, D] views for the 8-bit attention and the host call's skip_output_reshape."""
    why: str | None
    q: object = None
    k: object = None
    v: object = None
    skip_out: bool = False


def route(args, kwargs, mode: str = ALWAYS, bit_state=None, check=None) -> Route:
    """Where one host attention call goes (Route). `check(q, k, v, mask)`: why the 8-bit attention cannot run
    these tensors (default `core.why_not`, the GPU kernel's; bench/quality.py passes `core.shape_reason` to run
    the reference on the CPU under the same rules)."""
    if mode == NEVER or kwargs.get("low_precision_attention", True) is False:  # the model asks for 16 bits
        return Route(MODE_NEVER if mode == NEVER else FULL_PRECISION)
    if mode == LOW_BIT_STEPS and (bit_state is None or int(bit_state.bits) >= LOW_BITS_BELOW):
        return Route(HIGH_BIT_STEP)
    a = _bind(args, kwargs)
    heads = a.get("heads")
    if not isinstance(heads, int) or heads < 1:
        return Route("the call gives no head count")
    if kwargs.get("enable_gqa", False):
        return Route("grouped-query attention is not supported")
    q, k, v = (_to_bhld(a.get(n), heads, a.get("skip_reshape", False)) for n in ("q", "k", "v"))
    why = (check or core.why_not)(q, k, v, a["mask"])
    if why is None and k.shape[2] < MIN_KEYS:
        why = FEW_KEYS
    if why is not None:
        return Route(why)
    return Route(None, q, k, v, bool(a.get("skip_output_reshape", False)))


class AttentionStats:
    """What one override did since the sampling run began: calls that ran the 8-bit attention (`q8`), calls
    handed back to the host's attention (`host`) and why (`reasons`: reason -> calls). `emit(event, data)`
    sends `dvdq.attention` for the node `node` at most every `every_s` seconds while calls come, and at once
    on `begin_run` / `end_run` / `publish(force=True)`."""

    def __init__(self, node=None, mode: str = ALWAYS, pv: str = "auto", emit=None, every_s: float = 0.5,
                 clock=time.monotonic):
        self.node, self.mode, self.pv = None if node is None else str(node), mode, pv
        self.emit, self.every_s, self.clock = emit, every_s, clock
        self._lock = threading.Lock()
        self._sent = None  # when the last event went out
        self.reset()

    def reset(self):
        with self._lock:
            self.q8, self.host, self.reasons, self.running = 0, 0, {}, False

    def count(self, reason: str | None):
        """One call: None ran the 8-bit attention, else the reason it went to the host's."""
        with self._lock:
            if reason is None:
                self.q8 += 1
            else:
                self.host += 1
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.publish()

    def counts(self) -> tuple:
        """(8-bit calls, handed-back calls) so far: the Bit Switch Scheduler takes differences per step."""
        with self._lock:
            return self.q8, self.host

    def event(self) -> dict:
        with self._lock:
            return {"node": self.node, "mode": self.mode, "pv": self.pv, "q8": self.q8, "host": self.host,
                    "reasons": dict(self.reasons), "running": self.running}

    def publish(self, force: bool = False):
        if self.emit is None or self.node is None:
            return
        now = self.clock()
        if not force and self._sent is not None and now - self._sent < self.every_s:
            return
        self._sent = now
        self.emit(EVENT, self.event())

    def begin_run(self):
        self.reset()
        self.running = True
        self.publish(force=True)

    def end_run(self):
        self.running = False
        self.publish(force=True)


def make_override(mode: str = ALWAYS, pv: str = "auto", bit_state=None, previous=None, run=None, check=None,
                  stats=None):
    """override(func, *args, **kwargs) for transformer_options["optimized_attention_override"].
    mode LOW_BIT_STEPS reads `bit_state.bits` (the model's DVD-Quant activation bits, which the Bit Switch
    Scheduler sets per step) at each call. previous: an override that was there before (handed the calls we
    do not take). run: the attention op (tests pass a fake), default dvdq_core.attention.attention_q8.
    check: see `route`. stats: the AttentionStats that counts the calls (a new one by default)."""
    run = run or core.attention_q8
    stats = stats if stats is not None else AttentionStats(mode=mode, pv=pv)

    def host(func, args, kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        why, q, k, v, skip_out = route(args, kwargs, mode, bit_state, check)
        stats.count(why)
        if why is not None:
            _hand_back(why)
            return host(func, args, kwargs)
        out = run(q, k, v, scale=kwargs.get("scale"), pv=pv, backend="triton",
                  out_layout="bhld" if skip_out else "blhd")
        return out if skip_out else out.reshape(out.shape[0], out.shape[1], -1)

    override.dvdq_attention = (mode, pv)  # marks ours (a later node replaces it instead of chaining to it)
    override.dvdq_previous = previous
    override.dvdq_stats = stats
    return override


def make_outer_sample_wrapper(stats: AttentionStats):
    """fn(executor, ...) around CFGGuider.outer_sample: the counts start at each sampling run and are sent
    when it ends."""
    def outer_sample(executor, *args, **kwargs):
        stats.begin_run()
        try:
            return executor(*args, **kwargs)
        finally:
            stats.end_run()
    return outer_sample


def outer_sample_key():
    try:
        import comfy.patcher_extension as pe
        return pe.WrappersMP.OUTER_SAMPLE
    except ImportError:  # CI without ComfyUI (the fake patcher's key)
        return "outer_sample"


def install(model, mode: str = ALWAYS, pv: str = "auto", bit_state=None, node=None, emit=None):
    """A clone of `model` (ModelPatcher) whose attention is the 8-bit one (mode "never": the attention that was
    there before ours). Only the clone's transformer_options (and its OUTER_SAMPLE wrapper that counts per
    run) change. node, emit: the node's id and host.emit, for the panel's `dvdq.attention` events."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = to.get("optimized_attention_override")
    if previous is not None and hasattr(previous, "dvdq_attention"):  # ours from an earlier node: replace it
        previous = previous.dvdq_previous
    stats = AttentionStats(node, mode, pv, emit)
    if hasattr(m, "remove_wrappers_with_key"):
        m.remove_wrappers_with_key(outer_sample_key(), WRAPPER_KEY)
    if mode == NEVER:
        if previous is None:
            to.pop("optimized_attention_override", None)
        else:
            to["optimized_attention_override"] = previous
    else:
        to["optimized_attention_override"] = make_override(mode, pv, bit_state, previous, stats=stats)
        if hasattr(m, "add_wrapper_with_key"):
            m.add_wrapper_with_key(outer_sample_key(), WRAPPER_KEY, make_outer_sample_wrapper(stats))
    stats.publish(force=True)  # the node's mode on its panel before the first run
    return m
