"""Quantize a diffusion-model state dict file layer by layer (the CLI's `quantize`).

The input is read memory-mapped and the output is written tensor by tensor, so a 14B model never
needs its full size in RAM; only the quantized output's header is planned up front.

ComfyUI's "fp8_scaled" files (a `scaled_fp8` marker key; each Linear weight stored in fp8 divided by
its `<layer>.scale_weight`) are read as the weights they stand for: weight * scale_weight is what
gets quantized, the Linear weights left unquantized are written as those float32 products, and
the marker and scale keys are dropped, so the output is a plain DVD-Quant file. 8-bit float biases
of quantized layers are written in float32 (QuantLinear keeps them so).
"""
import json
import time

import torch
from safetensors import safe_open

from .config import QuantConfig
from .linear import quantize_weight, svd_buffers
from .serialization import SAFETENSORS_DTYPES, SafetensorsWriter, build_metadata
from .spec import layer_spec

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")



def detect_arch(keys) -> str:
    keys = set(keys)
    if "head.modulation" in keys:
        return "wan"
    if "txt_in.individual_token_refiner.blocks.0.norm1.weight" in keys and any(k.startswith("vector_in.") for k in keys):
        return "hunyuan_video"
    return ""


def _scale_key(name: str, scale_keys: dict):
    """The file key of a Linear weight's scale_weight in an fp8_scaled file, else None."""
    return scale_keys.get(name[: -len(".weight")]) if name.endswith(".weight") else None


