"""ComfyUI glue: errors, events, our model folder and file names, input checks, the layer class the
host's memory manager knows, the guard against weight patches on packed layers.

ComfyUI modules (`comfy.*`, `folder_paths`, `server`) are imported inside the functions, so the
node definitions import without ComfyUI (CI).
"""
import logging
import os
import re

import torch

from ..dvdq_core import QuantLinear, quantized_layers

log = logging.getLogger("dvdq")

FOLDER = "dvdq"  # our model folder: models/dvdq, also settable in extra_model_paths.yaml
EXTENSIONS = {".safetensors"}
GUARD_KEY = "dvdq_guard"
ATTACHMENT = "dvdq"  # the ModelPatcher attachment with what the pack knows of a quantized MODEL
# ComfyUI model code of the video DiTs the pack is built for (others are refused with a clear error)
VIDEO_DIT_MODULES = {"comfy.ldm.wan.": "wan", "comfy.ldm.hunyuan_video.": "hunyuan_video"}

class DVDQuantError(RuntimeError):
    """An error shown in the ComfyUI front end; its message says what to do."""


DVDQuantError.__module__ = "dvdq"  # the UI shows "dvdq.DVDQuantError: ...", not the pack's file path


# ---------------------------------------------------------------- events and folders

def emit(event: str, data: dict):
    """PromptServer.send_sync to every connected browser; a no-op outside a running server."""
    try:
        from server import PromptServer
        inst = getattr(PromptServer, "instance", None)
        if inst is not None:
            inst.send_sync(event, data)
    except Exception:  # no server (scripts, tests): events are only for the web panel
        pass


def register_folder():
    """models/dvdq as the `dvdq` model folder, keeping paths extra_model_paths.yaml already added."""
    try:
        import folder_paths
    except ImportError:
        return
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    if isinstance(exts, set):
        exts.update(EXTENSIONS)
    else:  # a yaml-created entry with another container type
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def model_choices() -> list:
    """Files of diffusion_models, then our pre-quantized files as dvdq/<file>."""
    try:
        import folder_paths
    except ImportError:
        return []
    names = list(folder_paths.get_filename_list("diffusion_models"))
    if FOLDER in folder_paths.folder_names_and_paths:
        names += [f"{FOLDER}/{n}" for n in folder_paths.get_filename_list(FOLDER)]
    return names


def resolve_model(name: str):
    """(full path, True if it is a DVD-Quant file of our folder)."""
    import folder_paths
    if name.startswith(FOLDER + "/"):
        path = folder_paths.get_full_path(FOLDER, name[len(FOLDER) + 1:])
        if path is not None:
            return path, True
    path = folder_paths.get_full_path("diffusion_models", name)
    if path is None:
        raise DVDQuantError(f"model file {name!r} not found in models/diffusion_models or models/{FOLDER}: "
                            "put it there (or add the folder to extra_model_paths.yaml) and refresh the page")
    return path, False


def save_folder() -> str:
    import folder_paths
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def unique_path(folder: str, stem: str, ext: str = ".safetensors") -> str:
    """folder/stem.ext, or stem_2, stem_3 ... if taken: existing files are never overwritten."""
    path = os.path.join(folder, stem + ext)
    n = 2
    while os.path.exists(path) or os.path.exists(path + ".partial"):
        path = os.path.join(folder, f"{stem}_{n}{ext}")
        n += 1
    return path


# ---------------------------------------------------------------- checks

def video_dit_arch(base_model) -> str:
    dm = getattr(base_model, "diffusion_model", None)
    mod = type(dm).__module__ + "." if dm is not None else ""
    for prefix, arch in VIDEO_DIT_MODULES.items():
        if mod.startswith(prefix):
            return arch
    what = type(dm).__name__ if dm is not None else type(base_model).__name__
    raise DVDQuantError(f"DVD-Quant quantizes video diffusion transformers (Wan 2.1/2.2, HunyuanVideo); this model is "
                        f"a {what} ({type(base_model).__name__}). Load a Wan or HunyuanVideo diffusion model "
                        "(models/diffusion_models), or use ComfyUI's own loader for this one.")


_WARNED_CPU = []


def quant_device():
    """Where BGR runs: the GPU when ComfyUI uses one, else the CPU (slow but correct)."""
    import comfy.model_management as mm
    dev = mm.get_torch_device()
    if dev.type == "cpu":
        if _WARNED_CPU:
            return None
        _WARNED_CPU.append(True)
        log.warning("DVD-Quant: no GPU in use: quantizing and running with the PyTorch reference backend on the CPU. "
                    "That is correct but slow; it is meant for small models and tests.")
        return None
    return dev


ALLOW_SLOW_ENV = "DVDQ_ALLOW_SLOW"


