"""Widget values -> dvdq_core.QuantConfig (no ComfyUI imports, tested in CI)."""
from ..dvdq_core import QuantConfig, parse_overrides
from ..dvdq_core.activations import ACT_BITS as A_BITS
from ..dvdq_core.config import GRANULARITIES as _GRANULARITIES, METHODS as _METHODS, check_svd_rank

METHODS = list(_METHODS)  # the core's choices, as lists for ComfyUI's dropdowns
GRANULARITIES = list(_GRANULARITIES)
BLOCKS = ["64", "128", "256"]  # the block sizes offered on the node (the core takes 16..256)

_CORE = QuantConfig()  # the core's defaults are the nodes' defaults (tests check the widgets follow)
DEFAULT_ARQ = {"rotate": _CORE.rotate, "had_block": _CORE.had_block, "auto_scale": _CORE.auto_scale,
               "granularity": _CORE.granularity, "scale_block": _CORE.scale_block, "layer_overrides": "",
               "svd_rank": _CORE.svd_rank}


class SettingsError(ValueError):
    """Bad widget values; the message says what to change."""


def arq_settings(rotate=True, had_block="128", auto_scale=True, granularity="pow2", scale_block="128",
                 layer_overrides="", svd_rank=_CORE.svd_rank) -> dict:
    """The ARQ_SETTINGS value: plain data, validated now so a typo shows on the ARQ Settings node."""
    if str(had_block) not in BLOCKS or str(scale_block) not in BLOCKS:
        raise SettingsError(f"ARQ Settings: block sizes must be one of {', '.join(BLOCKS)}")
    if granularity not in GRANULARITIES:
        raise SettingsError(f"ARQ Settings: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    try:
        parse_overrides(layer_overrides or "")
    except ValueError as e:
        raise SettingsError(f"ARQ Settings, layer_overrides: {e}") from None
    try:
        check_svd_rank(svd_rank)
    except ValueError as e:
        raise SettingsError(f"ARQ Settings: {e}") from None
    return {"rotate": bool(rotate), "had_block": int(had_block), "auto_scale": bool(auto_scale),
            "granularity": granularity, "scale_block": int(scale_block), "layer_overrides": layer_overrides or "",
            "svd_rank": svd_rank}


def check_activation_bits(a_low: int, a_high: int):
    for name, b in (("a_low", a_low), ("a_high", a_high)):
        if b not in A_BITS:
            raise SettingsError(f"{name} = {b}: activation bits must be 4, 5, 6, 7, 8 or 16 (16 = not quantized)")
    if a_low > a_high:
        raise SettingsError(f"a_low ({a_low}) is larger than a_high ({a_high}): swap them")


def build_config(w_bits: int, a_low: int, a_high: int, method: str, arq: dict | None = None) -> QuantConfig:
    """The QuantConfig of a Loader/Apply node. Without a Bit Switch Scheduler the model runs at a_high."""
    if method not in METHODS:
        raise SettingsError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(w_bits, int) or not 2 <= w_bits <= 8:
        raise SettingsError(f"w_bits = {w_bits!r}: weight bits must be an integer from 2 to 8")
    check_activation_bits(a_low, a_high)
    arq = {**DEFAULT_ARQ, **(arq or {})}
    try:
        return QuantConfig(method=method, w_bits=w_bits, a_bits=a_high, a_low=a_low, a_high=a_high,
                           rotate=arq["rotate"], had_block=int(arq["had_block"]), auto_scale=arq["auto_scale"],
                           granularity=arq["granularity"], scale_block=int(arq["scale_block"]),
                           svd_rank=int(arq["svd_rank"]), overrides=parse_overrides(arq["layer_overrides"] or ""))
    except ValueError as e:
        raise SettingsError(f"DVD-Quant settings: {e}") from None
