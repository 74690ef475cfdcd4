"""Does unpacking the 4-bit weights once per call, into an int8 workspace, buy a faster GEMM?

Why: the shipped sm_90 GEMM (kernels/_gluon.py, "chain") unpacks each packed weight tile inside its
K loop and writes the int8 tile to shared memory for the wgmma. NOTES v10 estimates that this moves
~56 KB of shared memory per 128 x 128 x 128 step against ~510 MMA cycles: shared-memory bandwidth
and issue slots, not the tensor cores, limit it (1150-1230 TOP/s; the int8 wgmma loop alone gives
1941). Here the weights are unpacked by a separate pass into a transient int8 buffer (N x K bytes,
reused for every layer: the stored weights stay 4-bit) and the GEMM is a plain int8 x int8 TMA
GEMM on the same codes. Cost of the pass: 1.5 N K bytes of memory traffic (~15 us for a Wan 14B
qkvo layer), against a GEMM of ~1.5 ms.

Variants, each checked bit for bit against the Triton GEMM on the same operands, then timed under
sustained load (bench/mma_ceiling.py's `sustained`, clock and power sampled):
- "chain": kernels/_gluon.py's chain kernel (packed weights), the baseline;
- "u8": kernels/_gluon.py's u8 kernel on the workspace (unpacked beforehand), tiles of BM tokens x
  BN weight rows; the shipped `w4_gemm` (unpack pass included) too.
Also timed: the unpack pass alone, cuBLAS BF16 `F.linear` and FP8 `_scaled_mm` (row-wise) at the
same shapes, the activation kernels (to state the whole layer) and the Triton GEMM with per-block
promotion (the 8-bit steps' GEMM). --crossover: chain vs unpack + u8 at 1024..16384 tokens.
--persistent: the u8 loop as a persistent grid (one program per SM, the TMA ring running on across
tiles): 12-15% SLOWER than one program per tile (call 10), so the product keeps the latter.
Findings: bench/NOTES-kernels.md v11. A first version of this file also timed a warp-specialised
kernel (a TMA loader warp feeding wgmma-only warpgroups) on the workspace: no faster than the u8
loop without promotion, and slower than the Triton GEMM with it (log s8call1); removed.

usage: python bench/workspace_study.py [--quick | --crossover | --block | --persistent] [--json FILE]     (H100, triton >= 3.5)
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))
from mma_ceiling import sustained  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait  # noqa: E402

from dvdq_core.kernels import configs, ops  # noqa: E402
from dvdq_core.kernels._gluon import _mma_layout, _store_tile, _tile_offsets  # noqa: E402


@gluon.jit
def _load_global(a_desc, w_desc, a_smem, w_smem, bars, step, pid, nprog, M, N, NK: gl.constexpr,
                 GROUP_M: gl.constexpr):
    """TMA of this program's step-th K step (over all its tiles) into slot step % STAGES."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BM: gl.constexpr = a_smem.shape[1]
    BK: gl.constexpr = a_smem.shape[2]
    BN: gl.constexpr = w_smem.shape[1]
    off_m, off_n = _tile_offsets(pid + (step // NK) * nprog, M, N, BM, BN, GROUP_M)
    k = step % NK
    slot = step % STAGES
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, k * BK], bars.index(slot), a_smem.index(slot))
    tma.async_copy_global_to_shared(w_desc, [off_n, k * BK], bars.index(slot), w_smem.index(slot))


