"""The Triton kernels (imported lazily: this module needs triton).

K (the width) is a compile-time constant everywhere: a model has only a few widths, and loops
with run-time bounds break Triton 3.6's interpreter under numpy >= 2.4.

Layout shared by the activation kernels and the GEMM (internal to this package): the int8 codes
of X are written with the columns of every layout group of G columns (G = 128 where the width and
the scale block allow it, else 64; ops.layout_group) permuted to "the G/2 even columns, then the
G/2 odd columns". A byte of the packed weight holds an even column in its low nibble and the next
odd column in its high nibble, so for a K tile of one group the GEMM concatenates the unpacked low
and high nibble planes along K (in registers, no shuffles) and issues ONE int8 dot of depth G with
the contiguous activation tile. The permutation is folded into the rotation matrix
(`R = blockdiag(+-1 H)[:, perm]`, or `P` when rotation is off), so it costs nothing.
"""
import triton
import triton.language as tl

EPS = tl.constexpr(1e-8)
# Four packed weight bytes ($2) and four zero points ($3) -> low ($0) and high ($1) nibbles - z as
# int8 (_unpack_asm; the Gluon kernels of kernels/_gluon.py use it too).
UNPACK_PTX = tl.constexpr("""{
        .reg .b32 nz, t;
        sub.u32 nz, 0x80808080, $3;
        and.b32 t, $2, 0x0F0F0F0F;
        add.u32 t, t, nz;
        xor.b32 $0, t, 0x80808080;
        shr.u32 t, $2, 4;
        and.b32 t, t, 0x0F0F0F0F;
        add.u32 t, t, nz;
        xor.b32 $1, t, 0x80808080;
        }""")


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
def _rounded_apart(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 v rounded to dtype and back, as an opaque step: written as casts, Triton narrows
    `x + round(y * g)` to bf16/fp16 arithmetic and LLVM contracts that into one fma, which drops the
    product's rounding (seen on an H100: one ulp off the host in ~1% of the elements)."""
    if INTERPRET or dtype == tl.float32:
        return _round_to(v, dtype, INTERPRET).to(tl.float32)
    if dtype == tl.bfloat16:
        r = tl.inline_asm_elementwise("cvt.rn.bf16.f32 $0, $1;", "=h,r", [v], dtype=tl.bfloat16, is_pure=True, pack=1)
    else:
        r = tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,r", [v], dtype=tl.float16, is_pure=True, pack=1)
    return r.to(tl.float32)


# GELU (tanh form) as v * (1 - 1 / (1 + 2**z)), z = 2 sqrt(2/pi) log2(e) (v + 0.044715 v^3): the same
# function as torch's 0.5 v (1 + tanh(u)) in five FMA-pipe ops and two MUFU ones (ex2, rcp), as it
# runs in the GEMM epilogues (this one and _gluon's, which calls it) where every instruction costs;
# it saturates to -0 like torch's.
GELU_C1 = tl.constexpr(2.302208198144325)  # 2 sqrt(2/pi) log2(e)
GELU_C2 = tl.constexpr(0.1029432395800235)  # GELU_C1 * 0.044715


@triton.jit
def gelu_tanh(v):
    """GELU, tanh form, float32 (see GELU_C1). z is capped at 126 so 2**z stays finite."""
    r = 1.0 / (1.0 + tl.exp2(tl.minimum(v * (GELU_C1 + GELU_C2 * (v * v)), 126.0)))
    return v - v * r


@triton.jit
def _load_rotation(r_ptr, R: tl.constexpr, INTERPRET: tl.constexpr):
    """The R x R +-1 matrix (blockdiag Hadamard pattern), loaded once per program."""
    offs = tl.arange(0, R)
    rmat = tl.load(r_ptr + offs[:, None] * R + offs[None, :])
    if INTERPRET:  # the interpreter's dot mishandles 16-bit floats: go through float32 (exact here)
        rmat = rmat.to(tl.float32)
    return rmat


@triton.jit
def _rotate_tile(x, rmat, rscale, BM: tl.constexpr, C: tl.constexpr, R: tl.constexpr, INTERPRET: tl.constexpr):
    """x [BM, C] (input dtype) @ blockdiag(rmat) * rscale -> float32 [BM, C].

    rmat holds +-1 (exact in any dtype); the dot accumulates in float32 and rscale = 1/sqrt(block):
    Xr in float32, as the reference rotates the float32 input.
    """
    xt = tl.reshape(x, (BM * C // R, R))
    if INTERPRET:
        xt = xt.to(tl.float32)
    xr = tl.dot(xt, rmat, out_dtype=tl.float32) * rscale
    return tl.reshape(xr, (BM, C))


@triton.jit
def _lora_down(t, x, a_ptr, c0, K: tl.constexpr, RANK, RP: tl.constexpr, C: tl.constexpr, INTERPRET: tl.constexpr):
    """One K tile of a LoRA branch's down-projection (dvdq_core/lowrank.py): t [BM, RP] float32 +=
    x [BM, C] (the UNROTATED input tile, input dtype) @ A[:, c0:c0 + C]^T, A [RANK, K] in x's dtype; its
    rows from RANK to RP are read as 0."""
    offs_r = tl.arange(0, RP)
    a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * K + (c0 + tl.arange(0, C))[None, :],
                mask=(offs_r < RANK)[:, None], other=0.0)
    if INTERPRET:  # the interpreter's dot mishandles 16-bit floats: go through float32 (exact products)
        return tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), t)
    return tl.dot(x, tl.trans(a), t)


