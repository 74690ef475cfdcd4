"""ComfyUI glue: model loading, quantizing a MODEL, saving, events, guards.

ComfyUI modules (`comfy.*`, `folder_paths`, `server`) are imported inside the functions, so the
node definitions import without ComfyUI (CI).
"""
import logging
import os
import re
import time
import uuid

import torch
from torch import nn

from dvdq_core import QuantLinear, load_quantized, quantize_model, quantized_layers, read_metadata, save_quantized
from dvdq_core import set_activation_bits
from dvdq_core.spec import layer_spec

log = logging.getLogger("dvdq")

FOLDER = "dvdq"  # our model folder: models/dvdq, also settable in extra_model_paths.yaml
EXTENSIONS = {".safetensors"}
GUARD_KEY = "dvdq_guard"
# ComfyUI model code of the video DiTs the pack is built for (others are refused with a clear error)
VIDEO_DIT_MODULES = {"comfy.ldm.wan.": "wan", "comfy.ldm.hunyuan_video.": "hunyuan_video"}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class DVDQuantError(RuntimeError):
    """An error shown in the ComfyUI front end; its message says what to do."""


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


def gpu_bits_problem(config, reason_fn):
    """The error text if the GPU kernels cannot run `config`'s bit-widths, else None.

    reason_fn(spec, a_bits) -> None or why not (the kernels' unsupported_reason on a probe layer).
    Only bit-widths are refused; reference-only methods and options (the baselines) stay allowed.
    """
    from dvdq_core import LayerSpec
    spec = LayerSpec(w_bits=config.w_bits, a_bits=None, method="dvdq", had_block=128, scale_block=128,
                     rotate=True, auto_scale=True, granularity="block")
    for bits in sorted({config.a_low, config.a_high}):
        reason = reason_fn(spec, bits)
        if reason:
            return (f"the GPU kernels cannot run W{config.w_bits}A{bits}: {reason}. Use w_bits 4 with activation "
                    f"bits 4..8 (or 16). To run these bits on the slow PyTorch reference backend anyway, start "
                    f"ComfyUI with the environment variable {ALLOW_SLOW_ENV}=1.")
    return None


def check_gpu_bits(config):
    """On a CUDA GPU, refuse bit-widths the Triton kernels cannot run, which would otherwise fall back to
    the slow reference backend without it being obvious."""
    if os.environ.get(ALLOW_SLOW_ENV) == "1" or not torch.cuda.is_available():
        return
    import comfy.model_management as mm
    if mm.get_torch_device().type != "cuda":
        return
    from dvdq_core.backends import load_kernels, triton_unsupported_reason
    if isinstance(load_kernels(), str):
        return  # kernels missing: the core warns once and uses the reference backend
    x = torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16)

    def reason(spec, bits):
        return triton_unsupported_reason(QuantLinear(256, 64, spec, bias=False, device="cuda"), x, bits)

    problem = gpu_bits_problem(config, reason)
    if problem:
        raise DVDQuantError(problem)


def quantized_keys(base_model) -> set:
    """State-dict prefixes ("diffusion_model.<layer>") of a model's DVD-Quant layers."""
    keys = getattr(base_model, "_dvdq_layer_keys", None)
    if keys is None:
        dm = getattr(base_model, "diffusion_model", None)
        keys = {"diffusion_model." + n for n, _ in quantized_layers(dm)} if dm is not None else set()
    return keys


def _targets(keys, layer_keys):
    hits = []
    for k in keys:
        key = k if isinstance(k, str) else k[0]
        if key.rsplit(".", 1)[0] in layer_keys:
            hits.append(key)
    return hits


def check_no_patches_on_quantized(patcher):
    """Refuse weight patches (LoRA etc.) that target quantized layers: ComfyUI would drop them silently."""
    layer_keys = quantized_keys(patcher.model)
    if not layer_keys:
        return
    hits = _targets(patcher.patches.keys(), layer_keys) + _targets(patcher.weight_wrapper_patches.keys(), layer_keys)
    for hp in (getattr(patcher, "hook_patches", None) or {}).values():
        hits += _targets(hp.keys(), layer_keys)
    if hits:
        raise DVDQuantError(lora_after_message(hits[:3]))


def lora_after_message(examples) -> str:
    return ("DVD-Quant: a LoRA (or another weight patch) was applied after quantization; it would change "
            f"4-bit packed layers such as {', '.join(examples)} and would be silently lost. Put the LoRA loader "
            "before 'DVD-Quant Apply' (Load Diffusion Model -> LoRA -> DVD-Quant Apply) so the LoRA is merged "
            "into the weights before they are quantized.")


