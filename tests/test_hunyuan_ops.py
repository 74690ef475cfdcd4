"""HunyuanVideo's block steps (dvdq_core.hunyuan_ops): each Triton kernel against the host's ops (the
references), and the references against the textbook math. Interpreter on the CPU (CI), compiled on
a GPU. The whole model against ComfyUI's own classes: tests/host (fused_layers.py)."""
import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels module is first imported

import pack  # noqa: E402
from dvdq_core import (  # noqa: E402
    hunyuan_ops,
    kernels,  # noqa: E402
    wan_ops,
)
from dvdq_core.kernels import ops  # noqa: E402
from gpu_checks import ON_CPU, allocations_without_host_sync, machine_reason, triton_reason  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
GEN = torch.Generator().manual_seed(78)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def flux_pe(b: int, n: int, d: int, theta=256.0) -> torch.Tensor:
    """[b, 1, n, D/2, 2, 2] float32 rotations [[cos, -sin], [sin, cos]] of random positions (the layout of
    ComfyUI's flux EmbedND; text tokens have position 0 there, so the rotation is the identity)."""
    pos = torch.randint(0, 100, (b, n), generator=GEN).float()
    pos[:, -2:] = 0
    omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    a = pos[..., None] * omega.float()
    f = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1)
    return f.view(b, 1, n, d // 2, 2, 2).to(DEV)


def qkv_output(b, n, heads, d, dtype, extra=0):
    """A qkv projection's output [b, n, 3 H D] (and `extra` more columns, as the single block's linear1
    whose split leaves the q/k/v columns with a longer token stride)."""
    t = (torch.randn(b, n, 3 * heads * d + extra, generator=GEN) * 3).to(dtype).to(DEV)
    return t[..., :3 * heads * d]


def norm_weight(d, dtype):
    return (1 + 0.2 * torch.randn(d, generator=GEN)).to(dtype).to(DEV)


def assert_close_to_reference(y, ref):
    """Equal up to float rounding (as test_wan_ops' check): each output is c x0 - s x1 (or s x0 + c x1) of
    its pair, whose length m the rotation keeps; the kernel's norm may land x0 or x1 on the
    neighbouring value (one ulp of m) and the GPU contracts the products into an FMA."""
    assert not torch.isnan(y).any(), "some output elements were not written"
    r = ref.float()
    m = r.unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    eps = torch.finfo(ref.dtype).eps
    # float32 (a kernel-only check: the ops send float32 to the host): the GPU's approximate rsqrt and
    # another summation order over D give a few ulps of m (H100: up to 1.4e-6 at m ~ 4)
    bound = eps * r.abs() + (8 if ref.dtype == torch.float32 else 2) * eps * m
    assert ((y.float() - r).abs() <= bound).all(), (y.float() - r).abs().max().item()
    if ref.dtype != torch.float32:  # (in float32 the rsqrt and the order of the sums show in most elements)
        assert (y != ref).float().mean().item() < 0.02


# (batch, image tokens, text tokens or None for the single block, heads, head dim, extra columns)
SHAPES = [(2, 5, 3, 3, 16, 0), (1, 7, None, 5, 8, 40), (2, 3, 1, 2, 32, 0), (1, 1, None, 3, 16, 0),
          (2, 6, None, 4, 16, 64)] + \
    ([(2, 4097, 256, 24, 128, 0), (1, 3333, None, 24, 128, 4 * 3072)] if ON_GPU else [])


@pytest.mark.parametrize("b,n,n2,heads,d,extra", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("pe_batch", [1, 2])
def test_head_norm_rope_matches_host_ops(b, n, n2, heads, d, extra, dtype, which, pe_batch):
    """q (which 0) or k (1) of the qkv output read in place, the double block's text part (n2 tokens,
    its own norm weight) after the image tokens in one buffer; every output element written."""
    c = heads * d
    qkv, w = qkv_output(b, n, heads, d, dtype, extra), norm_weight(d, dtype)
    x = qkv[..., which * c:(which + 1) * c]
    x2 = w2 = None
    if n2 is not None:
        x2, w2 = qkv_output(b, n2, heads, d, dtype)[..., which * c:(which + 1) * c], norm_weight(d, dtype)
    pe = flux_pe(min(pe_batch, b), n + (n2 or 0), d)
    reason = triton_reason("head_norm_rope", x, w, 1e-6, pe, heads, x2, w2)
    assert reason is None if dtype != torch.float32 else "bf16 or fp16 only" in reason
    out = torch.full((b, heads, n + (n2 or 0), d), float("nan"), dtype=dtype, device=DEV)
    y = ops.head_norm_rope(x, w, 1e-6, pe, heads, x2, w2, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close_to_reference(y, hunyuan_ops.head_norm_rope_reference(x, w, 1e-6, pe, heads, x2, w2))


def test_head_norm_rope_reference_is_the_host_and_the_textbook():
    """The reference is ComfyUI's chain spelled out (view + permute of the qkv output, QKNorm's
    rms_norm, torch.cat of image then text, flux.math.attention's rotation), bit for bit; and that is
    the textbook math: each head RMS-normed with the weight, its channel pairs (2i, 2i+1) as complex
    numbers times e^(i angle)."""
    b, n, n2, heads, d = 2, 5, 3, 3, 16
    c = heads * d
    for dtype in DTYPES:
        qkv, qkv2 = qkv_output(b, n, heads, d, dtype), qkv_output(b, n2, heads, d, dtype)
        w, w2 = norm_weight(d, dtype), norm_weight(d, dtype)
        pe = flux_pe(b, n + n2, d)
        host = []
        for t, wt in ((qkv, w), (qkv2, w2)):
            k = t.view(t.shape[0], t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)[1]
            host.append(torch.nn.functional.rms_norm(k, wt.shape, weight=wt.to(k.dtype), eps=1e-6).to(t))
        k = torch.cat(host, dim=2).to(dtype=pe.dtype).reshape(b, heads, n + n2, -1, 1, 2)
        want = (pe[..., 0] * k[..., 0] + pe[..., 1] * k[..., 1]).reshape(b, heads, n + n2, d).type_as(qkv)
        got = hunyuan_ops.head_norm_rope_reference(qkv[..., c:2 * c], w, 1e-6, pe, heads, qkv2[..., c:2 * c], w2)
        assert torch.equal(got, want), dtype
        # ComfyUI 0.8.0 on rotates with comfy-kitchen's apply_rope: its eager (CPU) form is the first product,
        # then addcmul_ of the second, which rounds otherwise on the CPU: the reference's addcmul form
        kitchen = pe[..., 0] * k[..., 0]
        kitchen.addcmul_(pe[..., 1], k[..., 1])
        kitchen = kitchen.reshape(b, heads, n + n2, d).type_as(qkv)
        got = hunyuan_ops.head_norm_rope_reference(qkv[..., c:2 * c], w, 1e-6, pe, heads, qkv2[..., c:2 * c], w2,
                                                   addcmul=True)
        assert torch.equal(got, kitchen), dtype
        assert_close_to_reference(got, want)
    x = torch.randn(b, n, c, generator=GEN, dtype=torch.float64)
    w = torch.randn(d, generator=GEN, dtype=torch.float64)
    pe = flux_pe(1, n, d).cpu()
    angle = torch.atan2(pe[..., 1, 0], pe[..., 0, 0]).double()  # [1, 1, n, D/2]
    xh = x.view(b, n, heads, d).transpose(1, 2)
    xn = xh * torch.rsqrt(xh.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    z = torch.view_as_complex(xn.reshape(b, heads, n, d // 2, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    got = hunyuan_ops.head_norm_rope_reference(x, w, 1e-6, pe.double(), heads)
    torch.testing.assert_close(got, torch.view_as_real(z).reshape(b, heads, n, d), rtol=1e-5, atol=1e-5)


def modulation(b, c, dtype, chunks=6):
    """HunyuanVideo's modulation vectors: Modulation.forward's chunks along the last dim of one
    [B, 1, chunks C] tensor (unit channel stride, token dim 1, batch stride chunks C)."""
    return (torch.randn(b, 1, chunks * c, generator=GEN) * 0.5).to(dtype).to(DEV).chunk(chunks, dim=-1)


TOKEN_SHAPES = [(2, 5, 48), (1, 7, 256), (2, 3, 320), (1, 1, 64)] + ([(2, 4353, 3072), (1, 333, 3072)] if ON_GPU else [])


@pytest.mark.parametrize("b,s,c", TOKEN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("round_product", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
def test_gated_residual_kernel_both_roundings(b, s, c, dtype, round_product, in_place):
    """ROUND_PRODUCT: HunyuanVideo's `x + y * gate` (the product rounded to the dtype first), for bf16
    and fp16 the host's result bit for bit (the product is exact in float32 and the sum rounds from
    float32 as torch's); without it Wan's addcmul, one rounding. In place (out = x) as `txt +=`."""
    x = (torch.randn(b, s, c, generator=GEN) * 4).to(dtype).to(DEV)
    y = (torch.randn(b, s, c, generator=GEN) * 2).to(dtype).to(DEV)
    gate = modulation(b, c, dtype, 3)[2]
    ref = hunyuan_ops.gated_add_reference(x, y, gate) if round_product else wan_ops.gated_residual_reference(x, y, gate)
    out = x.clone() if in_place else torch.full_like(x, float("nan"))
    r = ops.gated_residual(out if in_place else x, y, gate, out=out, round_product=round_product)
    assert r.data_ptr() == out.data_ptr() and not torch.isnan(r).any()
    if round_product and (dtype != torch.float32 or not ON_GPU):  # (a GPU may contract float32's x + y * g)
        assert torch.equal(r, ref)
    else:
        bound = torch.finfo(dtype).eps * ref.float().abs() + 2.0 ** -18 * ref.float().abs().amax(-1, keepdim=True)
        assert ((r.float() - ref.float()).abs() <= bound).all()
    if round_product and dtype == torch.bfloat16 and s * c > 200:  # the two formulas do differ
        assert not torch.equal(ref, wan_ops.gated_residual_reference(x, y, gate))


@pytest.mark.parametrize("b,s,c", TOKEN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modulated_norm_with_hunyuan_vectors(b, s, c, dtype):
    """Wan's modulated_norm kernel with HunyuanVideo's shift / scale (chunks of [B, 1, 6 C] along the
    channels): apply_mod(norm(x), 1 + scale, shift) is wan_ops.modulated_norm_reference's formula."""
    x = (torch.randn(b, s, c, generator=GEN) * 4 + 1).to(dtype).to(DEV)
    shift, scale = modulation(b, c, dtype)[:2]
    ln = torch.nn.functional.layer_norm(x, (c,), eps=1e-6)
    host = torch.addcmul(shift, ln, 1 + scale)  # flux apply_mod(tensor, m_mult, m_add) with modulation_dims None
    assert torch.equal(wan_ops.modulated_norm_reference(x, shift, scale, 1e-6), host)
    assert triton_reason("modulated_norm", x, shift, scale, 1e-6) is None
    out = torch.full_like(x, float("nan"))
    y = ops.modulated_norm(x, shift, scale, 1e-6, out=out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    term = (ln.float() * (1 + scale.float())).abs()  # one ulp of norm * (1 + scale) where the LayerNorms round apart
    bound = torch.finfo(dtype).eps * (host.float().abs() + term) + 2.0 ** -18 * host.float().abs().amax(-1, keepdim=True)
    assert ((y.float() - host.float()).abs() <= bound).all()


def test_core_dispatch():
    """dvdq_core.hunyuan_ops: the kernels on a GPU, the host's ops on the CPU (silently: there it is the
    expected path); gated_add_ updates x in place and returns it."""
    b, n, n2, heads, d = 2, 5, 3, 4, 16
    c = heads * d
    qkv, qkv2 = qkv_output(b, n, heads, d, torch.bfloat16), qkv_output(b, n2, heads, d, torch.bfloat16)
    w, w2 = norm_weight(d, torch.bfloat16), norm_weight(d, torch.bfloat16)
    pe = flux_pe(b, n + n2, d)
    x = (torch.randn(b, n, c, generator=GEN) * 4).to(torch.bfloat16).to(DEV)
    gate = modulation(b, c, torch.bfloat16, 3)[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = hunyuan_ops.head_norm_rope(qkv[..., :c], w, 1e-6, pe, heads, qkv2[..., :c], w2)
        y = qkv[..., 2 * c:]
        g = hunyuan_ops.gated_add(x, y, gate)
        x2 = x.clone()
        assert hunyuan_ops.gated_add_(x2, y, gate) is x2
    ref = hunyuan_ops.head_norm_rope_reference(qkv[..., :c], w, 1e-6, pe, heads, qkv2[..., :c], w2)
    if ON_GPU:
        assert_close_to_reference(q, ref)
    else:
        assert torch.equal(q, ref)
    assert torch.equal(g, x + y * gate) and torch.equal(x2, g)  # bf16: bit for bit on the GPU too


def host_apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    """What the host's modulation (flux's apply_mod, ComfyUI 0.3.x) computes, written out on its own as
    the ground truth of the tests below (tests/host compares the pack's hunyuan_ops.modulate with the
    real one): without dims `m_add + tensor * m_mult` rounded once; with dims, each token range
    [a, b) times its vector rounded to the dtype, then plus its shift rounded again."""
    if modulation_dims is None:
        return tensor * m_mult if m_add is None else torch.addcmul(m_add, tensor, m_mult)
    out = tensor.clone()
    for a, b, i in modulation_dims:
        seg = (tensor[:, a:b].float() * m_mult[:, i].float()).to(tensor.dtype)  # [B, C] over the tokens, as
        if m_add is not None:  # the host's slices broadcast it (per sample for a batch of one only)
            seg = (seg.float() + m_add[:, i].float()).to(tensor.dtype)
        out[:, a:b] = seg
    return out


def guided_modulation(b, c, dtype, chunks=6):
    """Modulation.forward's chunks with an I2V guiding frame: vec [B, 2, C] (HunyuanVideo.forward_orig's
    two vectors per sample) -> chunks of [B, 2, C] (token-vector stride chunks C)."""
    return (torch.randn(b, 2, chunks * c, generator=GEN) * 0.5).to(dtype).to(DEV).chunk(chunks, dim=-1)


def guided(t0):
    """forward_orig's modulation_dims for image tokens after a guiding frame of t0 tokens."""
    return [(0, t0, 0), (t0, None, 1)]


def per_token(v, s, t0):
    """[B, 2, C] vectors as [B, S, C]: vector 0 for the first t0 tokens, vector 1 after."""
    return torch.where(torch.arange(s, device=v.device)[None, :, None] < t0, v[:, :1], v[:, 1:2])


def host_split(fn, x, *vectors, dims):
    """fn(x, *vectors, dims) of the host for each sample on its own (the kernels' batch semantics; the
    host's slices only mean that for a batch of one), concatenated."""
    return torch.cat([fn(x[i:i + 1].clone(), *(v[i:i + 1] for v in vectors), dims) for i in range(x.shape[0])])


def host_modulation(x, shift, scale, dims):
    return host_apply_mod(torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6), 1 + scale, shift, dims)


def host_gate(x, y, gate, dims):
    return x + host_apply_mod(y.clone(), gate, None, dims)


def test_kernel_dims():
    """The two modulation_dims forms of HunyuanVideo.forward_orig with a guiding frame, for a batch of one,
    map to the kernels' (vectors, first_tokens); anything else is left to the host."""
    kd = hunyuan_ops.kernel_dims
    assert kd(guided(16), 1, 2) == (slice(0, 2), 16)
    assert kd(guided(1), 1, 2) == (slice(0, 2), 1)
    assert kd([(0, None, 1)], 1, 2) == (slice(1, 2), 0)
    assert kd(((0, None, 0),), 1, 1) == (slice(0, 1), 0)
    for dims, batch, vectors in (
            (guided(16), 2, 2), ([(0, None, 1)], 2, 2),  # a batch: the host's slices broadcast it over the tokens
            (guided(16), 1, 1), ([(0, None, 2)], 1, 2), ([(0, None, -1)], 1, 2), ([(0, None, None)], 1, 2),
            (guided(0), 1, 2), ([(0, 16, 1), (16, None, 0)], 1, 2), ([(0, 16, 0), (17, None, 1)], 1, 2),
            ([(0, 16, 0), (16, 32, 1)], 1, 2), ([(1, None, 0)], 1, 2), ([(0, 16, 0)], 1, 2), ([], 1, 2),
            ([(0, 4, 0), (4, 8, 1), (8, None, 1)], 1, 2), ([(0, True, 0), (True, None, 1)], 1, 2),
            ([(0, torch.tensor(4), 0), (torch.tensor(4), None, 1)], 1, 2), ([(0, None)], 1, 2), ("dims", 1, 2)):
        assert kd(dims, batch, vectors) is None, (dims, batch, vectors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dims_references_are_the_host(dtype):
    """With modulation_dims the references are the host's apply_mod (its loop: the product rounded, then
    the sum); for the kernels' forms that is each token's vector applied with those two roundings, which
    differs from the addcmul without dims (one rounding)."""
    b, s, c = 1, 7, 48
    x = (torch.randn(b, s, c, generator=GEN) * 4 + 1).to(dtype).to(DEV)
    y = (torch.randn(b, s, c, generator=GEN) * 2).to(dtype).to(DEV)
    shift, scale, gate = guided_modulation(b, c, dtype, 3)
    for dims, t0 in ((guided(3), 3), (guided(1), 1), (guided(9), 9), ([(0, None, 1)], 0), ([(0, None, 0)], s)):
        want = host_modulation(x, shift, scale, dims)
        assert torch.equal(hunyuan_ops.modulated_norm_reference(x, shift, scale, 1e-6, dims), want), dims
        ln = torch.nn.functional.layer_norm(x, (c,), eps=1e-6)
        assert torch.equal(ln * (1 + per_token(scale, s, t0)) + per_token(shift, s, t0), want), dims
        want = host_gate(x, y, gate, dims)
        assert torch.equal(hunyuan_ops.gated_add_reference(x, y.clone(), gate, dims), want), dims
        x2 = x.clone()
        assert hunyuan_ops.gated_add_inplace_reference(x2, y.clone(), gate, dims) is x2 and torch.equal(x2, want)
        assert torch.equal(x + y * per_token(gate, s, t0), want), dims
    assert torch.equal(hunyuan_ops.modulated_norm_reference(x, shift[:, :1], scale[:, :1], 1e-6),
                       wan_ops.modulated_norm_reference(x, shift[:, :1], scale[:, :1], 1e-6))  # without dims: addcmul
    if dtype == torch.bfloat16:
        one_rounding = torch.addcmul(per_token(shift, s, 3), ln, 1 + per_token(scale, s, 3))
        assert not torch.equal(host_modulation(x, shift, scale, guided(3)), one_rounding)


# (batch, tokens, channels, first tokens T0): T0 = 1, ragged, a batch of two (the kernels' per-sample
# vectors), T0 = S, T0 > S (every token on vector 0), one token
SPLITS = [(1, 7, 48, 1), (1, 7, 256, 3), (2, 5, 320, 2), (1, 5, 64, 5), (1, 4, 48, 9), (1, 1, 64, 1)] + \
    ([(1, 4608, 3072, 1536), (1, 333, 3072, 100)] if ON_GPU else [])


@pytest.mark.parametrize("b,s,c,t0", SPLITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("round_product", [True, False])
def test_modulated_norm_kernel_split_at_a_token(b, s, c, t0, dtype, round_product):
    """ops.modulated_norm with first_tokens: vector 0 for the first T0 tokens, vector 1 after; with
    round_product the host's apply_mod with dims (product, then sum, rounded), else addcmul with those
    vectors. Every output element written. Equal up to the LayerNorm's own rounding (the kernel sums in
    another order): see the exact test below."""
    x = (torch.randn(b, s, c, generator=GEN) * 4 + 1).to(dtype).to(DEV)
    shift, scale = guided_modulation(b, c, dtype)[:2]
    assert triton_reason("modulated_norm_dims", x, shift, scale, 1e-6, t0) is None
    ln = torch.nn.functional.layer_norm(x, (c,), eps=1e-6)
    if round_product:
        host = host_split(host_modulation, x, shift, scale, dims=guided(t0))
    else:
        host = torch.addcmul(per_token(shift, s, t0), ln, 1 + per_token(scale, s, t0))
    out = torch.full_like(x, float("nan"))
    y = ops.modulated_norm(x, shift, scale, 1e-6, out=out, first_tokens=t0, round_product=round_product)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    term = (ln.float() * (1 + per_token(scale, s, t0).float())).abs()
    # where the GPU's LayerNorm rounds the normed value one ulp apart: with round_product that ulp, times
    # (1 + scale), can move the rounded product by two of its ulps (an H100 showed it), then the sum rounds
    bound = torch.finfo(dtype).eps * (host.float().abs() + (2 if round_product else 1) * term) + \
        2.0 ** -18 * host.float().abs().amax(-1, keepdim=True)
    assert ((y.float() - host.float()).abs() <= bound).all(), ((y.float() - host.float()).abs() / bound).max().item()
    assert (y != host).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t0", [1, 6, 40])
def test_modulated_norm_kernel_rounds_as_the_host(dtype, t0):
    """Where the kernel's LayerNorm and the host's agree (rows of +-1 and +-3 times a power of two: mean
    0, variance 5, norms far from a rounding tie), ROUND_PRODUCT is the host's apply_mod with dims bit for
    bit: the product rounded apart (on a GPU not contracted into an FMA with the sum), then the sum.
    The single rounding of addcmul differs on the same data."""
    s, c = 48, 256
    base = torch.tensor([-3.0, -1.0, 1.0, 3.0]).repeat(c // 4)
    x = torch.stack([base[torch.randperm(c, generator=GEN)] * 2.0 ** (i % 5 - 2) for i in range(s)])[None]
    x = x.to(dtype).to(DEV)
    shift, scale = guided_modulation(1, c, dtype)[:2]
    out = torch.full_like(x, float("nan"))
    y = ops.modulated_norm(x, shift, scale, 1e-6, out=out, first_tokens=t0, round_product=True)
    assert torch.equal(y, host_modulation(x, shift, scale, guided(t0)))
    one = ops.modulated_norm(x, shift, scale, 1e-6, first_tokens=t0)
    ln = torch.nn.functional.layer_norm(x, (c,), eps=1e-6)
    assert torch.equal(one, torch.addcmul(per_token(shift, s, t0), ln, 1 + per_token(scale, s, t0)))
    assert not torch.equal(one, y)


@pytest.mark.parametrize("b,s,c,t0", SPLITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("round_product", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
def test_gated_residual_kernel_split_at_a_token(b, s, c, t0, dtype, round_product, in_place):
    """ops.gated_residual with first_tokens: ROUND_PRODUCT is the host's `x + apply_mod(y, gate, None,
    dims)` bit for bit (in place as `txt +=`), without it addcmul with each token's vector."""
    x = (torch.randn(b, s, c, generator=GEN) * 4).to(dtype).to(DEV)
    y = (torch.randn(b, s, c, generator=GEN) * 2).to(dtype).to(DEV)
    gate = guided_modulation(b, c, dtype, 3)[2]
    assert triton_reason("gated_add", x, y, gate, t0) is None
    if round_product:
        ref = host_split(host_gate, x, y, gate, dims=guided(t0))
    else:
        ref = torch.addcmul(x, y, per_token(gate, s, t0))
    out = x.clone() if in_place else torch.full_like(x, float("nan"))
    r = ops.gated_residual(out if in_place else x, y, gate, out=out, round_product=round_product, first_tokens=t0)
    assert r.data_ptr() == out.data_ptr() and not torch.isnan(r).any()
    if round_product:
        assert torch.equal(r, ref)
    else:
        bound = torch.finfo(dtype).eps * ref.float().abs() + 2.0 ** -18 * ref.float().abs().amax(-1, keepdim=True)
        assert ((r.float() - ref.float()).abs() <= bound).all()


def test_dims_dispatch():
    """dvdq_core.hunyuan_ops with modulation_dims: the forms of a guiding frame run the kernels on a GPU
    (no warning: they take the call) and the host's apply_mod on the CPU, bit for bit; other dims, and a
    batch of two (where the host's slices broadcast the batch over the tokens: with B = 2 tokens per
    slice it runs, each token of a slice on another sample's vector), are the host's ops everywhere."""
    b, s, c, t0 = 1, 9, 64, 4
    dt = torch.bfloat16
    x = (torch.randn(b, s, c, generator=GEN) * 4 + 1).to(dt).to(DEV)
    y = (torch.randn(b, s, c, generator=GEN) * 2).to(dt).to(DEV)
    shift, scale, gate = guided_modulation(b, c, dt, 3)
    for dims, first in ((guided(t0), t0), ([(0, None, 1)], 0)):  # (first: per_token's split of each form)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m = hunyuan_ops.modulated_norm(x, shift, scale, 1e-6, dims)
            g = hunyuan_ops.gated_add(x, y.clone(), gate, dims)  # (y a temporary: the host's path scales it in place)
            x2 = x.clone()
            assert hunyuan_ops.gated_add_(x2, y.clone(), gate, dims) is x2
        want = host_modulation(x, shift, scale, dims)
        if ON_GPU:  # one ulp of norm * (1 + scale) where the LayerNorms round apart
            ln = torch.nn.functional.layer_norm(x, (c,), eps=1e-6)
            term = (ln.float() * (1 + per_token(scale, s, first).float())).abs()
            assert ((m.float() - want.float()).abs() <= torch.finfo(dt).eps * (want.float().abs() + term)).all()
        else:
            assert torch.equal(m, want)
        assert torch.equal(g, host_gate(x, y, gate, dims)) and torch.equal(x2, g)  # bf16: bit for bit on a GPU too
    others = [[(0, 3, 1), (3, None, 0)], [(0, 2, 0), (2, 5, 1), (5, None, 0)], [(0, 4, 0)], [(2, None, 1)]]
    x4 = (torch.randn(2, 4, c, generator=GEN) * 4 + 1).to(dt).to(DEV)
    y4 = (torch.randn(2, 4, c, generator=GEN) * 2).to(dt).to(DEV)
    v4 = guided_modulation(2, c, dt, 3)
    for x, y, (shift, scale, gate), dims in [(x, y, (shift, scale, gate), d) for d in others] + \
            [(x4, y4, v4, d) for d in (guided(2), [(0, 2, 1), (2, None, 0)])]:
        assert torch.equal(hunyuan_ops.modulated_norm(x, shift, scale, 1e-6, dims), host_modulation(x, shift, scale, dims))
        assert torch.equal(hunyuan_ops.gated_add(x, y.clone(), gate, dims), host_gate(x, y, gate, dims))
        x2 = x.clone()
        assert torch.equal(hunyuan_ops.gated_add_(x2, y.clone(), gate, dims), host_gate(x, y, gate, dims))
    assert not torch.equal(host_gate(x4, y4, v4[2], guided(2)), host_split(host_gate, x4, y4, v4[2], dims=guided(2)))


def test_unsupported_reasons():
    heads, d = 2, 16
    c = heads * d
    qkv, w = qkv_output(1, 4, heads, d, torch.bfloat16), norm_weight(d, torch.bfloat16)
    x, pe = qkv[..., :c], flux_pe(1, 4, d)
    reason = functools.partial(triton_reason, "head_norm_rope")
    assert "float32" in reason(x, w, 1e-6, pe.double(), heads)
    assert "not [1 or B, 1, L" in reason(x, w, 1e-6, pe[:, :, :3], heads)
    assert "not [1 or B, 1, L" in reason(x, w, 1e-6, pe, heads, x[:, :2], w)  # pe must cover both parts
    assert "bf16 or fp16 only" in reason(x.float(), w, 1e-6, pe, heads)
    assert "heads x even head dim" in reason(x, w, 1e-6, pe, 3)
    assert "unit channel stride" in reason(qkv[..., ::2][..., :c], w, 1e-6, pe, heads)
    assert "power of two" in reason(x[..., :24], w[:12], 1e-6, flux_pe(1, 4, 12), heads)
    assert "norm weight" in reason(x, w[:8], 1e-6, pe, heads)
    assert "norm weight" in reason(x[:, :2], w, 1e-6, pe, heads, x[:, :2], None)
    assert "does not match the first" in reason(x[:, :2], w, 1e-6, pe, heads, x[:, :2].half(), w)
    v = x[:, :1]
    assert "does not match x" in triton_reason("gated_add", x, x[:, :2], v, 0)
    assert "bf16 or fp16 only" in triton_reason("gated_add", x.float(), x.float(), v.float(), 0)
    assert "not contiguous" in triton_reason("gated_add_inplace", x, x, v, 0)  # a view of the qkv output
    # split at a token (I2V guiding frame): two vectors per sample, then any token count (no repeat_e spreading)
    x3, v2 = x[:, :3].contiguous(), x[:, :2]
    dims_reason = functools.partial(triton_reason, "modulated_norm_dims")
    assert dims_reason(x3, v, v, 1e-6, 2) == triton_reason("gated_add", x3, x3, v, 2) == \
        "modulation vectors split at a token must be two per sample"
    assert "negative count of first tokens" in triton_reason("gated_add_inplace", x3, x3, v2, -1)
    assert "do not spread over 3 tokens" in dims_reason(x3, v2, v2, 1e-6, 0)
    assert "differ in shape" in dims_reason(x3, v2, v, 1e-6, 1)
    assert "bf16 or fp16 only" in dims_reason(x3.float(), v2.float(), v2.float(), 1e-6, 1)
    for first in (1, 2, 3, 7):
        assert dims_reason(x3, v2, v2, 1e-6, first) is None
        assert triton_reason("gated_add", x3, x3, v2, first) is None
    if not ON_GPU:  # the machine's checks come first
        assert machine_reason("head_norm_rope", x, w, 1e-6, pe, heads) == ON_CPU
        assert machine_reason("head_norm_rope", x[:, :2], w, 1e-6, pe, heads, x[:, :2], w) == ON_CPU
        assert machine_reason("gated_add", x, x, v, 0) == ON_CPU
        assert machine_reason("gated_add_inplace", x, x, v, 0) == ON_CPU


def test_kernels_compile_for_all_targets():
    """The new kernels compile for sm_80/86/89/90 at HunyuanVideo's size (24 heads x 128, C = 3072),
    without register spills (bench/compile_targets.py's check, CPU only, run without the interpreter):
    the q/k norm, the gate and the modulation of a guiding frame (both with the product rounded apart)."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']\n"
        "import compile_targets as ct\n"
        "from dvdq_core.kernels import _triton as kt, configs\n"
        "for cc in (80, 86, 89, 90):\n"
        "    for fn, types, consts in (\n"
        "        (kt._head_norm_rope_kernel, {'x_ptr': '*bf16', 'w_ptr': '*bf16', 'f_ptr': '*fp32', 'y_ptr': '*bf16',\n"
        "         'L': 'i32', 'L_OUT': 'i32', 'L0': 'i32', 'stride_xb': 'i64', 'stride_xl': 'i32', 'stride_fb': 'i32',\n"
        "         'stride_fl': 'i32', 'eps': 'fp32'}, dict(H=24, HP=32, HALF_D=64, INTERPRET=False)),\n"
        "        (kt._gated_residual_kernel, {'x_ptr': '*bf16', 'y_ptr': '*bf16', 'g_ptr': '*bf16', 'out_ptr': '*bf16',\n"
        "         'S': 'i32', 'REP': 'i32', 'LAST': 'i32', 'stride_gb': 'i32', 'stride_gf': 'i32'},\n"
        "         dict(C=3072, BC=4096, INTERPRET=False, ROUND_PRODUCT=True)),\n"
        "        (kt._modulated_norm_kernel, {'x_ptr': '*bf16', 'shift_ptr': '*bf16', 'scale_ptr': '*bf16',\n"
        "         'y_ptr': '*bf16', 'S': 'i32', 'REP': 'i32', 'LAST': 'i32', 'stride_vb': 'i32', 'stride_vf': 'i32',\n"
        "         'eps': 'fp32'}, dict(C=3072, BC=4096, INTERPRET=False, ROUND_PRODUCT=True))):\n"
        "        r = ct.compile_kernel(fn, types, consts, cc, configs.WAN_OPS_NUM_WARPS, 3)\n"
        "        print(f'sm_{cc}', fn.__name__, r)\n"
        "        assert r['spills'] == 0 and r['smem'] <= ct.SMEM_LIMIT[cc], r\n")
    # each target compiled as itself (an override would make Triton lower every target for one arch)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_OVERRIDE_ARCH")}
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("sm_") == 12


@pytest.mark.skipif(not ON_GPU, reason="a CUDA notion: the GPU path warns once when it must use the host's ops")
def test_gpu_call_the_kernel_cannot_take_warns():
    qkv, w = qkv_output(1, 4, 2, 16, torch.bfloat16), norm_weight(16, torch.bfloat16)
    with pytest.warns(RuntimeWarning,
                      match="HunyuanVideo.s per-head q/k norm and rotary embedding runs on the reference backend"):
        y = hunyuan_ops.head_norm_rope(qkv[..., :32].float(), w.float(), 1e-6, flux_pe(1, 4, 16), 2)
    assert y.dtype == torch.float32 and y.shape == (1, 2, 4, 16)
    x = qkv[..., :32]  # a view: the in-place update needs a contiguous residual
    with pytest.warns(RuntimeWarning, match="HunyuanVideo's gated residual \\(in place\\) runs on the reference backend"):
        want = x + x * x[:, :1]
        hunyuan_ops.gated_add_(x, x.clone(), x[:, :1].clone())
    assert torch.equal(x, want)


@pytest.mark.skipif(not ON_GPU, reason="torch.compile of the custom ops needs the compiled GPU kernels")
def test_torch_compile():
    """The custom ops in a compiled graph (dvdq::gated_add_inplace mutates its first argument), with and
    without a guiding frame's split of the modulation vectors."""
    b, n, n2, heads, d = 2, 64, 16, 4, 32
    c = heads * d
    qkv, qkv2 = qkv_output(b, n, heads, d, torch.bfloat16), qkv_output(b, n2, heads, d, torch.bfloat16)
    w, w2 = norm_weight(d, torch.bfloat16), norm_weight(d, torch.bfloat16)
    pe = flux_pe(b, n + n2, d)
    gate = modulation(b, c, torch.bfloat16, 3)[2]
    shift, scale, gate2 = guided_modulation(b, c, torch.bfloat16, 3)

    def step(a, t):
        q = kernels.head_norm_rope(a[..., :c], w, 1e-6, pe, heads, t[..., :c], w2)
        h = q.transpose(1, 2).flatten(2)  # [B, L, C]
        r = kernels.gated_add(h[:, :n], a[..., c:2 * c], gate, 0)
        res = h[:, n:].contiguous()
        kernels.gated_add_inplace(res, t[..., 2 * c:], gate2, 5)  # a guiding frame of 5 tokens
        m = kernels.modulated_norm_dims(r, shift, scale, 1e-6, 7)
        return r, res, kernels.gated_add(m, r, gate2, 7)

    got = torch.compile(step, fullgraph=True)(qkv, qkv2)
    want = step(qkv, qkv2)
    assert all(torch.equal(g, e) for g, e in zip(got, want))  # the same kernels, called by the compiled graph


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is a CUDA notion; needs the compiled GPU kernels")
def test_no_host_sync_and_only_outputs_allocated():
    b, n, n2, heads, d = 2, 64, 16, 4, 32
    c = heads * d
    qkv, qkv2 = qkv_output(b, n, heads, d, torch.bfloat16), qkv_output(b, n2, heads, d, torch.bfloat16)
    w, w2 = norm_weight(d, torch.bfloat16), norm_weight(d, torch.bfloat16)
    pe = flux_pe(b, n + n2, d)
    gate = modulation(b, c, torch.bfloat16, 3)[2]
    res = (torch.randn(b, n2, c, generator=GEN)).to(torch.bfloat16).to(DEV)
    x, y, y2 = qkv[..., 2 * c:].contiguous(), qkv[..., c:2 * c].contiguous(), qkv2[..., 2 * c:].contiguous()

    def ops_once():
        q = hunyuan_ops.head_norm_rope(qkv[..., :c], w, 1e-6, pe, heads, qkv2[..., :c], w2)
        hunyuan_ops.gated_add_(res, y2, gate)
        return hunyuan_ops.gated_add(x, y, gate), q

    # the q buffer (q and k of the image and text parts in one) and gated_add's output; the in-place update none
    assert allocations_without_host_sync(ops_once) == 2


def test_node_patch_refuses_a_changed_host():
    """nodes/hunyuan_blocks.py installs its forwards only where the host's code is the one they follow (the
    real classes are checked against ComfyUI in tests/host); the eps of RMSNorm.forward is a constant
    there and is checked too. One switch turns the Wan and HunyuanVideo fusions off."""
    from torch import nn
    hb = pack.sub("hunyuan_blocks")
    bf = pack.sub("block_fusion")
    wb = pack.sub("wan_blocks")

    changed = {}  # host code with another eps, and an attention without the rotation (source: never called)
    exec("def rms_forward(self, x):\n    return comfy.ldm.common_dit.rms_norm(x, self.scale, 1e-5)\n"
         "def attention(q, k, v, pe, mask=None, transformer_options={}):\n"
         "    return optimized_attention(q, k, v, q.shape[1], skip_reshape=True)\n", changed)
    assert "no longer has the constants [1e-06]" in bf.host_function_mismatch(changed["rms_forward"], hb.RMS_NORM)
    assert "uses ['dtype', 'reshape', 'to', 'type_as'] differently" in \
        bf.host_function_mismatch(changed["attention"], hb.ATTENTION)
    assert "expected ('self', 'img', 'txt'" in bf.host_function_mismatch(changed["rms_forward"], hb.DOUBLE_BLOCK)
    # the newer forms (0.8.0, 0.33.0): a block with 0.33.0's names but without its patch names is no known form;
    # a function is matched to the first form it has, with that form's flags, else compared with the newest
    exec("def single(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):\n"
         "    return (apply_mod, attention, cat, copy, dtype, float16, gate, get, hidden_size, linear1, linear2,\n"
         "            mlp_act, mlp_hidden_dim_first, modulation, nan_to_num, norm, num_heads, permute, pre_norm,\n"
         "            scale, shape, shift, split, torch, view, yak_mlp, 'patches', 'attn1_patch')\n", changed)
    assert "no longer has the constants ['attn1_output_patch']" in \
        bf.host_function_mismatch(changed["single"], hb.SINGLE_BLOCK_033)
    forms = hb.FORMS["SingleStreamBlock.forward"]
    assert hb._match(changed["single"], "single", forms) == \
        ((), "single: " + bf.host_function_mismatch(changed["single"], hb.SINGLE_BLOCK_033))
    exec("def attention(q, k, v, pe, mask=None, transformer_options={}):\n"
         "    q, k = apply_rope(q, k, pe)\n"
         "    return optimized_attention(q, k, v, q.shape[1], skip_reshape=True, mask=mask)\n", changed)
    assert hb._match(changed["attention"], "attention", hb.FORMS["attention"]) == (("addcmul",), None)
    assert hb.fuse_hunyuan(nn.Linear(2, 2)) == (0, None)  # no HunyuanVideo (and without ComfyUI: no import)
    for name in ("DVDQ_FUSE_BLOCKS", "DVDQ_FUSE_WAN"):
        os.environ[name] = "0"
        try:
            assert hb.fuse_hunyuan(nn.Linear(2, 2)) == wb.fuse_wan(nn.Linear(2, 2)) == (0, f"turned off by {name}=0")
        finally:
            del os.environ[name]


def test_calls_for_the_host_forward_say_why_once(monkeypatch, caplog):
    """A block call the fused forward does not take runs ComfyUI's own forward, and the log says why,
    once per reason (no silent slow path)."""
    import logging
    from types import SimpleNamespace
    hb = pack.sub("hunyuan_blocks")

    def attention():
        return None

    def apply_mod():
        return None
    monkeypatch.setitem(hb._HOST, "attention", attention)
    monkeypatch.setitem(hb._HOST, "apply_mod", apply_mod)
    monkeypatch.setitem(hb._HOST, "apply_rope", None)  # (this module has none, as the host's flux.math)
    monkeypatch.setattr(hb, "_SAID", set())
    host, pe = SimpleNamespace(attention=attention, apply_mod=apply_mod), torch.zeros(1)
    one, two = torch.zeros(1, 8, 4), torch.zeros(2, 8, 4)
    guided_img, guided_txt = [(0, 3, 0), (3, None, 1)], [(0, None, 1)]
    assert hb._host_reason(host, pe, one, torch.zeros(1, 4), None, None) is None
    assert hb._host_reason(host, pe, one, torch.zeros(1, 2, 4), guided_img, guided_txt) is None
    assert "start frame at batch size 1" in hb._host_reason(host, pe, two, torch.zeros(2, 2, 4), guided_img, guided_txt)
    assert "start frame at batch size 1" in hb._host_reason(host, pe, one, torch.zeros(1, 2, 4), [(0, 3, 1), (3, None, 0)])
    assert "rotary" in hb._host_reason(host, None, one, torch.zeros(1, 4), None)
    other = SimpleNamespace(attention=attention, apply_mod=lambda: None)
    assert "replaced" in hb._host_reason(other, pe, one, torch.zeros(1, 4), None)
    # 0.8.0 on ("v080"): blocks without their own modulation; 0.33.0 ("patches"): attention patches
    block, off = SimpleNamespace(modulation=object()), SimpleNamespace(modulation=None)
    patched = {"patches": {"attn1_output_patch": [print]}}
    assert hb._early_reason(off, frozenset(), patched) is None  # 0.3.64: no such blocks, patches ignored
    assert "modulation=False" in hb._early_reason(off, frozenset({"v080"}), {})
    assert hb._early_reason(block, frozenset({"v080", "patches"}), {"patches": {"attn1_patch": []}}) is None
    assert "attn1_patch" in hb._early_reason(block, frozenset({"v080", "patches"}), patched)
    with caplog.at_level(logging.WARNING, logger="dvdq"):
        for reason in ("reason a", "reason a", "reason b"):
            hb._to_host(reason)
    said = [r.getMessage() for r in caplog.records if r.name == "dvdq"]
    assert len(said) == 2 and "ComfyUI's own forward (correct, slower) for reason a" in said[0]


def test_ops_rms_norm_weights_and_eps(monkeypatch):
    """0.33.0's q/k norms are comfy.ops RMSNorms (torch's RMSNorm): the fused forwards take their weight
    (cast where comfy_cast_weights is set, else only in the activations' dtype) and their eps, where None
    torch's default: the epsilon of rms_norm's compute type, float32's for bf16 / fp16 (not the input's)."""
    from torch import nn
    hb = pack.sub("hunyuan_blocks")

    class Norm(nn.RMSNorm):
        comfy_cast_weights, weight_function, bias_function = False, [], []

    class QK(nn.Module):
        def __init__(self, eps=None, dtype=torch.bfloat16):
            super().__init__()
            self.query_norm, self.key_norm = Norm(16, eps=eps, dtype=dtype), Norm(16, eps=eps, dtype=dtype)

        def forward(self, q, k, v):
            return self.query_norm(q).to(v), self.key_norm(k).to(v)
    monkeypatch.setitem(hb._HOST, "QKNorm", QK.forward)
    monkeypatch.setitem(hb._HOST, "RMSNorm", Norm.forward)
    x = (torch.randn(1, 5, 32, generator=GEN) * 1e-2).to(torch.bfloat16)
    wq, wk, eps = hb._qk_norm(QK(), 16, x, True)
    assert wq.dtype == wk.dtype == torch.bfloat16 and eps == torch.finfo(torch.float32).eps
    h = x.view(1, 5, 2, 16)
    assert torch.equal(torch.nn.functional.rms_norm(h, (16,), wq, None), torch.nn.functional.rms_norm(h, (16,), wq, eps))
    assert hb._qk_norm(QK(1e-5), 16, x, True)[2] == 1e-5
    assert hb._qk_norm(QK(dtype=torch.float32), 16, x, True) is None  # torch's rms_norm would mix dtypes
    cast = QK(dtype=torch.float32)
    cast.query_norm.comfy_cast_weights = cast.key_norm.comfy_cast_weights = True  # the host casts to x's dtype
    assert hb._qk_norm(cast, 16, x, True) is not None and hb._qk_norm(cast, 8, x, True) is None
    cast.key_norm.eps = 1e-5
    assert hb._qk_norm(cast, 16, x, True) is None  # one eps for q and k


def test_plain_norm_refuses_patched_or_streamed_weights():
    """A q/k norm whose weight the host patches (weight_function: a LoRA on it) or, under 0.33.0's dynamic
    VRAM, patches or streams at cast time (`*_lowvram_function`, `_v`) is not fused: the host's forward runs it."""
    from torch import nn
    bf = pack.sub("block_fusion")
    norm = nn.RMSNorm(8)
    assert bf.plain_norm(norm)
    for attr, value in (("weight_function", [print]), ("weight_lowvram_function", print),
                        ("bias_lowvram_function", print), ("_v", object())):
        patched = nn.RMSNorm(8)
        setattr(patched, attr, value)
        assert not bf.plain_norm(patched), attr