@triton.jit
def _lora_store(t, t_ptr, rows, m_mask, RANK, RP: tl.constexpr, INTERPRET: tl.constexpr):
    """t [BM, RP] float32 -> rows of T [M, RANK] (dense, T's dtype: the input's), rounded once."""
    offs_r = tl.arange(0, RP)
    tl.store(t_ptr + rows[:, None] * RANK + offs_r[None, :], _round_to(t, t_ptr.dtype.element_ty, INTERPRET),
             mask=m_mask[:, None] & (offs_r < RANK)[None, :])


@triton.jit
def _absmax_kernel(
    x_ptr, r_ptr, rscale, rowmax_ptr, l_ptr, M, K: tl.constexpr, NT: tl.constexpr, stride_xm,
    SB: tl.constexpr, TG: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
    AUTO_SCALE: tl.constexpr, INTERPRET: tl.constexpr, POW2: tl.constexpr = False,
):
    """Pass 1 over BM rows: per (row, TG-column group) absmax of Xr into rowmax [M, K // TG]; per
    scale block absmax over all rows into l [K // SB] (atomic max; l is zeroed by the caller).
    POW2: only the per-channel absmax over all rows, into l [K] (for _quantize_pow2_kernel)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        xa = tl.abs(_rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET))
        if POW2:  # padded rows loaded as 0 never win; an atomic only where this tile raises the maximum
            cm = tl.max(xa, axis=0)  # (the maxima settle within the first programs: most atomics are skipped)
            tl.atomic_max(l_ptr + offs_c, cm, mask=cm > tl.load(l_ptr + offs_c))
        else:
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
    a_ptr=None, t_ptr=None, RANK=0, LORA: tl.constexpr = False, RP: tl.constexpr = 16,
):
    """Pass 2 over BM rows: s_i = max(max_j |Xr_ij| / l_j, EPS) / qmax from the small rowmax table,
    then q = clamp(rint(Xr * r), -qmax - 1, qmax) as int8 with r = 1 / (l_b * s_i), and s [M].
    LORA: also T = X @ A^T [M, RANK] (a LoRA branch's down-projection, _lora_down) from the same reads.

    r is computed per row and column tile (the tile lies in one scale block, or holds C // SB of
    them), not per element: one multiplication per element instead of two divisions. Every step is
    IEEE-rounded (div_rn, fp32 multiply) as in the reference, so a rounding tie rounds alike."""
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
    if not AUTO_SCALE:  # l = 1: one reciprocal per row for all of K
        r = tl.math.div_rn(1.0, s)
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    t = tl.zeros((BM, RP), dtype=tl.float32)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        if LORA:
            t = _lora_down(t, x, a_ptr, c0, K, RANK, RP, C, INTERPRET)
        xr = _rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET)
        if AUTO_SCALE and SB >= C:  # the tile lies inside one scale block (both are powers of two)
            lb = tl.maximum(tl.load(l_ptr + c0 // SB), EPS)
            v = xr * tl.math.div_rn(1.0, lb * s)[:, None]
        elif AUTO_SCALE:  # C // SB scale blocks in the tile
            lb = tl.maximum(tl.load(l_ptr + c0 // SB + tl.arange(0, C // SB)), EPS)
            rb = tl.math.div_rn(1.0, lb[None, :] * s[:, None])  # [BM, C // SB]
            v = tl.reshape(tl.reshape(xr, (BM, C // SB, SB)) * rb[:, :, None], (BM, C))
        else:
            v = xr * r[:, None]
        qv = _clamp_round(v, qmax, INTERPRET).to(tl.int8)
        tl.store(q_ptr + rows[:, None] * K + offs_c[None, :], qv, mask=m_mask[:, None])
    if LORA:
        _lora_store(t, t_ptr, rows, m_mask, RANK, RP, INTERPRET)


@triton.jit
def _clamp_round(v, qmax, INTERPRET: tl.constexpr):
    """clamp(rint(v), -qmax - 1, qmax) as int32 (clamp first, then round: the same for integer bounds)."""
    v = tl.minimum(tl.maximum(v, -qmax - 1.0), qmax * 1.0)
    if INTERPRET:  # same result for |v| < 2**22: adding 1.5 * 2**23 rounds half to even
        return ((v + 12582912.0) - 12582912.0).to(tl.int32)
    return tl.extra.cuda.libdevice.float2int_rn(v)  # round half to even (as torch.round), no separate rint


@triton.jit
def _ceil_log2(v):
    """Exact ceil(log2(v)) of positive normal float32 values (exponent field, +1 if any mantissa bit)."""
    b = v.to(tl.int32, bitcast=True)
    return ((b >> 23) & 0xFF) - 127 + ((b & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def _exp2i(e):
    """2**e as float32 for integer e in [-126, 127] (built from the exponent field: exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_exponents(cmax_ptr, c0, e_lo, C: tl.constexpr):
    """e_j = max(ceil(log2(max(cmax_j, EPS))), e_lo) for the C channels from c0."""
    cm = tl.maximum(tl.load(cmax_ptr + c0 + tl.arange(0, C)), EPS)
    return tl.maximum(_ceil_log2(cm), e_lo)


@triton.jit
def _quantize_pow2_kernel(
    x_ptr, r_ptr, rscale, cmax_ptr, q_ptr, s_ptr, M, K: tl.constexpr, stride_xm, qmax,
    C: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, OCTAVES: tl.constexpr, INTERPRET: tl.constexpr,
    PERSISTENT: tl.constexpr = False, a_ptr=None, t_ptr=None, RANK=0, LORA: tl.constexpr = False,
    RP: tl.constexpr = 16,
):
    """Pass 2 of granularity "pow2" (dvdq_core.activations): per-channel scales l_j = 2**e_j,
    e_j = max(ceil(log2 cmax_j), E - OCTAVES), folded into the codes:
        q'_ij = q_ij * 2**(e_j - e_lo) (int8: |q| <= 8, e_j - e_lo <= OCTAVES = 4),  s'_i = s_i * 2**e_lo
    with q, s exactly the reference's (x / 2**e is exact, and 1 / (2**e * s) = 2**-e * (1 / s)), so
    the GEMM sums q' * w in int32 over all of K. Reads X twice: the row scale s_i needs the max of
    |Xr_ij| / l_j over the whole row before any code can be made.
    PERSISTENT: the grid's programs stride over the blocks of BM rows (GPU only: the interpreter
    cannot loop to a run-time bound): the rotation matrix and the exponent floor are loaded once per
    program instead of once per block (configs.ACT_POW2_PASS2_PER_SM says what it measured).
    LORA: the first sweep also computes T = X @ A^T [M, RANK] (a LoRA branch's down-projection on the
    unrotated tiles it reads anyway, _lora_down; RP = RANK rounded up to a power of two >= 16)."""
    gmax = tl.max(tl.load(cmax_ptr + tl.arange(0, C)))
    for c0 in range(C, K, C):
        gmax = tl.maximum(gmax, tl.max(tl.load(cmax_ptr + c0 + tl.arange(0, C))))
    e_lo = _ceil_log2(tl.maximum(gmax, EPS)) - OCTAVES
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    if PERSISTENT:
        for rb in range(tl.program_id(0), tl.cdiv(M, BM), tl.num_programs(0)):
            _quantize_pow2_rows(x_ptr, rmat, rscale, cmax_ptr, q_ptr, s_ptr, rb, e_lo, M, K, stride_xm, qmax,
                                C, R, BM, INTERPRET, a_ptr, t_ptr, RANK, LORA, RP)
    else:
        _quantize_pow2_rows(x_ptr, rmat, rscale, cmax_ptr, q_ptr, s_ptr, tl.program_id(0), e_lo, M, K, stride_xm,
                            qmax, C, R, BM, INTERPRET, a_ptr, t_ptr, RANK, LORA, RP)


@triton.jit
def _quantize_pow2_rows(x_ptr, rmat, rscale, cmax_ptr, q_ptr, s_ptr, rb, e_lo, M, K: tl.constexpr, stride_xm, qmax,
                        C: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, INTERPRET: tl.constexpr,
                        a_ptr, t_ptr, RANK, LORA: tl.constexpr, RP: tl.constexpr):
    """_quantize_pow2_kernel's work on the block rb of BM rows."""
    offs_m = rb * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    amax = tl.zeros((BM,), dtype=tl.float32)
    t = tl.zeros((BM, RP), dtype=tl.float32)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        if LORA:
            t = _lora_down(t, x, a_ptr, c0, K, RANK, RP, C, INTERPRET)
        xr = _rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET)
        inv_l = _exp2i(-_pow2_exponents(cmax_ptr, c0, e_lo, C))
        amax = tl.maximum(amax, tl.max(tl.abs(xr) * inv_l[None, :], axis=1))
    if LORA:
        _lora_store(t, t_ptr, rows, m_mask, RANK, RP, INTERPRET)
    s = tl.math.div_rn(tl.maximum(amax, EPS), qmax)
    rs = tl.math.div_rn(1.0, s)
    tl.store(s_ptr + offs_m, s * _exp2i(e_lo), mask=m_mask)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        xr = _rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET)
        e = _pow2_exponents(cmax_ptr, c0, e_lo, C)
        qv = _clamp_round(xr * (rs[:, None] * _exp2i(-e)[None, :]), qmax, INTERPRET)
        qv = qv * (1 << (e - e_lo))[None, :]
        tl.store(q_ptr + rows[:, None] * K + offs_c[None, :], qv.to(tl.int8), mask=m_mask[:, None])


