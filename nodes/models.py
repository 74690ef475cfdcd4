"""Building, quantizing, loading and saving ComfyUI MODELs (ModelPatcher) with DVD-Quant layers.

ComfyUI modules are imported inside the functions (see host.py).
"""
import copy
import logging
import os
import time

import torch
from torch import nn

from ..dvdq_core import (
    load_quantized,
    quantize_model,
    quantized_layers,
    read_metadata,
    save_quantized,
    set_activation_bits,
)
from ..dvdq_core.backends import linear_backend
from ..dvdq_core.model import is_linear
from ..dvdq_core.serialization import read_header
from ..dvdq_core.spec import layer_spec
from .block_fusion import host_changed
from .host import (
    ATTACHMENT,
    FOLDER,
    GUARD_KEY,
    DVDQuantError,
    check_gpu_bits,
    emit,
    guard_outer_sample,
    layer_class,
    quant_device,
    video_dit_arch,
)
from .hunyuan_blocks import fuse_hunyuan, unfuse_hunyuan
from .lora import keep_lowrank_patching, patcher_class
from .wan_blocks import fuse_wan, unfuse_wan

log = logging.getLogger("dvdq")
VIDEO_IMAGE_MODELS = ("wan2.1", "hunyuan_video")  # unet_config["image_model"] of the accepted families
# arch -> (fuse, unfuse, what they switch: for the log)
FUSED_BLOCKS = {"wan": (fuse_wan, unfuse_wan, "Wan blocks and self-attention modules"),
                "hunyuan_video": (fuse_hunyuan, unfuse_hunyuan, "HunyuanVideo double- and single-stream blocks")}


def fuse_blocks(base_model, arch: str) -> dict:
    """The fused block forwards where the host's code is the one they follow; the summary's fields.
    Fails closed: an error while checking or switching leaves the host's own forwards (one warning)."""
    if arch not in FUSED_BLOCKS:
        return {"fused_steps": None, "fusion_off": None}
    fuse, unfuse, what = FUSED_BLOCKS[arch]
    dm = base_model.diffusion_model
    try:
        fused, off = fuse(dm)
    except Exception as e:
        unfuse(dm)
        fused, off = 0, host_changed(arch, f"{type(e).__name__} while fusing: {e}")
    log.info("DVD-Quant: elementwise steps fused in %d %s%s", fused, what, f" ({off})" if off else "")
    return {"fused_steps": fused, "fusion_off": off}


def quantized_patcher(base_model, info: dict, cls, load_device, offload_device, carry_from=None):
    """A new ModelPatcher of the host's class `cls` (dynamic VRAM where the host uses it), with the pack's
    low-rank patching of LoRAs (nodes/lora.py), for a quantized model, so its size is measured from the packed
    layers; it carries the pack's info as an attachment and the check of weight patches on packed layers as
    an OUTER_SAMPLE wrapper (both survive clones).
    carry_from: a MODEL whose model options, object patches (e.g. ModelSamplingSD3's shift), wrappers,
    callbacks and attachments the new one takes, as copied by the host's own clone(), but not its weight
    patches (Apply bakes them into the quantized weights)."""
    import comfy.patcher_extension
    patcher = patcher_class(cls)(base_model, load_device=load_device, offload_device=offload_device)
    if carry_from is not None:
        donor = carry_from.clone()
        for attr in CARRIED:
            if hasattr(donor, attr):
                setattr(patcher, attr, getattr(donor, attr))
    patcher.set_attachments(ATTACHMENT, info)
    if hasattr(patcher, "cached_patcher_init"):  # 0.33.0 on: how the host makes a model of its own for this MODEL
        # (a non-dynamic delegate for conditioning hooks, a copy per GPU), as its own loaders register
        patcher.cached_patcher_init = (_patcher_copy, (base_model, info, load_device, offload_device, _backups(patcher)))
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patcher.remove_wrappers_with_key(outer, GUARD_KEY)
    patcher.add_wrapper_with_key(outer, GUARD_KEY, guard_outer_sample)
    on_clone = comfy.patcher_extension.CallbacksMP.ON_CLONE
    patcher.remove_callbacks_with_key(on_clone, GUARD_KEY)
    patcher.add_callback_with_key(on_clone, GUARD_KEY, keep_lowrank_patching)
    return patcher


