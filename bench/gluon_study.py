"""A Hopper GEMM written in Gluon (explicit wgmma waits, TMA), against the shipped Triton GEMM.

Why: Triton 3.6 places `warp_group_dot_wait {pendings = 0}` right after every int8 `tl.dot`, so in
`kernels._triton._w4_gemm_kernel` no wgmma ever overlaps the weight unpacking or ARQ's per-K-block
promotion (bench/NOTES-kernels.md v4). Gluon (Triton 3.5+) lets a kernel say where it waits. This
study kernel has the shipped kernel's math and operand layouts (weights are the MMA's A side, from
registers; tokens its N side):
    Y[i, n] = D[n] * s_i * sum_b l_b * sum_{k in b} q[i, k] * (u[n, k] - z[n]) + bias[n]
Activation codes [BM, BK] and packed weight bytes [BN, BK/2] come in by TMA into a ring of STAGES
shared-memory slots; the packed bytes are read from shared memory straight into the MMA's A
register layout (a thread then holds byte column c where it holds K columns c and BK/2 + c, so
the [low plane | high plane] tile needs no data movement: convert_layout(assert_trivial=True)).
PIPE: two int32 partial sums alternate so step k's wgmma could run while step k-1's partial is
promoted. `_w4_gemm_ws_kernel` is warp-specialised instead: a TMA loader warp and four unpacking
warps (int8 weight tile into shared memory) feed wgmma warpgroups that do nothing else ("ws";
"ws-int": without the promotion, one chained int32 sum over K as granularity "pow2" runs).
CHAIN (no promotion): every warp unpacks into a shared-memory double buffer, then one chained
int32 wgmma per K step, waited for one step later; it became the product's kernels/_gluon.py,
which the "chain" variants now run.
Findings (v6 in bench/NOTES-kernels.md): ptxas serialises every wgmma of the PIPE loop anyway
(advisory C7513-C7515, shown by --compile-only); the serial loop only matches the shipped
kernel; the warp-specialised one is pipelined but slower (its unpacking warps are the limit);
CHAIN beats the Triton loop here (block codes) but not on the folded pow2 codes in the product.
NOT used by the product.

Each variant is checked against the shipped `ops.w4_gemm` on the same operands, then timed
(do_bench median) at the Wan 2.1 14B shapes, M = 32760 tokens, with cuBLAS BF16 F.linear.
--int-acc times the shipped GEMM with and without the per-K-block promotion instead.

usage: python bench/gluon_study.py [--quick] [--int-acc] [--codes block|pow2] [--outliers]   (GPU)
       python bench/gluon_study.py --compile-only          (CPU: sm_90 registers, spills, ptxas advisories)
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.compile_targets import compile_gluon, compile_gluon_gemm  # noqa: E402
from bench.kernels import make_layer  # noqa: E402
from dvdq_core.kernels import ops  # noqa: E402
from dvdq_core.kernels._gluon import _tile_offsets  # noqa: E402
from dvdq_core.kernels._triton import UNPACK_PTX  # noqa: E402

EPS: gl.constexpr = gl.constexpr(1e-8)  # as kernels._triton.EPS: floor of the auto-scale l_b


@gluon.jit
def _unpack(wp, z):
    """Packed bytes -> (low nibble - z, high nibble - z) as int8, four bytes per 32-bit op."""
    return gl.inline_asm_elementwise(asm=UNPACK_PTX, constraints="=r,=r,r,r", args=[wp, z],
                                     dtype=(gl.int8, gl.int8), is_pure=True, pack=4)


@gluon.jit
def _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, k):
    """TMA of K step k's activation codes [BM, BK] and packed weight bytes [BN, BK/2] into slot k % STAGES."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    slot = k % STAGES
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, k * BK], bars.index(slot), a_smem.index(slot))
    tma.async_copy_global_to_shared(w_desc, [off_n, k * (BK // 2)], bars.index(slot), w_smem.index(slot))


@gluon.jit
def _issue(a_smem, w_smem, bars, z, regs, k, A_LAYOUT: gl.constexpr):
    """Wait for K step k's tiles, unpack its weights into the MMA's A registers ([low plane | high
    plane]), issue its wgmma (async) into the registers of `regs` (a retired partial sum: tying
    them keeps copies of an in-flight accumulator out of the loop, which make ptxas serialise)."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BK: gl.constexpr = a_smem.shape[2]
    slot = k % STAGES
    mbarrier.wait(bars.index(slot), (k // STAGES) & 1)
    wp = w_smem.index(slot).load(A_LAYOUT)  # a thread holds byte column c where it holds K columns c, BK/2 + c
    lo, hi = _unpack(wp, z)
    w = gl.reshape(gl.permute(gl.join(lo, hi), (0, 2, 1)), (lo.shape[0], BK))
    w = gl.convert_layout(w, A_LAYOUT, assert_trivial=True)
    return warpgroup_mma(w, a_smem.index(slot).permute((1, 0)), regs, use_acc=False, is_async=True)


@gluon.jit
def _retire(tok, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, k, NK: gl.constexpr,
            SB: gl.constexpr, AUTO_SCALE: gl.constexpr, OUTSTANDING: gl.constexpr = 1):
    """Wait for K step k's wgmma (OUTSTANDING later ones may stay in flight), refill its slot with step
    k + STAGES, add its int32 partial sum, scaled by l_b, to the float32 accumulator."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    part = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(tok,))
    if k + STAGES < NK:
        _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, k + STAGES)
    if AUTO_SCALE:
        acc += part.to(gl.float32) * gl.maximum(gl.load(l_ptr + (k * BK) // SB), EPS)
    else:
        acc += part.to(gl.float32)
    return acc, part


@gluon.jit
def _w4_gemm_wgmma_kernel(
    a_desc, w_desc, z_ptr, d_ptr, l_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: gl.constexpr,
    SB: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
    AUTO_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, PIPE: gl.constexpr, num_warps: gl.constexpr,
):
    BM: gl.constexpr = a_desc.block_type.shape[0]  # tokens per program
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]  # weight rows per program
    NK: gl.constexpr = K // BK
    gl.static_assert(NK >= STAGES, "the host caps STAGES at K // BK")

    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BM, BN, GROUP_M)

    # MMA: M side = BN weight rows (warps stacked along it), N side = BM tokens, k = 32 (int8).
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BM, 32])
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    rows_z = (off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, a_reg))) % N
    z = gl.load(z_ptr + rows_z).to(gl.uint8)[:, None]
    z = gl.broadcast(z, gl.zeros((BN, BK // 2), gl.uint8, a_reg))[0]

    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):  # the host keeps STAGES <= NK
        _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, i)

    acc = gl.zeros((BN, BM), gl.float32, mma)
    if PIPE:
        # Two partial sums alternate (even / odd K steps): step k's wgmma runs while step k-1's
        # partial is promoted. Step 0 runs alone so that no register of a wgmma in flight is
        # initialised. (ptxas still serialises this loop, C7514: see bench/NOTES-kernels.md.)
        gl.static_assert(NK >= 2, "the host uses PIPE only for K >= 2 * BK")
        pa = gl.zeros((BN, BM), gl.int32, mma)
        tok_a = _issue(a_smem, w_smem, bars, z, pa, 0, a_reg)
        acc, pa = _retire(tok_a, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, 0, NK, SB,
                          AUTO_SCALE, 0)
        pb = gl.zeros((BN, BM), gl.int32, mma)
        tok_b = _issue(a_smem, w_smem, bars, z, pb, 1, a_reg)
        for k in range(2, NK - 1, 2):
            tok_a = _issue(a_smem, w_smem, bars, z, pa, k, a_reg)
            acc, pb = _retire(tok_b, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, k - 1, NK, SB,
                              AUTO_SCALE)
            tok_b = _issue(a_smem, w_smem, bars, z, pb, k + 1, a_reg)
            acc, pa = _retire(tok_a, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, k, NK, SB,
                              AUTO_SCALE)
        if NK % 2 == 1:  # one step left
            tok_a = _issue(a_smem, w_smem, bars, z, pa, NK - 1, a_reg)
            acc, pb = _retire(tok_b, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, NK - 2, NK, SB,
                              AUTO_SCALE)
            acc, pa = _retire(tok_a, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, NK - 1, NK, SB,
                              AUTO_SCALE, 0)
        else:
            acc, pb = _retire(tok_b, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, NK - 1, NK, SB,
                              AUTO_SCALE, 0)
    else:
        # One wgmma at a time per warpgroup; TMA and the other warpgroups overlap it.
        part = gl.zeros((BN, BM), gl.int32, mma)
        for k in range(NK):
            tok = _issue(a_smem, w_smem, bars, z, part, k, a_reg)
            acc, part = _retire(tok, acc, a_desc, w_desc, a_smem, w_smem, bars, l_ptr, off_m, off_n, k, NK, SB,
                                AUTO_SCALE, 0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    _epilogue(acc, d_ptr, s_ptr, bias_ptr, y_ptr, off_m, off_n, M, N, HAS_BIAS, mma, num_warps)


@gluon.jit
def _epilogue(acc, d_ptr, s_ptr, bias_ptr, y_ptr, off_m, off_n, M, N, HAS_BIAS: gl.constexpr, MMA: gl.constexpr,
              num_warps: gl.constexpr):
    """D[n] * s_i + bias[n], rounded, stored as Y[token, row] (masked)."""
    BN: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    offs_m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    d = gl.load(d_ptr + offs_n % N)
    s = gl.load(s_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc * d[:, None] * s[None, :]
    if HAS_BIAS:
        out += gl.load(bias_ptr + offs_n % N).to(gl.float32)[:, None]
    # threads along the weight rows, which are contiguous in Y: 16-byte stores
    ol: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4],
                                        warps_per_cta=[1, num_warps], order=[0, 1])
    out = gl.convert_layout(out.to(y_ptr.dtype.element_ty), ol)
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, ol))
    om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, ol))
    y_ptrs = y_ptr + om.to(gl.int64)[None, :] * N + on[:, None]
    gl.store(y_ptrs, out, mask=(on < N)[:, None] & (om < M)[None, :])