@triton.jit
def _rotate_kernel(x_ptr, r_ptr, rscale, y_ptr, M, K: tl.constexpr, stride_xm, C: tl.constexpr, R: tl.constexpr,
                   BM: tl.constexpr, INTERPRET: tl.constexpr, a_ptr=None, t_ptr=None, RANK=0,
                   LORA: tl.constexpr = False, RP: tl.constexpr = 16):
    """16-bit activations: Xr in the input dtype, for the dequantizing GEMM (LORA: and T = X @ A^T, as
    _quantize_kernel)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    rmat = _load_rotation(r_ptr, R, INTERPRET)
    t = tl.zeros((BM, RP), dtype=tl.float32)
    for c0 in range(0, K, C):
        offs_c = c0 + tl.arange(0, C)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :], mask=m_mask[:, None], other=0.0)
        if LORA:
            t = _lora_down(t, x, a_ptr, c0, K, RANK, RP, C, INTERPRET)
        xr = _rotate_tile(x, rmat, rscale, BM, C, R, INTERPRET)
        tl.store(y_ptr + rows[:, None] * K + offs_c[None, :], _round_to(xr, x.dtype, INTERPRET), mask=m_mask[:, None])
    if LORA:
        _lora_store(t, t_ptr, rows, m_mask, RANK, RP, INTERPRET)


@triton.jit
def _unpack_asm(wp, z):
    """Packed bytes -> (low nibble - z, high nibble - z) as int8, four bytes per 32-bit op:
    t = nibble + (0x80 - z) per byte (no carry: <= 143), then t ^ 0x80 = nibble - z (two's complement)."""
    zb = tl.broadcast_to(z, wp.shape)
    return tl.inline_asm_elementwise(asm=UNPACK_PTX, constraints="=r,=r,r,r", args=[wp, zb],
                                     dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _unpack_weights_kernel(w_ptr, z_ptr, out_ptr, N, K: tl.constexpr, G: tl.constexpr, BR: tl.constexpr,
                           GPP: tl.constexpr):
    """Packed 4-bit weights [N, K/2] -> int8 (u - z) [N, K] in the codes' layout (module docstring:
    per group of G columns, the G/2 even columns then the G/2 odd ones = the low nibbles of G/2
    bytes, then their high nibbles). A program covers BR rows x GPP groups; the last row block is
    masked. The workspace of the sm_90 GEMM (kernels/_gluon.py, _w4_gemm_u8_kernel)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mask = (rows < N)[:, None]
    z = tl.load(z_ptr + rows, mask=rows < N, other=0).to(tl.int16)[:, None]
    cols = tl.arange(0, G // 2)
    for i in tl.static_range(GPP):
        g = tl.program_id(1) * GPP + i
        b = tl.load(w_ptr + rows.to(tl.int64)[:, None] * (K // 2) + g * (G // 2) + cols[None, :], mask=mask,
                    other=0).to(tl.int16)
        dst = out_ptr + rows.to(tl.int64)[:, None] * K + g * G + cols[None, :]
        tl.store(dst, ((b & 15) - z).to(tl.int8), mask=mask)
        tl.store(dst + G // 2, ((b >> 4) - z).to(tl.int8), mask=mask)


@triton.jit
def _w4_gemm_kernel(
    a_ptr, w_ptr, z_ptr, d_ptr, l_ptr, s_ptr, bias_ptr, y_ptr, M, N, K: tl.constexpr,
    SB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    A_FLOAT: tl.constexpr, AUTO_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
    INTERPRET: tl.constexpr, ASM_UNPACK: tl.constexpr = False, SPLIT: tl.constexpr = 1, GELU: tl.constexpr = False,
    W8: tl.constexpr = False, t_ptr=None, lu_ptr=None, stride_t=0, RANK=0, LORA: tl.constexpr = False,
    RP: tl.constexpr = 16,
):
    """Y = D[n] * s_i * sum_b l_b * sum_{k in b} q[i, k] * (u[n, k] - z[n]) + bias[n]
    (GELU: then gelu_tanh(Y rounded to Y's dtype), rounded again: the fused feed-forward GELU).

    a: int8 codes [M, K] in the layout of groups of BK columns (module docstring; A_FLOAT: rotated
    activations in bf16/fp16, s = l = 1). w: packed 4-bit codes [N, K // 2] (low nibble = even
    column), unpacked in registers; [low plane | high plane] is the weight tile of one dot of
    depth BK. BK divides K (the host makes BK the layout group).
    AUTO_SCALE: each BK tile lies inside one scale block (BK divides SB); its int32 dot is scaled by
    l_b into a float32 accumulator. Without it the whole K sum stays in int32 (|sum| < 2**31 for
    K < 2**20) and is converted once.
    SWAP computes the transposed tile (weights as the MMA's M side, taken from registers).
    SPLIT: a program covers SPLIT * BM tokens as sub-tiles that share one unpacked weight tile.
    ASM_UNPACK unpacks four bytes per 32-bit instruction (inline PTX; not in the interpreter).
    W8: w is the unpacked int8 workspace (u - z) [N, K] of _unpack_weights_kernel instead.
    LORA: a LoRA branch's up-projection joins in the epilogue, before the output rounding and the
    GELU: Y += T[i, :] . U[n, :] with T [M, RANK] (row stride stride_t: the down-projection the
    activation pass wrote) and U [N, RANK] (the scaled up-projections), a 16-bit dot of depth RP
    (RANK rounded up to a power of two >= 16, masked) accumulating in float32 (_lora_up).
    Row indices wrap modulo M and N for the loads (unmasked loads pipeline best); the store is masked.
    """
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
    rows0 = (offs_m % M).to(tl.int64)  # 64-bit row offsets: M * K can pass 2**31 (long videos)
    rows1 = ((offs_m + BM) % M).to(tl.int64)
    wrows = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, BK // 2)
    a0_ptrs = a_ptr + rows0[:, None] * K + offs_k[None, :]
    a1_ptrs = a_ptr + rows1[:, None] * K + offs_k[None, :]
    if W8:
        w_ptrs = w_ptr + wrows[:, None] * K + offs_k[None, :]
    else:
        w_ptrs = w_ptr + wrows[:, None] * (K // 2) + offs_h[None, :]
    z = tl.load(z_ptr + wrows).to(tl.uint8)[:, None]

    INT_ACC: tl.constexpr = not A_FLOAT and not AUTO_SCALE  # one int32 sum over all of K
    ACC_T: tl.constexpr = tl.int32 if INT_ACC else tl.float32
    if SWAP:
        acc0 = tl.zeros((BN, BM), dtype=ACC_T)
        acc1 = tl.zeros((BN, BM), dtype=ACC_T)
    else:
        acc0 = tl.zeros((BM, BN), dtype=ACC_T)
        acc1 = tl.zeros((BM, BN), dtype=ACC_T)
    for k0 in range(0, K, BK):
        if W8:
            w = tl.load(w_ptrs)
        else:
            wp = tl.load(w_ptrs)
            if ASM_UNPACK and not INTERPRET:
                w_lo, w_hi = _unpack_asm(wp, z)
            else:
                w_lo = (wp & 15).to(tl.int8) - z.to(tl.int8)
                w_hi = (wp >> 4).to(tl.int8) - z.to(tl.int8)
            w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), (BN, BK))  # [low | high] along K
        if AUTO_SCALE:
            lb = tl.maximum(tl.load(l_ptr + k0 // SB), EPS)
        else:
            lb = 1.0
        acc0 = _gemm_step(acc0, a0_ptrs, w, lb, A_FLOAT, INT_ACC, SWAP, INTERPRET)
        if SPLIT == 2:
            acc1 = _gemm_step(acc1, a1_ptrs, w, lb, A_FLOAT, INT_ACC, SWAP, INTERPRET)
        a0_ptrs += BK
        a1_ptrs += BK
        w_ptrs += BK if W8 else BK // 2

    d = tl.load(d_ptr + wrows)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + wrows).to(tl.float32)
    else:
        bias = d * 0.0
    lu_ptrs = lu_ptr + wrows[:, None] * RANK if LORA else None  # this program's rows of the up-projection
    _gemm_store(acc0, y_ptr, s_ptr, d, bias, offs_m, offs_n, M, N, A_FLOAT, SWAP, INTERPRET, GELU,
                t_ptr, stride_t, lu_ptrs, RANK, LORA, RP)
    if SPLIT == 2:
        _gemm_store(acc1, y_ptr, s_ptr, d, bias, offs_m + BM, offs_n, M, N, A_FLOAT, SWAP, INTERPRET, GELU,
                    t_ptr, stride_t, lu_ptrs, RANK, LORA, RP)


@triton.jit
def _gemm_step(acc, a_ptrs, w, lb, A_FLOAT: tl.constexpr, INT_ACC: tl.constexpr, SWAP: tl.constexpr,
               INTERPRET: tl.constexpr):
    """One K tile of one token sub-tile: load a [BM, BK] (unmasked), one dot with w [BN, BK], accumulate."""
    a = tl.load(a_ptrs)
    if A_FLOAT:
        if INTERPRET:  # the interpreter's dot mishandles 16-bit floats; float32 is exact here
            a = a.to(tl.float32)
        wf = w.to(a.dtype)
        if SWAP:
            acc += tl.dot(wf, tl.trans(a))
        else:
            acc += tl.dot(a, tl.trans(wf))
    else:
        if SWAP:
            part = tl.dot(w, tl.trans(a), out_dtype=tl.int32)
        else:
            part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        if INT_ACC:
            acc += part
        else:
            acc += part.to(tl.float32) * lb
    return acc


@triton.jit
def _lora_up(v, lu_ptrs, t_ptr, stride_t, offs_m, M, RANK, RP: tl.constexpr, SWAP: tl.constexpr,
             INTERPRET: tl.constexpr):
    """v (float32, [BN, BM] with SWAP, else [BM, BN]) + T[tokens, :] . U[rows, :]: the LoRA branch's
    up-projection of one output tile, a 16-bit dot accumulating into v (lu_ptrs: U's rows [BN, 1]; loaded
    per token sub-tile, L1/L2-hot after the first, to keep registers free)."""
    offs_r = tl.arange(0, RP)
    lu = tl.load(lu_ptrs + offs_r[None, :], mask=(offs_r < RANK)[None, :], other=0.0)
    tt = tl.load(t_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_t + offs_r[None, :],
                 mask=(offs_r < RANK)[None, :], other=0.0)
    if INTERPRET:  # the interpreter's dot mishandles 16-bit floats: go through float32 (exact products)
        tt = tt.to(tl.float32)
        lu = lu.to(tl.float32)
    if SWAP:
        return tl.dot(lu, tl.trans(tt), v)
    return tl.dot(tt, tl.trans(lu), v)


@triton.jit
def _gemm_store(acc, y_ptr, s_ptr, d, bias, offs_m, offs_n, M, N, A_FLOAT: tl.constexpr, SWAP: tl.constexpr,
                INTERPRET: tl.constexpr, GELU: tl.constexpr, t_ptr=None, stride_t=0, lu_ptrs=None, RANK=0,
                LORA: tl.constexpr = False, RP: tl.constexpr = 16):
    """Epilogue of one token sub-tile: D[n] * s_i (* 1 for 16-bit activations) + bias (LORA: + the
    branch's up-projection, _lora_up), rounded (GELU: gelu_tanh of the rounded value, rounded again),
    masked store."""
    m_ok = offs_m < M
    acc = acc.to(tl.float32)
    if A_FLOAT:
        s = tl.full(offs_m.shape, 1.0, tl.float32)
    else:
        s = tl.load(s_ptr + (offs_m % M))
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SWAP:
        v = acc * d[:, None] * s[None, :] + bias[:, None]
        if LORA:
            v = _lora_up(v, lu_ptrs, t_ptr, stride_t, offs_m, M, RANK, RP, SWAP, INTERPRET)
        out = tl.trans(_round_to(v, y_ptr.dtype.element_ty, INTERPRET))
    else:
        v = acc * d[None, :] * s[:, None] + bias[None, :]
        if LORA:
            v = _lora_up(v, lu_ptrs, t_ptr, stride_t, offs_m, M, RANK, RP, SWAP, INTERPRET)
        out = _round_to(v, y_ptr.dtype.element_ty, INTERPRET)
    if GELU:
        out = _round_to(gelu_tanh(out.to(tl.float32)), y_ptr.dtype.element_ty, INTERPRET)
    tl.store(y_ptrs, out, mask=m_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, f_ptr, y_ptr, S, stride_fb, stride_fs, eps, H: tl.constexpr,
                      HP: tl.constexpr, HALF_D: tl.constexpr, NORM: tl.constexpr, INTERPRET: tl.constexpr):
    """One token per program: its row of H heads x D channels, read once as [HP, HALF_D, 2] (HP = H
    rounded up to a power of two, masked). NORM: RMS norm over the H * D channels with the weight,
    rounded to the output dtype (as the host's norm returns it). Then each pair (x0, x1) of a head
    becomes (f00 x0 + f01 x1, f10 x0 + f11 x1) in float32 with the token's 2 x 2 rotation f (shared by
    the heads), rounded once."""
    row = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = 2 * HALF_D
    b = row // S
    h = tl.arange(0, HP)[:, None]
    c = tl.arange(0, D)[None, :]
    ok = (h < H) & (c < D)
    offs = h * D + c
    x = tl.load(x_ptr + row * (H * D) + offs, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        ms = tl.sum(tl.sum(x * x, axis=1), axis=0) / (H * D)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = _round_to(x * (1.0 / tl.sqrt(ms + eps)) * w, y_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    y = _rotate_pairs(x, f_ptr + b * stride_fb + (row - b * S) * stride_fs, HP, HALF_D)
    tl.store(y_ptr + row * (H * D) + offs, _round_to(y, y_ptr.dtype.element_ty, INTERPRET), mask=ok)


@triton.jit
def _rotate_pairs(x, f_row, HP: tl.constexpr, HALF_D: tl.constexpr):
    """x [HP, D] float32: each channel pair (x0, x1) of each head becomes (f00 x0 + f01 x1,
    f10 x0 + f11 x1) with the token's 2 x 2 rotations f ([D/2, 2, 2] float32 at f_row, shared by the
    heads); float32 [HP, D]."""
    x0, x1 = tl.split(tl.reshape(x, (HP, HALF_D, 2)))
    fp = f_row + tl.arange(0, HALF_D)[None, :] * 4
    f00 = tl.load(fp)
    f01 = tl.load(fp + 1)
    f10 = tl.load(fp + 2)
    f11 = tl.load(fp + 3)
    return tl.reshape(tl.join(f00 * x0 + f01 * x1, f10 * x0 + f11 * x1), (HP, 2 * HALF_D))


@triton.jit
def _head_norm_rope_kernel(x_ptr, w_ptr, f_ptr, y_ptr, L, L_OUT, L0, stride_xb, stride_xl, stride_fb, stride_fl, eps,
                           H: tl.constexpr, HP: tl.constexpr, HALF_D: tl.constexpr, INTERPRET: tl.constexpr):
    """HunyuanVideo's q (or k): one token per program, its H heads x D channels read in place from the
    qkv projection's output (token stride stride_xl, unit channel stride) as [HP, D]. RMS norm over
    each head's D channels with the weight [D], rounded to the output dtype (as the host's norm
    returns it), then rotated as in _norm_rope_kernel with pe's row L0 + t, rounded once, and
    written to y [B, H, L_OUT, D] at token L0 + t: the double block's image and text parts fill one
    buffer (L0 = 0 and L0 = image tokens), so the host's torch.cat disappears."""
    pid = tl.program_id(0).to(tl.int64)
    D: tl.constexpr = 2 * HALF_D
    b = pid // L
    t = pid - b * L
    h = tl.arange(0, HP)[:, None]
    c = tl.arange(0, D)[None, :]
    ok = (h < H) & (c < D)
    x = tl.load(x_ptr + b * stride_xb + t * stride_xl + h * D + c, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [HP]
    w = tl.load(w_ptr + c).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    x = _round_to(x * rstd[:, None] * w, dt, INTERPRET).to(tl.float32)
    y = _rotate_pairs(x, f_ptr + b * stride_fb + (L0 + t) * stride_fl, HP, HALF_D)
    tl.store(y_ptr + ((b * H + h) * L_OUT + L0 + t) * D + c, _round_to(y, dt, INTERPRET), mask=ok)


@triton.jit
def _vector_row(row, S, REP, LAST, stride_b, stride_f):
    """Offset of token `row`'s modulation vector: its sample's row min(t // REP, LAST) of [F, C] vectors
    (LAST = F - 1: with REP from ops.tokens_per_vector it never binds; with REP = T0 and two vectors
    it gives vector 0 to the first T0 tokens and vector 1 to the rest)."""
    return (row // S) * stride_b + tl.minimum((row % S) // REP, LAST) * stride_f


@triton.jit
def _modulated_norm_kernel(x_ptr, shift_ptr, scale_ptr, y_ptr, S, REP, LAST, stride_vb, stride_vf, eps,
                           C: tl.constexpr, BC: tl.constexpr, INTERPRET: tl.constexpr,
                           ROUND_PRODUCT: tl.constexpr = False):
    """One token per program: LayerNorm over its C channels (no affine), rounded to the output dtype as
    the host's norm returns it, then shift + norm * (1 + scale) with its vectors (_vector_row: per
    sample, per frame or per token, or split at a token; (1 + scale) rounded too, as the host adds it
    in the dtype first), rounded once (addcmul). ROUND_PRODUCT: norm * (1 + scale) rounded to the
    output dtype first, as the host's apply_mod with modulation_dims (`*=` then `+=`) rounds it
    (exact product in float32, opaque rounding as in _gated_residual_kernel)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BC)
    ok = c < C
    x = tl.load(x_ptr + row * C + c, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    dt = y_ptr.dtype.element_ty
    n = _round_to(d * rstd, dt, INTERPRET).to(tl.float32)
    v = _vector_row(row, S, REP, LAST, stride_vb, stride_vf) + c
    shift = tl.load(shift_ptr + v, mask=ok, other=0.0).to(tl.float32)
    one_scale = _round_to(1.0 + tl.load(scale_ptr + v, mask=ok, other=0.0).to(tl.float32), dt, INTERPRET).to(tl.float32)
    p = n * one_scale
    if ROUND_PRODUCT:
        p = _rounded_apart(p, dt, INTERPRET)
    tl.store(y_ptr + row * C + c, _round_to(shift + p, dt, INTERPRET), mask=ok)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, g_ptr, out_ptr, S, REP, LAST, stride_gb, stride_gf, C: tl.constexpr,
                           BC: tl.constexpr, INTERPRET: tl.constexpr, ROUND_PRODUCT: tl.constexpr = False):
    """One token per program: x + y * gate with its gate vector (as _modulated_norm_kernel's), rounded
    once (Wan's addcmul). ROUND_PRODUCT: y * gate rounded to the output dtype first, as the host's
    `x + y * gate` (HunyuanVideo) rounds it; for bf16/fp16 that is the host's result bit for bit (the
    product is exact in float32, the sum is rounded from float32 as torch's). out may be x (in place)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BC)
    ok = c < C
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * C + c, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * C + c, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + _vector_row(row, S, REP, LAST, stride_gb, stride_gf) + c, mask=ok, other=0.0).to(tl.float32)
    p = y * g
    if ROUND_PRODUCT:
        p = _rounded_apart(p, dt, INTERPRET)
    tl.store(out_ptr + row * C + c, _round_to(x + p, dt, INTERPRET), mask=ok)