def _patcher_copy(base_model, info, load_device, offload_device, backups, disable_dynamic=False):
    """cached_patcher_init's factory: a new patcher (ComfyUI's plain class where the host asks for one without
    dynamic VRAM) on a pristine copy of the quantized module tree sharing its tensors, with bit states of its
    own; nothing is quantized again. backups: those the MODEL's clones share (they stay current). The host
    takes only the model from it and copies the rest from the MODEL it clones."""
    import comfy.model_patcher
    cls = comfy.model_patcher.ModelPatcher if disable_dynamic else comfy.model_patcher.CoreModelPatcher
    new = _pristine_copy(base_model, backups, offload_device)
    _fresh_bit_states(new)
    return quantized_patcher(new, info, cls, load_device, offload_device)


CARRIED = ("model_options", "object_patches", "wrappers", "callbacks", "attachments", "additional_models", "injections",
           "force_cast_weights")  # ModelPatcher fields clone() copies that Apply's new MODEL keeps


def dvdq_info(patcher):
    """What the pack knows of a MODEL it quantized ({"config", "arch", "source", ...}), else None."""
    get = getattr(patcher, "get_attachment", None)
    return get(ATTACHMENT) if get is not None else None


def selected_layers(dm: nn.Module, config) -> list:
    """The Linear layers quantize_model will replace, in its order."""
    return [n for n, m in dm.named_modules() if is_linear(m) and layer_spec(config, n, m.in_features)]


def host_quantized(w) -> bool:
    """A weight held as newer ComfyUI's own QuantizedTensor (fp8, int8, nvfp4, ... layouts: comfy/quant_ops.py)."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:  # ComfyUI before 0.8: no such tensors
        return False
    return isinstance(w, QuantizedTensor)


def check_plain_weights(dm, names, source: str):
    """DVD-Quant reads each layer's float weight: plain tensors, or ComfyUI's own QuantizedTensor, which
    the host dequantizes itself. Any other tensor subclass is another pack's quantized format
    (ComfyUI-GGUF's GGMLTensor keeps raw Q4/Q8 blocks behind its logical shape): reading it as floats
    would give a broken model, so it is refused before any work."""
    for name in names:
        w = dm.get_submodule(name).weight
        if type(w) not in (torch.Tensor, nn.Parameter) and not host_quantized(w):
            raise DVDQuantError(f"{source}: layer {name} holds its weight as {type(w).__name__}, a quantized tensor "
                                "format of another node pack (e.g. GGUF's), not weights DVD-Quant can read. Load the "
                                "model's original bf16/fp16 (or fp8) .safetensors with 'Load Diffusion Model' (or "
                                "pick it in DVD-Quant Loader); re-quantizing quantized weights would also compound "
                                "their rounding.")


def computed_weight(linear):
    """The float32 weight a ComfyUI Linear computes with where it differs from the stored one, else None:
    a QuantizedTensor dequantized by the host's own code (its layout's scales applied), or ComfyUI's
    convert_weight (fp8_scaled checkpoints store weight / scale_weight, and their layers multiply it
    back) on a float32 copy. Quantizing the stored codes instead gave a wrong model."""
    weight = getattr(linear, "weight", None)
    if weight is None:
        return None
    if host_quantized(weight):
        return weight.dequantize().to(torch.float32)
    convert = getattr(linear, "convert_weight", None)
    if convert is None:
        return None
    return convert(linear.weight.detach().to(torch.float32, copy=True), inplace=True)


# what ComfyUI stores beside a converted or quantized weight (fp8_scaled; QuantizedTensor layouts)
HOST_SCALE_KEYS = ("scale_weight", "scale_input", "weight_scale", "weight_scale_2", "input_scale", "comfy_quant")


def float_state_dict(dm) -> dict:
    """dm's tensors for a DVD-Quant file: a layer ComfyUI stores converted (fp8_scaled: weight divided by
    scale_weight, plus scale_weight / scale_input) is written as the float32 weight it computes with,
    so the file loads into ComfyUI's plain ops (they know no scale_weight)."""
    sd = dm.state_dict()
    for name, m in dm.named_modules():
        w = computed_weight(m)
        if w is not None:
            sd[name + ".weight"] = w
            for extra in HOST_SCALE_KEYS:
                sd.pop(f"{name}.{extra}", None)
    return sd


