"""What the card itself gives for 8-bit matrix work: the ceiling the layer target is measured against.

The issue's layer target (quantized linear >= 1.6x BF16 `F.linear` at the Wan 14B shapes, activation
quantization included) assumes the 8-bit MMA's 2x over BF16 is available in practice. This measures
how much of it is, on the lent card, under sustained load (clock and power sampled):

1. tensor cores alone: a Gluon kernel that loads one A and one B tile into shared memory once and then
   issues back-to-back wgmmas into one accumulator (one in flight, as a K loop does), no global memory
   in the loop; bf16 (fp32 accumulator), fp8 e4m3 (fp32) and int8 (int32). Tiles 128 x 256 x (64 or 128),
   8 warps, 1 or 2 programs per SM;
2. cuBLAS at large square shapes and at the Wan 14B layer shapes (M = 32760): BF16 `mm`, FP8
   `_scaled_mm` (per-tensor scales with fast accumulation; row-wise scales), int8 `_int_mm`.

Prints TFLOP/s (TOP/s for int8) and the median SM clock / power while each ran.
Run: `python bench/mma_ceiling.py [--json FILE]` (H100; needs triton >= 3.5 for Gluon).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))
from gpu_clock import ClockMonitor  # noqa: E402


class PowerClock(ClockMonitor):
    """Samples (SM clock MHz, power W, power limit W, temperature C) every 0.2 s while a block runs."""
    query = "clocks.sm,power.draw,power.limit,temperature.gpu"

    def __init__(self):
        super().__init__(period_s=0.2)

    def line(self):
        if not self.samples:
            return "no nvidia-smi samples"
        clk, pw, lim, temp = zip(*self.samples)
        return f"{statistics.median(clk):.0f} MHz, {statistics.median(pw):.0f} W of {lim[0]:.0f}, {max(temp):.0f} C"


def sustained(fn, seconds=1.5):
    """Median time of fn (ms) over ~seconds of back-to-back calls, with the clock/power seen meanwhile."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-5)
    n = max(3, int(seconds / one))
    times = []
    with PowerClock() as pc:
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            times.append((a, b))
        torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times), pc.line()


def mma_loop_kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

    @gluon.jit
    def _mma_loop(a_ptr, b_ptr, out_ptr, ITERS, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  INSTR_N: gl.constexpr, INSTR_K: gl.constexpr, A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr,
                  num_warps: gl.constexpr):
        blk: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [num_warps, 1], [1, 0])
        ra = gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
        rb = gl.arange(0, BN, layout=gl.SliceLayout(1, blk))
        ck = gl.arange(0, BK, layout=gl.SliceLayout(0, blk))
        a_smem = gl.allocate_shared_memory(a_ptr.dtype.element_ty, [BM, BK], A_LAYOUT,
                                           gl.load(a_ptr + ra[:, None] * BK + ck[None, :]))
        b_smem = gl.allocate_shared_memory(b_ptr.dtype.element_ty, [BN, BK], B_LAYOUT,
                                           gl.load(b_ptr + rb[:, None] * BK + ck[None, :]))
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, INSTR_N, INSTR_K])
        if a_ptr.dtype.element_ty == gl.int8:
            acc = gl.zeros((BM, BN), gl.int32, mma)
        else:
            acc = gl.zeros((BM, BN), gl.float32, mma)
        gl.thread_barrier()
        for _ in range(ITERS):
            acc = warpgroup_mma(a_smem, b_smem.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        gl.store(out_ptr + gl.program_id(0), gl.sum(gl.sum(acc.to(gl.float32), axis=1), axis=0))

    return _mma_loop, gl


def tensor_core_rows(iters, per_sm_list):
    kernel, gl = mma_loop_kernel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    # Triton's int8 wgmma is at most 128 wide (N): fp8 is run at both widths to see what that costs
    for name, tdt, gdt, bk, instr_n, instr_k in (("bf16", torch.bfloat16, gl.bfloat16, 64, 256, 16),
                                                ("fp8 e4m3", torch.float8_e4m3fn, gl.float8e4nv, 128, 256, 32),
                                                ("fp8 e4m3", torch.float8_e4m3fn, gl.float8e4nv, 128, 128, 32),
                                                ("int8", torch.int8, gl.int8, 128, 128, 32)):
        bm, bn = 128, 256
        if tdt == torch.int8:
            a = torch.randint(-8, 8, (bm, bk), dtype=torch.int8, device="cuda")
            b = torch.randint(-8, 8, (bn, bk), dtype=torch.int8, device="cuda")
        else:
            a = torch.randn(bm, bk, device="cuda").to(tdt)
            b = torch.randn(bn, bk, device="cuda").to(tdt)
        la = gl.NVMMASharedLayout.get_default_for([bm, bk], gdt)
        lb = gl.NVMMASharedLayout.get_default_for([bn, bk], gdt)
        for per_sm in per_sm_list:
            grid = sms * per_sm
            out = torch.empty(grid, device="cuda")

            def run():
                kernel[(grid,)](a, b, out, iters, bm, bn, bk, instr_n, instr_k, la, lb, num_warps=8)
            ms, seen = sustained(run)
            ops = 2 * bm * bn * bk * iters * grid
            rows.append({"what": f"wgmma loop {name} {bm}x{bn}x{bk} (n{instr_n}), {per_sm}/SM", "ms": ms,
                         "tflops": ops / ms / 1e9, "seen": seen})
            print(f"{rows[-1]['what']:48s} {ms:8.3f} ms {rows[-1]['tflops']:7.0f} T/s   {seen}", flush=True)
    return rows


def cublas_rows(shapes):
    rows = []
    for (m, n, k) in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        xs, ws = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        xi = torch.randint(-8, 8, (m, k), dtype=torch.int8, device="cuda")
        wi = torch.randint(-8, 8, (k, n), dtype=torch.int8, device="cuda").t().contiguous().t()
        cases = {
            "bf16 mm": lambda: torch.mm(x, w.t()),
            "fp8 _scaled_mm tensor-wise, fast accum": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                             out_dtype=torch.bfloat16, use_fast_accum=True),
            "fp8 _scaled_mm row-wise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16),
            "int8 _int_mm": lambda: torch._int_mm(xi, wi),
        }
        for name, fn in cases.items():
            try:
                ms, seen = sustained(fn)
            except Exception as e:  # a case this torch/cuBLAS does not support: say so
                print(f"{name} {m}x{n}x{k}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            rows.append({"what": f"cuBLAS {name}", "shape": [m, n, k], "ms": ms, "tflops": 2 * m * n * k / ms / 1e9,
                         "seen": seen})
            print(f"{rows[-1]['what']:45s} {m:6d}x{n:6d}x{k:6d} {ms:8.3f} ms {rows[-1]['tflops']:7.0f} T/s   {seen}", flush=True)
        x = w = x8 = w8 = xi = wi = None  # free this shape's operands before the next
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=4000, help="wgmmas per program in the tensor-core loop")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mma_ceiling.py measures a GPU: no CUDA device here")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), flush=True)
    rows = tensor_core_rows(args.iters, (1, 2))
    rows += cublas_rows([(8192, 8192, 8192), (16384, 16384, 16384),
                         (32760, 5120, 5120), (32760, 13824, 5120), (32760, 5120, 13824)])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
