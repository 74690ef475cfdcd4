"""Host side: buffers, launches, and the torch custom op that wraps them.

Only relative imports here; the core's rules (pow2 constants, Hadamard pattern, input sharing) come
from the core. triton is imported on first use, so importing the package needs neither triton nor a GPU.
"""
import math
import os
import warnings
from dataclasses import replace

import torch

from ..activations import POW2_BITS, POW2_OCTAVES
from ..hadamard import sylvester
from ..linear import SHARE_LAST
from . import configs

GROUP = 64  # smallest column tile of the activation kernels
_rot_cache = {}
# A LoRA branch beside the layer (dvdq_core/lowrank.py, lowrank.branch_of: the LoRAs after quantization and/or
# the weight's own SVD branch, one stacked branch; "lora_*" names below mean that branch) runs, by DVDQ_LORA_IMPL:
#   "unfused"   the layer as without a branch, then x @ A^T and an addmm of the up-projection into y
#               (cuBLAS), then the fused GELU by torch (the default off sm_90, where "epilogue" is not measured)
#   "epilogue"  T = x @ A^T by one cuBLAS GEMM, the activation pass as without a branch, the up-projection in
#               the GEMM's epilogue (the Gluon GEMM's on sm_90, else the Triton GEMM's): saves unfused's extra
#               read and write of the output without slowing the activation pass (the default on sm_90)
#   "fused"     the down-projection in the activation pass too (its tiles are read there anyway), the
#               up-projection in the epilogue as "epilogue"
#   "triton"    "fused", but layers with a branch take the Triton GEMM on sm_90 as well (no Gluon)
# bench/kernels.py --lora times them side by side (H100, Wan 14B, rank 64: epilogue +7-10% of the layer, unfused
# +14-31%, fused +11-16%: bench/RESULTS.md). DVDQ_LORA_IMPL, when set, applies to every card.
LORA_IMPLS = ("unfused", "epilogue", "fused", "triton")
DEFAULT_LORA_IMPL = {(9, 0): "epilogue"}  # by the architecture the kernels compile for; other cards: "unfused"
LORA_IMPL = os.environ.get("DVDQ_LORA_IMPL") or None
if LORA_IMPL is not None and LORA_IMPL not in LORA_IMPLS:
    raise ValueError(f"DVDQ_LORA_IMPL must be one of {', '.join(LORA_IMPLS)}, got {LORA_IMPL!r}")
# The largest padded rank (lora_rp) the kernels take ("epilogue", "fused", "triton"): the Gluon GEMMs keep
# a branch's tiles (U [BN, RP], T [BM, RP] in 16 bits) in their rings' shared memory, which holds them up to
# 128, and the activation pass and the Triton epilogue compile without spills up to there
# (bench/compile_targets.py). A larger rank (a stack of several LoRAs) runs unfused.
LORA_FUSED_MAX_RP = 128


def lora_impl_for(device) -> str:
    """How a branch runs on this device: DVDQ_LORA_IMPL, else DEFAULT_LORA_IMPL's choice for the card, which
    was measured with the Gluon GEMMs (without them, as with DVDQ_GEMM_IMPL=triton: "unfused")."""
    if LORA_IMPL is not None:
        return LORA_IMPL
    impl = DEFAULT_LORA_IMPL.get(_capability(device), "unfused")
    return impl if impl == "unfused" or _gluon() is not None else "unfused"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton():
    from . import _triton as kt  # imported here: needs triton
    return kt


def effective_blocks(layer, k: int):
    """(rotation block or 1, scale block) actually used for width k, as in the design."""
    hb = math.gcd(int(layer.had_block), k) if layer.rotate else 1
    sb = math.gcd(int(layer.scale_block), k)
    return hb, sb


def layout_group(k: int, sb: int, a_float: bool = False) -> int:
    """Columns per layout group G of the codes (also the GEMM's BK): each group of G columns is stored
    as its G/2 even columns, then its G/2 odd ones, so the low and high nibbles of G/2 packed weight
    bytes meet two contiguous halves of one K tile. 128 where the width and the scale block allow it
    (a group must lie inside one scale block); 64 otherwise and for 16-bit activations (smaller
    tiles of 2-byte values)."""
    return 128 if (not a_float and k % 128 == 0 and sb % 128 == 0) else GROUP