def running_backend(base_model) -> str:
    """The backend the quantized layers run on when sampling (ComfyUI's device, the model's compute dtype),
    with the reason where it is not the preferred one."""
    import comfy.model_management as mm
    layers = quantized_layers(base_model.diffusion_model)
    if not layers:
        return "-"
    dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
    return linear_backend(layers[0][1], dtype, device=mm.get_torch_device())


def quantize_base_model(base_model, config, node_id, patched_weight=None, source_name=""):
    """Quantize base_model.diffusion_model in place with a progress bar and events.

    patched_weight(name) -> tensor or None gives a layer's weight with the MODEL's patches (LoRA)
    applied; it is called just before that layer is quantized, so only one patched float weight
    exists at a time. Where it gives None, the layer's weight goes through ComfyUI's convert_weight
    if the layer has one (computed_weight).
    """
    import comfy.model_management
    import comfy.utils
    arch = video_dit_arch(base_model)
    check_gpu_bits(config)
    dm = base_model.diffusion_model
    order = selected_layers(dm, config)
    if not order:
        raise DVDQuantError(f"no Linear layer of this model matches {list(config.include)}; is it a video DiT?")
    check_plain_weights(dm, order, source_name or "the model")
    # the host's own measure: newer ComfyUI counts a QuantizedTensor by its stored bytes (nbytes)
    stored_bytes = sum(comfy.model_management.module_size(dm.get_submodule(n)) for n in order)
    pbar = comfy.utils.ProgressBar(len(order), node_id=node_id)

    def prepare(i):
        if i >= len(order):
            return
        lin = dm.get_submodule(order[i])
        w = patched_weight(order[i]) if patched_weight is not None else None
        if w is None:
            w = computed_weight(lin)
        if w is not None:
            lin.weight = nn.Parameter(w, requires_grad=False)

    def progress(done, total, name):
        if name != order[done - 1]:
            raise DVDQuantError(f"internal error: expected to quantize {order[done - 1]}, got {name}")
        prepare(done)
        pbar.update_absolute(done, total)
        emit("dvdq.quant_progress", {"node": str(node_id), "done": done, "total": total, "layer": name})

    prepare(0)
    try:
        report = quantize_model(dm, config, progress=progress, device=quant_device(), layer_cls=layer_class())
    except ValueError as e:  # bad overrides, bits, ...: the core's message says what is wrong
        raise DVDQuantError(f"DVD-Quant could not quantize {source_name or 'the model'}: {e}") from None
    report.bytes_before = stored_bytes  # (the core measured the float32 weights prepare swapped in)
    info = {"config": config, "arch": arch, "source": "quantized", **fuse_blocks(base_model, arch)}
    backend = running_backend(base_model)
    emit("dvdq.quant_summary", {"node": str(node_id), "layers": len(report.layers), "w_bits": config.w_bits,
                                "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
                                "mean_rel_error": report.mean_rel_error, "seconds": report.seconds,
                                "source": "quantized", "fused_steps": info["fused_steps"],
                                "fusion_off": info["fusion_off"], "backend": backend})
    log.info("DVD-Quant: %s: %d layers, %.1f MiB -> %.1f MiB, mean rel. error %.4f, %.1f s, backend %s", source_name,
             len(report.layers), report.bytes_before / 2**20, report.bytes_after / 2**20, report.mean_rel_error,
             report.seconds, backend)
    return info