@gluon.jit
def _ws_loader(a_desc, w_desc, a_smem, p_smem, w_smem, ld_ready, w_ready, empty, z_ptr, l_ptr, off_m, off_n, N,
               NK: gl.constexpr, SB: gl.constexpr, AUTO_SCALE: gl.constexpr):
    """Worker (1 warp): TMA of the activation codes and the packed weight bytes of every K step."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BK: gl.constexpr = a_smem.shape[2]
    for k in range(NK):
        slot = k % STAGES
        mbarrier.wait(empty.index(slot), ((k // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1 at once
        mbarrier.expect(ld_ready.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, k * BK], ld_ready.index(slot), a_smem.index(slot))
        tma.async_copy_global_to_shared(w_desc, [off_n, k * (BK // 2)], ld_ready.index(slot), p_smem.index(slot))


@gluon.jit
def _ws_unpacker(a_desc, w_desc, a_smem, p_smem, w_smem, ld_ready, w_ready, empty, z_ptr, l_ptr, off_m, off_n, N,
                 NK: gl.constexpr, SB: gl.constexpr, AUTO_SCALE: gl.constexpr):
    """Worker (4 warps): packed bytes -> int8 weight tile [low plane | high plane] in shared memory,
    the wgmma's A operand. Its slot is free once the loader refilled the same slot (the consumer
    released it after its wgmma)."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BN: gl.constexpr = p_smem.shape[1]
    HB: gl.constexpr = p_smem.shape[2]
    pl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[2, 16], warps_per_cta=[4, 1],
                                        order=[1, 0])
    rows = (off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, pl))) % N
    z = gl.load(z_ptr + rows).to(gl.uint8)[:, None]
    z = gl.broadcast(z, gl.zeros((BN, HB), gl.uint8, pl))[0]
    for k in range(NK):
        slot = k % STAGES
        mbarrier.wait(ld_ready.index(slot), (k // STAGES) & 1)
        lo, hi = _unpack(p_smem.index(slot).load(pl), z)
        w_smem.index(slot).store(gl.reshape(gl.permute(gl.join(lo, hi), (0, 2, 1)), (BN, 2 * HB)))
        fence_async_shared()
        mbarrier.arrive(w_ready.index(slot), count=1)


@gluon.jit
def _ws_consumer(a_smem, w_smem, ld_ready, w_ready, empty, l_ptr, NK: gl.constexpr, SB: gl.constexpr,
                 AUTO_SCALE: gl.constexpr, MMA: gl.constexpr):
    """Default partition: one wgmma per K step (both operands from shared memory), then ARQ's
    promotion; the slot goes back to the loader once the wgmma is done."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BM: gl.constexpr = a_smem.shape[1]
    BK: gl.constexpr = a_smem.shape[2]
    BN: gl.constexpr = w_smem.shape[1]
    if not AUTO_SCALE:
        # one int32 sum over all of K (granularity "pow2": the scales are in the codes): chained
        # wgmmas, each waited for one step later, so the tensor cores never wait for this warpgroup
        acc_i = gl.zeros((BN, BM), gl.int32, MMA)
        for k in range(NK):
            slot = k % STAGES
            ph = (k // STAGES) & 1
            mbarrier.wait(ld_ready.index(slot), ph)
            mbarrier.wait(w_ready.index(slot), ph)
            acc_i = warpgroup_mma(w_smem.index(slot), a_smem.index(slot).permute((1, 0)), acc_i, use_acc=k > 0,
                                  is_async=True)
            acc_i = warpgroup_mma_wait(num_outstanding=1, deps=(acc_i,))
            mbarrier.arrive(empty.index((k + STAGES - 1) % STAGES), count=1, pred=k > 0)  # step k-1 is done
        acc_i = warpgroup_mma_wait(num_outstanding=0, deps=(acc_i,))
        return (acc_i.to(gl.float32),)
    acc = gl.zeros((BN, BM), gl.float32, MMA)
    part = gl.zeros((BN, BM), gl.int32, MMA)
    for k in range(NK):
        slot = k % STAGES
        ph = (k // STAGES) & 1
        mbarrier.wait(ld_ready.index(slot), ph)
        mbarrier.wait(w_ready.index(slot), ph)
        tok = warpgroup_mma(w_smem.index(slot), a_smem.index(slot).permute((1, 0)), part, use_acc=False,
                            is_async=True)
        part = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        mbarrier.arrive(empty.index(slot), count=1)
        if AUTO_SCALE:
            acc += part.to(gl.float32) * gl.maximum(gl.load(l_ptr + (k * BK) // SB), EPS)
        else:
            acc += part.to(gl.float32)
    return (acc,)  # warp_specialize wants the default partition's results as a tuple


@gluon.jit
def _w4_gemm_ws_kernel(
    a_desc, w_desc, z_ptr, d_ptr, l_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: gl.constexpr,
    SB: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
    AUTO_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
):
    """Warp-specialised variant: a 1-warp TMA loader and a 4-warp unpacker feed the default
    partition's warpgroups, which only issue wgmma (weights and activations from shared memory) and
    promote; the warp scheduler interleaves them instead of one instruction stream."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    NK: gl.constexpr = K // BK
    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BM, BN, GROUP_M)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BM, 32])
    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], w_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], a_desc.layout)  # int8 rows of BK: same swizzle
    ld_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ld_ready.index(i), count=1)
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    worker_args = (a_desc, w_desc, a_smem, p_smem, w_smem, ld_ready, w_ready, empty, z_ptr, l_ptr, off_m, off_n, N,
                   NK, SB, AUTO_SCALE)
    acc = gl.warp_specialize([
        (_ws_consumer, (a_smem, w_smem, ld_ready, w_ready, empty, l_ptr, NK, SB, AUTO_SCALE, mma)),
        (_ws_loader, worker_args),
        (_ws_unpacker, worker_args),
    ], [1, 4], [24, 80])[0]
    _epilogue(acc, d_ptr, s_ptr, bias_ptr, y_ptr, off_m, off_n, M, N, HAS_BIAS, mma, num_warps)


