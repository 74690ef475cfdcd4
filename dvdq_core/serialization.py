"""Save and load quantized models as safetensors (docs/format.md). Never pickles."""
import json
import os
import struct

import torch
from safetensors import safe_open
from torch import nn

from .config import QuantConfig
from .fusion import fuse_gelu
from .linear import BitState, QuantLinear, input_sharing
from .model import is_linear, quantized_layers
from .spec import LayerSpec

FORMAT_VERSION = "3"
# Version 1 named a quantized layer's packed codes `qweight` (and the smoothquant baseline's float
# weight `weight`); version 2 stores the codes as the layer's `weight`, as a host expects of a Linear.
# Version 3 adds the SVD branch (`svd_down`, `svd_up`, layer spec `svd_rank`): a reader of version 2
# would load such a file without its branch, so it must refuse it. Version 1 and 2 files have none.
V1_NAMES = {"weight": "qweight", "float_weight": "weight"}
READABLE_VERSIONS = ("1", "2", FORMAT_VERSION)
# safetensors' dtype names; also what the CLI and the ComfyUI loader read file headers with
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so a large model never sits in memory at once.

    The header needs every key's dtype and shape up front: pass them as `plan` {key: (dtype, shape)}.
    """

    def __init__(self, path, plan: dict, metadata: dict):
        self.path, self.plan, self._next = path, plan, iter(plan)
        header, offset = {}, 0
        for key, (dtype, shape) in plan.items():
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._tmp = str(path) + ".partial"
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor):
        expected = next(self._next)
        dtype, shape = self.plan[key]
        if key != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer got {key} {tensor.dtype} {tuple(tensor.shape)}, planned {expected} {dtype} {shape}")
        self._f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self):
        if next(self._next, None) is not None:
            self._f.close()
            os.remove(self._tmp)
            raise RuntimeError("not every planned tensor was written")
        self._f.close()
        os.replace(self._tmp, self.path)  # the output appears only when complete

    def abort(self):
        self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def build_metadata(config: QuantConfig, layers: dict, arch: str = "") -> dict:
    """layers: {name: {"in", "out", "bias", **LayerSpec}}"""
    return {"dvdq.format_version": FORMAT_VERSION, "dvdq.config": config.to_json(),
            "dvdq.layers": json.dumps(layers, sort_keys=True), "dvdq.arch": arch}


def layer_entry(layer: QuantLinear) -> dict:
    return {"in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None, **layer.spec.to_dict()}


def save_quantized(model: nn.Module, path, config: QuantConfig, arch: str = "", state_dict: dict | None = None):
    """Write the whole quantized model (quantized layers and every other tensor) to `path`; state_dict:
    the tensors to write if not model.state_dict() (a host may store some layers in its own form)."""
    layers = {n: layer_entry(m) for n, m in quantized_layers(model)}
    if not layers:
        raise ValueError("the model has no DVD-Quant layers: quantize it before saving")
    sd = model.state_dict() if state_dict is None else state_dict
    w = SafetensorsWriter(path, {k: (t.dtype, tuple(t.shape)) for k, t in sd.items()}, build_metadata(config, layers, arch))
    try:
        for k, t in sd.items():
            w.write(k, t)
    except BaseException:
        w.abort()
        raise
    w.close()


def read_header(path) -> tuple[dict, dict]:
    """(metadata, {name: (shape, torch dtype)}) of a safetensors file from its header alone: no tensor is
    read. Dtypes torch has no name for here read as float32 (only their shape matters to the callers)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {}
        for k in f.keys():
            sl = f.get_slice(k)
            tensors[k] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32))
        return f.metadata() or {}, tensors