def _header_state_dict(path) -> dict:
    """The file's tensors as empty meta tensors (names, shapes, dtypes from the safetensors header)."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in read_header(path)[1].items()}


def peek_model_config(path):
    """ComfyUI's model detection run on a safetensors header only (nothing loaded); None if unknown."""
    import comfy.model_detection
    import comfy.utils
    if not path.endswith(".safetensors"):
        return None
    try:
        sd = _header_state_dict(path)
        prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
        sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
        return comfy.model_detection.model_config_from_unet(sd, "")
    except Exception:  # detection needing real values, odd headers: the full load decides
        return None


def load_and_quantize(path, config, node_id):
    """A diffusion model file through ComfyUI's own loader (detection, dtype, memory), then BGR."""
    import comfy.sd
    peek = peek_model_config(path)
    if peek is not None and peek.unet_config.get("image_model") not in VIDEO_IMAGE_MODELS:
        raise DVDQuantError(f"{os.path.basename(path)} is a {type(peek).__name__} model, not a video diffusion transformer; "
                            "DVD-Quant quantizes Wan 2.1/2.2 and HunyuanVideo. Use ComfyUI's own loader for this one.")
    if "dvdq.format_version" in _file_metadata(path):
        raise DVDQuantError(f"{os.path.basename(path)} is already DVD-Quant quantized: move it to models/{FOLDER} "
                            f"and pick it as '{FOLDER}/<file>'")
    try:
        patcher = comfy.sd.load_diffusion_model(path)
    except RuntimeError as e:
        if "Could not detect model type" in str(e):
            raise DVDQuantError(f"{os.path.basename(path)} is not a diffusion model ComfyUI recognizes. DVD-Quant "
                                "needs a Wan 2.1/2.2 or HunyuanVideo diffusion model file (as used by 'Load Diffusion "
                                "Model').") from None
        raise
    except Exception as e:
        raise DVDQuantError(f"could not read {os.path.basename(path)} ({type(e).__name__}: {e}); "
                            "is the file complete? Download it again.") from None
    info = quantize_base_model(patcher.model, config, node_id, source_name=os.path.basename(path))
    return quantized_patcher(patcher.model, info, type(patcher), patcher.load_device, patcher.offload_device)


def _file_metadata(path) -> dict:
    try:
        return read_header(path)[0]
    except Exception:
        return {}


# What ComfyUI's patchers put on a model and its modules while loading it (memory state, dynamic VRAM's
# slots and pins, cast switches, weight patch functions, the current patcher; read in 0.3.64, 0.8.0 and
# 0.33.0): a copy starts without the source's, as a new model
LOAD_STATE = {"model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram", "current_weight_patches_uuid",
              "model_offload_buffer_memory", "dynamic_vbars", "dynamic_pins", "dynamic_patchers", "comfy_cast_weights",
              "prev_comfy_cast_weights", "comfy_force_cast_weights", "comfy_patched_weights", "weight_function",
              "bias_function", "weight_lowvram_function", "bias_lowvram_function", "seed_key", "_v",
              "_v_signature", "_v_weight", "_v_bias", "_pin_state", "_pins", "_prefetch"}
LOAD_STATE_RESET = {"current_patcher": None,  # set by the host's own __init__: reset, not removed
                    # and by the pack's layer (nodes/lora.py): a copy starts without the source's LoRA branch
                    "lora_patches": {}, "hook_patches": {}, "lowrank_cache": None, "lowrank": None}
_TORCH_FIELDS = ("_parameters", "_buffers", "_modules")


def _tree_copy(module: nn.Module, device) -> nn.Module:
    """A new module tree of the same classes whose parameters and buffers hold module's tensors (no copy of
    the data; moved to device where they are elsewhere): layers of any kind, ComfyUI's own quantized ones
    (QuantizedTensor weights with their scales) included, come along as they are. Parameters are new
    Parameter objects (torch moves a Parameter's data in place, which would move the source's too), and
    every dict, set or list a module holds (hooks among them) is the copy's own. The host's load state
    (LOAD_STATE) stays behind."""
    new = copy.copy(module)  # a new __dict__ holding the same values ...
    for key in LOAD_STATE.intersection(new.__dict__):
        del new.__dict__[key]
    for key in LOAD_STATE_RESET.keys() & new.__dict__.keys():
        new.__dict__[key] = LOAD_STATE_RESET[key]
    for key, value in list(new.__dict__.items()):
        if key not in _TORCH_FIELDS and isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
    # ... and new containers of tensors and children (torch's own fields of every nn.Module)
    new._parameters = {k: None if t is None else nn.Parameter(t if t.device == device else t.to(device),
                                                               requires_grad=t.requires_grad)
                       for k, t in module._parameters.items()}
    new._buffers = {k: t if t is None or t.device == device else t.to(device) for k, t in module._buffers.items()}
    new._modules = {k: None if m is None else _tree_copy(m, device) for k, m in module._modules.items()}
    return new