def _quant_format(conf: torch.Tensor) -> str:
    """The layout name in a ComfyUI `.comfy_quant` entry (JSON as uint8 bytes: {"format": "float8_e4m3fn", ...})."""
    try:
        return str(json.loads(bytes(conf.reshape(-1).tolist()).decode("utf-8")).get("format", "unknown"))
    except (ValueError, AttributeError):
        return "unreadable"


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def quantize_file(src, dst, config: QuantConfig, device=None, progress=None, allow_unknown_arch=False) -> dict:
    """Returns a summary dict (arch, layers, bytes in/out, seconds, mean rel. error)."""
    t0 = time.perf_counter()
    try:
        f = safe_open(str(src), framework="pt", device="cpu")
    except Exception as e:
        raise ValueError(f"{src} is not a readable safetensors file ({e})") from None
    with f:
        if "dvdq.format_version" in (f.metadata() or {}):
            raise ValueError(f"{src} is already a DVD-Quant file; quantize the original model instead")
        keys = list(f.keys())
        formats = sorted({_quant_format(f.get_tensor(k)) for k in keys if k.endswith(".comfy_quant")})
        if formats:
            raise ValueError(f"{src} holds layers in ComfyUI's quantized formats ({', '.join(formats)}; '.comfy_quant' "
                             "entries), whose scales the CLI does not apply. Quantize the original bf16/fp16 file, or "
                             "load this one with ComfyUI's DVD-Quant Loader, which reads each layer through ComfyUI's "
                             "own dequantization")
        names = {k: _strip(k) for k in keys}
        scaled = "scaled_fp8" in names.values()
        scale_keys = {}
        if scaled:  # the marker and the per-layer scales are consumed here, not written
            scale_keys = {names[k][: -len(".scale_weight")]: k for k in keys if names[k].endswith(".scale_weight")}
            keys = [k for k in keys if names[k] != "scaled_fp8" and not names[k].endswith((".scale_weight", ".scale_input"))]
        arch = detect_arch(names.values())
        if not arch and not allow_unknown_arch:
            raise ValueError(f"{src} does not look like a Wan 2.1/2.2 or HunyuanVideo diffusion model in ComfyUI's key "
                             "names (no 'head.modulation' or 'txt_in.individual_token_refiner' keys); pass "
                             "--any-arch to quantize its matching 2-D '*.weight' tensors anyway")
        plan, specs, layers = {}, {}, {}
        for k in keys:
            sl = f.get_slice(k)
            shape, dtype = tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()]
            n = names[k]
            spec = None
            if n.endswith(".weight") and len(shape) == 2:
                spec = layer_spec(config, n[: -len(".weight")], shape[1])
            if spec is None:
                plan[n] = (torch.float32 if _scale_key(n, scale_keys) else dtype, shape)
                continue
            layer = n[: -len(".weight")]
            specs[k] = (layer, spec)
            out_f, in_f = shape
            packed_k = (in_f + 1) // 2 if spec.w_bits <= 4 else in_f
            plan[layer + ".weight"] = (torch.uint8, (out_f, packed_k))
            plan[layer + ".w_scale"] = (torch.float32, (out_f,))
            plan[layer + ".w_zero"] = (torch.uint8, (out_f,))
            if spec.method == "smoothquant":
                plan[layer + ".float_weight"] = (torch.float32 if _scale_key(n, scale_keys) else dtype, shape)
            for name, v in svd_buffers(spec, in_f, out_f, dtype).items():  # the SVD branch, as QuantLinear keeps it
                plan[f"{layer}.{name}"] = v
            has_bias = any(names[b] == layer + ".bias" for b in keys)
            layers[layer] = {"in": in_f, "out": out_f, "bias": has_bias, **spec.to_dict()}
        if not layers:
            raise ValueError(f"no layer of {src} matches include={list(config.include)}")
        for layer in layers:  # an fp8 bias of a quantized layer: float32, as QuantLinear keeps it
            if layer + ".bias" in plan and plan[layer + ".bias"][0].itemsize == 1:
                plan[layer + ".bias"] = (torch.float32, plan[layer + ".bias"][1])
        # the plan must list keys in the order they are written: quantized layers' keys where their weight was
        ordered = {}
        for k in keys:
            n = names[k]
            if k in specs:
                layer = specs[k][0]
                extra = (".float_weight",) if specs[k][1].method == "smoothquant" else ()
                extra += tuple(x for x in (".svd_down", ".svd_up") if layer + x in plan)
                for suffix in (".weight", ".w_scale", ".w_zero") + extra:
                    ordered[layer + suffix] = plan[layer + suffix]
            else:
                ordered[n] = plan[n]
        writer = SafetensorsWriter(dst, ordered, build_metadata(config, layers, arch))
        errs, bytes_in, bytes_out, done = [], 0, 0, 0
        try:
            for k in keys:
                t = f.get_tensor(k)
                bytes_in += t.numel() * t.element_size()
                sk = _scale_key(names[k], scale_keys)
                if sk:  # fp8_scaled: the weight it stands for
                    t = t.float() * f.get_tensor(sk).float()
                if k not in specs:
                    t = t.to(ordered[names[k]][0])
                    writer.write(names[k], t)
                    bytes_out += t.numel() * t.element_size()
                    continue
                layer, spec = specs[k]
                qw, rel = quantize_weight(t, spec, device)
                errs.append(rel)
                for suffix, v in ((".weight", qw.codes), (".w_scale", qw.scale), (".w_zero", qw.zero)):
                    writer.write(layer + suffix, v.cpu())
                    bytes_out += v.numel() * v.element_size()
                if spec.method == "smoothquant":
                    writer.write(layer + ".float_weight", t.to(ordered[layer + ".float_weight"][0]))
                for suffix, v in ((".svd_down", qw.svd_down), (".svd_up", qw.svd_up)):
                    if layer + suffix in ordered:
                        v = v.to(ordered[layer + suffix][0]).cpu()
                        writer.write(layer + suffix, v)
                        bytes_out += v.numel() * v.element_size()
                done += 1
                if progress is not None:
                    progress(done, len(specs), layer)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    return {"arch": arch or "unknown", "layers": len(specs), "bytes_in": bytes_in, "bytes_out": bytes_out,
            "mean_rel_error": sum(errs) / max(len(errs), 1), "seconds": time.perf_counter() - t0}