def _guard_outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    check_no_patches_on_quantized(guider.model_patcher)
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


def install_lora_guard():
    """Make LoraLoader / LoraLoaderModelOnly refuse a LoRA on an already quantized MODEL with a clear
    message: ComfyUI maps LoRA keys through the model's state dict, in which packed layers have no
    `.weight`, so it would only log 'lora key not loaded' and go on without the LoRA."""
    try:
        import comfy.sd
    except ImportError:
        return
    orig = comfy.sd.load_lora_for_models
    if getattr(orig, "_dvdq_guard", False):
        return

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        if model is not None and strength_model != 0:
            layer_keys = quantized_keys(model.model)
            if layer_keys:
                hits = lora_hits(lora, layer_keys)
                if hits:
                    raise DVDQuantError(lora_after_message(hits[:3]))
        return orig(model, clip, lora, strength_model, strength_clip)

    load_lora_for_models._dvdq_guard = True
    load_lora_for_models.__wrapped__ = orig
    comfy.sd.load_lora_for_models = load_lora_for_models


# ---------------------------------------------------------------- quantizing

def prepare_for_comfy(base_model, config, arch: str, source: str):
    """Let ComfyUI's memory manager move QuantLinear per module like its own layers: a module
    counts for ModelPatcher.load/partially_unload only if it has parameters or `comfy_cast_weights`.
    With these attributes packed layers are loaded, offloaded (low-VRAM) and measured by their
    packed buffers; their forward moves the buffers to the input's device when offloaded."""
    dm = base_model.diffusion_model
    names = []
    for name, m in quantized_layers(dm):
        m.comfy_cast_weights = False
        m.weight_function = []
        m.bias_function = []
        names.append("diffusion_model." + name)
    base_model._dvdq_layer_keys = set(names)
    base_model._dvdq_info = {"config": config, "arch": arch, "source": source}


def finish_patcher(patcher):
    patcher.size = 0  # ModelPatcher caches its size: measure the packed model again
    patcher.model_size()
    patcher.remove_wrappers_with_key(_wrappers().OUTER_SAMPLE, GUARD_KEY)
    patcher.add_wrapper_with_key(_wrappers().OUTER_SAMPLE, GUARD_KEY, _guard_outer_sample)
    return patcher


def _wrappers():
    import comfy.patcher_extension
    return comfy.patcher_extension.WrappersMP


def selected_layers(dm: nn.Module, config) -> list:
    """The Linear layers quantize_model will replace, in its order."""
    return [n for n, m in dm.named_modules() if isinstance(m, nn.Linear) and layer_spec(config, n, m.in_features)]


def quantize_base_model(base_model, config, node_id, patched_weight=None, source_name=""):
    """Quantize base_model.diffusion_model in place with a progress bar and events.

    patched_weight(name) -> tensor or None gives a layer's weight with the MODEL's patches (LoRA)
    applied; it is called just before that layer is quantized, so only one patched float weight
    exists at a time.
    """
    import comfy.utils
    arch = video_dit_arch(base_model)
    check_gpu_bits(config)
    dm = base_model.diffusion_model
    order = selected_layers(dm, config)
    if not order:
        raise DVDQuantError(f"no Linear layer of this model matches {list(config.include)}; is it a video DiT?")
    pbar = comfy.utils.ProgressBar(len(order), node_id=node_id)

    def prepare(i):
        if patched_weight is None or i >= len(order):
            return
        w = patched_weight(order[i])
        if w is not None:
            lin = dm.get_submodule(order[i])
            lin.weight = nn.Parameter(w, requires_grad=False)

    def progress(done, total, name):
        if name != order[done - 1]:
            raise DVDQuantError(f"internal error: expected to quantize {order[done - 1]}, got {name}")
        prepare(done)
        pbar.update_absolute(done, total)
        emit("dvdq.quant_progress", {"node": str(node_id), "done": done, "total": total, "layer": name})

    prepare(0)
    try:
        report = quantize_model(dm, config, progress=progress, device=quant_device())
    except ValueError as e:  # bad overrides, bits, ...: the core's message says what is wrong
        raise DVDQuantError(f"DVD-Quant could not quantize {source_name or 'the model'}: {e}") from None
    prepare_for_comfy(base_model, config, arch, "quantized")
    emit("dvdq.quant_summary", {"node": str(node_id), "layers": len(report.layers), "w_bits": config.w_bits,
                                "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
                                "mean_rel_error": report.mean_rel_error, "seconds": report.seconds,
                                "source": "quantized"})
    log.info("DVD-Quant: %s: %d layers, %.1f MiB -> %.1f MiB, mean rel. error %.4f, %.1f s", source_name,
             len(report.layers), report.bytes_before / 2**20, report.bytes_after / 2**20, report.mean_rel_error,
             report.seconds)
    return report