def _perm(g: int):
    """Column permutation within a group of g: new position p takes old column perm[p]."""
    return [2 * j for j in range(g // 2)] + [2 * j + 1 for j in range(g // 2)]


def rotation_matrix(hb: int, g: int, dtype, device) -> torch.Tensor:
    """R x R matrix (R = max(hb, g)): blockdiag of the +-1 Sylvester pattern of size hb (identity when
    hb is 1; the kernels scale by 1/sqrt(hb)), columns permuted per layout group of g (free: the
    permutation rides on the rotation's dot). Cached per (hb, g, dtype, device): built once."""
    key = (hb, g, dtype, str(device))
    r = _rot_cache.get(key)
    if r is None:
        size = max(hb, g)
        if hb > 1:
            full = torch.block_diag(*([sylvester(hb).to(dtype)] * (size // hb)))
        else:
            full = torch.eye(size, dtype=dtype)
        perm = torch.tensor([j * g + p for j in range(size // g) for p in _perm(g)])
        r = full[:, perm].contiguous().to(device)
        _rot_cache[key] = r
    return r


def unpermute_columns(q: torch.Tensor, g: int) -> torch.Tensor:
    """Permuted layout (groups of g) -> natural column order (tests and debugging only)."""
    m, k = q.shape
    inv = torch.empty(g, dtype=torch.long)
    inv[torch.tensor(_perm(g))] = torch.arange(g)
    return q.reshape(m, k // g, g)[:, :, inv.to(q.device)].reshape(m, k)


def _act_launch(x2d, hb: int, sb: int, act_cfg=None, g=None):
    """What every activation kernel launch shares: the rotation matrix, the grid, the row-max
    granularity TG = min(R, sb) and the launch keywords: the rotation tile R = max(block, layout
    group) is also the column tile C, BM rows per program, warps, stages. act_cfg = (elements per
    tile, warps, stages) replaces the shipped setting (benchmark sweeps)."""
    m, k = x2d.shape
    g = g or layout_group(k, sb)
    r = max(hb, g)
    elems, warps, stages = act_cfg or (configs.ACT_ELEMS_PER_TILE, configs.ACT_NUM_WARPS, configs.ACT_NUM_STAGES)
    bm = 16 if interpreting() else max(16, elems // r)
    rmat = rotation_matrix(hb, g, x2d.dtype, x2d.device)
    kw = dict(C=r, R=r, BM=bm, INTERPRET=interpreting(), num_warps=warps, num_stages=stages)
    return rmat, (triton_cdiv(m, bm),), min(r, sb), kw


def lora_rp(rank: int) -> int:
    """A branch's rank as the kernels' dots take it: rounded up to a power of two, at least 16 (masked)."""
    return max(16, triton_next_power_of_2(rank))


def _lora_kw(down, t):
    """Launch keywords of an activation kernel that also writes T = X @ down^T into t [M, rank] (none without)."""
    if down is None:
        return {}
    return dict(a_ptr=down, t_ptr=t, RANK=down.shape[0], LORA=True, RP=lora_rp(down.shape[0]))


def _codes(x2d, q, s):
    """Output buffers of the quantizers (given ones are used: tests poison them)."""
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2d.device) if q is None else q
    s = torch.empty((m,), dtype=torch.float32, device=x2d.device) if s is None else s
    return q, s


def channel_absmax(x2d, hb: int, sb: int, act_cfg=None):
    """Pass 1 of granularity "pow2": max_i |Xr_ij| per channel j (float32 [K], permuted layout)."""
    m, k = x2d.shape
    rmat, grid, tg, kw = _act_launch(x2d, hb, sb, act_cfg or (configs.ACT_POW2_PASS1_ELEMS, configs.ACT_NUM_WARPS,
                                                              configs.ACT_NUM_STAGES))
    cmax = torch.zeros((k,), dtype=torch.float32, device=x2d.device)
    _triton()._absmax_kernel[grid](x2d, rmat, 1.0 / math.sqrt(hb), cmax, cmax, m, k, 1, x2d.stride(0),
                                   SB=sb, TG=tg, AUTO_SCALE=True, POW2=True, **kw)
    return cmax


_sm_count = {}


def _programs(device, per_sm: int) -> int:
    """per_sm programs for every SM of the device (cached: the property query costs host time)."""
    if device.index not in _sm_count:
        _sm_count[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return per_sm * _sm_count[device.index]


def quantize_pow2(x2d, hb: int, sb: int, a_bits: int, cmax, q=None, s=None, act_cfg=None, down=None, t=None):
    """Pass 2 of granularity "pow2" (see _quantize_pow2_kernel) -> (q' int8 [M, K], s' f32 [M]).
    On the GPU a persistent grid of configs.ACT_POW2_PASS2_PER_SM programs per SM strides over the
    row blocks (act_cfg's optional 4th entry overrides it; 0 = one program per block).
    down [rank, K] (x's dtype, contiguous): also writes a LoRA branch's T = X @ down^T into t [M, rank]."""
    m, k = x2d.shape
    act_cfg = act_cfg or (configs.act_lora(_capability(x2d.device)) if down is not None else None)
    rmat, grid, _, kw = _act_launch(x2d, hb, sb, act_cfg[:3] if act_cfg else None)
    per_sm = act_cfg[3] if act_cfg and len(act_cfg) > 3 else configs.ACT_POW2_PASS2_PER_SM
    if per_sm and not interpreting():
        grid = (min(grid[0], _programs(x2d.device, per_sm)),)
        kw["PERSISTENT"] = True
    q, s = _codes(x2d, q, s)
    _triton()._quantize_pow2_kernel[grid](x2d, rmat, 1.0 / math.sqrt(hb), cmax, q, s, m, k, x2d.stride(0),
                                          float(2 ** (a_bits - 1) - 1), OCTAVES=POW2_OCTAVES, **kw,
                                          **_lora_kw(down, t))
    return q, s


def quantize_activations(x2d, hb: int, sb: int, a_bits: int, auto_scale: bool, q=None, s=None, act_cfg=None,
                         pow2=False, down=None, t=None):
    """Rotate, auto-scale and quantize X [M, K] -> (q int8 [M, K] in the layout of
    layout_group(K, sb), s f32 [M], l f32 [K // sb]).
    pow2 (granularity "pow2" at POW2_BITS, with auto-scale): per-channel power-of-two scales folded
    into the codes and s (see _quantize_pow2_kernel) -> (q', s', None): the GEMM then runs without
    auto-scale, one int32 sum over all of K.
    q and s may be given (tests pass poisoned buffers to check every element is written).
    act_cfg: (elements per tile, warps, stages) instead of the shipped setting (benchmark sweeps;
    with pow2 it applies to pass 2).
    down [rank, K] and t [M, rank] (x's dtype): the pass that quantizes (pass 2) also writes a LoRA
    branch's down-projection T = X @ down^T (float32 sums of the unrotated input, rounded once) into t."""
    if pow2:
        return (*quantize_pow2(x2d, hb, sb, a_bits, channel_absmax(x2d, hb, sb), q, s, act_cfg, down, t), None)
    kt = _triton()
    m, k = x2d.shape
    rmat, grid, tg, kw = _act_launch(x2d, hb, sb, act_cfg)
    # (with a branch pass 2 takes configs.act_lora's launch; each pass covers all rows with its own grid)
    rmat2, grid2, _, kw2 = (rmat, grid, tg, kw) if down is None else \
        _act_launch(x2d, hb, sb, act_cfg or configs.act_lora(_capability(x2d.device))[:3])
    q, s = _codes(x2d, q, s)
    rowmax = torch.empty((m, k // tg), dtype=torch.float32, device=x2d.device)
    l = torch.zeros((k // sb,), dtype=torch.float32, device=x2d.device)
    kt._absmax_kernel[grid](x2d, rmat, 1.0 / math.sqrt(hb), rowmax, l, m, k, k // tg, x2d.stride(0),
                            SB=sb, TG=tg, AUTO_SCALE=auto_scale, **kw)
    kt._quantize_kernel[grid2](x2d, rmat2, 1.0 / math.sqrt(hb), rowmax, l, q, s, m, k, k // tg, x2d.stride(0),
                               float(2 ** (a_bits - 1) - 1), SB=sb, TG=tg, TB=64, AUTO_SCALE=auto_scale, **kw2,
                               **_lora_kw(down, t))
    return q, s, l


def rotate_activations(x2d, hb: int, down=None, t=None):
    """16-bit path: Xr in the input dtype, in the layout of layout_group(K, sb, a_float=True) (down, t:
    and a LoRA branch's down-projection, as quantize_activations)."""
    m, k = x2d.shape
    rmat, grid, _, kw = _act_launch(x2d, hb, GROUP, None if down is None else configs.act_lora(_capability(x2d.device))[:3],
                                    g=layout_group(k, GROUP, a_float=True))
    xr = torch.empty((m, k), dtype=x2d.dtype, device=x2d.device)
    _triton()._rotate_kernel[grid](x2d, rmat, 1.0 / math.sqrt(hb), xr, m, k, x2d.stride(0), **kw, **_lora_kw(down, t))
    return xr


def triton_cdiv(a, b):
    return (a + b - 1) // b


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _capability(device):
    """The architecture the kernels are compiled for on this device (configs.target_capability)."""
    if device.type != "cuda":
        return (0, 0)
    return configs.target_capability(torch.cuda.get_device_capability(device))


_gluon_state = []  # [module] or [None], decided on first use


def _gluon():
    """The Gluon kernels module, or None where this triton has no Gluon (or DVDQ_GEMM_IMPL=triton)."""
    if not _gluon_state:
        mod = None
        if os.environ.get("DVDQ_GEMM_IMPL", "") != "triton":
            try:
                from . import _gluon as mod  # imported here: needs triton >= 3.5
            except Exception as e:  # an older triton: the Triton GEMM serves (same result, slower)
                warnings.warn(f"DVD-Quant: the Hopper GEMM without per-block scales needs Triton's Gluon "
                              f"(triton >= 3.5; import failed: {e}); using the Triton GEMM, same results, "
                              f"about 10% slower. Upgrade triton to get it.", stacklevel=3)
                mod = None
        _gluon_state.append(mod)
    return _gluon_state[0]


def chain_gemm_applies(a, qweight, auto_scale: bool, cap=None) -> bool:
    """Whether w4_gemm takes an sm_90 Gluon GEMM: int8 codes without per-K-block scales, enough
    tokens for its tile, a Hopper GPU outside the interpreter, and Gluon available. cap: the
    device's capability if the caller has it."""
    return (a.dtype == torch.int8 and not auto_scale and a.shape[0] > configs.CHAIN_MIN_M and a.is_cuda
            and not interpreting() and configs.wgmma(cap or _capability(a.device)) and qweight.is_contiguous()
            and _gluon() is not None)


def _gemm_lora_kw(lora):
    """Launch keywords of a GEMM that adds a LoRA branch's up-projection in its epilogue: lora = (t [M, rank]
    with unit column stride, up [N, rank] contiguous), both of the activations' dtype (none without)."""
    if lora is None:
        return {}
    t, up = lora
    return dict(t_ptr=t, lu_ptr=up, stride_t=t.stride(0), RANK=up.shape[1], LORA=True, RP=lora_rp(up.shape[1]))


def w4_gemm_chain(a, qweight, w_zero, w_scale, s, bias, out_dtype, sb: int, out=None, chain_cfg=None, gelu=False,
                  lora=None):
    """Y [M, N] from int8 codes without per-K-block scales, on sm_90 (_gluon._w4_gemm_chain_kernel).
    chain_cfg: a tile other than configs.CHAIN_SM90 (bench/kernels.py --chain-sweep). gelu, lora: as w4_gemm
    (where gluon_lora_fits)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    cfg = chain_cfg or configs.CHAIN_SM90
    m, k = a.shape
    n = qweight.shape[0]
    bk = layout_group(k, sb)
    bm, bn = cfg["BM"], cfg["BN"]
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    w_desc = TensorDescriptor(qweight, [n, k // 2], [k // 2, 1], [bn, bk // 2],
                              gl.NVMMASharedLayout.get_default_for([bn, bk // 2], gl.uint8))
    y = torch.empty((m, n), dtype=out_dtype, device=a.device) if out is None else out
    grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
    _gluon()._w4_gemm_chain_kernel[grid](
        a_desc, w_desc, w_zero, w_scale, s, bias if bias is not None else w_scale, y, m, n, k,
        GROUP_M=cfg["group_m"], STAGES=min(cfg["stages"], k // bk), HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"], GELU=gelu, **_gemm_lora_kw(lora))
    return y


def unpack_weights(qweight, w_zero, g: int, out=None):
    """Packed 4-bit weights [N, K/2] -> int8 (u - z) [N, K] in the codes' layout of groups of g columns
    (_triton._unpack_weights_kernel): the workspace of w4_gemm_u8, from PyTorch's caching allocator."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    out = torch.empty((n, k), dtype=torch.int8, device=qweight.device) if out is None else out
    br, gpp = 32, 2 if (k // g) % 2 == 0 else 1
    _triton()._unpack_weights_kernel[(triton_cdiv(n, br), k // g // gpp)](qweight, w_zero, out, n, k, G=g, BR=br,
                                                                          GPP=gpp, num_warps=4)
    return out


def workspace_or_none(qweight, w_zero, g: int):
    """unpack_weights, or None where the GPU has no room for the workspace (N x K bytes): the caller
    then unpacks in its GEMM loop, as below configs.U8_MIN_M tokens (slower, no extra memory)."""
    try:
        return unpack_weights(qweight, w_zero, g)
    except torch.OutOfMemoryError:
        return None


def w4_gemm_u8(a, qweight, w_zero, w_scale, s, bias, out_dtype, sb: int, out=None, u8_cfg=None, gelu=False, w8=None,
               lora=None):
    """As w4_gemm_chain, through an int8 weight workspace (unpack_weights, or w8 if given) and
    _gluon._w4_gemm_u8_kernel. u8_cfg: a tile other than configs.U8_SM90 (benchmarks)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    cfg = u8_cfg or configs.U8_SM90
    m, k = a.shape
    n = qweight.shape[0]
    bk = layout_group(k, sb)
    bm, bn = cfg["BM"], cfg["BN"]
    w8 = unpack_weights(qweight, w_zero, bk) if w8 is None else w8
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    w_desc = TensorDescriptor(w8, [n, k], [k, 1], [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    y = torch.empty((m, n), dtype=out_dtype, device=a.device) if out is None else out
    grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
    _gluon()._w4_gemm_u8_kernel[grid](
        a_desc, w_desc, w_scale, s, bias if bias is not None else w_scale, y, m, n, k,
        GROUP_M=cfg["group_m"], STAGES=min(cfg["stages"], k // bk), HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"], GELU=gelu, **_gemm_lora_kw(lora))
    return y


_gluon_lora_state = [True]  # False once a Gluon GEMM with a fused branch failed: those layers take the Triton GEMM


def gluon_lora_fits(k: int, sb: int, rank: int) -> bool:
    """Whether both Gluon GEMMs hold a branch's tiles of this rank in their rings (_gluon._lora_up): U [BN, RP]
    and T [BM, RP] in 16 bits need STAGES * BK >= 2 RP bytes per row of the activation and weight rings (u8,
    and the chain kernel's activation ring), and BK >= RP of the chain kernel's unpacked double buffer; the
    rings shrink with K (STAGES <= K / BK), so a small K or 64-wide groups take fewer."""
    bk, rp = layout_group(k, sb), lora_rp(rank)
    return all(min(cfg["stages"], k // bk) * bk >= 2 * rp for cfg in (configs.U8_SM90, configs.CHAIN_SM90)) and bk >= rp


def w4_gemm(a, qweight, w_zero, w_scale, l, s, bias, out_dtype, sb: int, auto_scale: bool, cfg=None, out=None,
            gelu=False, lora=None, lora_gluon=True, **variant):
    """Y [M, N] from activation codes a (or 16-bit Xr), packed 4-bit weights and the scales; gelu: the
    epilogue applies GELU (tanh form) to the rounded output (dvdq_core.fusion).
    lora = (t [M, rank], up [N, rank]) in the output's dtype: the epilogue adds a LoRA branch's
    up-projection t @ up^T to the float32 result before the rounding and the GELU.
    Without per-K-block scales on an H100-class GPU a Gluon GEMM runs (chain_gemm_applies): from
    configs.U8_MIN_M tokens on through the int8 weight workspace, else the chain kernel; unless a
    Triton tile or variant is asked for, or a branch with lora_gluon False, one whose tiles do not fit
    their rings (gluon_lora_fits), or after their branch epilogue failed once. The caller keeps lora's
    padded rank within LORA_FUSED_MAX_RP."""
    cap = _capability(a.device)
    gluon_ok = lora is None or (lora_gluon and _gluon_lora_state[0] and gluon_lora_fits(a.shape[1], sb, lora[1].shape[1]))
    if cfg is None and not variant and gluon_ok and chain_gemm_applies(a, qweight, auto_scale, cap):
        try:
            w8 = None
            if configs.use_workspace(cap, a.shape[0], False, interpreting()):
                w8 = workspace_or_none(qweight, w_zero, layout_group(a.shape[1], sb))
            if w8 is not None:
                return w4_gemm_u8(a, qweight, w_zero, w_scale, s, bias, out_dtype, sb, out, gelu=gelu, w8=w8, lora=lora)
            return w4_gemm_chain(a, qweight, w_zero, w_scale, s, bias, out_dtype, sb, out, gelu=gelu, lora=lora)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # Gluon is experimental: a newer triton may change its API under us
            if lora is not None:  # the branch's epilogue only: layers without a branch keep the Gluon GEMM
                _gluon_lora_state[0] = False
                warnings.warn(f"DVD-Quant: the Hopper Gluon GEMM failed with a LoRA branch in its epilogue "
                              f"({type(e).__name__}: {str(e)[:300]}); layers with a LoRA take the Triton GEMM "
                              f"from now on (same results). Please report this with your triton version.",
                              stacklevel=2)
            else:
                _gluon_state[:] = [None]
                warnings.warn(f"DVD-Quant: the Hopper Gluon GEMM failed ({type(e).__name__}: {str(e)[:300]}); the "
                              f"Triton GEMM runs from now on (same results, about 10% slower). Please report this "
                              f"with your triton version.", stacklevel=2)
    kt = _triton()
    m, k = a.shape
    n = qweight.shape[0]
    a_float = a.dtype != torch.int8
    flags = {}
    if cfg is None:
        cfg = configs.gemm_config(cap, m, n, k, sb, a_float, interpreting())
        # not with a DVDQ_GEMM_CONFIG tile: the int8 weight tile doubles its shared memory
        flags["W8"] = configs.use_workspace(cap, m, a_float, interpreting()) and not os.environ.get("DVDQ_GEMM_CONFIG")
    cfg = replace(cfg, BK=layout_group(k, sb, a_float))  # one K tile = one layout group
    flags = {**cfg.flags(), **flags, **variant}
    w8 = workspace_or_none(qweight, w_zero, cfg.BK) if flags.get("W8") else None
    flags["W8"] = w8 is not None
    if interpreting():  # inline PTX cannot run in the interpreter
        flags["ASM_UNPACK"] = False
    if a_float:  # two sub-tiles of 2-byte activations would not fit in shared memory
        flags["SPLIT"] = 1
    y = torch.empty((m, n), dtype=out_dtype, device=a.device) if out is None else out
    grid = (triton_cdiv(m, cfg.BM * flags.get("SPLIT", 1)) * triton_cdiv(n, cfg.BN),)
    dummy = w_scale  # never read when the matching flag is off
    kt._w4_gemm_kernel[grid](
        a, qweight if w8 is None else w8, w_zero, w_scale, l if l is not None else dummy, s if s is not None else dummy,
        bias if bias is not None else dummy, y, m, n, k,
        SB=sb, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, A_FLOAT=a_float,
        AUTO_SCALE=auto_scale and not a_float, HAS_BIAS=bias is not None, SWAP=cfg.SWAP,
        INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, GELU=gelu,
        **flags, **_gemm_lora_kw(lora))
    return y


# One-entry cache of the last quantized activation: q, k and v projections (and a fused
# cross-attention k/v) read the same input, which is then quantized once instead of three times.
# The entry holds a strong reference to its input, so that memory cannot be freed and reused while
# cached. Outside inference mode the tensor's version counter catches in-place changes, so any
# layer may reuse. Inference-mode tensors (ComfyUI samples under torch.inference_mode()) have no
# version counter: there only layers of a known shared-input group (`share`, set by the core from
# the layer's name: Wan's q/k/v) reuse, and the group's last member releases the entry.
# DVDQ_REUSE_ACTIVATIONS=0 turns the cache off.
# A layer with a LoRA branch (down: its down-projection) gets T = X @ down^T from the pass that quantizes
# X; only the codes are cached (T is the layer's own), so on a hit T is one cuBLAS GEMM of X (one more
# read of X, instead of the three of the activation pass), as LORA_IMPL "epilogue" always computes it.
_reuse = os.environ.get("DVDQ_REUSE_ACTIVATIONS", "1") != "0"
_last = [None, None, None]  # key, input, (q, s, l)


def _quantize_cached(x2d, hb, sb, a_bits, auto_scale, share=0, pow2=False, down=None):
    """(q, s, l, t): the codes (cached as above) and, with down, a LoRA branch's T [M, rank] (else None)."""
    t = None if down is None else torch.empty((x2d.shape[0], down.shape[0]), dtype=x2d.dtype, device=x2d.device)
    inference = x2d.is_inference()
    if not _reuse or (inference and not share):
        return (*quantize_activations(x2d, hb, sb, a_bits, auto_scale, pow2=pow2, down=down, t=t), t)
    key = (x2d.data_ptr(), tuple(x2d.shape), tuple(x2d.stride()), x2d.dtype, x2d.device,
           None if inference else x2d._version, hb, sb, a_bits, auto_scale, pow2)
    if _last[0] == key:
        val = _last[2]
        if down is not None:
            torch.mm(x2d, down.t(), out=t)
    else:
        clear_activation_cache()  # release the previous entry before allocating the new one
        val = quantize_activations(x2d, hb, sb, a_bits, auto_scale, pow2=pow2, down=down, t=t)
        _last[0], _last[1], _last[2] = key, x2d, val
    if share == SHARE_LAST:
        clear_activation_cache()
    return (*val, t)


def clear_activation_cache():
    _last[0] = _last[1] = _last[2] = None


def _joined_bias(bias, lora_bias):
    """The layer's bias plus a branch's bias difference, added in float32 (the epilogue adds it unrounded)."""
    if lora_bias is None:
        return bias
    return lora_bias if bias is None else bias.float() + lora_bias.float()


def w4_linear_impl(x2d, qweight, w_scale, w_zero, bias, a_bits: int, hb: int, sb: int, auto_scale: bool,
                   gemm_cfg=None, out=None, share: int = 0, pow2: bool = False, gelu: bool = False, lora_down=None,
                   lora_up=None, lora_bias=None, lora_impl=None, **variant):
    """pow2: the layer's granularity folds power-of-two scales into the codes ("pow2", "pow2-fast"; it
    applies at POW2_BITS with auto-scale only).
    gelu: GELU (tanh form) fused into the GEMM's epilogue (dvdq_core.fusion).
    lora_down [R, K], lora_up [N, R], lora_bias [N] (x's dtype; any may be None): a LoRA branch beside
    the layer (dvdq_core/lowrank.py), Y = act(Q(X) W^T + b + (X down^T) up^T + lora_bias), run as
    lora_impl says (default lora_impl_for(x2d.device): see LORA_IMPLS above)."""
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if x2d.shape[0] == 0:  # no tokens: nothing to launch (GELU(empty) is empty too)
        return x2d.new_empty((0, qweight.shape[0])) if out is None else out
    if lora_down is not None and lora_down.shape[0] == 0:  # bias differences only
        lora_down = lora_up = None
    if lora_down is not None or lora_bias is not None:  # (a layer without a branch needs no choice)
        lora_impl = lora_impl or lora_impl_for(x2d.device)
    if lora_down is not None and lora_rp(lora_down.shape[0]) > LORA_FUSED_MAX_RP:
        lora_impl = "unfused"
    if lora_impl == "unfused" and (lora_down is not None or lora_bias is not None):
        y = w4_linear_impl(x2d, qweight, w_scale, w_zero, bias, a_bits, hb, sb, auto_scale, gemm_cfg, out, share,
                           pow2, False, **variant)
        if lora_down is not None:
            y.addmm_(x2d @ lora_down.t(), lora_up.t())
        if lora_bias is not None:
            y.add_(lora_bias)
        if gelu:
            g = torch.nn.functional.gelu(y, approximate="tanh")
            y = g if out is None else y.copy_(g)
        return y
    bias = _joined_bias(bias, lora_bias)
    up = None if lora_up is None else lora_up.contiguous()
    down = t = None  # down: the factor the activation pass multiplies by (fused); t: T when it comes from cuBLAS
    if lora_down is not None and lora_impl == "epilogue":  # one cuBLAS GEMM, rounded once to x's dtype
        t = x2d @ lora_down.t()
    elif lora_down is not None:
        down = lora_down.contiguous()
    gluon = lora_impl != "triton"
    if a_bits == 16:
        if down is not None:
            t = torch.empty((x2d.shape[0], down.shape[0]), dtype=x2d.dtype, device=x2d.device)
        xr = rotate_activations(x2d, hb, down, t)
        return w4_gemm(xr, qweight, w_zero, w_scale, None, None, bias, x2d.dtype, sb, False, gemm_cfg, out, gelu,
                       lora=None if t is None else (t, up), lora_gluon=gluon, **variant)
    pow2 = pow2 and auto_scale and a_bits == POW2_BITS
    if out is None:
        q, s, l, t_act = _quantize_cached(x2d, hb, sb, a_bits, auto_scale, share, pow2, down)
    else:  # tests: always run the activation kernels
        t_act = None if down is None else torch.empty((x2d.shape[0], down.shape[0]), dtype=x2d.dtype,
                                                      device=x2d.device)
        q, s, l = quantize_activations(x2d, hb, sb, a_bits, auto_scale, pow2=pow2, down=down, t=t_act)
    t = t if down is None else t_act
    return w4_gemm(q, qweight, w_zero, w_scale, l, s, bias, x2d.dtype, sb, auto_scale and not pow2, gemm_cfg, out,
                   gelu, lora=None if t is None else (t, up), lora_gluon=gluon, **variant)


def norm_rope(x, weight, eps: float, freqs, heads: int, out=None):
    """Wan's q/k RMS norm (weight None: none) and rotary embedding, one read and one write of x
    [B, S, H * D] -> [B, S, H, D] (see _norm_rope_kernel; the checks are the triton backend's norm_rope capabilities)."""
    b, s, c = x.shape
    d = c // heads
    x = x.contiguous()
    out = torch.empty((b, s, heads, d), dtype=x.dtype, device=x.device) if out is None else out
    if x.numel():
        _triton()._norm_rope_kernel[(b * s,)](
            x, x if weight is None else weight.to(x.dtype).contiguous(), freqs, out, s,
            freqs.stride(0) if freqs.shape[0] > 1 else 0, freqs.stride(1), eps,
            H=heads, HP=triton_next_power_of_2(heads), HALF_D=d // 2, NORM=weight is not None,
            INTERPRET=interpreting(), num_warps=configs.WAN_OPS_NUM_WARPS)
    return out


def tokens_per_vector(s: int, f: int) -> int:
    """Tokens that share one of F modulation vectors over S tokens, as ComfyUI's repeat_e spreads
    them: S // F each when that divides, else S // F + 1 (the last vector covers the rest)."""
    repeats = s // f
    return repeats if repeats * f == s else repeats + 1


def _vector_strides(v):
    """(batch stride, vector stride) of [B or 1, F, C] vectors (0 where the dim broadcasts)."""
    return (v.stride(0) if v.shape[0] > 1 else 0), (v.stride(1) if v.shape[1] > 1 else 0)


def _vector_rows(s: int, v, first_tokens: int):
    """_vector_row's (REP, LAST) for S tokens and [B, F, C] vectors: first_tokens 0 spreads the F
    vectors as repeat_e (tokens_per_vector); first_tokens > 0 (F = 2) gives vector 0 to the first
    first_tokens tokens and vector 1 to the rest (the host's modulation_dims of an I2V guiding frame)."""
    f = v.shape[1]
    return (first_tokens if first_tokens > 0 else tokens_per_vector(s, f)), f - 1


def modulated_norm(x, shift, scale, eps: float, out=None, first_tokens: int = 0, round_product: bool = False):
    """LayerNorm(x) * (1 + scale) + shift, x [B, S, C], shift/scale [B, F, C] (_modulated_norm_kernel);
    first_tokens: as _vector_rows; round_product: the product rounded first (the host's apply_mod with
    modulation_dims)."""
    b, s, c = x.shape
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    if shift.stride() != scale.stride():  # both are slices of one tensor in the host; one stride pair serves
        shift, scale = shift.contiguous(), scale.contiguous()
    if x.numel():
        _triton()._modulated_norm_kernel[(b * s,)](
            x, shift, scale, out, s, *_vector_rows(s, shift, first_tokens), *_vector_strides(shift), eps, C=c,
            BC=triton_next_power_of_2(c), INTERPRET=interpreting(), ROUND_PRODUCT=round_product,
            num_warps=configs.WAN_OPS_NUM_WARPS)
    return out


def gated_residual(x, y, gate, out=None, round_product=False, first_tokens: int = 0):
    """x + y * gate, x/y [B, S, C], gate [B, F, C] (_gated_residual_kernel); round_product: y * gate
    rounded first (HunyuanVideo's `x + y * gate`); first_tokens: as _vector_rows. out may be x
    (contiguous) for the in-place update."""
    b, s, c = x.shape
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x) if out is None else out
    if x.numel():
        _triton()._gated_residual_kernel[(b * s,)](
            x, y, gate, out, s, *_vector_rows(s, gate, first_tokens), *_vector_strides(gate), C=c,
            BC=triton_next_power_of_2(c), INTERPRET=interpreting(), ROUND_PRODUCT=round_product,
            num_warps=configs.WAN_OPS_NUM_WARPS)
    return out


def head_norm_rope(x, weight, eps: float, pe, heads: int, x2=None, weight2=None, out=None):
    """HunyuanVideo's q (or k): per-head RMS norm with weight [D], then the rotary embedding, of x
    [B, L, H * D] (the q or k columns of the qkv projection's output, read in place: any token and
    batch stride) -> [B, H, L + L2, D], x2 [B, L2, H * D] with weight2 (the double block's text
    part) after x's tokens. pe [B or 1, 1, L + L2, D/2, 2, 2] float32 (_head_norm_rope_kernel; the
    checks are the triton backend's head_norm_rope capabilities)."""
    b, l, c = x.shape
    total = l + (0 if x2 is None else x2.shape[1])
    d = c // heads
    out = torch.empty((b, heads, total, d), dtype=x.dtype, device=x.device) if out is None else out
    for part, w, l0 in ((x, weight, 0), (x2, weight2, l)):
        if part is None or part.numel() == 0:
            continue
        _triton()._head_norm_rope_kernel[(b * part.shape[1],)](
            part, w.to(part.dtype).contiguous(), pe, out, part.shape[1], total, l0, part.stride(0), part.stride(1),
            pe.stride(0) if pe.shape[0] > 1 else 0, pe.stride(2), eps, H=heads, HP=triton_next_power_of_2(heads),
            HALF_D=d // 2, INTERPRET=interpreting(), num_warps=configs.WAN_OPS_NUM_WARPS)
    return out