def read_metadata(path) -> dict:
    """The DVD-Quant metadata of a file: {"format_version", "config" (QuantConfig), "layers", "arch"}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{os.path.basename(str(path))} is not a readable safetensors file ({e})") from None
    if "dvdq.format_version" not in meta:
        raise ValueError(f"{os.path.basename(str(path))} is not a DVD-Quant file (no dvdq.format_version metadata); "
                         "quantize it with the DVD-Quant Loader or `python -m dvdq_core quantize` first")
    if meta["dvdq.format_version"] not in READABLE_VERSIONS:
        raise ValueError(f"{os.path.basename(str(path))} has DVD-Quant format version {meta['dvdq.format_version']}, "
                         f"this version reads {', '.join(READABLE_VERSIONS)}: update DVD-Quant or re-quantize the model")
    return {"format_version": meta["dvdq.format_version"], "config": QuantConfig.from_json(meta["dvdq.config"]),
            "layers": json.loads(meta["dvdq.layers"]), "arch": meta.get("dvdq.arch", "")}


@torch.no_grad()
def load_quantized(model: nn.Module, path, backend: str | None = None, layer_cls=QuantLinear) -> QuantConfig:
    """Load a file written by save_quantized (or the CLI) into a float model of the same architecture.

    The listed Linear layers are replaced by `layer_cls` (QuantLinear or a subclass) shells and filled from the file, without
    running BGR. The model may live on the meta device (weights are then assigned from the file).
    Refuses a file that does not match the model, naming the first mismatching layer.
    """
    meta = read_metadata(path)
    config = meta["config"]
    state = BitState(config.a_bits)
    modules = dict(model.named_modules())
    # check in the model's layer order, so the first mismatch reported is the first in the model
    order = {n: i for i, n in enumerate(modules)}
    meta["layers"] = dict(sorted(meta["layers"].items(), key=lambda kv: order.get(kv[0], len(order))))
    for name, entry in meta["layers"].items():
        m = modules.get(name)
        if isinstance(m, QuantLinear):
            raise ValueError("the model is already quantized; load the file into an unquantized model")
        if not is_linear(m):
            what = "does not exist in the model" if m is None else f"is a {type(m).__name__} in the model, not a Linear layer"
            raise ValueError(f"file does not match the model: layer {name!r} {what}")
        if (m.out_features, m.in_features) != (entry["out"], entry["in"]):
            raise ValueError(f"file does not match the model: layer {name!r} is {entry['out']}x{entry['in']} in the file "
                             f"but {m.out_features}x{m.in_features} in the model")
    with safe_open(str(path), framework="pt") as f:
        file_keys = list(f.keys())
    originals = {name: modules[name] for name in meta["layers"]}
    try:
        _fill(model, path, meta, file_keys, state, backend or config.backend, layer_cls)
    except BaseException:  # leave the model as it was
        for name, m in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
        raise
    fuse_gelu(model)
    return config


def file_key(key: str, layers, version: str) -> str:
    """The name a model tensor has in a file of `version` (quantized layers' names changed in version 2)."""
    layer, _, attr = key.rpartition(".")
    if version == "1" and layer in layers and attr in V1_NAMES:
        return f"{layer}.{V1_NAMES[attr]}"
    return key


def _fill(model, path, meta, file_keys, state, backend, layer_cls):
    modules = dict(model.named_modules())
    for name, entry in meta["layers"].items():
        m = modules[name]
        w = m.weight if m.weight is not None else torch.empty(0, device="meta")  # (a host may create it lazily)
        q = layer_cls(m.in_features, m.out_features, LayerSpec.from_dict(entry), bias=entry["bias"],
                      bias_dtype=m.bias.dtype if m.bias is not None else torch.float32, weight_dtype=w.dtype,
                      state=state, backend=backend, device=w.device)
        q.shares_input = input_sharing(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    expected = model.state_dict()
    names = {file_key(k, meta["layers"], meta["format_version"]): k for k in expected}
    # parameters a host creates lazily (None until its own loader fills them from the state dict)
    lazy = {f"{n}.{p}" if n else p for n, mod in model.named_modules() for p, t in mod._parameters.items() if t is None}
    in_file = set(file_keys)
    missing = [k for f, k in names.items() if f not in in_file]
    extra = [k for k in file_keys if k not in names and k not in lazy]
    if missing or extra:
        first = missing[0] if missing else extra[0]
        raise ValueError(f"file does not match the model: tensor {first!r} is "
                         f"{'missing from the file' if missing else 'in the file but not in the model'}")
    assign = any(t.is_meta for t in expected.values())

    def own(t):  # assigned tensors become the model's: copies out of the file's buffer, whose tensors sit at
        # 8-byte offsets (the header's padding), where CPU matmuls round differently from aligned memory
        return t.clone() if assign else t
    sd = {}
    with safe_open(str(path), framework="pt") as f:
        for fk, k in names.items():  # the model's order: the first mismatch reported is the first in the model
            t = f.get_tensor(fk)
            if tuple(t.shape) != tuple(expected[k].shape):
                raise ValueError(f"file does not match the model: tensor {k!r} has shape {tuple(t.shape)} in the file "
                                 f"but {tuple(expected[k].shape)} in the model")
            sd[k] = own(t)
        for k in lazy.intersection(file_keys):
            sd[k] = own(f.get_tensor(k))
    model.load_state_dict(sd, strict=True, assign=assign)
