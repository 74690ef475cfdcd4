"""Where does the W4 x int8 GEMM lose against a plain Triton int8 GEMM? One-call study.

Self-contained loop variants at the Wan 2.1 14B shapes (M = 32760 tokens), each checked against a
torch reference on a slice of rows before it is timed (do_bench median after warm-up):
  plain      A int8 [M, K] x B int8 [N, K]^T, int32 accumulator, int32 output (no masks on loads:
             row indices wrap modulo M, the store is masked)
  promo      plain + per-scale-block promotion acc_f += f32(acc_i) * l_b every SB of K, then the
             epilogue D[n] * s_i -> bf16 (cvt = I2F instruction, magic = exact add-and-bitcast)
  w4         promo with the packed 4-bit weights [N, K / 2] (low nibble = even column), unpacked in
             registers (inline PTX, four bytes per op); activations in the "even half / odd half per
             BK tile" layout, so the low nibbles meet the first BK / 2 codes and the high nibbles
             the next BK / 2 (two dots of depth BK / 2, no shuffles)
plus the current kernels._w4_gemm_kernel default, cuBLAS torch._int_mm, BF16 F.linear and FP8
torch._scaled_mm in the same run.

usage: python bench/gemm_study.py [--quick] [--v2] [--compile-only]   (--compile-only: sm_90 SASS stats on CPU)
"""
import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dvdq_core.kernels._triton import UNPACK_PTX  # noqa: E402

