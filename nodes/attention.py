"""DVD-Quant 8-bit Attention: the core's 8-bit attention as one model's ComfyUI attention.

ComfyUI's supported hook: `transformer_options["optimized_attention_override"]`, called by every
`optimized_attention(...)` of the model as `override(func, q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)` with `func` the host's own attention (ComfyUI
0.3.64, 0.8.0, 0.33.0). q, k, v arrive as [B, L, H x D], or [B, H, L, D] with skip_reshape; the result is
[B, L, H x D], or [B, H, L, D] with skip_output_reshape. The override is set in a clone's model_options, so
only that MODEL changes, whatever model it is (quantized or not). A call the kernel does not take goes
back to the attention that was there before (an earlier override, or `func`), with one warning per reason.

The functions here only touch their arguments, so CI tests them with fakes.
"""
import logging

from ..dvdq_core import attention as core

log = logging.getLogger("dvdq")

ALWAYS, LOW_BIT_STEPS, NEVER = "always", "low-bit steps (δ-GBS)", "never"
MODES = (ALWAYS, LOW_BIT_STEPS, NEVER)
PV_FORMS = ("auto", "fp8", "fp16")
LOW_BITS_BELOW = 8  # "low-bit steps": the step's activation bits are below this (δ-GBS's 4-bit steps by default)
MIN_KEYS = 128  # shorter key sequences (text cross-attention of tiny models) stay on the host: nothing to gain
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
    if why is not None and why not in _WARNED:
        _WARNED.add(why)
        log.warning("DVD-Quant 8-bit Attention: this call runs on ComfyUI's attention because %s.", why)


def make_override(mode: str = ALWAYS, pv: str = "auto", bit_state=None, previous=None, run=None):
    """override(func, *args, **kwargs) for transformer_options["optimized_attention_override"].
    mode LOW_BIT_STEPS reads `bit_state.bits` (the model's DVD-Quant activation bits, which the Bit Switch
    Scheduler sets per step) at each call. previous: an override that was there before (handed the calls we
    do not take). run: the attention op (tests pass a fake), default dvdq_core.attention.attention_q8."""
    run = run or core.attention_q8

    def host(func, args, kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        if mode == NEVER or kwargs.get("low_precision_attention", True) is False:  # the model asks for 16 bits
            return host(func, args, kwargs)
        if mode == LOW_BIT_STEPS and (bit_state is None or int(bit_state.bits) >= LOW_BITS_BELOW):
            return host(func, args, kwargs)
        a = _bind(args, kwargs)
        heads, skip_out = a.get("heads"), a.get("skip_output_reshape", False)
        why = None
        if not isinstance(heads, int) or heads < 1:
            why = "the call gives no head count"
        elif kwargs.get("enable_gqa", False):
            why = "grouped-query attention is not supported"
        q, k, v = (_to_bhld(a.get(n), heads, a.get("skip_reshape", False)) for n in ("q", "k", "v"))
        why = why or core.why_not(q, k, v, a["mask"])
        if why is not None:
            _hand_back(why)
            return host(func, args, kwargs)
        if k.shape[2] < MIN_KEYS:
            return host(func, args, kwargs)
        out = run(q, k, v, scale=kwargs.get("scale"), pv=pv, backend="triton",
                  out_layout="bhld" if skip_out else "blhd")
        return out if skip_out else out.reshape(out.shape[0], out.shape[1], -1)

    override.dvdq_attention = (mode, pv)  # marks ours (a later node replaces it instead of chaining to it)
    override.dvdq_previous = previous
    return override


def install(model, mode: str = ALWAYS, pv: str = "auto", bit_state=None):
    """A clone of `model` (ModelPatcher) whose attention is the 8-bit one (mode "never": the attention that was
    there before ours). Only the clone's transformer_options change."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = to.get("optimized_attention_override")
    if previous is not None and hasattr(previous, "dvdq_attention"):  # ours from an earlier node: replace it
        previous = previous.dvdq_previous
    if mode == NEVER:
        if previous is None:
            to.pop("optimized_attention_override", None)
        else:
            to["optimized_attention_override"] = previous
        return m
    to["optimized_attention_override"] = make_override(mode, pv, bit_state, previous)
    return m
