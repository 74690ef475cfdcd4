"""Weight quantization: per-row asymmetric codes with integer zero point (min-max and BGR).

BGR (Bounded-init Grid Refinement, called PBQ in the paper's first version) searches clipping
bounds, then refines step size and zero point by least squares; see docs/method.md (the algorithm)
and docs/design.md (the storage).
"""
from dataclasses import dataclass

import torch

from .hadamard import rotate

W_BITS = range(2, 9)

# BGR's search constants (the paper publishes neither n nor eps). The clipping range shrinks
# symmetrically by i * (max - min) / BGR_GRID for i = 0..BGR_MAX_SHRINK, i.e. down to 20% of the
# min-max range: heavy-tailed rows want that much. The BGR_TOP_K best starting grids per row are
# refined; refinement stops when the total error falls by less than BGR_EPS (relative).
BGR_GRID = 100
BGR_MAX_SHRINK = 40
BGR_TOP_K = 2
BGR_MAX_ITER = 50
BGR_EPS = 1e-4
_BATCH_ELEMENTS = 1 << 24  # rows are processed in batches of about this many weights


def check_w_bits(bits) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in W_BITS:
        raise ValueError(f"weight bits must be an integer from 2 to 8, got {bits!r}")
    return bits


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> storage: two codes per byte for bits <= 4 (even column in the low nibble)."""
    u = u.to(torch.uint8)
    if bits > 4:
        return u.contiguous()
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes [N, k]."""
    if bits > 4:
        return packed[:, :k]
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8, packed (see pack_codes)
    scale: torch.Tensor  # float32 [N], step size D
    zero: torch.Tensor  # uint8 [N], integer zero point z
    bits: int
    shape: tuple
    # the 16-bit SVD branch beside the codes (svd_split; None without one): the layer computes
    # Q(x)·(D(u - z))ᵀ + (x·svd_downᵀ)·svd_upᵀ, the codes holding the rotated residual
    svd_up: torch.Tensor | None = None  # [N, r]
    svd_down: torch.Tensor | None = None  # [r, K]

    def unpacked(self) -> torch.Tensor:
        return unpack_codes(self.codes, self.bits, self.shape[1])

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        u = self.unpacked().float()
        return (self.scale.unsqueeze(1) * (u - self.zero.float().unsqueeze(1))).to(dtype)

    def full_weight(self, block: int = 1, device=None) -> torch.Tensor:
        """The whole weight these stand for, float32 [N, K] on device (default: the codes'): the codes rotated
        back by the block Hadamard they were quantized in (block 1: none), plus the SVD branch."""
        dev = device or self.codes.device
        w = rotate(QuantizedWeight(self.codes.to(dev), self.scale.to(dev), self.zero.to(dev), self.bits,
                                   self.shape).dequantize(), block)  # H is symmetric and orthogonal
        if self.svd_up is not None:
            w = w + self.svd_up.to(dev, torch.float32) @ self.svd_down.to(dev, torch.float32)
        return w

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.svd_up, self.svd_down)
                   if t is not None)


def _check_weight(weight: torch.Tensor):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")