def load_and_quantize(path, config, node_id):
    """A diffusion model file through ComfyUI's own loader (detection, dtype, memory), then BGR."""
    import comfy.sd
    if "dvdq.format_version" in _file_metadata(path):
        raise DVDQuantError(f"{os.path.basename(path)} is already DVD-Quant quantized: move it to models/{FOLDER} "
                            f"and pick it as '{FOLDER}/<file>'")
    try:
        patcher = comfy.sd.load_diffusion_model(path)
    except RuntimeError as e:
        if "Could not detect model type" in str(e):
            raise DVDQuantError(f"{os.path.basename(path)} is not a diffusion model ComfyUI recognizes. DVD-Quant needs "
                                "a Wan 2.1/2.2 or HunyuanVideo diffusion model file (as used by 'Load Diffusion Model').") from None
        raise
    except Exception as e:
        raise DVDQuantError(f"could not read {os.path.basename(path)} ({type(e).__name__}: {e}); "
                            "is the file complete? Download it again.") from None
    quantize_base_model(patcher.model, config, node_id, source_name=os.path.basename(path))
    return finish_patcher(patcher)


def _file_metadata(path) -> dict:
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def apply_to_model(model, config, node_id):
    """Quantize a MODEL from any loader chain into a new MODEL; the input is left untouched.

    ModelPatcher.clone() shares the torch module (weights and all) with the input, so quantizing a
    clone in place would swap the input's layers too, under every other node using it. Instead a
    new model is built on the meta device from the same model config; its non-quantized tensors
    share storage with the input's (no copy), and each quantized layer is made from the input's
    weight with the MODEL's patches (e.g. a LoRA) applied, one layer at a time.
    """
    import comfy.lora
    import comfy.float
    import comfy.model_patcher

    src = model
    base = src.model
    video_dit_arch(base)
    if getattr(base, "_dvdq_layer_keys", None):
        raise DVDQuantError("this MODEL is already quantized by DVD-Quant; connect the unquantized model")
    offload = src.offload_device
    key_patches = src.get_key_patches()  # {key: [(weight, convert_func), *patches]} with originals from backups

    def patched(key):
        (weight, convert), *patches = key_patches[key]
        if not patches:
            return None
        w = convert(weight.to(device=offload, dtype=torch.float32, copy=True), inplace=True)
        w = comfy.lora.calculate_weight(patches, w, key)
        return comfy.float.stochastic_rounding(w, weight.dtype, seed=comfy.model_patcher.string_to_seed(key))

    sd = {}
    for key, entry in key_patches.items():
        weight = entry[0][0].detach()
        w = patched(key) if len(entry) > 1 and not _is_quantized_weight_key(key, base, config) else None
        t = w if w is not None else weight
        sd[key] = t if t.device == offload else t.to(offload)
    fake = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items() if k.startswith("diffusion_model.")}
    new = base.model_config.get_model({k[len("diffusion_model."):]: v for k, v in fake.items()}, "", device="meta")
    missing, unexpected = new.load_state_dict(sd, strict=False, assign=True)
    _check_materialized(new, "DVD-Quant Apply")
    n = src.clone()
    n.model = new
    for attr, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0), ("model_lowvram", False),
                        ("current_weight_patches_uuid", None), ("device", offload)):
        setattr(new, attr, value)
    n.patches, n.backup, n.object_patches_backup, n.hook_backup = {}, {}, {}, {}
    n.patches_uuid = uuid.uuid4()
    n.is_injected = False
    n.parent = None

    def layer_weight(name):
        return patched("diffusion_model." + name + ".weight") if ("diffusion_model." + name + ".weight") in key_patches else None

    quantize_base_model(new, config, node_id, patched_weight=layer_weight, source_name="the MODEL")
    check_no_patches_on_quantized(n)
    return finish_patcher(n)


def _is_quantized_weight_key(key, base, config) -> bool:
    if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
        return False
    name = key[len("diffusion_model."):-len(".weight")]
    try:
        m = base.diffusion_model.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(m, nn.Linear) and layer_spec(config, name, m.in_features) is not None


def _check_materialized(base_model, what):
    for name, t in list(base_model.named_parameters()) + list(base_model.named_buffers()):
        if t.is_meta:
            raise DVDQuantError(f"{what}: tensor {name!r} has no data after loading; this model type is not supported "
                                "by DVD-Quant yet (please report it)")