def _pristine_copy(base_model, backups, device) -> nn.Module:
    """A tree copy of a MODEL's model as its loader left it. The clones of one MODEL share its module,
    and one that sampled last leaves it patched in place (a LoRA's weights, ModelSamplingSD3's
    model_sampling, ...) until it unloads; backups: the (weight, hook, object) backups the clones share,
    which hold the originals."""
    import comfy.utils
    weights, hooks, objects = backups
    new = _tree_copy(base_model, device)
    for key, saved in weights.items():
        comfy.utils.set_attr_param(new, key, saved.weight.to(device))
    for key, saved in hooks.items():
        comfy.utils.set_attr_param(new, key, saved[0].to(device))
    for key, obj in objects.items():
        comfy.utils.set_attr(new, key, _tree_copy(obj, device) if isinstance(obj, nn.Module) else obj)
    return new


def _backups(patcher) -> tuple:
    """The originals a patcher's clones share while one of them has the module patched."""
    return patcher.backup, getattr(patcher, "hook_backup", {}), patcher.object_patches_backup


def _fresh_bit_states(model: nn.Module):
    """Give a copied quantized tree bit states of its own (the copy's steps must not switch the source's)."""
    fresh = {}
    for _, layer in quantized_layers(model):
        layer.state = fresh.setdefault(id(layer.state), copy.copy(layer.state))


def _stored_weight(src, key):
    """(weight, convert) of a MODEL's key without its patches, as ComfyUI's get_key_patches gives them (the
    original from the patcher's backups while the model is loaded patched), for one key: that method
    reads every key of the state dict, and newer ComfyUI's quantized layers put scale entries there
    that are no attribute of the layer, so it fails on such models."""
    import comfy.model_patcher
    weight, _, convert = comfy.model_patcher.get_key_weight(src.model, key)
    backup = src.backup.get(key)
    hook_backup = getattr(src, "hook_backup", {}).get(key)
    if backup is not None:  # the original; a hook's backup holds the weight as the MODEL's patches left it
        weight = backup.weight
    elif hook_backup is not None:
        weight = hook_backup[0]
    return weight, convert or (lambda a, **kwargs: a)


