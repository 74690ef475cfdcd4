"""What the fused block forwards of every model family share (nodes/wan_blocks.py,
nodes/hunyuan_blocks.py): the environment switch, the fingerprint of the host code they follow,
which norms the kernels take, and switching modules to our subclasses and back.

A fused forward is the pack's own version of a host forward (same steps, same order, the
elementwise steps as dvdq kernels). It is installed by changing a module's class to a subclass of
its own, and only where the host's code still is what it follows (signature and names used), so a
changed ComfyUI keeps its own forward (correct, only slower) and a warning says so.
"""
import inspect
import logging
import os

from torch import nn

log = logging.getLogger("dvdq")
SWITCHES = ("DVDQ_FUSE_BLOCKS", "DVDQ_FUSE_WAN")  # either =0 turns the fused block steps off (DVDQ_FUSE_WAN: earlier name)


def switched_off() -> str | None:
    """The UI's reason when an environment switch turns the fused block steps off, else None."""
    for name in SWITCHES:
        if os.environ.get(name, "1") == "0":
            return f"turned off by {name}=0"
    return None


def _names(code) -> set:
    """Global and attribute names a function uses, nested functions included."""
    out = set(code.co_names)
    for c in code.co_consts:
        if inspect.iscode(c):
            out |= _names(c)
    return out


def host_attr(module, dotted: str):
    """module.<dotted> ("Class.forward"), or None where the host no longer has it in that form."""
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


_SAID = set()


def host_changed(family: str, why: str) -> str:
    """Log once per host difference that a family's fused forwards are off; the UI's short reason."""
    if (family, why) not in _SAID:
        _SAID.add((family, why))
        log.warning("DVD-Quant: ComfyUI's %s code differs from what the fused block steps follow (%s); they are off "
                    "and the model runs ComfyUI's own forwards (correct, only slower). Please report the ComfyUI "
                    "version.", family, why)
    return f"ComfyUI's {family} code changed (see the log)"


def host_function_mismatch(fn, expected, subject: str = "it") -> str | None:
    """None when the function has the expected (parameters, names[, constants it must hold]), else
    what differs. Fails closed: anything that cannot be read as such a function is a difference."""
    try:
        return _mismatch(fn, expected, subject)
    except Exception as e:  # not a Python function any more (None, a builtin, a C extension ...)
        return f"{subject} cannot be checked ({type(e).__name__}: {e})"


def _mismatch(fn, expected, subject):
    params, names, *consts = expected
    got = tuple(inspect.signature(fn).parameters)
    if got != params:
        return f"{subject} takes {got}, expected {params}"
    used = _names(fn.__code__)
    if used != set(names):
        return f"{subject} uses {sorted(used ^ set(names))} differently"
    missing = [c for c in (consts[0] if consts else ()) if c not in fn.__code__.co_consts]
    if missing:
        return f"{subject} no longer has the constants {missing}"
    return None


def host_forward_mismatch(cls, expected) -> str | None:
    """None when cls.forward has the expected (parameters, names), else what differs."""
    return host_function_mismatch(getattr(cls, "forward", None), expected, "its forward")


def plain_norm(norm: nn.Module) -> bool:
    """A norm whose weight the host does not patch (no LoRA or other weight function on it). A weight the
    host only casts (ComfyUI's manual_cast layers: fp8 storage, low-VRAM offload) is fine: the fused
    forwards cast it to the input's dtype and device themselves, as the host's cast does. Not plain: a weight
    that ComfyUI's dynamic VRAM (0.33.0) patches or streams at cast time (`*_lowvram_function`, `_v`): today
    it force-loads such small norms with their patches applied, but that is its choice to change."""
    return not (getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None)
                or getattr(norm, "weight_lowvram_function", None) or getattr(norm, "bias_lowvram_function", None)
                or hasattr(norm, "_v"))


def bare_layer_norm(norm: nn.Module, x) -> bool:
    """A LayerNorm over x's channels without affine (Wan's norm1 / norm2, HunyuanVideo's img_norm1 ...;
    with no weight there is nothing for the host to cast or patch): the modulation kernels' norm."""
    return isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None \
        and tuple(norm.normalized_shape) == (x.shape[-1],)


def fused_subclass(cache: dict, cls, build):
    """Our subclass of cls (a host class, or a subclass keeping its forward), built once by
    build(cls) and named DVDQ<cls>; cache: host class -> our subclass, one per model family."""
    if cls not in cache:
        fused = build(cls)
        fused.__name__ = fused.__qualname__ = "DVDQ" + cls.__name__
        cache[cls] = fused
    return cache[cls]


def restore_classes(diffusion_model: nn.Module, cache: dict) -> int:
    """Give the modules switched to one of cache's subclasses (host class -> ours) their host class
    back; returns how many (benchmarks measure what fusing saves)."""
    hosts = {fused: host for host, fused in cache.items()}
    restored = 0
    for m in diffusion_model.modules():
        if type(m) in hosts:
            m.__class__ = hosts[type(m)]
            restored += 1
    return restored