def gpu_bits_problem(config, caps):
    """The error text if a backend of these linear Capabilities cannot run `config`'s bit-widths, else None.
    Only bit-widths are refused; reference-only methods and options (the baselines) stay allowed."""
    from ..dvdq_core.backends import bits_reason
    for bits in sorted({config.a_low, config.a_high}):
        reason = bits_reason(caps, config.w_bits, bits)
        if reason:
            return (f"the GPU kernels cannot run W{config.w_bits}A{bits}: {reason}. Use w_bits 4 with activation "
                    f"bits 4..8 (or 16). To run these bits on the slow PyTorch reference backend anyway, start "
                    f"ComfyUI with the environment variable {ALLOW_SLOW_ENV}=1.")
    return None


def check_gpu_bits(config):
    """On a CUDA GPU, refuse bit-widths the Triton kernels cannot run, which would otherwise fall back to
    the slow reference backend without it being obvious. Logs the backends once (the first model)."""
    from ..dvdq_core import backends
    backends.log_backends_once()
    if os.environ.get(ALLOW_SLOW_ENV) == "1" or not torch.cuda.is_available():
        return
    import comfy.model_management as mm
    if mm.get_torch_device().type != "cuda":
        return
    triton = backends.get("triton")
    if triton.available() is not None:
        return  # kernels missing: the core warns once and uses the reference backend
    problem = gpu_bits_problem(config, triton.capabilities["linear"])
    if problem:
        raise DVDQuantError(problem)


def quantized_keys(base_model) -> set:
    """State-dict prefixes ("diffusion_model.<layer>") of a model's DVD-Quant layers."""
    dm = getattr(base_model, "diffusion_model", None)
    return {"diffusion_model." + n for n, _ in quantized_layers(dm)} if dm is not None else set()


_LAYER_CLASS = []


def layer_class():
    """QuantLinear as one of ComfyUI's own layers: with comfy.ops.CastWeightBiasOp's attributes the host's
    memory manager loads, offloads (low VRAM, dynamic VRAM) and measures it like its Linear layers, by
    its packed buffers (`weight` holds the packed codes); the forward runs them on the input's device, with
    the low-rank branch the pack's patcher builds from the LoRA patches the host gives it (nodes/lora.py)."""
    if not _LAYER_CLASS:
        import comfy.ops

        class DVDQuantLinear(QuantLinear, comfy.ops.CastWeightBiasOp):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.lora_patches = {}  # {weight or bias key: patch list} from the pack's patcher (nodes/lora.py)
                self.hook_patches = {}  # the same for hook LoRAs, while their hook group is active
                self.lowrank_cache = None

            def forward(self, x):
                if self.act and "forward" in self.__dict__:  # ComfyUI's bypass LoRA wraps this forward (0.33 on)
                    raise DVDQuantError(BYPASS_ON_FUSED_ACT)
                return super().forward(x)

        _LAYER_CLASS.append(DVDQuantLinear)
    return _LAYER_CLASS[0]


BYPASS_ON_FUSED_ACT = (
    "DVD-Quant: a bypass LoRA (Load LoRA (Bypass)) reaches a feed-forward layer whose GELU DVD-Quant applies inside "
    "the layer, so the LoRA would be added after the GELU. Use the plain 'LoraLoaderModelOnly' after the DVD-Quant "
    "Loader instead: DVD-Quant runs it beside the 4-bit weights without changing them, as bypass mode would.")


def _targets(keys, layer_keys):
    hits = []
    for k in keys:
        key = k if isinstance(k, str) else k[0]
        if key.rsplit(".", 1)[0] in layer_keys:
            hits.append(key)
    return hits


def check_patches_on_quantized(patcher):
    """Before sampling (the pack's OUTER_SAMPLE wrapper, before the host loads the model): every weight patch
    on a quantized layer must be a form its low-rank branch runs (nodes/lora.py), on the pack's patcher
    class. Weight wrappers, and patches on a patcher the host made of its own class, are refused with
    what to do. ComfyUI maps a LoRA onto a layer by its `weight` key, which quantized layers keep, so
    LoraLoader's patches and weight wrappers all show here."""
    from .lora import runs_lowrank
    layer_keys = quantized_keys(patcher.model)
    if not layer_keys:
        return
    hits = _targets(patcher.patches.keys(), layer_keys)
    if hits and not runs_lowrank(patcher):
        raise DVDQuantError(lora_after_message("a LoRA on a model copy ComfyUI made without DVD-Quant's patch "
                                               "handling", hits[:3]))
    for key in hits:
        check_patch_list(patcher, key, patcher.patches[key])
    wrapped = _targets(patcher.weight_wrapper_patches.keys(), layer_keys)
    if wrapped:
        raise DVDQuantError(lora_after_message("a weight wrapper", wrapped[:3]))


