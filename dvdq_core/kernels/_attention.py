"""8-bit attention kernels (imported lazily: this module needs triton). The math is
dvdq_core/attention.py's (`attention_reference` computes it in PyTorch, block by block as here).

Three steps per call, each reading its inputs once:
1. `_kv_stats_kernel`: per (batch x head, chunk of tokens) partial sums of K and V and V's
   per-channel max / min (the chunks are summed by PyTorch: a fixed order, deterministic).
2. `_quantize_kernel` (one launch per tensor): Q -> INT8 per token (scale x softmax scale x log2 e),
   K - mean -> INT8 per block of BN tokens, and in the FP8 form (V - mean) * 448 / absmax -> FP8
   e4m3, stored transposed [D, tokens] so the P.V dot reads V K-major as Hopper's FP8 wgmma needs.
   The quantized tensors are padded with zeros to whole tiles, so the main loop loads unmasked.
3. `_attention_kernel`: FlashAttention's online softmax over key blocks: INT8 QK^T (int32), the row max
   on the codes, then one FMA per score (x q_scale x k_scale - max) before exp2, P.V as FP8 (sm_90; each
   block's product added to a float32 accumulator outside the MMA) or in V's 16-bit dtype; the last,
   partial key block is masked. Options (kernels/configs.py AttentionConfig, docs/attention.md): MAGIC
   (the int32 -> float32 conversion through the accumulator's start value), ACC_R (FP8 P.V in the MMA's
   accumulator), TMA (K / V by tensor descriptors), WS (tl.range warp specialization).
`quantize` runs steps 1-2 and `attend` step 3 (bench/attention.py times them apart).

Interpreter (TRITON_INTERPRET=1, CI): loop bounds are compile-time constants there (Triton 3.6's
interpreter fails on run-time loop bounds with numpy >= 2.4); its float32 -> FP8 cast rounds wrongly
at binade edges and below 2**-6, so values are rounded on the float32 grid first (the cast is then
exact); 16-bit dots go through float32 and float32 -> bf16 is rounded on the bits (_triton._round_to).
"""
import torch
import triton
import triton.language as tl

from .. import attention as _core
from ._triton import EPS, _clamp_round, _exp2i, _round_to

V_MAX = tl.constexpr(_core.V_MAX)  # the reference's constants (dvdq_core.attention), one definition
P_SHIFT = tl.constexpr(_core.P_SHIFT)


