"""Hopper (sm_90) GEMMs for the int8 codes when no per-K-block scale is applied (granularity "pow2"
at 4 bits, and methods without auto-scale), written in Gluon (imported lazily: needs triton 3.5+).

    Y[i, n] = D[n] * s_i * sum_k q[i, k] * (u[n, k] - z[n]) + bias[n]

Same result as `_triton._w4_gemm_kernel` without AUTO_SCALE (exact int32 sums, the same epilogue
arithmetic: the GPU tests compare them bit for bit), faster because the K loop is really
pipelined: Triton 3.6 waits for every int8 `tl.dot` before the next one (docs/kernel-notes.md),
here each wgmma is waited for one K step later. Weights are the MMA's M side, tokens its N side.
Two kernels, ops.w4_gemm picks by the number of tokens:
- `_w4_gemm_u8_kernel` (many tokens): the weights were unpacked by `_triton._unpack_weights_kernel`
  into an int8 workspace [N, K] (1.5 N K bytes of traffic, ~1-3% of the GEMM at 32760 tokens), so
  the loop only has TMA and wgmma: both tiles come into a ring of STAGES shared-memory slots.
  1.2-1.3x faster than the chain kernel at the Wan 14B shapes (docs/kernel-notes.md, the workspace study), which
  moved ~56 KB of shared memory and unpacked 16 KB per K step on the same pipes.
- `_w4_gemm_chain_kernel` (fewer tokens, where that pass would not pay): TMA brings the activation
  codes [BM, BK] and the packed weight bytes [BN, BK/2]; the bytes are read in the MMA's A-operand
  layout (a thread then holds byte column c where it holds K columns c and BK/2 + c), unpacked four
  per 32-bit op, and the [low plane | high plane] int8 tile goes to a double buffer in shared
  memory (an int8 register operand cannot be kept alive across Triton's wgmma wait, so ptxas
  would serialise).
A slot of the ring is refilled only after a barrier of all warps that follows their wait: every
warpgroup has then retired its wgmma on that slot (the TMA is issued by one thread).
Not runnable in Triton's interpreter: the CPU tests check the math through `_w4_gemm_kernel` and
compile these kernels for sm_90 (bench/compile_targets.py: no spills, one wgmma kept in flight, no
ptxas serialisation advisory).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._triton import UNPACK_PTX, gelu_tanh


@gluon.jit
def _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, k):
    """TMA of K step k's activation codes and weight tile (packed bytes: half as many columns) into
    slot k % STAGES."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BK: gl.constexpr = a_smem.shape[2]
    WK: gl.constexpr = w_smem.shape[2]
    slot = k % STAGES
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, k * BK], bars.index(slot), a_smem.index(slot))
    tma.async_copy_global_to_shared(w_desc, [off_n, k * WK], bars.index(slot), w_smem.index(slot))


