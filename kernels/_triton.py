"""The Triton kernels (imported lazily: this module needs triton).

K (the width) is a compile-time constant everywhere: a model has only a few widths, and loops
with run-time bounds break Triton 3.6's interpreter under numpy >= 2.4.

Layout shared by the activation kernels and the GEMM (internal to this package): the int8 codes
of X are written with the columns of every group of 64 permuted to "the 32 even columns, then the
32 odd columns". A byte of the packed weight holds an even column in its low nibble and the next
odd column in its high nibble, so the GEMM multiplies the first half of each group with the low
nibbles and the second half with the high nibbles: two plain int8 dots, no interleaving.
The permutation is folded into the rotation matrix (`R = blockdiag(+-1 H)[:, perm]`, or `P` when
rotation is off), so it costs nothing.
"""
import triton
import triton.language as tl

GROUP = tl.constexpr(64)  # permutation group (columns): even half then odd half
EPS = tl.constexpr(1e-8)


@triton.jit
def _round_to(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> dtype, round to nearest even. The interpreter truncates float32 -> bf16, so there
    the rounding is done on the bits first (the final cast is then exact)."""
    if INTERPRET and dtype == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _load_rotation(r_ptr, R: tl.constexpr, INTERPRET: tl.constexpr):
    """The R x R +-1 matrix (blockdiag Hadamard pattern, columns permuted), loaded once per program."""
    offs = tl.arange(0, R)
    rmat = tl.load(r_ptr + offs[:, None] * R + offs[None, :])
    if INTERPRET:  # the interpreter's dot mishandles 16-bit floats: go through float32 (exact here)
        rmat = rmat.to(tl.float32)
    return rmat


@triton.jit
def _rotate_tile(x, rmat, rscale, BM: tl.constexpr, C: tl.constexpr, R: tl.constexpr, INTERPRET: tl.constexpr):
    """x [BM, C] (input dtype) @ blockdiag(rmat) * rscale -> float32 [BM, C], columns permuted.

    rmat holds +-1 (exact in any dtype); the dot accumulates in float32 and rscale = 1/sqrt(block):
    Xr in float32, as the reference rotates the float32 input.
    """
    xt = tl.reshape(x, (BM * C // R, R))
    if INTERPRET:
        xt = xt.to(tl.float32)
    xr = tl.dot(xt, rmat, out_dtype=tl.float32) * rscale
    return tl.reshape(xr, (BM, C))


@triton.jit
def _absmax_kernel(
    x_ptr, r_ptr, rscale, rowmax_ptr, l_ptr, M, K: tl.constexpr, NT: tl.constexpr, stride_xm,
    SB: tl.constexpr, TG: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
    AUTO_SCALE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 1 over BM rows: per (row, TG-column group) absmax of Xr into rowmax [M, K // TG]; per
    scale block absmax over all rows into l [K // SB] (atomic max; l is zeroed by the caller)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        xa = tl.abs(_rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET))
        rmax = tl.max(tl.reshape(xa, (BM, C // TG, TG)), axis=2)  # [BM, C // TG]
        offs_t = c0 // TG + tl.arange(0, C // TG)
        tl.store(rowmax_ptr + rows[:, None] * NT + offs_t[None, :], rmax, mask=m_mask[:, None])
        if AUTO_SCALE:
            cmax = tl.max(rmax, axis=0)  # [C // TG]; padded rows loaded as 0 never win
            tl.atomic_max(l_ptr + (offs_t * TG) // SB, cmax)


@triton.jit
def _quantize_kernel(
    x_ptr, r_ptr, rscale, rowmax_ptr, l_ptr, q_ptr, s_ptr, M, K: tl.constexpr, NT: tl.constexpr, stride_xm, qmax,
    SB: tl.constexpr, TG: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
    TB: tl.constexpr, AUTO_SCALE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 2 over BM rows (IEEE divisions as the reference: a rounding tie then rounds alike): s_i = max(max_j |Xr_ij| / l_j, EPS) / qmax from the small rowmax table,
    then q = clamp(rint(Xr / l / s_i), -qmax - 1, qmax) as int8 (permuted layout), and s [M]."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    smax = tl.zeros((BM,), dtype=tl.float32)
    for t0 in range(0, NT, TB):
        offs_t = t0 + tl.arange(0, TB)
        t_mask = offs_t < NT
        rm = tl.load(rowmax_ptr + rows[:, None] * NT + offs_t[None, :], mask=m_mask[:, None] & t_mask[None, :], other=0.0)
        if AUTO_SCALE:
            lt = tl.maximum(tl.load(l_ptr + (offs_t * TG) // SB, mask=t_mask, other=1.0), EPS)
            rm = tl.math.div_rn(rm, lt[None, :])
        smax = tl.maximum(smax, tl.max(rm, axis=1))
    s = tl.math.div_rn(tl.maximum(smax, EPS), qmax)
    tl.store(s_ptr + offs_m, s, mask=m_mask)
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        xs = _rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET)
        if AUTO_SCALE:
            lc = tl.maximum(tl.load(l_ptr + offs_c // SB), EPS)
            xs = tl.math.div_rn(xs, lc[None, :])
        v = tl.math.div_rn(xs, s[:, None])
        if INTERPRET:  # same result for |v| < 2**22: adding 1.5 * 2**23 rounds half to even
            v = (v + 12582912.0) - 12582912.0
        else:
            v = tl.extra.cuda.libdevice.rint(v)  # round half to even, as torch.round
        v = tl.minimum(tl.maximum(v, -qmax - 1.0), qmax * 1.0)
        tl.store(q_ptr + rows[:, None] * K + offs_c[None, :], v.to(tl.int8), mask=m_mask[:, None])


@triton.jit
def _rotate_kernel(x_ptr, r_ptr, rscale, y_ptr, M, K: tl.constexpr, stride_xm, C: tl.constexpr, R: tl.constexpr,
                   BM: tl.constexpr, INTERPRET: tl.constexpr):
    """16-bit activations: Xr (permuted layout) in the input dtype, for the dequantizing GEMM."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        xr = _rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET)
        tl.store(y_ptr + rows[:, None] * K + offs_c[None, :], _round_to(xr, x.dtype, INTERPRET), mask=m_mask[:, None])


@triton.jit
def _unpack_asm(wp, z):
    """Packed bytes -> (low nibble - z, high nibble - z) as int8, four bytes per 32-bit op:
    t = nibble + (0x80 - z) per byte (no carry: <= 143), then t ^ 0x80 = nibble - z (two's complement)."""
    zb = tl.broadcast_to(z, wp.shape)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 nz, t;
        sub.u32 nz, 0x80808080, $3;
        and.b32 t, $2, 0x0F0F0F0F;
        add.u32 t, t, nz;
        xor.b32 $0, t, 0x80808080;
        shr.u32 t, $2, 4;
        and.b32 t, t, 0x0F0F0F0F;
        add.u32 t, t, nz;
        xor.b32 $1, t, 0x80808080;
        }""",
        constraints="=r,=r,r,r", args=[wp, zb], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _w4_gemm_kernel(
    a_ptr, w_ptr, z_ptr, d_ptr, l_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: tl.constexpr,
    SB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    A_FLOAT: tl.constexpr, AUTO_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
    ASM_UNPACK: tl.constexpr = False, W_INT8: tl.constexpr = False, PROMOTE: tl.constexpr = True,
    ONE_DOT: tl.constexpr = False,
):
    """Y = D[n] * s_i * sum_b l_b * sum_{k in b} q[i, k] * (u[n, k] - z[n]) + bias[n].

    a: int8 codes [M, K] (permuted layout; A_FLOAT: rotated activations in bf16/fp16, s = l = 1).
    w: packed 4-bit codes [N, K // 2] (low nibble = even column). Each BK tile lies inside one
    scale block (BK divides SB): its int32 dot is scaled by l_b into a float32 accumulator.
    SWAP computes the transposed tile (weights as the MMA's M side, taken from registers).
    ASM_UNPACK unpacks four bytes per 32-bit instruction (inline PTX; not in the interpreter).
    ONE_DOT re-interleaves the unpacked halves in registers into the permuted order and issues one
    dot of depth BK instead of two of depth BK / 2.
    W_INT8 / PROMOTE=False are benchmark-only variants (w already unpacked to int8 [N, K] in the
    permuted layout / no per-block scaling): they bound what unpacking and scaling cost.
    """
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
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    n_mask = offs_n < N
    offs_h = tl.arange(0, BK // 2)
    a_cols = (offs_h // 32) * 64 + offs_h % 32  # even half of each permuted group of 64
    a_ptrs = a_ptr + rows[:, None] * K + a_cols[None, :]
    if W_INT8:
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + a_cols[None, :]
    else:
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + offs_h[None, :]
    z = tl.load(z_ptr + offs_n, mask=n_mask, other=0).to(tl.int8)

    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        acc_i = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_i = tl.zeros((BM, BN), dtype=tl.int32)
    offs_k = tl.arange(0, BK)
    af_ptrs = a_ptr + rows[:, None] * K + offs_k[None, :]  # ONE_DOT: the whole tile, as stored
    for k0 in range(0, K, BK):
        if EVEN_K:  # no K mask (a mask on the contiguous axis would block vector loads)
            am = m_mask[:, None]
            afm = m_mask[:, None]
            wm = n_mask[:, None]
        else:
            k_ok = (k0 + 2 * offs_h) < K
            am = m_mask[:, None] & k_ok[None, :]
            afm = m_mask[:, None] & ((k0 + offs_k) < K)[None, :]
            wm = n_mask[:, None] & k_ok[None, :]
        if ONE_DOT and not A_FLOAT:
            a_full = tl.load(af_ptrs, mask=afm, other=0)
        else:
            a_e = tl.load(a_ptrs, mask=am, other=0)
            a_o = tl.load(a_ptrs + 32, mask=am, other=0)
        if W_INT8:
            w_lo = tl.load(w_ptrs, mask=wm, other=0)
            w_hi = tl.load(w_ptrs + 32, mask=wm, other=0)
        else:
            wp = tl.load(w_ptrs, mask=wm, other=0)
        if not W_INT8:
            if ASM_UNPACK and not INTERPRET:
                w_lo, w_hi = _unpack_asm(wp, z.to(tl.uint8, bitcast=True)[:, None])
            else:
                w_lo = (wp & 15).to(tl.int8) - z[:, None]
                w_hi = (wp >> 4).to(tl.int8) - z[:, None]
        if A_FLOAT:
            if INTERPRET:  # the interpreter's dot mishandles 16-bit floats; float32 is exact here
                a_e = a_e.to(tl.float32)
                a_o = a_o.to(tl.float32)
            w_lo = w_lo.to(a_e.dtype)
            w_hi = w_hi.to(a_e.dtype)
            if SWAP:
                acc += tl.dot(w_lo, tl.trans(a_e)) + tl.dot(w_hi, tl.trans(a_o))
            else:
                acc += tl.dot(a_e, tl.trans(w_lo)) + tl.dot(a_o, tl.trans(w_hi))
        else:
            if ONE_DOT:
                w_full = tl.reshape(tl.permute(tl.join(tl.reshape(w_lo, (BN, BK // 64, 32)),
                                                       tl.reshape(w_hi, (BN, BK // 64, 32))), (0, 1, 3, 2)), (BN, BK))
                if SWAP:
                    part = tl.dot(w_full, tl.trans(a_full), out_dtype=tl.int32)
                else:
                    part = tl.dot(a_full, tl.trans(w_full), out_dtype=tl.int32)
            elif SWAP:
                part = tl.dot(w_lo, tl.trans(a_e), out_dtype=tl.int32)
                part += tl.dot(w_hi, tl.trans(a_o), out_dtype=tl.int32)
            else:
                part = tl.dot(a_e, tl.trans(w_lo), out_dtype=tl.int32)
                part += tl.dot(a_o, tl.trans(w_hi), out_dtype=tl.int32)
            if not PROMOTE:
                acc_i += part
            elif AUTO_SCALE:
                lb = tl.maximum(tl.load(l_ptr + k0 // SB), EPS)
                acc += part.to(tl.float32) * lb
            else:
                acc += part.to(tl.float32)
        a_ptrs += BK
        af_ptrs += BK
        w_ptrs += BK if W_INT8 else BK // 2
    if not PROMOTE:
        acc = acc_i.to(tl.float32)

    d = tl.load(d_ptr + offs_n, mask=n_mask, other=0.0)
    y_ptrs = y_ptr + rows[:, None] * N + offs_n[None, :]
    if SWAP:
        acc = acc * d[:, None]
        if not A_FLOAT:
            acc = acc * tl.load(s_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        out = tl.trans(_round_to(acc, y_ptr.dtype.element_ty, INTERPRET))
    else:
        acc = acc * d[None, :]
        if not A_FLOAT:
            acc = acc * tl.load(s_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = _round_to(acc, y_ptr.dtype.element_ty, INTERPRET)
    tl.store(y_ptrs, out, mask=m_mask[:, None] & n_mask[None, :])
