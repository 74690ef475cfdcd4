"""Where the activation kernels' time goes (granularity "block" and "pow2"), GPU only.

The pow2 activation kernels cost 1.5x the block ones (0.57 vs 0.37 ms at M = 32760, K = 5120 on an
H100): pass 2 reads and rotates X twice. Before writing a faster pass 2 this splits the time:
each pass alone, the memory floor (torch copies of the same bytes), and study copies of the pow2
kernels with one thing removed: the rotation (a plain float cast: how much the tensor-core
rotation costs), the channel-maxima atomics of pass 1 (per-program stores instead), or the first
sweep of pass 2 (row scale given: what the second read of X costs). The study kernels reuse the
shipped helpers; their results are not checked (they compute something else on purpose).

usage: python bench/act_study.py [--m 32760] [--k 5120 13824]
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dvdq_core.kernels import ops  # noqa: E402
from dvdq_core.kernels._triton import (  # noqa: E402
    EPS,
    _absmax_kernel,
    _ceil_log2,
    _clamp_round,
    _exp2i,
    _load_rotation,
    _pow2_exponents,
    _quantize_kernel,
    _quantize_pow2_kernel,
    _rotate_tile,
)


@triton.jit
def _maybe_rotate(x, rmat, rscale, BM: tl.constexpr, C: tl.constexpr, R: tl.constexpr, ROTATE: tl.constexpr):
    if ROTATE:
        return _rotate_tile(x, rmat, rscale, BM, C, R, False)
    return x.to(tl.float32) * rscale


@triton.jit
def _study_pass1(x_ptr, r_ptr, rscale, l_ptr, part_ptr, M, K: tl.constexpr, stride_xm, C: tl.constexpr,
                 R: tl.constexpr, BM: tl.constexpr, ROTATE: tl.constexpr, ATOMIC: tl.constexpr):
    """pow2 pass 1 (per-channel absmax), with or without rotation / atomics (else per-program rows)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    rmat = _load_rotation(r_ptr, R, False)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        cm = tl.max(tl.abs(_maybe_rotate(x, rmat, rscale, BM, C, R, ROTATE)), axis=0)
        if ATOMIC:
            tl.atomic_max(l_ptr + offs_c, cm)
        else:
            tl.store(part_ptr + pid_m * K + offs_c, cm)