@gluon.jit
def _tile_offsets(pid, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """(first token, first weight row) of output tile pid; GROUP_M token tiles share their weight tiles in L2."""
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m * BM, pid_n * BN


@gluon.constexpr_function
def _mma_layout(BM, num_warps):
    """The wgmma accumulator's layout for BM tokens (Triton's int8 wgmma is at most 128 wide)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, min(BM, 128), 32])


@gluon.constexpr_function
def _mma16_layout(BM, num_warps):
    """The accumulator layout of a 16-bit wgmma (K = 16 per instruction) over the same [BN, BM] tile as
    _mma_layout (the same registers: only the instruction's K differs)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, min(BM, 128), 16])


@gluon.constexpr_function
def _rank_rows_layout(RP, num_warps):
    """Rows of RP 16-bit values, 8 consecutive ones (16 bytes) per thread: for the LoRA tiles' loads."""
    tpr = min(RP // 8, 32)
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // tpr, tpr], warps_per_cta=[num_warps, 1],
                            order=[1, 0])


@gluon.constexpr_function
def _rank_smem_layout(rows, RP, dtype):
    return gl.NVMMASharedLayout.get_default_for([rows, RP], dtype)


@gluon.jit
def _scaled_tile(acc, d_ptr, s_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
    """D[n] * s_i + bias[n] on the int32 sums acc [BN rows, BM tokens], float32 (as _triton._gemm_store)."""
    BN: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    mma: gl.constexpr = _mma_layout(BM, num_warps)
    offs_n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    offs_m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    d = gl.load(d_ptr + offs_n % N)
    s = gl.load(s_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc.to(gl.float32) * d[:, None] * s[None, :]
    if HAS_BIAS:
        out += gl.load(bias_ptr + offs_n % N).to(gl.float32)[:, None]
    return out


@gluon.jit
def _lora_up(out, u_smem, t_smem, t_ptr, stride_t, lu_ptr, RANK, off_m, off_n, M, N, num_warps: gl.constexpr):
    """out [BN rows, BM tokens] float32 + U[row, :] . T[token, :]: a LoRA branch's up-projection (as
    _triton._lora_up) as one bf16/fp16 wgmma of depth RP accumulating into out. U [N, RANK] and T
    [M, RANK] (row stride stride_t) are read masked to RANK columns into u_smem [BN, RP] and t_smem
    [BM, RP]: views of the main loop's rings, whose every wgmma and TMA is complete by now."""
    BN: gl.constexpr = out.shape[0]
    BM: gl.constexpr = out.shape[1]
    RP: gl.constexpr = u_smem.shape[1]
    ld: gl.constexpr = _rank_rows_layout(RP, num_warps)
    CH: gl.constexpr = min(BM, BN, 32 * 32 * num_warps // RP)  # rows per copy: 32 values a thread (registers are short)
    r = gl.arange(0, RP, layout=gl.SliceLayout(0, ld))
    rc = gl.arange(0, CH, layout=gl.SliceLayout(1, ld))
    gl.thread_barrier()  # every warpgroup has retired its last wgmma on the rings these views reuse
    for i in gl.static_range(BN // CH):
        rn = (off_n + i * CH + rc) % N
        u_smem.slice(i * CH, CH).store(gl.load(lu_ptr + rn.to(gl.int64)[:, None] * RANK + r[None, :],
                                               mask=(rn < N)[:, None] & (r < RANK)[None, :], other=0.0))
    for i in gl.static_range(BM // CH):
        rm = off_m + i * CH + rc
        t_smem.slice(i * CH, CH).store(gl.load(t_ptr + rm.to(gl.int64)[:, None] * stride_t + r[None, :],
                                               mask=(rm < M)[:, None] & (r < RANK)[None, :], other=0.0))
    fence_async_shared()
    gl.thread_barrier()
    acc = gl.convert_layout(out, _mma16_layout(BM, num_warps))
    acc = warpgroup_mma(u_smem, t_smem.permute((1, 0)), acc, use_acc=True, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))


@gluon.jit
def _store_tile(out, y_ptr, off_m, off_n, M, N, GELU: gl.constexpr, num_warps: gl.constexpr):
    """The rest of the epilogue (as _triton._gemm_store): out [BN rows, BM tokens] float32 rounded
    (GELU of the rounded value, rounded again), stored as Y[token, row] (masked)."""
    BN: gl.constexpr = out.shape[0]
    BM: gl.constexpr = out.shape[1]
    ol: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4],
                                        warps_per_cta=[1, num_warps], order=[0, 1])  # rows contiguous in Y
    out = out.to(y_ptr.dtype.element_ty)
    if GELU:  # the fused feed-forward GELU, on the rounded output: the Triton GEMM's very function
        out = gelu_tanh(out.to(gl.float32)).to(y_ptr.dtype.element_ty)
    out = gl.convert_layout(out, ol)
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, ol))
    om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, ol))
    gl.store(y_ptr + om.to(gl.int64)[None, :] * N + on[:, None], out, mask=(on < N)[:, None] & (om < M)[None, :])