def load_prequantized(path, a_bits, node_id):
    """A DVD-Quant file: the model is built by ComfyUI's detection from the file's tensor names and
    shapes (packed layers stand in with their original shapes from `dvdq.layers`), on the meta
    device, then filled from the file by dvdq_core.load_quantized. No BGR runs."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    from safetensors import safe_open

    t0 = time.perf_counter()
    fname = os.path.basename(path)
    try:
        meta = read_metadata(path)
    except (ValueError, FileNotFoundError) as e:
        raise DVDQuantError(f"{e}") from None
    layers = meta["layers"]
    check_gpu_bits(meta["config"])
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:
        raise DVDQuantError(f"{fname} cannot be read ({e}); the file is damaged: save or download it again") from None
    quant_suffixes = (".qweight", ".w_scale", ".w_zero")
    fake = {}
    float_dtypes = []
    for k, (shape, dt) in shapes.items():
        layer, _, suffix = k.rpartition(".")
        if layer in layers and "." + suffix in quant_suffixes:
            continue
        dtype = _SAFETENSORS_DTYPES.get(dt, torch.float32)
        fake[k] = torch.empty(shape, dtype=dtype, device="meta")
        if dtype.is_floating_point:
            float_dtypes.append(dtype)
    wdtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float16
    for name, e in layers.items():
        fake.setdefault(name + ".weight", torch.empty((e["out"], e["in"]), dtype=wdtype, device="meta"))
    model_config = comfy.model_detection.model_config_from_unet(fake, "")
    if model_config is None:
        raise DVDQuantError(f"{fname}: ComfyUI does not recognize the model in this DVD-Quant file; "
                            "it may come from another ComfyUI version or model family. Re-quantize the original model.")
    load_device = mm.get_torch_device()
    offload = mm.unet_offload_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(fake),
                               supported_dtypes=list(model_config.supported_inference_dtypes), weight_dtype=wdtype)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    base = model_config.get_model(fake, "", device="meta")
    arch = video_dit_arch(base)
    want = {k: v.dtype for k, v in base.diffusion_model.state_dict().items()}
    try:
        config = load_quantized(base.diffusion_model, path)
    except ValueError as e:
        raise DVDQuantError(f"{fname} does not match the model ComfyUI built from it: {e}. "
                            "The file may be damaged or from an incompatible version: re-quantize the original.") from None
    _cast_like(base.diffusion_model, want, set(layers))
    _check_materialized(base, "DVD-Quant Loader")
    set_activation_bits(base.diffusion_model, a_bits)
    config.a_bits = a_bits
    prepare_for_comfy(base, config, arch, "loaded")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload)
    qbytes = sum(t.numel() * t.element_size() for _, m in quantized_layers(base.diffusion_model)
                 for t in m.state_dict().values())
    elt = torch.empty((), dtype=wdtype).element_size()
    before = sum(e["out"] * e["in"] * elt + (e["out"] * elt if e["bias"] else 0) for e in layers.values())
    emit("dvdq.quant_summary", {"node": str(node_id), "layers": len(layers), "w_bits": config.w_bits,
                                "bytes_before": before, "bytes_after": qbytes, "mean_rel_error": None,
                                "seconds": time.perf_counter() - t0, "source": "loaded"})
    return finish_patcher(patcher)


def _cast_like(dm, dtypes: dict, quantized: set):
    """Non-quantized tensors to the dtype ComfyUI chose for the model (as load_state_dict copy would)."""
    for key, dtype in dtypes.items():
        if key.rsplit(".", 1)[0] in quantized:
            continue
        owner, _, attr = key.rpartition(".")
        mod = dm.get_submodule(owner) if owner else dm
        t = getattr(mod, attr)
        if t is None or t.dtype == dtype or not t.is_floating_point():
            continue
        if isinstance(t, nn.Parameter):
            setattr(mod, attr, nn.Parameter(t.data.to(dtype), requires_grad=False))
        else:
            mod._buffers[attr] = t.to(dtype)


def save_model(patcher, path):
    base = patcher.model
    info = getattr(base, "_dvdq_info", None)
    if info is None:
        raise DVDQuantError("DVD-Quant Save needs a MODEL quantized by DVD-Quant Loader or Apply")
    if patcher.patches:
        raise DVDQuantError("this MODEL carries weight patches (e.g. a LoRA) that the file could not hold: "
                            "save the quantized model before applying them, or apply the LoRA before DVD-Quant Apply")
    save_quantized(base.diffusion_model, path, info["config"], arch=info["arch"])
    return path


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
