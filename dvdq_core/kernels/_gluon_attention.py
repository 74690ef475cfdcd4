"""The sm_90 8-bit attention kernel with FP8 P.V, written in Gluon (imported lazily: needs triton 3.5+):
the same math and the same inputs as `_attention._attention_kernel` (quantize's codes and scales), in
the form FlashAttention-3 runs on Hopper, which Triton 3.6 does not compile plain Triton to
(docs/attention.md):

- One program takes 128 query rows of one head, in two consumer warpgroups of 64 rows each, plus one
  producer warp. The producer brings each key block's K codes and V^T codes by TMA into a ring of
  STAGES slots (one mbarrier per tensor and slot says "full", one per slot says "both consumers are
  done with it"). The two warpgroups share every K / V tile (half the L2 traffic of two 64-row
  programs) and never wait for each other: no CTA-wide barrier in the loop, so that one warpgroup's
  softmax can run while the other's MMAs hold the tensor cores (intended; measured no faster than the
  Triton kernel, where the MMAs and the softmax add up too: docs/attention.md).
- Per warpgroup and key block j the MMAs come in one batch: P_(j-1).V_(j-1) and Q.K_j^T are issued
  back to back (async), then waited for together; then the ALU work: acc = acc * alpha + that P.V,
  and block j's online softmax. The batch keeps the tensor cores busy while the other warpgroup is
  in its ALU phase.
- Q's codes sit in a shared-memory tile per warpgroup (loaded once); P goes from the score layout to
  the FP8 operand layout without moving (_p_operand).
Not runnable in Triton's interpreter: the CPU tests compile it for sm_90 (bench/compile_targets.py);
on the GPU it is compared with the reference and with the Triton kernel (tests/test_attention.py).
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

from .. import attention as _core

P_SHIFT: gl.constexpr = gl.constexpr(_core.P_SHIFT)
WG_ROWS: gl.constexpr = gl.constexpr(64)  # query rows per consumer warpgroup (one wgmma M)
MAGIC_BITS: gl.constexpr = gl.constexpr(0x4B400000)  # the bits of the float32 1.5 * 2**23 (its grid step is 1)
MAGIC_BIAS: gl.constexpr = gl.constexpr(12582912.0)


@gluon.constexpr_function
def _acc_layout(n):
    """The accumulator layout of a 64-row, n-wide 8-bit wgmma (K = 32 per instruction) on one warpgroup."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 32])


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, empty, bh, LKP, n_blocks):
    """TMA of K block j ([BN, D] codes) and V^T block j ([D, BN]) into slot j % STAGES, once both
    consumers have released the slot's previous tile."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    D: gl.constexpr = k_smem.shape[2]
    for j in range(n_blocks):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)  # (a fresh barrier passes phase 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [bh * LKP + j * BN, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [bh * D, j * BN], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _score_start(R: gl.constexpr, BN: gl.constexpr, MAGIC: gl.constexpr):
    """The scores' wgmma accumulator start: MAGIC_BITS (_softmax) or zeros (not read: use_acc=False)."""
    return gl.full([R, BN], MAGIC_BITS if MAGIC else 0, gl.int32, _acc_layout(BN))


@gluon.jit
def _softmax(s, m_i, l_i, qs, ks, j, Lk, MASK: gl.constexpr, MAGIC: gl.constexpr):
    """Online-softmax update of key block j from its int32 scores s (as _attention._softmax_step, FP8): P
    (float32), alpha, l, m. MAGIC: s was accumulated from MAGIC_BITS, so its bits read as float32 are
    exactly 1.5 * 2**23 + the score (|score| < 2**22) and one exact subtraction replaces the int -> float
    conversion (the same numbers; measured no faster, docs/attention.md)."""
    BN: gl.constexpr = s.shape[1]
    sl: gl.constexpr = s.type.layout
    if MAGIC:
        x = s.to(gl.float32, bitcast=True) - MAGIC_BIAS
    else:
        x = s.to(gl.float32)
    if MASK:
        cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, sl))
        x = gl.where((cols < Lk)[None, :], x, float("-inf"))
    c = qs * ks
    m_new = gl.maximum(m_i, gl.max(x, 1) * c)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(gl.fma(x, c[:, None], -(m_new - P_SHIFT)[:, None]))
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, l_i, m_new


_FP8X4_PTX = gl.constexpr("""{
.reg .b16 lo, hi;
cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
mov.b32 $0, {lo, hi};
}""")