# ---- the study ----
SHAPES = [("qkvo", 5120, 5120), ("ffn1", 13824, 5120), ("ffn2", 5120, 13824)]
# (BM tokens, BN weight rows, warps, stages, loop): "serial" (wait for each wgmma), "pipe" (two
# alternating partial sums), "ws" (warp-specialised: TMA warp, unpacking warps, wgmma warpgroups)
VARIANTS = [
    (128, 64, 4, 3, "serial"), (128, 128, 8, 4, "pipe"), (128, 128, 8, 4, "ws"), (128, 128, 8, 4, "ws-int"),
    (128, 128, 8, 3, "chain"), (128, 128, 8, 2, "chain"), (64, 128, 8, 3, "chain"), (64, 128, 4, 4, "chain"),
    (128, 128, 8, 3, "chain-g16"), (128, 128, 8, 3, "chain-g4"),
]
# "chain": the loop without promotion, unpacking into a shared-memory double buffer, chained int32
# wgmmas each waited for one step later. It became the product's sm_90 GEMM: these variants run
# kernels/_gluon.py's kernel with the given tile (ops.w4_gemm_chain), no copy of it here.
# "ws-int": the warp-specialised kernel without ARQ's per-block promotion (AUTO_SCALE off: one int32
# sum over all of K, as granularity "pow2" runs); timed on the same operands, checked against the
# shipped GEMM with auto_scale off.