@gluon.jit
def _u8_persistent_kernel(a_desc, w_desc, d_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: gl.constexpr,
                          GROUP_M: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                          num_warps: gl.constexpr):
    """kernels/_gluon.py's u8 loop as a persistent grid: one program per SM walks the output tiles
    pid, pid + nprog, ...; the TMA ring runs on across tiles, so the next tile's first loads are in
    flight during this tile's last wgmmas and its epilogue."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    NK: gl.constexpr = K // BK
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
    total = ((num_tiles - pid + nprog - 1) // nprog) * NK
    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        if i < total:
            _load_global(a_desc, w_desc, a_smem, w_smem, bars, i, pid, nprog, M, N, NK, GROUP_M)
    for t in range((num_tiles - pid + nprog - 1) // nprog):
        acc = gl.zeros((BN, BM), gl.int32, _mma_layout(BM, num_warps))
        for k in range(NK):
            g = t * NK + k
            slot = g % STAGES
            mbarrier.wait(bars.index(slot), (g // STAGES) & 1)
            acc = warpgroup_mma(w_smem.index(slot), a_smem.index(slot).permute((1, 0)), acc, use_acc=k > 0,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if g >= 1 and g - 1 + STAGES < total:
                gl.thread_barrier()
                _load_global(a_desc, w_desc, a_smem, w_smem, bars, g - 1 + STAGES, pid, nprog, M, N, NK, GROUP_M)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        off_m, off_n = _tile_offsets(pid + t * nprog, M, N, BM, BN, GROUP_M)
        _store_tile(acc, d_ptr, s_ptr, bias_ptr, y_ptr, off_m, off_n, M, N, HAS_BIAS, False, num_warps)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


def u8_persistent(a, w8, w_scale, s, bias, sb, bm, bn, warps, stages, per_sm=1, group_m=16,
                  out_dtype=torch.bfloat16):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    m, k = a.shape
    n = w8.shape[0]
    bk = ops.layout_group(k, sb)
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    w_desc = TensorDescriptor(w8, [n, k], [k, 1], [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, per_sm * torch.cuda.get_device_properties(a.device).multi_processor_count),)
    _u8_persistent_kernel[grid](a_desc, w_desc, w_scale, s, bias if bias is not None else w_scale, y, m, n, k,
                                GROUP_M=group_m, STAGES=min(stages, k // bk), HAS_BIAS=bias is not None,
                                num_warps=warps)
    return y


def compile_persistent(bm=128, bn=256, warps=8, stages=3):
    """sm_90 compile on the CPU: registers, spills, shared memory, ptxas advisories, wait depths."""
    from compile_targets import compile_gluon
    la = gl.NVMMASharedLayout.get_default_for([bm, 128], gl.int8)
    lw = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.int8)
    types = {"a_desc": f"tensordesc<i8[{bm}, 128],{la!r}>", "w_desc": f"tensordesc<i8[{bn}, 128],{lw!r}>",
             "d_ptr": "*fp32", "s_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32"}
    r, advisories, waits = compile_gluon(_u8_persistent_kernel, types, dict(K=5120, GROUP_M=16, STAGES=stages,
                                                                           HAS_BIAS=True, num_warps=warps), warps)
    print(f"persistent {bm}x{bn} w{warps} s{stages}: {r}, advisories {advisories}, waits {waits}")


SHAPES = [("qkvo", 5120, 5120), ("ffn1", 13824, 5120), ("ffn2", 5120, 13824)]
# (BM tokens, BN weight rows, warps, stages, kind). "chain" and "u8" run the product's kernels
# (ops.w4_gemm_chain, ops.w4_gemm_u8 with the given tile and the workspace unpacked beforehand).
VARIANTS = [
    (128, 128, 8, 3, "chain"),
    (128, 128, 8, 3, "u8"), (128, 128, 8, 4, "u8"), (128, 256, 8, 3, "u8"), (256, 128, 8, 3, "u8"),
    (128, 256, 8, 4, "u8"), (128, 128, 4, 4, "u8"),
]
# --crossover: from how many tokens does the unpack pass pay for itself (configs.U8_MIN_M)?
CROSSOVER_SHAPES = [("wan14b qkvo", 5120, 5120), ("wan14b ffn1", 13824, 5120), ("hunyuan proj", 3072, 3072),
                    ("wan1.3b qkvo", 1536, 1536)]
CROSSOVER_M = (1024, 2048, 4096, 8192, 16384)


def crossover(dev, record, seconds):
    """Chain kernel vs unpack pass + u8 kernel (the product's two paths) at growing token counts."""
    from bench.kernels import make_layer
    for name, n, k in CROSSOVER_SHAPES:
        layer = make_layer(n, k, dev)
        sb = ops.effective_blocks(layer, k)[1]
        for m in CROSSOVER_M:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            q, s, _ = ops.quantize_activations(x, layer.had_block, sb, 4, True, pow2=True)
            args = (q, layer.weight, layer.w_zero, layer.w_scale, s, layer.bias, torch.bfloat16, sb)
            assert torch.equal(ops.w4_gemm_chain(*args), ops.w4_gemm_u8(*args))
            t_chain, _ = sustained(lambda: ops.w4_gemm_chain(*args), seconds)
            t_u8, seen = sustained(lambda: ops.w4_gemm_u8(*args), seconds)
            record(f"{name} M={m}", "chain / unpack + u8", t_chain, 0, seen,
                   f"u8 incl. unpack {t_u8:.3f} ms: {t_chain / t_u8:.2f}x")
        torch.cuda.empty_cache()


def block_rows(dev, record, seconds, m=32760):
    """The 8-bit steps' GEMM (Triton, ARQ's per-block promotion) reading the int8 workspace (W8) instead
    of unpacking in its loop, at a few tiles (unpack pass included in the W8 times)."""
    from bench.kernels import make_layer
    from dvdq_core.kernels.configs import SM90_DEFAULT, _fast
    for name, n, k in SHAPES:
        layer = make_layer(n, k, dev)
        hb, sb = ops.effective_blocks(layer, k)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        q, s, l = ops.quantize_activations(x, hb, sb, 8, True)
        args = (q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.bfloat16, sb, True)
        ref = ops.w4_gemm(*args)
        for cfg in (SM90_DEFAULT, _fast(128, 128, 128, 8, 4), _fast(128, 128, 128, 8, 3), _fast(128, 64, 128, 4, 4),
                    _fast(64, 256, 128, 8, 3, split=2)):
            for w8 in (False, True):
                f = lambda: ops.w4_gemm(*args, cfg=cfg, W8=w8)
                try:
                    same = torch.equal(f(), ref)
                    t, seen = sustained(f, seconds)
                    record(name, f"block {cfg.to_env()}{' W8' if w8 else ''}", t, 2.0 * m * n * k, seen,
                           "bit-exact" if same else "DIFFERS")
                except Exception as e:  # noqa: BLE001 (a study: report and go on)
                    print(f"  {name} {cfg.to_env()} W8={w8} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.empty_cache()


def persistent_rows(dev, record, seconds, m=32760):
    """The shipped u8 kernel against its persistent form (3 and 4 stages, L2 groups 16 and 8)."""
    from bench.kernels import make_layer
    for name, n, k in SHAPES:
        layer = make_layer(n, k, dev)
        hb, sb = ops.effective_blocks(layer, k)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        q, s, _ = ops.quantize_activations(x, hb, sb, 4, True, pow2=True)
        w8 = ops.unpack_weights(layer.weight, layer.w_zero, ops.layout_group(k, sb))
        args = (q, layer.weight, layer.w_zero, layer.w_scale, s, layer.bias, torch.bfloat16, sb)
        ref = ops.w4_gemm_u8(*args, w8=w8)
        flops = 2.0 * m * n * k
        t, seen = sustained(lambda: ops.w4_gemm_u8(*args, w8=w8), seconds)
        record(name, "u8 shipped (workspace given)", t, flops, seen)
        for stages, group in ((3, 16), (4, 16), (4, 8), (4, 32)):
            f = lambda: u8_persistent(q, w8, layer.w_scale, s, layer.bias, sb, 128, 256, 8, stages, group_m=group)
            try:
                same = torch.equal(f(), ref)
                t, seen = sustained(f, seconds)
                record(name, f"u8 persistent s{stages} g{group}", t, flops, seen, "bit-exact" if same else "DIFFERS")
            except Exception as e:  # noqa: BLE001 (a study: report and go on)
                print(f"  {name} persistent s{stages} g{group} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()


def shape_rows(name, n, k, m, dev, record, seconds):
    from bench.kernels import make_layer
    layer = make_layer(n, k, dev)
    hb, sb = ops.effective_blocks(layer, k)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    flops = 2.0 * m * n * k
    w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    t, seen = sustained(lambda: F.linear(x, w16, layer.bias), seconds)
    record(name, "cuBLAS BF16 F.linear", t, flops, seen)
    x8, wq8 = x.to(torch.float8_e4m3fn), w16.to(torch.float8_e4m3fn)
    xs, ws = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    t, seen = sustained(lambda: torch._scaled_mm(x8, wq8.t(), scale_a=xs, scale_b=ws, bias=layer.bias,
                                                 out_dtype=torch.bfloat16), seconds)
    record(name, "cuBLAS FP8 row-wise (GEMM only)", t, flops, seen)
    x8 = wq8 = w16 = None
    t, seen = sustained(lambda: ops.quantize_activations(x, hb, sb, 4, True, pow2=True), seconds)
    record(name, "pow2 activation kernels", t, 0, seen)
    t, seen = sustained(lambda: ops.quantize_activations(x, hb, sb, 8, True), seconds)
    record(name, "block activation kernels (8 bits)", t, 0, seen)
    bk = ops.layout_group(k, sb)
    w8 = ops.unpack_weights(layer.weight, layer.w_zero, bk)
    t, seen = sustained(lambda: ops.unpack_weights(layer.weight, layer.w_zero, bk, w8), seconds)
    record(name, "unpack to int8 workspace", t, 0, seen, f"{1.5 * n * k / t / 1e6:.0f} GB/s")
    q, s, l = ops.quantize_activations(x, hb, sb, 8, True)
    t, seen = sustained(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias,
                                            torch.bfloat16, sb, True), seconds)
    record(name, "Triton GEMM, block (8-bit steps)", t, flops, seen)
    q, s, _ = ops.quantize_activations(x, hb, sb, 4, True, pow2=True)
    gemm_args = (q, layer.weight, layer.w_zero, layer.w_scale, s, layer.bias, torch.bfloat16, sb)
    ref = ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias, torch.bfloat16, sb, False,
                      cfg=configs.SM90_DEFAULT)
    t, seen = sustained(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias,
                                            torch.bfloat16, sb, False), seconds)
    record(name, "shipped w4_gemm (unpack incl.)", t, flops, seen)
    for bm, bn, w, st, kind in VARIANTS:
        cfg = dict(BM=bm, BN=bn, num_warps=w, stages=st, group_m=16)
        if kind == "chain":
            f = lambda: ops.w4_gemm_chain(*gemm_args, chain_cfg=cfg)
        else:
            f = lambda: ops.w4_gemm_u8(*gemm_args, u8_cfg=cfg, w8=w8)
        y = f()
        same = torch.equal(y, ref)
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t, seen = sustained(f, seconds)
        record(name, f"{kind} {bm}x{bn} w{w} s{st}", t, flops, seen,
               "bit-exact" if same else f"DIFFERS max rel {err:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--crossover", action="store_true", help="only the chain vs workspace crossover in tokens")
    p.add_argument("--block", action="store_true", help="only the 8-bit steps' GEMM with and without the workspace")
    p.add_argument("--persistent", action="store_true", help="only the u8 kernel against its persistent form")
    p.add_argument("--seconds", type=float, default=1.0, help="sustained time per case")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("workspace_study.py measures a GPU: no CUDA device here")
    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), flush=True)
    rows = []

    def record(shape, label, ms, flops, seen, extra=""):
        rows.append({"shape": shape, "what": label, "ms": ms, "tops": flops / ms / 1e9 if flops else None,
                     "seen": seen, "note": extra})
        tops = f"{flops / ms / 1e9:6.0f} T/s" if flops else " " * 10
        print(f"  {shape:20s} {label:34s} {ms:8.3f} ms {tops}  {seen}  {extra}", flush=True)

    if args.crossover:
        crossover(dev, record, args.seconds)
    elif args.block:
        block_rows(dev, record, args.seconds)
    elif args.persistent:
        persistent_rows(dev, record, args.seconds)
    else:
        for name, n, k in SHAPES[:1] if args.quick else SHAPES:
            shape_rows(name, n, k, 32760, dev, record, args.seconds)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