def _grid(lo, hi, qmax):
    """Min-max grid (D, z) covering [lo, hi] per row; z is an integer in [0, qmax] (kept as float)."""
    flat = (hi - lo) <= 1e-12
    # a constant row: widen the range to include 0 so the value is represented exactly
    lo = torch.where(flat, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi = torch.where(flat, torch.maximum(hi, torch.zeros_like(hi)), hi)
    d = ((hi - lo) / qmax).clamp_min(1e-12)
    d = torch.where((hi - lo) <= 1e-12, torch.ones_like(d), d)
    z = torch.round(-lo / d).clamp(0, qmax)
    return d, z


def _codes(w, d, z, qmax):
    return torch.clamp(torch.round(w / d.unsqueeze(1)) + z.unsqueeze(1), 0, qmax)


def _sse(w, d, z, u):
    return ((d.unsqueeze(1) * (u - z.unsqueeze(1)) - w) ** 2).sum(1)


def _finish(w_full, d, z, bits):
    u = _codes(w_full, d, z, 2**bits - 1)
    return u.to(torch.uint8), d.float(), z.to(torch.uint8)


def _quantize_rows(weight, bits, row_fn):
    _check_weight(weight)
    check_w_bits(bits)
    n, k = weight.shape
    rows = max(1, _BATCH_ELEMENTS // max(k, 1))
    codes, scales, zeros = [], [], []
    for start in range(0, n, rows):
        w = weight[start:start + rows].float()
        d, z = row_fn(w, 2**bits - 1)
        u, d, z = _finish(w, d, z, bits)
        codes.append(pack_codes(u, bits))
        scales.append(d)
        zeros.append(z)
    return QuantizedWeight(torch.cat(codes), torch.cat(scales), torch.cat(zeros), bits, (n, k))


def _minmax_rows(w, qmax):
    return _grid(w.amin(1), w.amax(1), qmax)


def _bgr_rows(w, qmax):
    wmin, wmax = w.amin(1), w.amax(1)
    step = (wmax - wmin) / BGR_GRID
    # bounded init: error of the min-max grid of each symmetrically shrunk range
    errs, grids = [], []
    for i in range(BGR_MAX_SHRINK + 1):
        d, z = _grid(wmin + i * step, wmax - i * step, qmax)
        errs.append(_sse(w, d, z, _codes(w, d, z, qmax)))
        grids.append((d, z))
    errs = torch.stack(errs, 1)  # [R, candidates]
    all_d = torch.stack([g[0] for g in grids], 1)
    all_z = torch.stack([g[1] for g in grids], 1)
    best_err = errs[:, 0].clone()  # min-max itself: BGR is never worse on any row
    best_d, best_z = all_d[:, 0].clone(), all_z[:, 0].clone()
    rows = torch.arange(w.shape[0], device=w.device)
    mean_w = w.mean(1)
    for pick in errs.topk(min(BGR_TOP_K, errs.shape[1]), dim=1, largest=False).indices.T:
        d, z = all_d[rows, pick], all_z[rows, pick]
        u = _codes(w, d, z, qmax)
        prev = _sse(w, d, z, u)
        for _ in range(BGR_MAX_ITER):
            better = prev < best_err
            best_err = torch.where(better, prev, best_err)
            best_d, best_z = torch.where(better, d, best_d), torch.where(better, z, best_z)
            c = u - z.unsqueeze(1)
            num, den = (c * w).sum(1), (c * c).sum(1)
            d_ls = torch.where(den > 0, num / den.clamp_min(1e-30), d)  # least-squares step size
            d = torch.where(d_ls > 0, d_ls, d)
            z = torch.round((u.mean(1) - mean_w / d).clamp(0, qmax))
            u = _codes(w, d, z, qmax)
            err = _sse(w, d, z, u)
            if (prev - err).sum() < BGR_EPS * prev.sum():
                prev = err
                break
            prev = err
        better = prev < best_err
        best_err = torch.where(better, prev, best_err)
        best_d, best_z = torch.where(better, d, best_d), torch.where(better, z, best_z)
    return best_d, best_z


def minmax_quantize(weight: torch.Tensor, bits: int = 4) -> QuantizedWeight:
    """Per-row asymmetric min-max quantization (the baseline)."""
    return _quantize_rows(weight, bits, _minmax_rows)


def bgr_quantize(weight: torch.Tensor, bits: int = 4) -> QuantizedWeight:
    """BGR: bounded-init clipping search, then least-squares grid refinement, per row, batched."""
    return _quantize_rows(weight, bits, _bgr_rows)


# The 16-bit SVD branch (docs/method.md, "The weight's SVD branch"): W = up @ down + residual, the residual
# quantized. Its top singular directions are where a weight's outlier columns, rows and blocks live, so the
# residual has a small, even range. Matrices wider than SVD_EXACT_MAX in both dimensions take a seeded
# randomized range finder (deterministic): only how much of W the branch holds depends on its accuracy,
# never the layer's correctness (the residual is whatever the branch leaves).
SVD_EXACT_MAX = 1024
SVD_OVERSAMPLE = 16
SVD_POWER_ITERS = 4


def _top_singular(w: torch.Tensor, rank: int):
    """(U [N, r], S [r], Vh [r, K]) of the top `rank` singular triplets of w (in w's dtype)."""
    n, k = w.shape
    if min(n, k) <= SVD_EXACT_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.linalg.qr(w @ torch.randn(k, rank + SVD_OVERSAMPLE, generator=g).to(w.device, w.dtype)).Q
    for _ in range(SVD_POWER_ITERS):
        q = torch.linalg.qr(w @ torch.linalg.qr(w.t() @ q).Q).Q
    u, s, vh = torch.linalg.svd(q.t() @ w, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


# Guarded input channels: columns whose norm is below GUARD_RATIO x the median column norm. A layer that reads
# the residual stream gives its massive channels (hundreds of times the median) tiny columns, so the product
# stays in range; a 4-bit grid's error on such a column (spread onto it by the rotation) is multiplied by the
# massive input. The branch holds these columns (one-hot rows of `down`): at most GUARD_MAX per layer and a
# quarter of its rank, so the rest of the rank keeps the top singular directions (outlier columns, sinks).
GUARD_RATIO = 0.1
GUARD_MAX = 8


def guard_channels(weight: torch.Tensor, rank: int, ratio: float = GUARD_RATIO) -> torch.Tensor:
    """Indices (int64, ascending, on the CPU) of the input channels whose column norm is below ratio x the
    median's: the smallest min(GUARD_MAX, rank // 4) of them. Norms in the weight's dtype (float64 from
    svd_split: the same set on every device), ties by index (a stable sort)."""
    limit = min(GUARD_MAX, int(rank) // 4)
    c = weight.norm(dim=0).cpu()
    small = torch.nonzero(c < ratio * c.median()).flatten()
    if small.numel() > limit:
        small = small[torch.argsort(c[small], stable=True)[:limit]]
    return small.sort().values


def _rows_without(rows: torch.Tensor, guarded: torch.Tensor) -> torch.Tensor:
    """SVD rows with exact zeros in the guarded columns (they are 0 there up to float64 noise, whose sign
    depends on the CPU thread count and would survive into the 16-bit factors)."""
    rows[:, guarded.to(rows.device)] = 0.0
    return rows


def svd_split(weight: torch.Tensor, rank: int, guard: torch.Tensor | None = None):
    """(up [N, r], down [r, K], residual [N, K]) with weight = up @ down + residual, up @ down the best
    rank-r approximation (r = min(rank, N, K); float32). rank 0: empty factors and the weight itself.
    guard: input channels (guard_channels) whose columns take the first rows of `down` (one-hot), the rest
    the best rank approximation of the other columns; the residual's guarded columns are then 0."""
    _check_weight(weight)
    r = min(int(rank), *weight.shape)
    if r <= 0:
        w = weight.float()
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1]), w
    # float64: float32 SVDs and products differ in their last bits with the number of CPU threads, and a
    # residual one bit apart can round to other 4-bit codes; in float64 the float32 results agree, so a file
    # quantized by the CLI and the same model quantized in ComfyUI get the same codes
    home = weight.device
    w = weight.to(float64_device(home), torch.float64)
    if guard is not None and guard.numel():
        up, down = refit_branch(w, r, guard)  # the same fit, to the weight itself
    else:
        u, s, vh = _top_singular(w, r)
        up, down = u * s, vh
    return (up.float().contiguous().to(home), down.float().contiguous().to(home),
            (w - up @ down).float().to(home))


def refit_branch(error: torch.Tensor, rank: int, guard: torch.Tensor):
    """The branch (up [N, r], down [r, K], float32) that best holds a weight's quantization error `error`
    (float64, W - the dequantized residual in the weight's basis): the guarded channels' one-hot rows first in
    `down`, the other rows the top singular directions of the error without those columns; up = error downᵀ.
    The layer's weight error is then error (I - downᵀ down): 0 on the guarded channels."""
    e = error
    rest = e.clone()
    rest[:, guard.to(e.device)] = 0.0
    parts = []
    if guard.numel():
        onehot = e.new_zeros(guard.numel(), e.shape[1])
        onehot[torch.arange(guard.numel()), guard.to(e.device)] = 1.0
        parts.append(onehot)
    r_rest = min(int(rank), *e.shape) - guard.numel()
    if r_rest > 0:
        parts.append(_rows_without(_top_singular(rest, r_rest)[2], guard))
    down = torch.cat(parts) if parts else e.new_zeros(0, e.shape[1])
    return e @ down.t(), down


def quantize_split(weight: torch.Tensor, rank: int, bits: int = 4, method: str = "dvdq", had_block: int = 1,
                   guard: bool = True) -> QuantizedWeight:
    """A weight's 4-bit residual codes (rotated by the block Hadamard `had_block`, 1: none; BGR for method
    "dvdq", else min-max) and its 16-bit branch (svd_up, svd_down), the branch fitted to what the codes leave:

    1. split: the guarded channels' columns (guard_channels: tiny columns, the massive input channels a layer
       that reads the residual stream nearly ignores) and the top singular directions of the rest (svd_split),
    2. quantize the residual W - up·down (rotated),
    3. refit the branch to the weight's remaining error W - Ŵ (refit_branch).

    The layer's weight error is then W - Ŵ projected out of the branch's rows: 0 on the guarded channels
    (up to the 16-bit rounding of the stored factors), whatever the rotation spread onto them. Same shapes
    and storage as svd_split's branch. (Quantizing the refitted residual again and refitting, keeping the best
    round, gained little for 2-3x the time: docs/method.md.)"""
    _check_weight(weight)
    w = weight.float()
    quant = bgr_quantize if method == "dvdq" else minmax_quantize
    r = min(int(rank), *w.shape)
    if r <= 0:
        return quant(rotate(w, had_block), bits)
    home = w.device
    w64 = w.to(float64_device(home), torch.float64)
    g = guard_channels(w64, r) if guard else torch.zeros(0, dtype=torch.long)
    res = svd_split(w64, r, guard=g)[2].to(home)
    qw = quant(rotate(res, had_block), bits)
    del res
    # the error in the plain basis (the block Sylvester Hadamard is its own inverse); float64 as in svd_split
    error = w64 - rotate(qw.dequantize().to(w64.device, torch.float64), had_block)
    del w64
    up, down = refit_branch(error, r, g)
    qw.svd_up, qw.svd_down = up.float().contiguous().to(home), down.float().contiguous().to(home)
    return qw


def float64_device(device: torch.device) -> torch.device:
    """Where float64 math on `device`'s tensors runs: the device itself, or the CPU for Apple's MPS, which
    has no float64."""
    return torch.device("cpu") if torch.device(device).type == "mps" else torch.device(device)