SHAPES = [("qkvo", 5120, 5120), ("ffn1", 13824, 5120), ("ffn2", 5120, 13824)]
M_TOKENS = 32760
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _i2f_exact(x):
    """int32 -> float32 for |x| < 2**22 with one integer add and one float add (the I2F instruction
    runs at a quarter of the FMA rate): 0x4B400000 is 1.5 * 2**23, whose ulp is 1."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _unpack(wp, z):
    if INTERPRET:
        return (wp & 15).to(tl.int8) - z.to(tl.int8), (wp >> 4).to(tl.int8) - z.to(tl.int8)
    zb = tl.broadcast_to(z, wp.shape)
    return tl.inline_asm_elementwise(asm=UNPACK_PTX, constraints="=r,=r,r,r", args=[wp, zb],
                                     dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _study_kernel(a_ptr, b_ptr, z_ptr, l_ptr, d_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, SB: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  W4: tl.constexpr, PROMO: tl.constexpr, SWAP: tl.constexpr):
    """PROMO 0: int32 out; 1: I2F promotion; 2: magic promotion; 3: magic, lagged by one block
    (the next block's MMAs can run while the previous block is promoted)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = (offs_m % M).to(tl.int64)  # wrap instead of masking: unmasked loads pipeline best
    cols_n = (offs_n % N).to(tl.int64)
    STEPS: tl.constexpr = SB // BK
    if W4:
        HK: tl.constexpr = BK // 2
        offs_h = tl.arange(0, HK)
        if W4 == 2:  # the shipped layout: per 64 columns, 32 even then 32 odd (32-byte segments)
            a_cols = (offs_h // 32) * 64 + offs_h % 32
            A_HI: tl.constexpr = 32
        else:  # per BK tile, BK / 2 even then BK / 2 odd (contiguous halves)
            a_cols = offs_h
            A_HI: tl.constexpr = HK
        a_ptrs = a_ptr + rows[:, None] * K + a_cols[None, :]
        b_ptrs = b_ptr + cols_n[:, None] * (K // 2) + offs_h[None, :]
        z = tl.load(z_ptr + cols_n).to(tl.uint8)[:, None]
    else:
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + rows[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + cols_n[:, None] * K + offs_k[None, :]
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        prev = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        prev = tl.zeros((BM, BN), dtype=tl.int32)
    acc_i = prev
    lb_prev = 0.0
    for kb in range(0, K // SB):
        if PROMO != 0:
            if SWAP:
                part = tl.zeros((BN, BM), dtype=tl.int32)
            else:
                part = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            part = acc_i
        for s in tl.static_range(STEPS):
            if W4:
                a_lo = tl.load(a_ptrs)
                a_hi = tl.load(a_ptrs + A_HI)
                w_lo, w_hi = _unpack(tl.load(b_ptrs), z)
                if SWAP:
                    part += tl.dot(w_lo, tl.trans(a_lo), out_dtype=tl.int32)
                    part += tl.dot(w_hi, tl.trans(a_hi), out_dtype=tl.int32)
                else:
                    part += tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
                    part += tl.dot(a_hi, tl.trans(w_hi), out_dtype=tl.int32)
                b_ptrs += HK
            else:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
                if SWAP:
                    part += tl.dot(b, tl.trans(a), out_dtype=tl.int32)
                else:
                    part += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
                b_ptrs += BK
            a_ptrs += BK
        if PROMO == 0:
            acc_i = part
        else:
            lb = tl.load(l_ptr + kb)
            if PROMO == 1:
                acc += part.to(tl.float32) * lb
            elif PROMO == 2:
                acc += _i2f_exact(part) * lb
            else:
                acc += _i2f_exact(prev) * lb_prev
                prev = part
                lb_prev = lb
    if PROMO == 3:
        acc += _i2f_exact(prev) * lb_prev
    m_ok = offs_m < M
    n_ok = offs_n < N
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if PROMO == 0:
        if SWAP:
            tl.store(y_ptrs, tl.trans(acc_i), mask=m_ok[:, None] & n_ok[None, :])
        else:
            tl.store(y_ptrs, acc_i, mask=m_ok[:, None] & n_ok[None, :])
    else:
        d = tl.load(d_ptr + cols_n)
        s = tl.load(s_ptr + rows)
        if SWAP:
            out = tl.trans((acc * d[:, None] * s[None, :]).to(tl.bfloat16))
        else:
            out = (acc * d[None, :] * s[:, None]).to(tl.bfloat16)
        tl.store(y_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _promote(acc, part, lb, PROMO: tl.constexpr):
    if PROMO == 1:
        return acc + part.to(tl.float32) * lb
    else:
        return acc + _i2f_exact(part) * lb


@triton.jit
def _one_dot_kernel(a_ptr, b_ptr, z_ptr, l_ptr, d_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, SB: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    ORDER: tl.constexpr, PROMO: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr):
    """W4, weights on the MMA's register side, ONE dot of depth BK per K tile and token sub-tile.
    ORDER 3: activations in natural column order, w = join(lo, hi) (pairs interleave back);
    ORDER 4: activations per BK tile even half / odd half, w = concat(lo, hi) along K.
    SPLIT 2: the CTA covers 2 * BM tokens as two sub-tiles that share one unpacked weight tile
    (half the unpack work per MAC, registers of one int32 part at a time)."""
    pid = tl.program_id(0)
    TM: tl.constexpr = BM * SPLIT
    num_pid_m = tl.cdiv(M, TM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * TM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows0 = (offs_m % M).to(tl.int64)
    rows1 = ((offs_m + BM) % M).to(tl.int64)
    cols_n = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, BK // 2)
    a0_ptrs = a_ptr + rows0[:, None] * K + offs_k[None, :]
    a1_ptrs = a_ptr + rows1[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + cols_n[:, None] * (K // 2) + offs_h[None, :]
    z = tl.load(z_ptr + cols_n).to(tl.uint8)[:, None]
    acc0 = tl.zeros((BN, BM), dtype=tl.float32)
    acc1 = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        wp = tl.load(b_ptrs)
        if ASM:
            lo, hi = _unpack(wp, z)
        else:
            lo = (wp & 15).to(tl.int8) - z.to(tl.int8)
            hi = (wp >> 4).to(tl.int8) - z.to(tl.int8)
        if ORDER == 3:
            w = tl.reshape(tl.join(lo, hi), (BN, BK))
        else:
            w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BN, BK))
        lb = tl.load(l_ptr + k0 // SB)
        a0 = tl.load(a0_ptrs)
        acc0 = _promote(acc0, tl.dot(w, tl.trans(a0), out_dtype=tl.int32), lb, PROMO)
        if SPLIT == 2:
            a1 = tl.load(a1_ptrs)
            acc1 = _promote(acc1, tl.dot(w, tl.trans(a1), out_dtype=tl.int32), lb, PROMO)
        a0_ptrs += BK
        a1_ptrs += BK
        b_ptrs += BK // 2
    n_ok = offs_n < N
    d = tl.load(d_ptr + cols_n)
    s0 = tl.load(s_ptr + rows0)
    out0 = tl.trans((acc0 * d[:, None] * s0[None, :]).to(tl.bfloat16))
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], out0,
             mask=(offs_m < M)[:, None] & n_ok[None, :])
    if SPLIT == 2:
        s1 = tl.load(s_ptr + rows1)
        out1 = tl.trans((acc1 * d[:, None] * s1[None, :]).to(tl.bfloat16))
        tl.store(y_ptr + (offs_m + BM).to(tl.int64)[:, None] * N + offs_n[None, :], out1,
                 mask=((offs_m + BM) < M)[:, None] & n_ok[None, :])


# (label, W4, PROMO, SWAP, BM tokens, BN weight rows, BK, SB, warps, stages, maxnreg)
def variants(quick):
    v = []
    for bm, bn, w, st in ((128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4)):
        v.append((f"plain {bm}x{bn}x128 w{w} s{st}", 0, 0, 0, bm, bn, 128, 128, w, st, None))
    for promo, name, tiles in (
            (1, "cvt", ((128, 128, 8, 4, None), (128, 64, 4, 4, None))),
            (2, "magic", ((128, 128, 8, 4, None), (128, 256, 8, 3, None), (128, 64, 4, 4, None),
                          (128, 128, 8, 4, 128))),
            (3, "magic-lag", ((128, 128, 8, 4, None),))):
        for bm, bn, w, st, r in tiles:
            v.append((f"promo128 {name} {bm}x{bn} w{w} s{st}" + (f" r{r}" if r else ""), 0, promo, 0, bm, bn, 128,
                      128, w, st, r))
    v.append(("promo256 magic 128x128 w8 s2", 0, 2, 0, 128, 128, 128, 256, 8, 2, None))
    for promo, swap, bm, bn, w, st, r in ((2, 1, 128, 64, 4, 4, None), (1, 1, 128, 64, 4, 4, None),
                                          (2, 0, 128, 64, 4, 4, None), (2, 1, 128, 128, 8, 4, None),
                                          (2, 0, 128, 128, 8, 4, None), (2, 1, 128, 128, 8, 4, 128),
                                          (2, 0, 128, 128, 8, 4, 128)):
        v.append((f"w4 {'magic' if promo == 2 else 'cvt'} {'swap' if swap else 'noswap'} {bm}x{bn} w{w} s{st}"
                  + (f" r{r}" if r else ""), 1, promo, swap, bm, bn, 128, 128, w, st, r))
    for swap, bm, bn, w, st in ((1, 128, 64, 4, 4), (1, 128, 128, 8, 4), (0, 128, 128, 8, 4)):
        v.append((f"w4 L64 magic {'swap' if swap else 'noswap'} {bm}x{bn} w{w} s{st}", 2, 2, swap, bm, bn, 128,
                  128, w, st, None))
    if quick:
        v = v[:2] + [x for x in v if x[1]][:2]
    return v


def launch(var, a, b, z, l, d, s, y, m, n, k):
    _, w4, promo, swap, bm, bn, bk, sb, warps, stages, maxnreg = var
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    # BM/BN name the output tile (tokens x weight rows); the kernel's SWAP tile is BN x BM.
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    _study_kernel[grid](a, b, z, l, d, s, y, m, n, k, sb, bm, bn, bk, 8, w4, promo, swap,
                        num_warps=warps, num_stages=stages, **extra)


# (label, "od", ORDER, PROMO, SPLIT, ASM, BM tokens per sub-tile, BN weight rows, warps, stages)
def od_variants():
    v = [("plain 128x256x128 w8 s3", 0, 0, 0, 128, 256, 128, 128, 8, 3, None)]
    for order, promo, split, asm, bm, bn, w, st in (
            (4, 1, 1, 1, 128, 128, 8, 4), (4, 1, 1, 1, 128, 128, 8, 3), (4, 2, 1, 1, 128, 128, 8, 4),
            (4, 1, 2, 1, 128, 128, 8, 3), (4, 1, 2, 1, 128, 128, 8, 4), (4, 1, 1, 1, 128, 64, 4, 4),
            (4, 1, 1, 1, 64, 128, 4, 4), (3, 1, 1, 1, 128, 128, 8, 4), (3, 1, 1, 0, 128, 128, 8, 4),
            (3, 1, 2, 1, 128, 128, 8, 3)):
        v.append((f"od {'natural' if order == 3 else 'halves128'} {'cvt' if promo == 1 else 'magic'}"
                  f"{'' if asm else ' plain-unpack'} {split}x{bm}t x {bn}r w{w} s{st}",
                  "od", order, promo, split, asm, bm, bn, w, st))
    return v


def launch_od(var, a, b, z, l, d, s, y, m, n, k):
    _, _, order, promo, split, asm, bm, bn, warps, stages = var
    grid = (triton.cdiv(m, bm * split) * triton.cdiv(n, bn),)
    _one_dot_kernel[grid](a, b, z, l, d, s, y, m, n, k, 128, bm, bn, 128, 8, order, promo, split, asm,
                          num_warps=warps, num_stages=stages)


def pack_h(u, bk):
    """u [N, K] unsigned 4-bit codes in natural order -> packed [N, K/2] (low nibble = even column)."""
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def perm_h(k, bk, device):
    """Activation column order for the w4 variants: per BK tile, its even columns then its odd ones."""
    idx = torch.arange(k, device=device).view(k // bk, bk)
    return torch.cat([idx[:, 0::2], idx[:, 1::2]], 1).reshape(-1)


def run(args):
    import torch.nn.functional as F
    from triton.testing import do_bench

    from dvdq_core.kernels import configs, ops

    dev = "cuda"
    torch.manual_seed(0)
    ms = lambda fn: do_bench(fn, warmup=50, rep=200, return_mode="median")  # noqa: E731
    rows = []
    for name, n, k in SHAPES:
        m = M_TOKENS
        ops_t = 2.0 * m * n * k
        q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
        q[q == 0] = 1
        u = torch.randint(0, 16, (n, k), dtype=torch.int16, device=dev)
        zp = torch.randint(0, 16, (n,), dtype=torch.int16, device=dev)
        w8 = (u - zp[:, None]).to(torch.int8)
        packed = pack_h(u, 128)
        z8 = zp.to(torch.uint8)
        sb_max = 256
        l = torch.rand(k // 128, device=dev) + 0.5
        d = torch.rand(n, device=dev) * 0.01 + 1e-3
        s = torch.rand(m, device=dev) * 0.01 + 1e-3
        y32 = torch.empty(m, n, dtype=torch.int32, device=dev)
        ybf = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        # references on a slice of rows (exact integer sums in float64)
        sl = torch.cat([torch.arange(0, 256, device=dev), torch.arange(m - 120, m, device=dev)])
        qs = q[sl].double()
        wd = w8.double()

        def ref_promo(sb):
            ls = l[: k // sb] if sb == 128 else l[: k // sb]
            acc = torch.zeros(len(sl), n, dtype=torch.float64, device=dev)
            for b in range(k // sb):
                acc += (qs[:, b * sb:(b + 1) * sb] @ wd[:, b * sb:(b + 1) * sb].T) * float(ls[b])
            return (acc * d.double()[None, :] * s[sl].double()[:, None])

        ref_int = (qs @ wd.T)
        refs = {}
        for var in (od_variants() if args.v2 else variants(args.quick)):
            if var[1] == "od":
                label, w4, promo, sb, bk = var[0], var[2], var[3], 128, 128
                go = launch_od
            else:
                label, w4, promo, swap, bm, bn, bk, sb, warps, stages, maxnreg = var
                go = launch
            a_in = q[:, perm_h(k, 64 if w4 == 2 else bk, dev)].contiguous() if w4 in (1, 2, 4) else q
            b_in = packed if w4 else w8
            y = y32 if promo == 0 else ybf
            try:
                go(var, a_in, b_in, z8, l, d, s, y, m, n, k)
                torch.cuda.synchronize()
                if promo == 0:
                    ok = torch.equal(y[sl].double(), ref_int)
                    err = 0.0 if ok else float((y[sl].double() - ref_int).abs().max())
                else:
                    if sb not in refs:
                        refs[sb] = ref_promo(sb)
                    r = refs[sb]
                    err = float(((y[sl].double() - r).abs().max() / r.abs().max()))
                    ok = err < 8e-3  # bf16 output rounding
                t = ms(lambda: go(var, a_in, b_in, z8, l, d, s, y, m, n, k))
                rows.append((name, label, t, ops_t / t * 1e-9, "ok" if ok else f"WRONG {err:.3g}"))
            except Exception as e:  # noqa: BLE001
                rows.append((name, label, float("nan"), float("nan"), f"FAIL {type(e).__name__}: {str(e)[:80]}"))
            print(*rows[-1], flush=True)
            del a_in
        # current kernel (per-64 layout; random codes: timing only)
        layer_q = packed
        t = ms(lambda: ops.w4_gemm(q, layer_q, z8, d, l, s, None, torch.bfloat16, 128, True))
        rows.append((name, f"current _w4_gemm_kernel {configs.SM90_DEFAULT.to_env()}", t, ops_t / t * 1e-9, "timing"))
        print(*rows[-1], flush=True)
        t = ms(lambda: torch._int_mm(q, w8.T))
        rows.append((name, "cuBLAS torch._int_mm", t, ops_t / t * 1e-9, "-"))
        print(*rows[-1], flush=True)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        wb = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
        t = ms(lambda: F.linear(x, wb))
        rows.append((name, "BF16 F.linear", t, ops_t / t * 1e-9, "-"))
        print(*rows[-1], flush=True)
        try:
            xf = x.to(torch.float8_e4m3fn)
            wf = wb.to(torch.float8_e4m3fn)
            sa = torch.rand(m, 1, device=dev)
            sw = torch.rand(1, n, device=dev)
            t = ms(lambda: torch._scaled_mm(xf, wf.T, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16))
            rows.append((name, "FP8 _scaled_mm rowwise", t, ops_t / t * 1e-9, "-"))
        except Exception as e:  # noqa: BLE001
            rows.append((name, "FP8 _scaled_mm rowwise", float("nan"), float("nan"), f"FAIL {e}"[:80]))
        print(*rows[-1], flush=True)
        del q, w8, packed, y32, ybf, x, wb
        torch.cuda.empty_cache()
    print("\n| shape | variant | ms | TOP/s | check |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.0f} | {r[4]} |")


def compile_only(args):
    """sm_90 compile on a CPU machine: registers, spills, shared memory, wgmma waits."""
    import re
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"a_ptr": "*i8", "b_ptr": "*i8", "z_ptr": "*u8", "l_ptr": "*fp32", "d_ptr": "*fp32", "s_ptr": "*fp32",
           "y_ptr": "*i32", "M": "i32", "N": "i32"}
    cuobj = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for var in variants(args.quick):
        label, w4, promo, swap, bm, bn, bk, sb, warps, stages, maxnreg = var
        s2 = dict(sig)
        if w4:
            s2["b_ptr"] = "*u8"
        if promo:
            s2["y_ptr"] = "*bf16"
        names = list(s2) + ["K", "SB", "BM", "BN", "BK", "GROUP_M", "W4", "PROMO", "SWAP"]
        consts = dict(K=5120, SB=sb, BM=bm, BN=bn, BK=bk, GROUP_M=8, W4=w4, PROMO=promo, SWAP=swap)
        for c in consts:
            s2[c] = "constexpr"
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
        t0 = time.time()
        try:
            src = ASTSource(_study_kernel, s2, constexprs={(names.index(c),): v for c, v in consts.items()},
                            attrs=attrs)
            ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": stages,
                                                                                **({"maxnreg": maxnreg} if maxnreg else {})})
            ttgir = ck.asm["ttgir"]
            waits = re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", ttgir)
            path = "/tmp/_study.cubin"
            open(path, "wb").write(ck.asm["cubin"])
            sass = subprocess.run([cuobj, "-sass", path], capture_output=True, text=True).stdout
            res = subprocess.run([cuobj, "-res-usage", path], capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+)", res).group(1)
            print(f"{label:45s} regs={regs} smem={ck.metadata.shared // 1024}KB "
                  f"waits={waits} IGMMA={sass.count('IGMMA')} I2F={sass.count('I2F')} "
                  f"STL={sass.count('STL')} ({time.time() - t0:.0f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{label:45s} FAIL {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--v2", action="store_true", help="the one-dot variants (second call)")
    a = p.parse_args()
    compile_only(a) if a.compile_only else run(a)