def check_patch_list(patcher, key: str, patches: list):
    """One quantized layer's patch list: a form its branch runs, of the layer's size."""
    from ..dvdq_core.lowrank import misfit
    from .lora import UnsupportedPatch, packed_layer, patch_terms, unsupported_message
    try:
        terms, biases = patch_terms(key, patches)
    except UnsupportedPatch as e:
        raise DVDQuantError(unsupported_message(str(e), key)) from None
    layer = packed_layer(patcher.model, key)
    why = next(filter(None, (misfit(t, layer.out_features, layer.in_features) for t in terms)), None)
    if why is None and any(d.numel() != layer.out_features for _, d in biases):
        why = f"its bias difference does not have the layer's {layer.out_features} values"
    if why:
        raise DVDQuantError(f"DVD-Quant: the LoRA patch on {key} does not fit the layer: {why}. Use a LoRA made "
                            "for this model.")


def lora_after_message(what: str, examples=()) -> str:
    """what: the kind of patch; examples: weight keys it targets, where known."""
    which = f" such as {', '.join(examples)}" if examples else ""
    return (f"DVD-Quant: {what} would change quantized layers{which}, which needs their float weights. Put the "
            "LoRA loader before 'DVD-Quant Apply' (Load Diffusion Model -> LoRA -> DVD-Quant Apply) so the LoRA "
            "is merged into the weights before they are quantized.")


def hook_lora_hits(guider, layer_keys: set) -> list:
    """LoRA keys of conditioning weight hooks ("Create Hook LoRA") that address quantized layers.

    Hook LoRAs reach the patcher only once sampling has begun (and on 0.33.0 on a non-dynamic copy of
    the host's own class); the user's conds (before ComfyUI filters them) tell beforehand."""
    hits = []
    for conds in (getattr(guider, "original_conds", None) or {}).values():
        for c in conds or []:
            group = c.get("hooks") if isinstance(c, dict) else None
            for hook in getattr(group, "hooks", None) or []:
                hits += lora_hits(getattr(hook, "weights", None) or {}, layer_keys)
    return hits


def check_hook_patches(patcher, layer_keys: set, guider):
    """Hook LoRAs on quantized layers: run by the pack's patcher as branches too (nodes/lora.py), in the forms
    a branch runs; refused on a patcher of the host's own class (0.33's non-dynamic copy for hooks on a GPU)."""
    from .lora import runs_lowrank
    hits = []
    for hp in (getattr(patcher, "hook_patches", None) or {}).values():
        for key in _targets(hp.keys(), layer_keys):
            hits.append(key)
            check_patch_list(patcher, key, hp[key])
    hits += hook_lora_hits(guider, layer_keys)
    if hits and not runs_lowrank(patcher):
        raise DVDQuantError(lora_after_message("a hook LoRA (scheduled through conditioning) on a model copy ComfyUI "
                                               "made without DVD-Quant's patch handling", hits[:3]))


def guard_outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    patcher = guider.model_patcher
    check_patches_on_quantized(patcher)
    check_hook_patches(patcher, quantized_keys(patcher.model), guider)
    return executor(*args, **kwargs)


def lora_hits(lora: dict, layer_keys: set) -> list:
    """LoRA keys that address one of the quantized layers, in any naming ComfyUI understands."""
    stems = set()
    for lk in layer_keys:
        n = lk[len("diffusion_model."):]
        stems.update({lk, n, "lora_unet_" + n.replace(".", "_"), "lycoris_" + n.replace(".", "_"),
                      "transformer." + n, "base_model.model." + n})
    hits = []
    for key in lora:
        parts = key.split(".")
        if any(".".join(parts[:i]) in stems for i in range(1, len(parts))):
            hits.append(key)
    return hits


def split_prefix(prefix: str):
    """"dvdq/wan/model" -> ("wan", "model"): sub-folder of models/dvdq and file stem (a leading "dvdq/" names
    the folder itself)."""
    parts = [p for p in re.split(r"[\\/]+", (prefix or "").strip()) if p]
    if parts and parts[0] == FOLDER:
        parts = parts[1:]
    if not parts:
        parts = ["model"]
    if any(p in (".", "..") for p in parts) or os.path.isabs(prefix or ""):
        raise DVDQuantError(f"filename_prefix {prefix!r}: use a relative name such as 'dvdq/my_model' (no '..')")
    return os.path.join(*parts[:-1]) if len(parts) > 1 else "", parts[-1]


def default_copy_stem(source_path, config) -> str:
    stem = os.path.splitext(os.path.basename(source_path))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    return f"{stem}_dvdq_w{config.w_bits}_{config.method}"