def apply_to_model(model, config, node_id):
    """Quantize a MODEL from any loader chain into a new MODEL; the input is left untouched.

    ModelPatcher.clone() shares the torch module (weights and all) with the input, so quantizing a
    clone in place would swap the input's layers too, under every other node using it. Instead the
    new model is a copy of the module tree whose tensors are the input's (no copy), a layer that
    has weight patches (e.g. a LoRA) gets its patched weight, and each quantized layer is made from
    the input's weight with the MODEL's patches applied, one layer at a time.
    """
    import comfy.float
    import comfy.lora
    import comfy.model_patcher
    import comfy.utils

    src = model
    base = src.model
    video_dit_arch(base)
    if quantized_layers(base.diffusion_model):
        raise DVDQuantError("this MODEL is already quantized by DVD-Quant; connect the unquantized model")
    check_plain_weights(base.diffusion_model, selected_layers(base.diffusion_model, config), "DVD-Quant Apply")
    offload = src.offload_device
    seed_of = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed  # moved in 0.33

    def patched(key, stored=True):
        """The weight with ComfyUI's conversion (scaled fp8) and the MODEL's patches applied: in float32 as
        the layer computes with it (stored=False: what a quantized layer is made from), or back in the
        stored form (ComfyUI's set_weight where the layer has one: fp8_scaled divides by scale_weight)."""
        weight, convert = _stored_weight(src, key)
        if host_quantized(weight):  # the host's own dequantization (its layout's scales)
            w = weight.dequantize().to(device=offload, dtype=torch.float32)
        else:
            w = convert(weight.to(device=offload, dtype=torch.float32, copy=True), inplace=True)
        w = comfy.lora.calculate_weight(src.patches[key], w, key)
        if not stored:
            return w
        set_func = comfy.model_patcher.get_key_weight(base, key)[1]
        if set_func is not None:
            return set_func(w, return_weight=True, seed=seed_of(key))
        if host_quantized(weight):
            raise DVDQuantError(f"DVD-Quant Apply: {key} is held in ComfyUI's {type(weight).__name__} and has a "
                                "LoRA or other weight patch, which this ComfyUI cannot store back into it. Load the "
                                "model's bf16/fp16 file, or quantize that layer too (ARQ Settings' layer overrides).")
        return comfy.float.stochastic_rounding(w, weight.dtype, seed=seed_of(key))

    new = _pristine_copy(base, _backups(src), offload)
    for key in src.patches:
        if src.patches[key] and not _is_quantized_weight_key(key, base, config):  # kept layers: patched weight
            comfy.utils.set_attr_param(new, key, patched(key))
    _check_materialized(new, "DVD-Quant Apply")
    new.device = offload

    def layer_weight(name):  # None without patches: quantize_base_model then converts as ComfyUI would
        key = "diffusion_model." + name + ".weight"
        return patched(key, stored=False) if src.patches.get(key) else None

    info = quantize_base_model(new, config, node_id, patched_weight=layer_weight, source_name="the MODEL")
    return quantized_patcher(new, info, type(src), src.load_device, src.offload_device, carry_from=src)


def _is_quantized_weight_key(key, base, config) -> bool:
    if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
        return False
    name = key[len("diffusion_model."):-len(".weight")]
    try:
        m = base.diffusion_model.get_submodule(name)
    except AttributeError:
        return False
    return is_linear(m) and layer_spec(config, name, m.in_features) is not None


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

    t0 = time.perf_counter()
    fname = os.path.basename(path)
    try:
        meta = read_metadata(path)
    except (ValueError, FileNotFoundError) as e:
        raise DVDQuantError(f"{e}") from None
    layers = meta["layers"]
    check_gpu_bits(meta["config"])
    try:
        shapes = read_header(path)[1]
    except Exception as e:
        raise DVDQuantError(f"{fname} cannot be read ({e}); the file is damaged: save or download it again") from None
    quant_suffixes = (".weight", ".qweight", ".float_weight", ".w_scale", ".w_zero",  # format 2 and 1
                      ".svd_down", ".svd_up")  # format 3
    fake = {}
    float_dtypes = []
    for k, (shape, dtype) in shapes.items():
        layer, _, suffix = k.rpartition(".")
        if layer in layers and "." + suffix in quant_suffixes:
            continue
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
        config = load_quantized(base.diffusion_model, path, layer_cls=layer_class())
    except ValueError as e:
        raise DVDQuantError(f"{fname} does not match the model ComfyUI built from it: {e}. "
                            "The file may be damaged or from an incompatible version: re-quantize the original.") from None
    _cast_like(base.diffusion_model, want, set(layers))
    _check_materialized(base, "DVD-Quant Loader")
    set_activation_bits(base.diffusion_model, a_bits)
    config.a_bits = a_bits
    info = {"config": config, "arch": arch, "source": "loaded", **fuse_blocks(base, arch)}
    base.device = None  # built on "meta"; ModelPatcher sets its offload device, as for ComfyUI's own loader
    cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)  # what the host's loader uses
    patcher = quantized_patcher(base, info, cls, load_device, offload)
    qbytes = sum(t.numel() * t.element_size() for _, m in quantized_layers(base.diffusion_model)
                 for t in m.state_dict().values())
    elt = torch.empty((), dtype=wdtype).element_size()
    before = sum(e["out"] * e["in"] * elt + (e["out"] * elt if e["bias"] else 0) for e in layers.values())
    emit("dvdq.quant_summary", {"node": str(node_id), "layers": len(layers), "w_bits": config.w_bits,
                                "bytes_before": before, "bytes_after": qbytes, "mean_rel_error": None,
                                "seconds": time.perf_counter() - t0, "source": "loaded",
                                "fused_steps": info["fused_steps"], "fusion_off": info["fusion_off"],
                                "backend": running_backend(base)})
    return patcher


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