@triton.jit
def _to_fp8(v, INTERPRET: tl.constexpr):
    """float32 -> FP8 e4m3, round to nearest even (|v| <= 448 here)."""
    if INTERPRET:
        e = ((tl.abs(v).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 |v|) (normal v)
        step = _exp2i(tl.maximum(e, -6) - 3)  # e4m3: 3 mantissa bits; subnormal spacing 2**-9
        v = ((v / step + 12582912.0) - 12582912.0) * step  # rint on that grid (exact: step is a power of 2)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    return v.to(tl.float8e4nv)


@triton.jit
def _kv_stats_kernel(k_ptr, v_ptr, part_ptr, L, H, NCH, skb, skh, skl, skd, svb, svh, svl, svd,
                     D: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, V_STATS: tl.constexpr):
    """part[0..3, bh, chunk, :] = sum K, sum V, max V, min V over the chunk's tokens."""
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, D)
    kb = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vb = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    ksum = tl.zeros((D,), tl.float32)
    vsum = tl.zeros((D,), tl.float32)
    vmax = tl.full((D,), float("-inf"), tl.float32)
    vmin = tl.full((D,), float("inf"), tl.float32)
    for i in range(CHUNK // BT):
        rows = c * CHUNK + i * BT + tl.arange(0, BT)
        ok = (rows < L)[:, None]
        x = tl.load(kb + rows[:, None].to(tl.int64) * skl + offs_d[None, :] * skd, mask=ok, other=0.0)
        ksum += tl.sum(x.to(tl.float32), 0)
        if V_STATS:
            x = tl.load(vb + rows[:, None].to(tl.int64) * svl + offs_d[None, :] * svd, mask=ok, other=0.0)
            x = x.to(tl.float32)
            vsum += tl.sum(x, 0)
            vmax = tl.maximum(vmax, tl.max(tl.where(ok, x, float("-inf")), 0))
            vmin = tl.minimum(vmin, tl.min(tl.where(ok, x, float("inf")), 0))
    out = part_ptr + (bh * NCH + c) * D + offs_d
    plane = tl.num_programs(0) * NCH * D  # part is [4, B x H, NCH, D]
    tl.store(out, ksum)
    if V_STATS:
        tl.store(out + plane, vsum)
        tl.store(out + 2 * plane, vmax)
        tl.store(out + 3 * plane, vmin)


@triton.jit
def _v_key_position(r):
    """Where key r goes in the Gluon kernel's V^T (_gluon_attention._p_operand): within each 32 keys, key
    8g + 2t + e at 16 (g // 2) + 4t + 2 (g % 2) + e (v_key_position in Python)."""
    k = r % 32
    g = k // 8
    return r - k + (g // 2) * 16 + ((k % 8) // 2) * 4 + (g % 2) * 2 + k % 2


def v_key_position(r):
    return _v_key_position.fn(r)


@triton.jit
def _quantize_kernel(x_ptr, mean_ptr, r_ptr, out_ptr, scale_ptr, L, LP, H, sxb, sxh, sxl, sxd, qk_scale,
                     D: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr, INTERPRET: tl.constexpr,
                     V_ORDER: tl.constexpr = False):
    """One tile of BT tokens of one (batch, head). MODE 0: Q, INT8 per token, scale x qk_scale;
    1: K - mean, INT8 per tile (BT = the attention's BN); 2: (V - mean) * r -> FP8, stored [D, LP]
    (V_ORDER: the keys in the Gluon kernel's order, _v_key_position)."""
    t, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    ok = (rows < L)[:, None]
    base = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    x = tl.load(base + rows[:, None].to(tl.int64) * sxl + offs_d[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    obase = bh.to(tl.int64) * LP * D
    if MODE == 0:
        amax = tl.maximum(tl.max(tl.abs(x), 1), EPS)
        q = _clamp_round(x * tl.math.div_rn(127.0, amax)[:, None], 127.0, INTERPRET).to(tl.int8)
        tl.store(out_ptr + obase + rows[:, None] * D + offs_d[None, :], q)
        tl.store(scale_ptr + bh.to(tl.int64) * LP + rows, tl.math.div_rn(amax, 127.0) * qk_scale)
    elif MODE == 1:
        x = tl.where(ok, x - tl.load(mean_ptr + bh * D + offs_d)[None, :], 0.0)
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), EPS)
        q = _clamp_round(x * tl.math.div_rn(127.0, amax), 127.0, INTERPRET).to(tl.int8)
        tl.store(out_ptr + obase + rows[:, None] * D + offs_d[None, :], q)
        tl.store(scale_ptr + bh.to(tl.int64) * (LP // BT) + t, tl.math.div_rn(amax, 127.0))
    else:
        x = tl.where(ok, x - tl.load(mean_ptr + bh * D + offs_d)[None, :], 0.0)
        v8 = _to_fp8(x * tl.load(r_ptr + bh * D + offs_d)[None, :], INTERPRET)
        cols = _v_key_position(rows) if V_ORDER else rows
        tl.store(out_ptr + obase + offs_d[None, :] * LP + cols[:, None], v8)


MAGIC_BIAS = tl.constexpr(12582912.0)  # 1.5 * 2**23: its float32 grid step is 1
MAGIC_BITS = tl.constexpr(0x4B400000)  # its bits: an int32 accumulator started there reads, as float32, 1.5 * 2**23 + x


@triton.jit
def _scores(q, k_base, j, offs_n, offs_d, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MAGIC: tl.constexpr,
            TMA: tl.constexpr = False, row0=0):
    """The INT8 dot of key block j: float32 codes x (MAGIC 0: converted; 1: also exact, through the accumulator
    started at MAGIC_BITS and one exact subtraction; 2: 1.5 * 2**23 + x, the bias taken off later in the FMA).
    TMA: k_base is a tensor descriptor of all heads' [LKP, D] codes, this head's from row0."""
    if TMA:
        k = k_base.load([row0 + j * BN, 0])
    else:
        k = tl.load(k_base + (j * BN + offs_n)[:, None] * D + offs_d[None, :])
    if MAGIC == 0:
        x = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        # |x| <= 127 * 127 * D < 2**22: 0x4B400000 + x are the bits of the float32 1.5 * 2**23 + x, exactly
        # (no int -> float conversion per element)
        x = tl.dot(q, tl.trans(k), tl.full((BM, BN), MAGIC_BITS, tl.int32), out_dtype=tl.int32)
        x = x.to(tl.float32, bitcast=True)
        if MAGIC == 1:
            x = x - MAGIC_BIAS
    return x


@triton.jit
def _softmax_step(x, l_i, m_i, c, j, Lk, offs_n, BN: tl.constexpr, FP8: tl.constexpr, MASK: tl.constexpr,
                  MAGIC: tl.constexpr):
    """Online-softmax update of one key block from its codes x (scores x * c, c = q_scale x k_scale per row):
    P (unnormalised, float32), alpha (the old rows' rescale), l, m. The row max is taken on the codes (c > 0),
    so each score costs one FMA before exp2."""
    if MASK:
        x = tl.where((j * BN + offs_n < Lk)[None, :], x, float("-inf"))
    mx = tl.max(x, 1)
    if MAGIC == 2:
        off = MAGIC_BIAS * c  # the bias, folded into the FMA's addend (one rounding of ~2**-24 x it)
        m_new = tl.maximum(m_i, (mx - MAGIC_BIAS) * c)
    else:
        off = 0.0
        m_new = tl.maximum(m_i, mx * c)
    alpha = tl.exp2(m_i - m_new)
    if FP8:
        b = m_new - P_SHIFT + off
    else:
        b = m_new + off
    p = tl.exp2(tl.fma(x, c[:, None], -b[:, None]))
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _v_tile(v_base, j, Lk, LKP, svl, svd, offs_n, offs_d, BN: tl.constexpr, FP8: tl.constexpr, MASK: tl.constexpr,
            TMA: tl.constexpr = False, row0=0):
    if TMA:  # a descriptor of all heads' [D, LKP] FP8 codes, this head's from row0
        v = tl.trans(v_base.load([row0, j * BN]))
    elif FP8:
        v = tl.trans(tl.load(v_base + offs_d[:, None] * LKP + (j * BN + offs_n)[None, :]))  # keys contiguous
    else:
        rows = j * BN + offs_n
        ptrs = v_base + rows[:, None].to(tl.int64) * svl + offs_d[None, :] * svd
        if MASK:
            v = tl.load(ptrs, mask=(rows < Lk)[:, None], other=0.0)
        else:
            v = tl.load(ptrs)
    return v


@triton.jit
def _pv(p, v, acc, FP8: tl.constexpr, FRESH: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + P.V (FRESH: P.V alone, in a new accumulator)."""
    if FP8:
        p8 = _to_fp8(p, INTERPRET)
        if FRESH:
            return tl.dot(p8, v, out_dtype=tl.float32)
        return tl.dot(p8, v, acc, out_dtype=tl.float32)
    p16 = _round_to(p, v.dtype, INTERPRET)
    if INTERPRET:  # the interpreter's dot mishandles 16-bit floats: float32 (exact products here)
        if FRESH:
            return tl.dot(p16.to(tl.float32), v.to(tl.float32))
        return acc + tl.dot(p16.to(tl.float32), v.to(tl.float32))
    if FRESH:
        return tl.dot(p16, v, out_dtype=tl.float32)
    return tl.dot(p16, v, acc)


@triton.jit
def _attention_block(acc, l_i, m_i, x, qs, ks_ptr, v_base, j, Lk, LKP, svl, svd, offs_n, offs_d,
                     BN: tl.constexpr, FP8: tl.constexpr, MASK: tl.constexpr, MAGIC: tl.constexpr,
                     ACC_R: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr = False, vrow0=0):
    """One key block j from its codes x: online-softmax update and P.V. ACC_R 1 (FP8): each block's P.V in a
    fresh MMA accumulator, added to the float32 one outside the MMA; 0: accumulated in the MMA's accumulator
    (the 16-bit form always)."""
    p, alpha, l_i, m_new = _softmax_step(x, l_i, m_i, qs * tl.load(ks_ptr + j), j, Lk, offs_n, BN, FP8, MASK, MAGIC)
    v = _v_tile(v_base, j, Lk, LKP, svl, svd, offs_n, offs_d, BN, FP8, MASK, TMA, vrow0)
    if FP8 and ACC_R == 1:
        acc = acc * alpha[:, None] + _pv(p, v, acc, FP8, True, INTERPRET)
    else:
        acc = _pv(p, v, acc * alpha[:, None], FP8, False, INTERPRET)
    return acc, l_i, m_new


@triton.jit
def _attention_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vm_ptr, o_ptr, H, Lq, Lk, LQP, LKP, n_full,
                      svb, svh, svl, svd, sob, soh, sol, sod,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FP8: tl.constexpr, TAIL: tl.constexpr,
                      N_FULL: tl.constexpr, INTERPRET: tl.constexpr, MAGIC: tl.constexpr = 0,
                      ACC_R: tl.constexpr = 1, TMA: tl.constexpr = False, WS: tl.constexpr = False):
    """MAGIC: how the INT8 scores become float32 (_scores); ACC_R: where the FP8 P.V accumulates (1: each block
    in a fresh MMA accumulator, added outside the MMA; 0: in the MMA's accumulator); TMA (FP8 form): k_ptr and
    v_ptr are tensor descriptors (TMA loads instead of cp.async); WS: Triton's warp specialization of the key
    loop (tl.range(warp_specialize=True))."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    bh64 = bh.to(tl.int64)
    q = tl.load(q_ptr + bh64 * LQP * D + offs_m[:, None] * D + offs_d[None, :])
    qs = tl.load(qs_ptr + bh64 * LQP + offs_m)
    ks_ptr += bh64 * (LKP // BN)
    krow0 = 0
    vrow0 = 0
    if TMA:
        k_base = k_ptr
        v_base = v_ptr
        krow0 = bh * LKP
        vrow0 = bh * D
    else:
        k_base = k_ptr + bh64 * LKP * D
        if FP8:
            v_base = v_ptr + bh64 * LKP * D
        else:
            v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    if INTERPRET:  # (a compile-time bound there, see the module's docstring)
        for j in range(0, N_FULL):
            x = _scores(q, k_base, j, offs_n, offs_d, D, BM, BN, MAGIC, TMA, krow0)
            acc, l_i, m_i = _attention_block(acc, l_i, m_i, x, qs, ks_ptr, v_base, j, Lk, LKP, svl, svd, offs_n,
                                             offs_d, BN, FP8, False, MAGIC, ACC_R, INTERPRET, TMA, vrow0)
    else:
        for j in tl.range(0, n_full, warp_specialize=WS):
            x = _scores(q, k_base, j, offs_n, offs_d, D, BM, BN, MAGIC, TMA, krow0)
            acc, l_i, m_i = _attention_block(acc, l_i, m_i, x, qs, ks_ptr, v_base, j, Lk, LKP, svl, svd, offs_n,
                                             offs_d, BN, FP8, False, MAGIC, ACC_R, INTERPRET, TMA, vrow0)
    if TAIL:  # the last, partial key block (its padded keys' codes are zeros: masked in the scores)
        x = _scores(q, k_base, n_full, offs_n, offs_d, D, BM, BN, MAGIC, TMA, krow0)
        acc, l_i, m_i = _attention_block(acc, l_i, m_i, x, qs, ks_ptr, v_base, n_full, Lk, LKP, svl, svd, offs_n,
                                         offs_d, BN, FP8, True, MAGIC, ACC_R, INTERPRET, TMA, vrow0)
    out = acc / l_i[:, None]
    if FP8:
        out = out * tl.load(vs_ptr + bh * D + offs_d)[None, :] + tl.load(vm_ptr + bh * D + offs_d)[None, :]
    o = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * sol + offs_d[None, :] * sod
    tl.store(o, _round_to(out, o_ptr.dtype.element_ty, INTERPRET), mask=(offs_m < Lq)[:, None])


STATS_CHUNK = 1024  # tokens per stats program (interpreter: 4 tiles)
STATS_BT = 64


def attention(q, k, v, scale: float, fp8: bool, blhd: bool, cfg) -> torch.Tensor:
    """Launch the three steps; q, k, v [B, H, L, D] bf16/fp16 with any strides (checked by the caller)."""
    return attend(quantize(q, k, v, scale, fp8, cfg), blhd)


def quantize(q, k, v, scale: float, fp8: bool, cfg) -> dict:
    """Steps 1 and 2: the codes and scales the attention kernel reads (bench/attention.py times this alone)."""
    from .ops import interpreting
    interp = interpreting()
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    gluon = gluon_applies(cfg, fp8, interp, lk, d)
    if cfg.gluon and not gluon:  # its 128 x 128 x 4-warp tile would spill in the Triton kernel
        cfg = _gluon_fallback(cfg, q.device, fp8, interp, lk, d)
    bm, bn = cfg.BM, cfg.BN
    lqp, lkp = triton.cdiv(lq, bm) * bm, triton.cdiv(lk, bn) * bn
    bh = bsz * heads
    dev = q.device
    chunk = STATS_BT * 4 if interp else STATS_CHUNK
    nch = triton.cdiv(lk, chunk)
    part = torch.empty((4 if fp8 else 1, bh, nch, d), device=dev, dtype=torch.float32)
    _kv_stats_kernel[(bh, nch)](k, v, part, lk, heads, nch, *k.stride(), *v.stride(), D=d, CHUNK=chunk, BT=STATS_BT,
                                V_STATS=fp8, num_warps=4)
    kmean = (part[0].sum(1) / lk).contiguous()
    q8 = torch.empty((bh, lqp, d), device=dev, dtype=torch.int8)
    qs = torch.empty((bh, lqp), device=dev, dtype=torch.float32)
    k8 = torch.empty((bh, lkp, d), device=dev, dtype=torch.int8)
    ks = torch.empty((bh, lkp // bn), device=dev, dtype=torch.float32)
    qk_scale = float(scale) * _core.LOG2E
    common = dict(D=d, INTERPRET=interp, num_warps=4)
    _quantize_kernel[(lqp // bm, bh)](q, q, q, q8, qs, lq, lqp, heads, *q.stride(), qk_scale, BT=bm, MODE=0, **common)
    _quantize_kernel[(lkp // bn, bh)](k, kmean, kmean, k8, ks, lk, lkp, heads, *k.stride(), 1.0, BT=bn, MODE=1, **common)
    if fp8:
        vm = (part[1].sum(1) / lk).contiguous()
        va = torch.maximum(part[2].amax(1) - vm, vm - part[3].amin(1)).clamp_min(_core.EPS)  # = max |V - mean|
        vs, vr = va / _core.V_MAX, _core.V_MAX / va
        v_in = torch.empty((bh, d, lkp), device=dev, dtype=torch.float8_e4m3fn)
        _quantize_kernel[(lkp // bn, bh)](v, vm, vr, v_in, ks, lk, lkp, heads, *v.stride(), 1.0, BT=bn, MODE=2,
                                          V_ORDER=gluon, **common)
        v_strides = (0, 0, 0, 0)
    else:
        vs = vm = ks  # unused
        v_in, v_strides = v, v.stride()
    return dict(q8=q8, qs=qs, k8=k8, ks=ks, v_in=v_in, vs=vs, vm=vm, v_strides=v_strides, shape=(bsz, heads, lq, lk, d),
                lqp=lqp, lkp=lkp, dtype=q.dtype, fp8=fp8, cfg=cfg, interp=interp, gluon=gluon)


def attend(t: dict, blhd: bool) -> torch.Tensor:
    """Step 3, the attention kernel, on quantize's output."""
    bsz, heads, lq, lk, d = t["shape"]
    cfg, fp8, interp, lqp, lkp = t["cfg"], t["fp8"], t["interp"], t["lqp"], t["lkp"]
    bm, bn, bh = cfg.BM, cfg.BN, bsz * heads
    dev = t["q8"].device
    if blhd:
        out = torch.empty((bsz, lq, heads, d), device=dev, dtype=t["dtype"])
        o_strides = (out.stride(0), out.stride(2), out.stride(1), out.stride(3))
    else:
        out = torch.empty((bsz, heads, lq, d), device=dev, dtype=t["dtype"])
        o_strides = out.stride()
    n_full = lk // bn
    if t["gluon"]:
        _attend_gluon(t, out, o_strides, n_full)
        return out
    tma = bool(fp8 and cfg.tma and not interp)
    k_arg, v_arg = t["k8"], t["v_in"]
    if tma:  # descriptors of all heads' codes: K [B H LKP, D] in [BN, D] tiles, V^T [B H D, LKP] in [D, BN] tiles
        from triton.tools.tensor_descriptor import TensorDescriptor
        k_arg = TensorDescriptor.from_tensor(k_arg.view(bh * lkp, d), [bn, d])
        v_arg = TensorDescriptor.from_tensor(v_arg.view(bh * d, lkp), [d, bn])
    _attention_kernel[(lqp // bm, bh)](
        t["q8"], t["qs"], k_arg, t["ks"], v_arg, t["vs"], t["vm"], out, heads, lq, lk, lqp, lkp, n_full,
        *t["v_strides"], *o_strides,
        D=d, BM=bm, BN=bn, FP8=fp8, TAIL=lk % bn != 0, N_FULL=n_full if interp else 0, INTERPRET=interp,
        MAGIC=cfg.magic, ACC_R=cfg.acc_r, TMA=tma, WS=cfg.ws,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gluon_applies(cfg, fp8: bool, interp: bool, lk: int, d: int) -> bool:
    """Whether a call runs the Gluon kernel (_gluon_attention.py): asked for by the tile (`gluon=1`, sm_90's
    FP8 form; configs.attention_config), compiled (not the interpreter), 128 x 128 tiles, head dim 64 or 128,
    and at least one whole key block (its first block is never masked). Elsewhere the Triton kernel runs,
    with the same math."""
    return bool(cfg.gluon and fp8 and not interp and cfg.BM == 128 and cfg.BN == 128 and d in (64, 128)
                and lk >= cfg.BN)


GLUON_MAXNREG = 168  # 12 warps (2 consumer warpgroups, the producer's): 65536 / 384 registers, rounded down to 8
GLUON_CONSUMER_REGS = 240  # per consumer thread (setmaxnreg); the producer warp's warpgroup keeps 24


def _gluon_fallback(cfg, device, fp8: bool, interp: bool, lk: int, d: int):
    """The tile for a call the Gluon kernel does not take (gluon_applies): the card's default, with one warning."""
    from .. import attention as att
    from . import configs
    cap = (0, 0) if interp else torch.cuda.get_device_capability(device)
    att._warn_once(f"DVD-Quant: DVDQ_ATTN_CONFIG asks for the Gluon attention kernel (gluon=1), which takes the FP8 "
                   f"P.V form on a compiled sm_90 GPU with head dim 64 or 128 and at least {cfg.BN} keys; calls "
                   f"without that (here: head dim {d}, {lk} keys, {'FP8' if fp8 else '16-bit'} P.V"
                   f"{', interpreter' if interp else ''}) run the Triton kernel with its default tile.")
    return configs.ATTN_INTERPRETER if interp else configs.attention_candidates(cap, fp8)[0]


def gluon_tile_layouts(bn: int, d: int):
    """The shared-memory layouts of the Gluon kernel's K [bn, d] INT8 and V^T [d, bn] FP8 tiles (its TMA
    descriptors'; bench/compile_targets.py compiles with the same)."""
    from triton.experimental.gluon import language as gl
    return (gl.NVMMASharedLayout.get_default_for([bn, d], gl.int8),
            gl.NVMMASharedLayout.get_default_for([d, bn], gl.float8e4nv))


def _attend_gluon(t: dict, out, o_strides, n_full: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon_attention import _attention_ws_kernel
    bsz, heads, lq, lk, d = t["shape"]
    cfg, lqp, lkp, bh = t["cfg"], t["lqp"], t["lkp"], bsz * heads
    bn = cfg.BN
    k_lay, v_lay = gluon_tile_layouts(bn, d)
    k_desc = TensorDescriptor.from_tensor(t["k8"].view(bh * lkp, d), [bn, d], k_lay)
    v_desc = TensorDescriptor.from_tensor(t["v_in"].view(bh * d, lkp), [d, bn], v_lay)
    assert o_strides[3] == 1
    _attention_ws_kernel[(lqp // cfg.BM, bh)](
        t["q8"], t["qs"], k_desc, t["ks"], v_desc, t["vs"], t["vm"], out, heads, lq, lk, lqp, lkp, n_full,
        int(lk % bn != 0), *o_strides[:3], int(cfg.pingpong), STAGES=cfg.num_stages, CONSUMER_REGS=GLUON_CONSUMER_REGS,
        MAGIC=cfg.magic == 1, num_warps=4, maxnreg=GLUON_MAXNREG)