@gluon.jit
def _p_operand(p, p_l: gl.constexpr):
    """P [64, BN] FP8 in the score accumulator's layout -> the P.V wgmma's register operand, without moving
    a byte: per 32 keys a thread holds keys 8g + 2t + e (g < 4, t = lane % 4, e < 2) and the operand wants
    keys 4t + u and 16 + 4t + u (u < 4), so the tensor is re-indexed (position 16 (g // 2) + 4t + 2 (g % 2)
    + e takes key 8g + 2t + e) and V's keys are stored in that order (`v_key_order`)."""
    R: gl.constexpr = p.shape[0]
    BN: gl.constexpr = p.shape[1]
    x = gl.reshape(p, [R, BN // 32, 2, 2, 4, 2])  # key = 32 c + 16 g1 + 8 g0 + 2 t + e
    x = gl.permute(x, (0, 1, 2, 4, 3, 5))  # position = 32 c + 16 g1 + 4 t + 2 g0 + e
    x = gl.convert_layout(gl.reshape(x, [R, BN]), p_l)
    # float32 -> FP8 e4m3, four keys of a row per 32-bit register (as Triton's cast: rn, satfinite)
    return gl.inline_asm_elementwise(asm=_FP8X4_PTX, constraints="=r,r,r,r,r", args=[x], dtype=gl.float8e4nv,
                                     is_pure=True, pack=4)


@gluon.jit
def _step(acc, p, alpha, l_i, m_i, q, qs, k_smem, v_smem, k_ready, v_ready, empty, ks_ptr, j, Lk, turn_mine, turn_other,
          pingpong, MASK: gl.constexpr, MAGIC: gl.constexpr):
    """Key block j for one warpgroup: the MMA batch (P.V of block j-1, then block j's scores, issued back to
    back and waited for together), then the ALU phase (acc update, block j's softmax) while the other
    warpgroup's MMAs run. pingpong != 0: the two warpgroups take turns issuing their batches (FlashAttention-3's
    scheduling barrier, here a pair of mbarriers): this one waits for its turn and hands it over once issued."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    D: gl.constexpr = k_smem.shape[2]
    o_l: gl.constexpr = acc.type.layout
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=4)
    prev = (j - 1) % STAGES
    slot = j % STAGES
    ks = gl.load(ks_ptr + j)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
    if pingpong != 0:
        mbarrier.wait(turn_mine, (j - 1) & 1)
    o = warpgroup_mma(_p_operand(p, p_l), v_smem.index(prev).permute((1, 0)),
                      gl.zeros([acc.shape[0], D], gl.float32, o_l), use_acc=False, is_async=True)
    s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), _score_start(acc.shape[0], BN, MAGIC), use_acc=MAGIC,
                      is_async=True)
    if pingpong != 0:
        mbarrier.arrive(turn_other, count=1)
    o, s = warpgroup_mma_wait(num_outstanding=0, deps=(o, s))
    mbarrier.arrive(empty.index(prev), count=1)  # this warpgroup is done with slot prev
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None] + o
    p, alpha, l_i, m_i = _softmax(s, m_i, l_i, qs, ks, j, Lk, MASK, MAGIC)
    return acc, p, alpha, l_i, m_i


@gluon.jit
def _consumer(q_smem, turn_mine, turn_other, k_smem, v_smem, k_ready, v_ready, empty, q_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr,
              o_ptr, bh, H, Lq, Lk, LQP, LKP, n_full, tail, sob, soh, sol, pingpong, row0, MAGIC: gl.constexpr):
    """One warpgroup's 64 query rows from row0, of head bh: the key loop and the epilogue. tail: 1 where a last,
    partial key block follows the n_full whole ones. (Run-time values only: a worker partition takes no
    constexpr in Triton 3.6: `_consumer_*` fix MAGIC.)"""
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    D: gl.constexpr = k_smem.shape[2]
    s_l: gl.constexpr = _acc_layout(BN)
    o_l: gl.constexpr = _acc_layout(D)
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=4)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)
    b = bh // H
    h = bh % H
    bh64 = bh.to(gl.int64)

    # Q's codes into this warpgroup's shared-memory tile: the scores' wgmma reads them from there (as a
    # register operand they would hold 16 registers the loop needs)
    ql: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[32 * 16 // D, D // 16],
                                        warps_per_cta=[4, 1], order=[1, 0])
    qr = row0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, ql))
    qd = gl.arange(0, D, layout=gl.SliceLayout(0, ql))
    q_smem.store(gl.load(q_ptr + bh64 * LQP * D + qr[:, None] * D + qd[None, :]))
    fence_async_shared()
    gl.thread_barrier()  # (this warpgroup's warps)
    q = q_smem
    qs = gl.load(qs_ptr + bh64 * LQP + row0 + gl.arange(0, WG_ROWS, layout=row_l))
    ks_ptr += bh64 * (LKP // BN)

    m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([WG_ROWS], gl.float32, row_l)
    acc = gl.zeros([WG_ROWS, D], gl.float32, o_l)

    # block 0: its scores alone (the host runs this kernel only where n_full >= 1: block 0 is never masked)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), _score_start(WG_ROWS, BN, MAGIC), use_acc=MAGIC,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    p, alpha, l_i, m_i = _softmax(s, m_i, l_i, qs, gl.load(ks_ptr), 0, Lk, False, MAGIC)
    for j in range(1, n_full):
        acc, p, alpha, l_i, m_i = _step(acc, p, alpha, l_i, m_i, q, qs, k_smem, v_smem, k_ready, v_ready, empty,
                                        ks_ptr, j, Lk, turn_mine, turn_other, pingpong, False, MAGIC)
    if tail != 0:  # the last, partial key block (its padded keys' codes are zeros: masked in the scores)
        acc, p, alpha, l_i, m_i = _step(acc, p, alpha, l_i, m_i, q, qs, k_smem, v_smem, k_ready, v_ready, empty,
                                        ks_ptr, n_full, Lk, turn_mine, turn_other, pingpong, True, MAGIC)
    n = n_full + tail  # blocks: the last one's P.V
    last = (n - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
    o = warpgroup_mma(_p_operand(p, p_l), v_smem.index(last).permute((1, 0)), gl.zeros([WG_ROWS, D], gl.float32, o_l),
                      use_acc=False, is_async=True)
    o = warpgroup_mma_wait(num_outstanding=0, deps=(o,))
    mbarrier.arrive(empty.index(last), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None] + o

    # epilogue: / l, times V's per-channel scale, plus its mean; rows past Lq are not stored
    od = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    orow = row0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, o_l))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    out = out * gl.load(vs_ptr + bh * D + od)[None, :] + gl.load(vm_ptr + bh * D + od)[None, :]
    optr = o_ptr + b.to(gl.int64) * sob + h.to(gl.int64) * soh + orow.to(gl.int64)[:, None] * sol + od[None, :]
    gl.store(optr, out.to(o_ptr.dtype.element_ty), mask=(orow < Lq)[:, None])


@gluon.jit
def _consumer_exact(q_smem, turn_mine, turn_other, k_smem, v_smem, k_ready, v_ready, empty, q_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr,
              o_ptr, bh, H, Lq, Lk, LQP, LKP, n_full, tail, sob, soh, sol, pingpong, row0):
    _consumer(q_smem, turn_mine, turn_other, k_smem, v_smem, k_ready, v_ready, empty, q_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr,
              o_ptr, bh, H, Lq, Lk, LQP, LKP, n_full, tail, sob, soh, sol, pingpong, row0, True)


@gluon.jit
def _consumer_convert(q_smem, turn_mine, turn_other, k_smem, v_smem, k_ready, v_ready, empty, q_ptr, qs_ptr, ks_ptr,
                      vs_ptr, vm_ptr, o_ptr, bh, H, Lq, Lk, LQP, LKP, n_full, tail, sob, soh, sol, pingpong, row0):
    _consumer(q_smem, turn_mine, turn_other, k_smem, v_smem, k_ready, v_ready, empty, q_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr,
              o_ptr, bh, H, Lq, Lk, LQP, LKP, n_full, tail, sob, soh, sol, pingpong, row0, False)


# run-time ints that can be 1 (Triton would turn them into constexprs, which a worker partition cannot take);
# the output strides are never 1 (head dim >= 64) and keep their divisibility hints
_INTS = ("H", "Lq", "Lk", "LQP", "LKP", "n_full", "tail", "pingpong")
_STRIDES = ("sob", "soh", "sol")


@gluon.jit(do_not_specialize=_INTS)
def _attention_ws_kernel(q_ptr, qs_ptr, k_desc, ks_ptr, v_desc, vs_ptr, vm_ptr, o_ptr, H, Lq, Lk, LQP, LKP, n_full,
                         tail, sob, soh, sol, pingpong, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         MAGIC: gl.constexpr):
    """Grid (LQP / 128, B x H); num_warps 4 (the first consumer), plus 4 + 1 warps (module docstring). The
    output's last stride is 1."""
    BN: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    bh = gl.program_id(1)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, D], k_desc.layout)
    q_smem = gl.allocate_shared_memory(gl.int8, [2, WG_ROWS, D], gl.NVMMASharedLayout.get_default_for([WG_ROWS, D], gl.int8))
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, D, BN], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
    n_blocks = n_full + tail
    row0 = gl.program_id(0) * (2 * WG_ROWS)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # (pingpong) whose batch is next
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.arrive(turn.index(0), count=1)  # the first warpgroup starts
    cargs = (k_smem, v_smem, k_ready, v_ready, empty, q_ptr, qs_ptr, ks_ptr, vs_ptr, vm_ptr, o_ptr, bh, H, Lq, Lk,
             LQP, LKP, n_full, tail, sob, soh, sol, pingpong)
    if MAGIC:
        gl.warp_specialize([
            (_consumer_exact, (q_smem.index(0), turn.index(0), turn.index(1)) + cargs + (row0, )),
            (_consumer_exact, (q_smem.index(1), turn.index(1), turn.index(0)) + cargs + (row0 + WG_ROWS, )),
            (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, empty, bh, LKP, n_blocks)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_consumer_convert, (q_smem.index(0), turn.index(0), turn.index(1)) + cargs + (row0, )),
            (_consumer_convert, (q_smem.index(1), turn.index(1), turn.index(0)) + cargs + (row0 + WG_ROWS, )),
            (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, empty, bh, LKP, n_blocks)),
        ], [4, 1], [CONSUMER_REGS, 24])
