"""A runtime low-rank branch beside a quantized layer, for LoRAs applied after quantization:

    y = act(Q(x)·Wqᵀ + b + (x·Aᵀ)·Bᵀ + Δb)

A is every LoRA's down-projection stacked ([R, K]), B every LoRA's scaled up-projection side by side
([N, R]), so a stack of LoRAs costs one 16-bit GEMM pair whatever their number. The branch reads the
layer's original (unrotated) input: a LoRA's ΔW = s·up·down lives in the float weight's basis, and the
packed weights are never changed, so strengths, stacks and removal take effect without re-quantizing.
The backend that runs the layer applies the branch (QuantLinear.forward hands it the factors in the input's
dtype): the reference backend with `add_to`, the GPU kernels fused (x·Aᵀ in the activation pass, the
up-projection in the GEMM's epilogue; dvdq_core/kernels/README.md).
"""
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankTerm:
    """One LoRA on one layer: ΔW = scale · up @ down, over output rows `rows` and input columns `cols`
    ((start, length), None for all; ComfyUI's patch offset addresses a slice of a fused weight)."""
    up: torch.Tensor    # [n, r]
    down: torch.Tensor  # [r, k]
    scale: float
    rows: tuple | None = None
    cols: tuple | None = None


@dataclass(frozen=True)
class LowRank:
    down: torch.Tensor         # [R, K]
    up: torch.Tensor           # [N, R], the scales folded in
    bias: torch.Tensor | None  # [N] or None

    def add_to(self, y: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        """y + (x·Aᵀ)·Bᵀ + Δb, in place, for the layer's fresh output y [M, N] (x's dtype): the up-projection
        accumulates into y in the GEMM (one read and one write of y, no [M, N] temporary)."""
        if self.down.shape[0]:
            y.addmm_(x2d @ self.down.t(), self.up.t())
        if self.bias is not None:
            y.add_(self.bias)
        return y


    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.bias) if t is not None)

    def to(self, device, dtype) -> "LowRank":
        return LowRank(self.down.to(device, dtype), self.up.to(device, dtype),
                       None if self.bias is None else self.bias.to(device, dtype))


def branch_of(layer) -> "LowRank | None":
    """The low-rank branch a backend adds to a quantized layer's output: its `lowrank` (LoRAs after
    quantization, the weight's SVD branch stacked in), else the weight's own SVD branch, else None."""
    branch = getattr(layer, "lowrank", None)
    if branch is None and hasattr(layer, "svd_branch"):
        branch = layer.svd_branch()
    return branch


def misfit(term: LowRankTerm, out_features: int, in_features: int) -> str | None:
    """Why the term does not fit a layer of out_features x in_features, else None (shapes only: cheap)."""
    r, k = term.down.shape[0], math.prod(term.down.shape[1:])
    n = term.up.shape[0]
    if math.prod(term.up.shape[1:]) != r:
        return f"its factors disagree (up {tuple(term.up.shape)}, down {tuple(term.down.shape)})"
    rows = term.rows or (0, out_features)
    cols = term.cols or (0, in_features)
    if (n, k) != (rows[1], cols[1]) or rows[0] + rows[1] > out_features or cols[0] + cols[1] > in_features:
        return (f"it is {n} x {k}" + (f" at rows {rows[0]}, columns {cols[0]}" if term.rows or term.cols else "")
                + f", the layer {out_features} x {in_features} (a LoRA made for another model size?)")
    return None


def stack(terms, bias_diffs, out_features: int, in_features: int, device, dtype) -> LowRank | None:
    """All terms of one layer as one LowRank in `dtype` on `device` (None when nothing is left).
    bias_diffs: (scale, [N] tensor) pairs added to the output."""
    downs, ups = [], []
    for t in terms:
        if t.scale == 0:
            continue
        why = misfit(t, out_features, in_features)
        if why:
            raise ValueError(f"a low-rank term does not fit: {why}")
        down = t.down.to(device=device, dtype=torch.float32).reshape(t.down.shape[0], -1)
        up = t.up.to(device=device, dtype=torch.float32).reshape(t.up.shape[0], -1) * t.scale
        if t.cols is not None:  # a slice of the input: zero elsewhere
            full = torch.zeros(down.shape[0], in_features, device=device)
            full[:, t.cols[0]:t.cols[0] + t.cols[1]] = down
            down = full
        if t.rows is not None:
            full = torch.zeros(out_features, up.shape[1], device=device)
            full[t.rows[0]:t.rows[0] + t.rows[1]] = up
            up = full
        downs.append(down)
        ups.append(up)
    bias = None
    for scale, diff in bias_diffs:
        if scale == 0:
            continue
        d = diff.to(device=device, dtype=torch.float32).reshape(-1) * scale
        if d.shape[0] != out_features:
            raise ValueError(f"a bias difference of {d.shape[0]} values does not fit a layer of {out_features} outputs")
        bias = d if bias is None else bias + d
    if not downs and bias is None:
        return None
    down = torch.cat(downs) if downs else torch.zeros(0, in_features, device=device)
    up = torch.cat(ups, 1) if ups else torch.zeros(out_features, 0, device=device)
    return LowRank(down.to(dtype), up.to(dtype), None if bias is None else bias.to(dtype))