@triton.jit
def _study_pass2(x_ptr, r_ptr, rscale, cmax_ptr, q_ptr, s_ptr, M, K: tl.constexpr, stride_xm, qmax,
                 C: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, OCTAVES: tl.constexpr,
                 ROTATE: tl.constexpr, SWEEP1: tl.constexpr):
    """pow2 pass 2 as shipped, with or without rotation / the row-scale sweep (then s is read)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    gmax = tl.max(tl.load(cmax_ptr + tl.arange(0, C)))
    for c0 in range(C, K, C):
        gmax = tl.maximum(gmax, tl.max(tl.load(cmax_ptr + c0 + tl.arange(0, C))))
    e_lo = _ceil_log2(tl.maximum(gmax, EPS)) - OCTAVES
    rmat = _load_rotation(r_ptr, R, False)
    if SWEEP1:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, K, C):
            offs_c = c0 + tl.arange(0, C)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
            xr = _maybe_rotate(x, rmat, rscale, BM, C, R, ROTATE)
            inv_l = _exp2i(-_pow2_exponents(cmax_ptr, c0, e_lo, C))
            amax = tl.maximum(amax, tl.max(tl.abs(xr) * inv_l[None, :], axis=1))
        s = tl.math.div_rn(tl.maximum(amax, EPS), qmax)
        tl.store(s_ptr + offs_m, s * _exp2i(e_lo), mask=m_mask)
    else:
        s = tl.load(s_ptr + offs_m, mask=m_mask, other=1.0)
    rs = tl.math.div_rn(1.0, s)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        xr = _maybe_rotate(x, rmat, rscale, BM, C, R, ROTATE)
        e = _pow2_exponents(cmax_ptr, c0, e_lo, C)
        qv = _clamp_round(xr * (rs[:, None] * _exp2i(-e)[None, :]), qmax, False)
        qv = qv * (1 << (e - e_lo))[None, :]
        tl.store(q_ptr + rows[:, None] * K + offs_c[None, :], qv.to(tl.int8), mask=m_mask[:, None])


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def study(m, k, dev):
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    x[:, :: max(1, k // 7)] *= 20
    hb, sb = 128, 128
    rmat, _, tg, kw = ops._act_launch(x, hb, sb)  # the shipped launch setting
    r, c, bm, nw, ns = kw["R"], kw["C"], kw["BM"], kw["num_warps"], kw["num_stages"]
    rs = 1.0 / math.sqrt(hb)
    grid = (triton.cdiv(m, bm),)
    q = torch.empty((m, k), dtype=torch.int8, device=dev)
    s = torch.ones((m,), dtype=torch.float32, device=dev)
    cmax = torch.zeros((k,), dtype=torch.float32, device=dev)
    part = torch.empty((grid[0], k), dtype=torch.float32, device=dev)
    rowmax = torch.empty((m, k // tg), dtype=torch.float32, device=dev)
    l = torch.zeros((k // sb,), dtype=torch.float32, device=dev)
    xb = m * k * 2
    rows = {}

    def add(name, fn, nbytes):
        t = bench(fn)
        rows[name] = (t, nbytes / t / 1e12)
        print(f"K={k:6d} {name:48s} {t * 1e3:7.3f} ms {nbytes / t / 1e12:5.2f} TB/s", flush=True)

    y16 = torch.empty_like(x)
    add("torch copy X -> X (read 2 B, write 2 B)", lambda: y16.copy_(x), 2 * xb)
    add("torch X.to(int8) (read 2 B, write 1 B)", lambda: q.copy_(x), xb + xb // 2)
    add("block: both passes (shipped)", lambda: ops.quantize_activations(x, hb, sb, 4, True), 2 * xb + xb // 2)
    add("block: pass 1 alone", lambda: _absmax_kernel[grid](
        x, rmat, rs, rowmax, l, m, k, k // tg, x.stride(0), SB=sb, TG=tg, C=c, R=r, BM=bm, AUTO_SCALE=True,
        INTERPRET=False, num_warps=nw, num_stages=ns), xb)
    add("block: pass 2 alone", lambda: _quantize_kernel[grid](
        x, rmat, rs, rowmax, l, q, s, m, k, k // tg, x.stride(0), 7.0, SB=sb, TG=tg, C=c, R=r, BM=bm, TB=64,
        AUTO_SCALE=True, INTERPRET=False, num_warps=nw, num_stages=ns), xb + xb // 2)
    add("pow2: both passes (shipped)", lambda: ops.quantize_activations(x, hb, sb, 4, True, pow2=True),
        3 * xb + xb // 2)
    add("pow2: pass 1 alone (shipped)", lambda: _absmax_kernel[grid](
        x, rmat, rs, cmax, cmax, m, k, 1, x.stride(0), SB=sb, TG=tg, C=c, R=r, BM=bm, AUTO_SCALE=True,
        INTERPRET=False, POW2=True, num_warps=nw, num_stages=ns), xb)
    for rot in (True, False):
        for atomic in (True, False):
            add(f"pow2: pass 1 study rotate={rot} atomics={atomic}", lambda: _study_pass1[grid](
                x, rmat, rs, cmax, part, m, k, x.stride(0), C=c, R=r, BM=bm, ROTATE=rot, ATOMIC=atomic,
                num_warps=nw, num_stages=ns), xb)
    add("pow2: pass 2 alone (shipped)", lambda: _quantize_pow2_kernel[grid](
        x, rmat, rs, cmax, q, s, m, k, x.stride(0), 7.0, C=c, R=r, BM=bm, OCTAVES=4, INTERPRET=False,
        num_warps=nw, num_stages=ns), 2 * xb + xb // 2)
    for rot in (True, False):
        for sweep1 in (True, False):
            add(f"pow2: pass 2 study rotate={rot} row-scale sweep={sweep1}", lambda: _study_pass2[grid](
                x, rmat, rs, cmax, q, s, m, k, x.stride(0), 7.0, C=c, R=r, BM=bm, OCTAVES=4, ROTATE=rot,
                SWEEP1=sweep1, num_warps=nw, num_stages=ns), (2 if sweep1 else 1) * xb + xb // 2)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--k", type=int, nargs="+", default=[5120, 13824])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "m": args.m}
    print(json.dumps(info))
    res = {k: study(args.m, k, dev) for k in args.k}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": res}, f, indent=1)


if __name__ == "__main__":
    main()