def _kernel(mode):
    return _w4_gemm_ws_kernel if mode.startswith("ws") else _w4_gemm_wgmma_kernel


def w4_gemm_gluon(a, qweight, w_zero, w_scale, l, s, bias, out_dtype, sb: int, auto_scale: bool, BM=128, BN=128,
                  num_warps=8, stages=4, mode="serial", group_m=8):
    """Host side of the study kernels (int8 codes only): the same arguments and result as ops.w4_gemm."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    if mode.startswith("chain"):  # the shipped kernel; "chain-gN": another L2 swizzle group
        cfg = dict(BM=BM, BN=BN, num_warps=num_warps, stages=stages,
                   group_m=int(mode[7:]) if mode.startswith("chain-g") else group_m)
        return ops.w4_gemm_chain(a, qweight, w_zero, w_scale, s, bias, out_dtype, sb, chain_cfg=cfg)
    m, k = a.shape
    n = qweight.shape[0]
    bk = ops.layout_group(k, sb)
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [BM, bk], gl.NVMMASharedLayout.get_default_for([BM, bk], gl.int8))
    w_desc = TensorDescriptor(qweight, [n, k // 2], [k // 2, 1], [BN, bk // 2],
                              gl.NVMMASharedLayout.get_default_for([BN, bk // 2], gl.uint8))
    nk = k // bk
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    grid = (ops.triton_cdiv(m, BM) * ops.triton_cdiv(n, BN),)
    extra = {} if mode.startswith("ws") else {"PIPE": mode == "pipe" and nk >= 2}
    stages = stages if mode.startswith("ws") else max(1, min(stages, nk))
    _kernel(mode)[grid](
        a_desc, w_desc, w_zero, w_scale, l if l is not None else w_scale, s, bias if bias is not None else w_scale, y,
        m, n, k, SB=sb, GROUP_M=group_m, STAGES=stages, AUTO_SCALE=auto_scale, HAS_BIAS=bias is not None,
        num_warps=num_warps, **extra)
    return y


def compile_only():
    """Compile the study kernels for sm_90 on the CPU: registers, spills, shared memory and ptxas's
    wgmma advisories (C751x = "wgmma.mma_async instructions are serialized due to ...")."""
    print(f"{'BM':>4s} {'BN':>4s} {'warps':>5s} {'stages':>6s} {'loop':>6s} {'regs':>4s} {'spills':>6s} {'smem KB':>7s}  ptxas")
    for bm, bn, warps, stages, mode in VARIANTS:
        if mode.startswith("chain"):  # the shipped kernel: bench/compile_targets.py compiles it
            r, adv, waits = compile_gluon_gemm("chain", dict(BM=bm, BN=bn, num_warps=warps, stages=stages, group_m=8))
            print(f"{bm:4d} {bn:4d} {warps:5d} {stages:6d} {mode:>6s} {r['regs']:4d} {r['spills']:6d} "
                  f"{r['smem'] / 1024:7.1f}  {', '.join(adv) or 'no advisory'}; waits {','.join(waits)}")
            continue
        bk = 128
        a_lay = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
        w_lay = gl.NVMMASharedLayout.get_default_for([bn, bk // 2], gl.uint8)
        types = {"a_desc": f"tensordesc<i8[{bm}, {bk}],{a_lay!r}>", "w_desc": f"tensordesc<u8[{bn}, {bk // 2}],{w_lay!r}>",
                 "z_ptr": "*u8", "d_ptr": "*fp32", "l_ptr": "*fp32", "s_ptr": "*fp32", "bias_ptr": "*bf16",
                 "y_ptr": "*bf16", "M": "i32", "N": "i32"}
        consts = dict(K=5120, SB=128, GROUP_M=8, STAGES=stages, AUTO_SCALE=mode != "ws-int", HAS_BIAS=True,
                      num_warps=warps)
        if not mode.startswith("ws"):
            consts["PIPE"] = mode == "pipe"
        try:
            r, adv, waits = compile_gluon(_kernel(mode), types, consts, warps)
        except Exception as e:  # noqa: BLE001 (a study: report and go on)
            print(f"{bm:4d} {bn:4d} {warps:5d} {stages:6d} {mode:>6s} compile failed: {type(e).__name__}: {str(e)}")
            continue
        print(f"{bm:4d} {bn:4d} {warps:5d} {stages:6d} {mode:>6s} {r['regs']:4d} {r['spills']:6d} "
              f"{r['smem'] / 1024:7.1f}  {', '.join(adv) or 'no advisory'}; waits {','.join(waits)}")


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def int_acc_section(m, dev):
    """The shipped Triton GEMM with and without ARQ's per-K-block promotion (AUTO_SCALE off = one
    int32 accumulation over all of K, the loop that power-of-two per-channel scales folded into the
    int8 codes would allow)."""
    from dvdq_core.kernels.configs import SM90_DEFAULT, _fast
    for name, n, k in SHAPES:
        layer = make_layer(n, k, dev)
        hb, sb = ops.effective_blocks(layer, k)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        q, s, l = ops.quantize_activations(x, hb, sb, 4, True)
        flops = 2.0 * m * n * k
        for cfg in (SM90_DEFAULT, _fast(64, 256, 128, 8, 4, split=2), _fast(64, 256, 128, 8, 3, split=2)):
            for auto in (True, False):
                t = bench(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias,
                                              torch.bfloat16, sb, auto, cfg))
                print(f"  {name} triton {cfg.to_env():24s} {'block promotion' if auto else 'int32 over all K':16s} "
                      f"{t * 1e3:.3f} ms {flops / t / 1e12:6.0f} TOP/s")
        del q, s, l, x, layer
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--int-acc", action="store_true", help="only the shipped GEMM with / without promotion")
    p.add_argument("--compile-only", action="store_true", help="sm_90 compile on the CPU, no GPU needed")
    p.add_argument("--codes", choices=("block", "pow2"), default="block",
                   help="activation codes: 4-bit block codes, or granularity pow2's folded codes (no-promotion "
                        "variants only are then meaningful)")
    p.add_argument("--outliers", action="store_true", help="input with a few 20x channels, as bench/kernels.py")
    p.add_argument("--only", default="", help="run only the variants whose label contains this text")
    args = p.parse_args()
    if args.compile_only:
        return compile_only()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    m = 32760
    if args.int_acc:
        return int_acc_section(m, dev)
    for name, n, k in SHAPES[:1] if args.quick else SHAPES:
        layer = make_layer(n, k, dev)
        hb, sb = ops.effective_blocks(layer, k)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        if args.outliers:
            x[:, :: max(1, k // 7)] *= 20
        q, s, l = ops.quantize_activations(x, hb, sb, 4, True, pow2=args.codes == "pow2")
        if l is None:  # folded pow2 codes: the block-promotion rows below then use l = 1
            l = torch.ones(k // sb, device=dev)
        flops = 2.0 * m * n * k
        ref = ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.bfloat16, sb, True)
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        t = bench(lambda: F.linear(x, w16, layer.bias))
        print(f"{name} N={n} K={k}: bf16 F.linear {t * 1e3:.3f} ms ({flops / t / 1e12:.0f} TFLOP/s)")
        t = bench(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias,
                                      torch.bfloat16, sb, True))
        print(f"  shipped triton GEMM        {t * 1e3:.3f} ms {flops / t / 1e12:6.0f} TOP/s")
        ref_int = ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.bfloat16, sb, False)
        t = bench(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias,
                                      torch.bfloat16, sb, False))
        print(f"  shipped, no promotion      {t * 1e3:.3f} ms {flops / t / 1e12:6.0f} TOP/s")
        for bm, bn, w, st, mode in VARIANTS:
            label = f"gluon BM{bm} BN{bn} w{w} s{st} {mode}"
            if args.only not in label:
                continue
            auto = not (mode == "ws-int" or mode.startswith("chain"))
            want = ref if auto else ref_int
            try:
                f = lambda: w4_gemm_gluon(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias,
                                          torch.bfloat16, sb, auto, BM=bm, BN=bn, num_warps=w, stages=st, mode=mode)
                y = f()
                torch.cuda.synchronize()
                err = ((y.float() - want.float()).abs().max() / want.float().abs().max()).item()
                t = bench(f)
                print(f"  {label:42s} {t * 1e3:.3f} ms {flops / t / 1e12:6.0f} TOP/s  max rel diff {err:.2e}")
            except Exception as e:
                print(f"  {label:42s} FAILED {type(e).__name__}: {str(e)[:300]}")
        del q, s, l, ref, ref_int, x, w16, layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