@gluon.jit
def _w4_gemm_u8_kernel(
    a_desc, w_desc, d_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
    GELU: gl.constexpr = False, t_ptr=None, lu_ptr=None, stride_t=0, RANK=0, LORA: gl.constexpr = False,
    RP: gl.constexpr = 16,
):
    """w_desc: the unpacked int8 weights (u - z) [N, K] in the codes' layout. LORA: + T . U^T before the
    rounding (_lora_up; U's tile [BN, RP] reuses the weight ring, T's [BM, RP] the activation ring:
    they fit where STAGES * BK >= 2 RP)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]  # tokens per program (the MMA's N side)
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]  # weight rows per program (the MMA's M side)
    NK: gl.constexpr = K // BK
    gl.static_assert(NK >= STAGES, "the host caps STAGES at K // BK")
    gl.static_assert(STAGES >= 2 or NK == 1, "one stage would wait for a step before loading it")
    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BM, BN, GROUP_M)

    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, i)

    acc = gl.zeros((BN, BM), gl.int32, _mma_layout(BM, num_warps))
    for k in range(NK):
        slot = k % STAGES
        mbarrier.wait(bars.index(slot), (k // STAGES) & 1)
        acc = warpgroup_mma(w_smem.index(slot), a_smem.index(slot).permute((1, 0)), acc, use_acc=k > 0,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if k >= 1 and k - 1 + STAGES < NK:  # step k-1's wgmma is done in every warpgroup: refill its slot
            gl.thread_barrier()
            _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, k - 1 + STAGES)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    out = _scaled_tile(acc, d_ptr, s_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS, num_warps)
    if LORA:  # (the host checks the fit: ops.gluon_lora_fits)
        gl.static_assert(STAGES * BK >= 2 * RP, "the LoRA tiles do not fit the rings")
        dt: gl.constexpr = lu_ptr.dtype.element_ty
        u_smem = w_smem._reinterpret(dt, [BN, RP], _rank_smem_layout(BN, RP, dt))
        t_smem = a_smem._reinterpret(dt, [BM, RP], _rank_smem_layout(BM, RP, dt))
        out = _lora_up(out, u_smem, t_smem, t_ptr, stride_t, lu_ptr, RANK, off_m, off_n, M, N, num_warps)
    _store_tile(out, y_ptr, off_m, off_n, M, N, GELU, num_warps)


@gluon.jit
def _w4_gemm_chain_kernel(
    a_desc, w_desc, z_ptr, d_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
    GELU: gl.constexpr = False, t_ptr=None, lu_ptr=None, stride_t=0, RANK=0, LORA: gl.constexpr = False,
    RP: gl.constexpr = 16,
):
    """w_desc: the packed weight bytes [N, K/2]; z_ptr: the zero points. LORA: as _w4_gemm_u8_kernel
    (U's tile reuses the unpacked-weight double buffer, T's the activation ring: BK >= RP and
    STAGES * BK >= 2 RP)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]  # tokens per program (the MMA's N side)
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]  # weight rows per program (the MMA's M side)
    NK: gl.constexpr = K // BK
    gl.static_assert(NK >= STAGES, "the host caps STAGES at K // BK")
    gl.static_assert(STAGES >= 2 or NK == 1, "one stage would wait for a step before loading it")
    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BM, BN, GROUP_M)

    mma: gl.constexpr = _mma_layout(BM, num_warps)
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    rows = (off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, a_reg))) % N
    z = gl.broadcast(gl.load(z_ptr + rows).to(gl.uint8)[:, None], gl.zeros((BN, BK // 2), gl.uint8, a_reg))[0]

    a_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], w_desc.layout)
    u_smem = gl.allocate_shared_memory(gl.int8, [2, BN, BK], a_desc.layout)  # int8 rows of BK: same swizzle
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, i)

    acc = gl.zeros((BN, BM), gl.int32, mma)
    for k in range(NK):
        slot = k % STAGES
        mbarrier.wait(bars.index(slot), (k // STAGES) & 1)
        wp = w_smem.index(slot).load(a_reg)
        lo, hi = gl.inline_asm_elementwise(asm=UNPACK_PTX, constraints="=r,=r,r,r", args=[wp, z],
                                           dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
        # a warpgroup writes only the rows its own wgmma reads; their last reader, step k-2's
        # wgmma, was retired by the previous wait
        u = u_smem.index(k % 2)
        u.store(gl.reshape(gl.permute(gl.join(lo, hi), (0, 2, 1)), (BN, BK)))
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(u, a_smem.index(slot).permute((1, 0)), acc, use_acc=k > 0, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        if k >= 1 and k - 1 + STAGES < NK:  # step k-1's wgmma is done in every warpgroup: refill its slot
            gl.thread_barrier()
            _load_step(a_desc, w_desc, a_smem, w_smem, bars, off_m, off_n, k - 1 + STAGES)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    out = _scaled_tile(acc, d_ptr, s_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS, num_warps)
    if LORA:  # (the host checks the fit: ops.gluon_lora_fits)
        gl.static_assert(BK >= RP and STAGES * BK >= 2 * RP, "the LoRA tiles do not fit the buffers")
        dt: gl.constexpr = lu_ptr.dtype.element_ty
        u_lora = u_smem._reinterpret(dt, [BN, RP], _rank_smem_layout(BN, RP, dt))
        t_lora = a_smem._reinterpret(dt, [BM, RP], _rank_smem_layout(BM, RP, dt))
        out = _lora_up(out, u_lora, t_lora, t_ptr, stride_t, lu_ptr, RANK, off_m, off_n, M, N, num_warps)
    _store_tile(out, y_ptr, off_m, off_n, M, N, GELU, num_warps)
