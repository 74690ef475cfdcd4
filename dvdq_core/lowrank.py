"""A runtime low-rank branch beside a quantized layer, for LoRAs applied after quantization:

    y = act(Q(x)·Wqᵀ + b + (x·Aᵀ)·Bᵀ + Δb)

A is every LoRA's down-projection stacked ([R, K]), B every LoRA's scaled up-projection side by side
([N, R]), so a stack of LoRAs costs one 16-bit GEMM pair whatever their number. The branch reads the
layer's original (unrotated) input: a LoRA's ΔW = s·up·down lives in the float weight's basis, and the
packed weights are never changed, so strengths, stacks and removal take effect without re-quantizing.
"""
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
        """y + (x·Aᵀ)·Bᵀ + Δb for the layer's output y [M, N] (x's dtype): the up-projection accumulates into
        y in the GEMM (one read and one write of y, no [M, N] temporary)."""
        if self.down.shape[0]:
            y = torch.addmm(y, x2d @ self.down.t(), self.up.t())
        if self.bias is not None:
            y = y + self.bias
        return y


    def to(self, device, dtype) -> "LowRank":
        return LowRank(self.down.to(device, dtype), self.up.to(device, dtype),
                       None if self.bias is None else self.bias.to(device, dtype))


def stack(terms, bias_diffs, out_features: int, in_features: int, device, dtype) -> LowRank | None:
    """All terms of one layer as one LowRank in `dtype` on `device` (None when nothing is left).
    bias_diffs: (scale, [N] tensor) pairs added to the output."""
    downs, ups = [], []
    for t in terms:
        if t.scale == 0:
            continue
        down = t.down.to(device=device, dtype=torch.float32).reshape(t.down.shape[0], -1)
        up = t.up.to(device=device, dtype=torch.float32).reshape(t.up.shape[0], -1) * t.scale
        r = down.shape[0]
        if up.shape[1] != r:
            raise ValueError(f"a low-rank term's factors disagree: up {tuple(up.shape)}, down {tuple(down.shape)}")
        if t.cols is not None:  # a slice of the input: zero elsewhere
            full = torch.zeros(r, in_features, device=device)
            full[:, t.cols[0]:t.cols[0] + t.cols[1]] = down
            down = full
        if t.rows is not None:
            full = torch.zeros(out_features, r, device=device)
            full[t.rows[0]:t.rows[0] + t.rows[1]] = up
            up = full
        if down.shape[1] != in_features or up.shape[0] != out_features:
            raise ValueError(f"a low-rank term of shape {up.shape[0]} x {down.shape[1]} does not fit a layer of "
                             f"{out_features} x {in_features}")
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
