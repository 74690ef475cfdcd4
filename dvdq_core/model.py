"""quantize_model: replace a model's Linear layers by QuantLinear, one layer at a time."""
import fnmatch
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import QuantConfig
from .fusion import fuse_gelu
from .linear import BitState, QuantLinear, input_sharing
from .spec import layer_spec


@dataclass
class LayerReport:
    name: str
    shape: tuple  # (out_features, in_features)
    w_bits: int
    a_bits: int | None  # None: switched per step
    rel_error: float  # ||W^ - W||_F / ||W||_F (in the rotated basis, the same norm)
    seconds: float


@dataclass
class QuantReport:
    method: str
    layers: list = field(default_factory=list)
    bytes_before: int = 0  # the replaced layers' weights and biases
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def mean_rel_error(self) -> float:
        return sum(l.rel_error for l in self.layers) / max(len(self.layers), 1)

    def table(self) -> str:
        rows = [f"{'layer':48s} {'shape':>14s} {'W':>2s} {'A':>3s} {'rel.err':>8s} {'s':>6s}"]
        for l in self.layers:
            a = "sw" if l.a_bits is None else str(l.a_bits)
            rows.append(f"{l.name:48s} {str(tuple(l.shape)):>14s} {l.w_bits:2d} {a:>3s} {l.rel_error:8.4f} {l.seconds:6.2f}")
        rows.append(f"{len(self.layers)} layers, {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB, "
                    f"mean rel. error {self.mean_rel_error:.4f}, {self.seconds:.1f} s")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_rel_error"] = self.mean_rel_error
        return d


def is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a module that is one in all but class (in_features, out_features and a weight of
    that shape: hosts' mixed-precision layers hold quantized weights in a plain nn.Module). Not ours."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, QuantLinear) or not isinstance(getattr(m, "in_features", None), int):
        return False
    w = getattr(m, "weight", None)
    return getattr(w, "shape", None) is not None and tuple(w.shape) == (getattr(m, "out_features", None), m.in_features)


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def check_overrides(model: nn.Module, config: QuantConfig):
    """Every override glob must name at least one Linear layer (catches typos and norms named by mistake)."""
    modules = dict(model.named_modules())
    for glob in config.overrides:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise ValueError(f"layer override {glob!r} matches no layer of the model")
        if not any(is_linear(modules[n]) or isinstance(modules[n], QuantLinear) for n in hits):
            n = hits[0]
            raise ValueError(f"layer override {glob!r} matches {n!r}, a {type(modules[n]).__name__}, "
                             "not a Linear layer: only Linear layers are quantized")


def quantized_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def get_bit_state(model: nn.Module) -> BitState:
    for _, m in quantized_layers(model):
        return m.state
    raise ValueError("the model has no DVD-Quant layers: quantize it first")


def set_activation_bits(model: nn.Module, bits: int):
    from .activations import check_act_bits
    get_bit_state(model).bits = check_act_bits(bits)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig | None = None, progress=None, device=None,
                   layer_cls=QuantLinear) -> QuantReport:
    """Replace every nn.Linear (subclasses included) that `config` selects, in place, by `layer_cls`
    (QuantLinear or a subclass, e.g. one a host's memory manager knows as its own layer).

    Layers are quantized one at a time (on `device` if given, e.g. the GPU while the model sits on
    the CPU) and each float weight is released as soon as its replacement exists, so peak memory
    stays near the model's own size plus one layer. `progress(done, total, name)` is called after
    each layer.
    """
    config = config or QuantConfig()
    if quantized_layers(model):
        raise ValueError("the model is already quantized by DVD-Quant; load the original weights to quantize again")
    check_overrides(model, config)
    todo = []
    for name, m in model.named_modules():
        if is_linear(m):
            spec = layer_spec(config, name, m.in_features)
            if spec is not None:
                todo.append((name, spec))
    if not todo:
        raise ValueError(f"no Linear layer of the model matches include={list(config.include)}; "
                         "check the layer names (e.g. 'blocks.*') or the overrides")
    state = BitState(config.a_bits)
    report = QuantReport(config.method)
    t_all = time.perf_counter()
    for done, (name, spec) in enumerate(todo, 1):
        t0 = time.perf_counter()
        linear = model.get_submodule(name)
        report.bytes_before += _tensor_bytes(linear)
        q, rel = layer_cls.from_linear(linear, spec, state, backend=config.backend, device=device)
        q.shares_input = input_sharing(name)
        _set_submodule(model, name, q)
        del linear
        report.bytes_after += _tensor_bytes(q)
        report.layers.append(LayerReport(name, (q.out_features, q.in_features), spec.w_bits, spec.a_bits, rel,
                                         time.perf_counter() - t0))
        if progress is not None:
            progress(done, len(todo), name)
    fuse_gelu(model)
    report.seconds = time.perf_counter() - t_all
    return report
