"""Epilogue fusion: a GELU that directly follows a QuantLinear inside an nn.Sequential (the feed-forward
of Wan and HunyuanVideo: Linear -> GELU(tanh) -> Linear) is computed by the QuantLinear itself.

On the GPU the GEMM applies it to each output tile before storing it, which saves the separate GELU
kernel's read and write of the widest hidden tensor of the block. The result is the same as the
unfused model's: the backend rounds the linear's output to the output dtype first, then applies the
GELU (the reference backend calls the very `F.gelu` the GELU module would have called).

Structure only: nothing is stored in the quantized file; `quantize_model` and `load_quantized`
fuse after building the layers. DVDQ_FUSE_GELU=0 turns it off (to measure what it saves).
"""
import os

from torch import nn

from .linear import QuantLinear


class FusedGELU(nn.Identity):
    """Stands where the GELU was: a marker that the preceding QuantLinear applies it."""

    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate

    def extra_repr(self):
        return f"approximate={self.approximate!r}, applied by the preceding QuantLinear"


def _adjacent(model: nn.Module):
    """(Sequential, first child, name of the second, second child) for every adjacent pair of children of a
    Sequential that runs its children in order. A subclass with a forward of its own may not call them all
    (ComfyUI's newer WanFeedForward applies the GELU itself and skips the module), so it is left alone."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]:
        children = list(seq._modules.items())
        for (_, first), (name, second) in zip(children, children[1:]):
            yield seq, first, name, second


def gelu_fold_on() -> bool:
    """False where DVDQ_FUSE_GELU=0 turns the fold off (also for the ComfyUI feed-forward the nodes fuse)."""
    return os.environ.get("DVDQ_FUSE_GELU", "1") != "0"


def fuse_gelu(model: nn.Module) -> int:
    """Fuse every Sequential's [QuantLinear, GELU(approximate='tanh')] pair; returns how many."""
    if not gelu_fold_on():
        return 0
    fused = 0
    for seq, lin, name, act in _adjacent(model):
        if isinstance(lin, QuantLinear) and lin.act is None and type(act) is nn.GELU and act.approximate == "tanh":
            lin.act = "gelu_tanh"
            seq._modules[name] = FusedGELU(act.approximate)
            fused += 1
    return fused


def unfuse_gelu(model: nn.Module) -> int:
    """Undo fuse_gelu (benchmarks measure what it saves); returns how many GELUs were restored."""
    restored = 0
    for seq, lin, name, act in _adjacent(model):
        if isinstance(act, FusedGELU) and isinstance(lin, QuantLinear) and lin.act == "gelu_tanh":
            lin.act = None
            seq._modules[name] = nn.GELU(approximate=act.approximate)
            restored += 1
    return restored
