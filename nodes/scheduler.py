"""Bit Switch Scheduler: delta-GBS through ComfyUI's composable wrappers.

OUTER_SAMPLE wraps each sampling run (reset, or continue a split schedule; see steps.py),
DIFFUSION_MODEL wraps each call of the diffusion model (pick the step's bits, observe the output).
The wrapper functions only touch their arguments, so CI tests them with fake executors.
"""
import logging

from ..dvdq_core import set_activation_bits
from .steps import BitScheduleHook

WRAPPER_KEY = "dvdq_bitswitch"


def find_transformer_options(args, kwargs) -> dict:
    """The transformer_options dict of a DIFFUSION_MODEL call; its position differs per model class."""
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict) and ("sigmas" in a or "sample_sigmas" in a or "cond_or_uncond" in a):
            return a
    return {}


def call_sigma(transformer_options: dict):
    sig = transformer_options.get("sigmas")
    if sig is None:
        return None
    if hasattr(sig, "reshape"):
        return float(sig.reshape(-1)[0])
    return float(sig[0] if isinstance(sig, (list, tuple)) else sig)


_WARNED = []


def served_from_cache(transformer_options: dict) -> bool:
    """Whether ComfyUI's EasyCache, wrapped inside this wrapper (applied after the scheduler), returned its
    cached output for this call instead of running the model: its holder's `skip_current_step`, which its
    CALC_COND_BATCH wrapper clears before each step's calls. (LazyCache, and EasyCache applied before the
    scheduler, wrap outside it: a skipped step then never reaches it. LazyCache's holder sits under the same
    key, with a skip_current_step it never clears: it is not asked.)"""
    holder = transformer_options.get("easycache")
    if holder is None or getattr(holder, "name", "EasyCache") != "EasyCache":
        return False
    skip = getattr(holder, "skip_current_step", None)
    if skip is None:
        if not _WARNED:
            _WARNED.append(True)
            logging.getLogger("dvdq").warning(
                "DVD-Quant: this ComfyUI's EasyCache does not say which steps it skipped; the Bit Switch "
                "Scheduler then counts its cached outputs as the model's. Apply EasyCache before the scheduler.")
        return False
    return bool(skip)


def make_outer_sample_wrapper(hook: BitScheduleHook):
    """fn(executor, noise, latent_image, sampler, sigmas, ...) around CFGGuider.outer_sample."""
    def outer_sample(executor, *args, **kwargs):
        noise = args[0] if args else kwargs["noise"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        hook.begin_run(sigmas, tuple(noise.shape))
        completed = False
        try:
            out = executor(*args, **kwargs)
            completed = True
            return out
        finally:  # an interrupted or failed run leaves nothing for the next run to continue
            hook.end_run(completed)
    return outer_sample


def make_diffusion_model_wrapper(hook: BitScheduleHook):
    """fn(executor, x, timestep, ..., transformer_options, ...) around the diffusion model's forward."""
    def diffusion_model(executor, *args, **kwargs):
        to = find_transformer_options(args, kwargs)
        if hook.running and not hook.tracker.schedule and to.get("sample_sigmas") is not None:
            hook.tracker.begin(to["sample_sigmas"])  # a sampler path without OUTER_SAMPLE
        sigma = call_sigma(to)
        attention = getattr(to.get("optimized_attention_override"), "dvdq_stats", None)  # the 8-bit attention's
        bits = hook.bits if sigma is None else hook.bits_for_call(sigma, "easycache" in to, attention)
        set_activation_bits(executor.class_obj, bits)
        out = executor(*args, **kwargs)
        hook.after_call(out, to.get("cond_or_uncond"), sigma, served_from_cache(to))
        return out
    return diffusion_model


def install(model, hook: BitScheduleHook):
    """A clone of `model` (ModelPatcher) with the scheduler's wrappers; an earlier scheduler's are replaced."""
    import comfy.patcher_extension as pe
    m = model.clone()
    for kind, make in ((pe.WrappersMP.OUTER_SAMPLE, make_outer_sample_wrapper),
                       (pe.WrappersMP.DIFFUSION_MODEL, make_diffusion_model_wrapper)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, make(hook))
    return m