def save_model(patcher, path, merge_loras=False):
    """The quantized model. Without merge_loras: the base model, without the MODEL's LoRAs (they run beside the
    packed weights, nodes/lora.py, and stay files of their own); a float layer the last sampling left patched
    in place is written as its original (the patcher's backups). merge_loras: every LoRA merged into the
    weights, each quantized layer's float weight (its packed weight, rotated back) plus the LoRAs quantized
    again with the layer's settings: one file to share, with the rounding of a second quantization."""
    base = patcher.model
    info = dvdq_info(patcher)
    if info is None:
        raise DVDQuantError("DVD-Quant Save needs a MODEL quantized by DVD-Quant Loader or Apply")
    dm = base.diffusion_model
    sd = float_state_dict(dm)
    prefix = "diffusion_model."
    hook_backup = getattr(patcher, "hook_backup", {})
    for key in {*patcher.backup, *hook_backup}:
        name = key[len(prefix):]
        if key.startswith(prefix) and name in sd:  # the original weight, without the MODEL's patches
            weight, convert = _stored_weight(patcher, key)
            sd[name] = convert(weight.detach().to(torch.float32, copy=True), inplace=True).to(sd[name].dtype)
    patched = [k for k in patcher.patches if patcher.patches[k] and k.startswith(prefix) and k[len(prefix):] in sd]
    if merge_loras and patched:
        _merge_patches(patcher, sd, patched)
    save_quantized(dm, path, info["config"], arch=info["arch"], state_dict=sd)
    if patched and not merge_loras:
        log.info("DVD-Quant Save: wrote the quantized base model; this MODEL's LoRAs (%d patched weights) are not in "
                 "it: load them after the DVD-Quant Loader as before", len(patched))
    return path


def _merge_patches(patcher, sd: dict, keys: list):
    """sd (the base model's tensors) with the patches of `keys` merged by ComfyUI's own calculate_weight (any
    form it knows): float tensors as they are; a quantized layer's weight dequantized and rotated back, then
    quantized again with the layer's settings (progress bar). smoothquant's float weight is merged too."""
    import comfy.lora
    import comfy.utils

    from ..dvdq_core.linear import quantize_weight
    from .lora import packed_layer
    device = quant_device() or torch.device("cpu")

    def merged(key, t):
        return comfy.lora.calculate_weight(patcher.patches[key], t.to(device, torch.float32, copy=True), key)
    bar = comfy.utils.ProgressBar(len(keys))
    for key in keys:
        name = key[len("diffusion_model."):]
        layer = packed_layer(patcher.model, key)
        if layer is None or key.endswith(".bias"):  # a float tensor
            sd[name] = merged(key, sd[name]).to(sd[name].device, sd[name].dtype)
        else:
            # the whole weight (the SVD branch included: it is split off again below)
            w = layer.quantized_weight().full_weight(layer.spec.had_block if layer.spec.rotate else 1, device)
            qw, _ = quantize_weight(merged(key, w), layer.spec, device)
            stem = name[:-len(".weight")]
            fields = [("weight", qw.codes), ("w_scale", qw.scale), ("w_zero", qw.zero)]
            if qw.svd_up is not None:
                fields += [("svd_up", qw.svd_up), ("svd_down", qw.svd_down)]
            if f"{stem}.float_weight" in sd:  # method smoothquant computes with it
                fields.append(("float_weight", merged(key, sd[f"{stem}.float_weight"])))
            for field, t in fields:
                sd[f"{stem}.{field}"] = t.to(sd[f"{stem}.{field}"].device, sd[f"{stem}.{field}"].dtype)
        bar.update(1)
