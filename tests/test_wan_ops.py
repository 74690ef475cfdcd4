"""The Wan block's elementwise steps (dvdq_core.wan_ops): each Triton kernel against the host's ops
(the references), and the references against the textbook math. Interpreter on the CPU (CI),
compiled on a GPU."""
import functools
import os
import warnings

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels module is first imported

import pack  # noqa: E402
from dvdq_core import kernels, wan_ops  # noqa: E402
from dvdq_core.kernels import ops  # noqa: E402
from gpu_checks import ON_CPU, allocations_without_host_sync, machine_reason, triton_reason  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
GEN = torch.Generator().manual_seed(77)


def wan_freqs(b: int, s: int, d: int, theta=10000.0) -> torch.Tensor:
    """[b, S, 1, D/2, 2, 2] float32 rotations [[cos, -sin], [sin, cos]] of random positions."""
    pos = torch.randint(0, 1000, (b, s), generator=GEN).float()
    omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    a = pos[..., None] * omega.float()
    f = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1)
    return f.view(b, s, 1, d // 2, 2, 2).to(DEV)


def inputs(b, s, heads, d, dtype, norm):
    x = (torch.randn(b, s, heads * d, generator=GEN) * 3).to(dtype).to(DEV)
    w = (1 + 0.2 * torch.randn(heads * d, generator=GEN)).to(dtype).to(DEV) if norm else None
    return x, w


def assert_close_to_reference(y, ref, norm: bool):
    """(the rotation) Equal up to float rounding. Each output is c x0 - s x1 (or s x0 + c x1) of its
    pair (x0, x1), whose length m the rotation keeps: the GPU contracts the two products into an FMA
    where the host rounds one first (float32 ulps of m), and with the norm the GPU's rms_norm may round
    x0 or x1 to the neighbouring bf16/fp16 value (one ulp of m). Where the two terms cancel (an output
    near zero) that is more than one ulp of the output; elsewhere at most the neighbouring value."""
    assert not torch.isnan(y).any(), "some output elements were not written"
    r = ref.float()
    m = r.unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    eps = torch.finfo(ref.dtype).eps
    bound = eps * r.abs() + (eps if norm else 2.0 ** -20) * m
    assert ((y.float() - r).abs() <= bound).all(), (y.float() - r).abs().max().item()
    assert (y != ref).float().mean().item() < 0.01


SHAPES = [(2, 5, 3, 16), (1, 7, 5, 8), (2, 3, 12, 32)] + ([(2, 4097, 40, 128), (1, 333, 12, 128)] if ON_GPU else [])


@pytest.mark.parametrize("b,s,heads,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("freq_batch", [1, 2])
def test_kernel_matches_host_ops(b, s, heads, d, dtype, norm, freq_batch):
    x, w = inputs(b, s, heads, d, dtype, norm)
    f = wan_freqs(min(freq_batch, b), s, d)
    assert triton_reason("norm_rope", x, w, 1e-6, f, heads) is None
    out = torch.full((b, s, heads, d), float("nan"), dtype=dtype, device=DEV)
    y = ops.norm_rope(x, w, 1e-6, f, heads, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close_to_reference(y, wan_ops.norm_rope_reference(x, w, 1e-6, f, heads), norm)


def test_reference_is_the_textbook_rotation():
    """RMS-normalise with the weight, then each head's channel pair (2i, 2i+1) as a complex number
    times e^(i angle): the reference (ComfyUI's formula) computes exactly this."""
    b, s, heads, d = 2, 6, 3, 16
    x, w = inputs(b, s, heads, d, torch.float32, True)
    f = wan_freqs(1, s, d)
    angle = torch.atan2(f[..., 1, 0], f[..., 0, 0])  # [1, S, 1, D/2]
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    z = torch.view_as_complex(xn.view(b, s, heads, d // 2, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    want = torch.view_as_real(z).reshape(b, s, heads, d)
    torch.testing.assert_close(wan_ops.norm_rope_reference(x, w, 1e-6, f, heads), want, rtol=1e-5, atol=1e-5)


def test_core_dispatch():
    """dvdq_core.wan_ops: the kernels on a GPU, the host's ops on the CPU (silently: there it is
    the expected path); eps None means torch's rms_norm default, float32's epsilon for bf16 inputs."""
    x, w = inputs(2, 5, 4, 16, torch.bfloat16, True)
    f = wan_freqs(1, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = wan_ops.norm_rope(x, w, None, f, 4)
        e = modulation(2, 64, torch.bfloat16)
        m = wan_ops.modulated_norm(x, e[0], e[1], 1e-6)
        g = wan_ops.gated_residual(x, m, e[2])
    ref = wan_ops.norm_rope_reference(x, w, torch.finfo(torch.float32).eps, f, 4)
    small = x * 1e-3  # where eps matters: norm_rope's eps None is torch's own (rms_norm with eps None)
    with torch.no_grad():
        y_small = wan_ops.norm_rope(small, w, None, f, 4)
    if not ON_GPU:
        assert torch.equal(y_small, wan_ops.norm_rope_reference(small, w, None, f, 4))
    m_ref = wan_ops.modulated_norm_reference(x, e[0], e[1], 1e-6)
    if ON_GPU:
        assert_close_to_reference(y, ref, True)
        term = (torch.nn.functional.layer_norm(x, (64,), eps=1e-6).float() * (1 + e[1].float())).abs()
        assert_one_rounding(m, m_ref, torch.finfo(x.dtype).eps * term)
        assert_one_rounding(g, wan_ops.gated_residual_reference(x, m, e[2]))
    else:
        assert torch.equal(y, ref) and torch.equal(m, m_ref)
        assert torch.equal(g, wan_ops.gated_residual_reference(x, m, e[2]))


def test_unsupported_reasons():
    x, w = inputs(1, 4, 2, 16, torch.bfloat16, True)
    f = wan_freqs(1, 4, 16)
    reason = functools.partial(triton_reason, "norm_rope")
    assert "float32" in reason(x, w, 1e-6, f.double(), 2)
    assert "not [1 or B, S" in reason(x, w, 1e-6, f[:, :3], 2)
    assert "dtype" in reason(x.float(), w, 1e-6, f, 2)
    assert "heads x even head dim" in reason(x, w, 1e-6, f, 3)
    assert "power of two" in reason(x[..., :24], w[:24], 1e-6, wan_freqs(1, 4, 12), 2)
    assert "norm weight" in reason(x, w[:8], 1e-6, f, 2)
    v = x[:, :1]
    assert "need the host's type promotion" in triton_reason("modulated_norm", x, v.float(), v.float(), 1e-6)
    assert "is not [1, frames, 32]" in triton_reason("modulated_norm", x, v[..., :16], v[..., :16], 1e-6)
    assert "differ in shape" in triton_reason("modulated_norm", x, x[:, :2], v, 1e-6)
    assert "do not spread over 4 tokens" in triton_reason("gated_residual", x, x, x[:, :3])
    assert "not [batch, tokens, channels]" in triton_reason("gated_residual", x[0], x[0], v[0])
    assert "bf16 or fp16 only" in triton_reason("gated_residual", x.float(), x.float(), v.float())
    assert "does not match x" in triton_reason("gated_residual", x, x[:, :2], v)
    if not ON_GPU:  # the machine's checks come first: on the CPU that is the reason, whatever the call
        assert machine_reason("norm_rope", x, w, 1e-6, f, 2) == ON_CPU
        assert machine_reason("modulated_norm", x, v, v, 1e-6) == ON_CPU
        assert machine_reason("gated_residual", x.float(), x, v) == ON_CPU


def modulation(b, c, dtype, frames=None):
    """Six modulation vectors as the host slices them: one per sample, a chunk of a [B, 6, C] tensor
    (batch stride 6 C), or with `frames` F an unbind of a [B, F, 6, C] tensor (per frame or token)."""
    if frames is None:
        return (torch.randn(b, 6, c, generator=GEN) * 0.5).to(dtype).to(DEV).chunk(6, dim=1)
    return (torch.randn(b, frames, 6, c, generator=GEN) * 0.5).to(dtype).to(DEV).unbind(2)


# None: [B, 1, C] chunks of [B, 6, C]; 1: a [B, 1, C] unbind of [B, 1, 6, C]; "third": ceil(S / 3)
# vectors (S = 5: two, 3 + 2 tokens; S = 7: three, 3 + 3 + 1); "token": one vector per token
FRAMES = [None, 1, "third", "token"]


def frames_for(spec, s):
    return {None: None, 1: 1, "third": max(1, s // 3 + (s % 3 > 0)), "token": s}[spec]


def assert_one_rounding(y, ref, extra=0.0):
    """Equal up to one rounding of the output (the kernels compute in float32 in another order), plus
    `extra` where an intermediate may round differently."""
    assert not torch.isnan(y).any(), "some output elements were not written"
    r = ref.float()
    bound = torch.finfo(ref.dtype).eps * r.abs() + 2.0 ** -18 * r.abs().amax(-1, keepdim=True) + extra
    assert ((y.float() - r).abs() <= bound).all(), (y.float() - r).abs().max().item()
    assert (y != ref).float().mean().item() < 0.02


TOKEN_SHAPES = [(2, 5, 48), (1, 7, 256), (2, 3, 320)] + ([(2, 4097, 5120), (1, 333, 1536)] if ON_GPU else [])


@pytest.mark.parametrize("b,s,c", TOKEN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frames", FRAMES)
def test_modulated_norm_matches_host_ops(b, s, c, dtype, frames):
    x = (torch.randn(b, s, c, generator=GEN) * 4 + 1).to(dtype).to(DEV)
    e = modulation(b, c, dtype, frames_for(frames, s))
    assert triton_reason("modulated_norm", x, e[0], e[1], 1e-6) is None
    out = torch.full_like(x, float("nan"))
    y = ops.modulated_norm(x, e[0], e[1], 1e-6, out=out)
    assert y.data_ptr() == out.data_ptr()
    # the kernel's LayerNorm (two passes) and the GPU's (Welford) may round the normed value to
    # neighbouring values: one ulp of norm * (1 + scale) more where shift cancels that term
    term = (torch.nn.functional.layer_norm(x, (c,), eps=1e-6).float() * (1 + wan_ops.per_token(e[1], x).float())).abs()
    assert_one_rounding(y, wan_ops.modulated_norm_reference(x, e[0], e[1], 1e-6), torch.finfo(dtype).eps * term)


@pytest.mark.parametrize("b,s,c", TOKEN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frames", FRAMES)
def test_gated_residual_matches_host_ops(b, s, c, dtype, frames):
    x = (torch.randn(b, s, c, generator=GEN) * 4).to(dtype).to(DEV)
    y = (torch.randn(b, s, c, generator=GEN) * 2).to(dtype).to(DEV)
    g = modulation(b, c, dtype, frames_for(frames, s))[2]
    assert triton_reason("gated_residual", x, y, g) is None
    out = torch.full_like(x, float("nan"))
    r = ops.gated_residual(x, y, g, out=out)
    assert r.data_ptr() == out.data_ptr()
    assert_one_rounding(r, wan_ops.gated_residual_reference(x, y, g))


def test_per_token_spreads_like_comfyui_repeat_e():
    """ComfyUI's repeat_e (comfy/ldm/wan/model.py), spelled out: token t of S takes vector t // r of
    F, r = S / F when F divides S, else S // F + 1; and the kernels' tokens_per_vector agrees."""
    for s, f in [(12, 1), (12, 3), (12, 5), (12, 12), (7, 2), (10, 4), (6, 20)]:
        v = torch.arange(f, dtype=torch.float32).view(1, f, 1)
        r = s // f if (s // f) * f == s else s // f + 1
        want = torch.tensor([t // r if f > 1 else 0 for t in range(s)], dtype=torch.float32)
        got = wan_ops.per_token(v, torch.zeros(1, s, 1)).expand(1, s, 1).flatten()
        assert torch.equal(got, want), (s, f)
        if f > 1:
            assert ops.tokens_per_vector(s, f) == r


def test_references_are_the_textbook_formulas():
    x = torch.randn(2, 5, 32, generator=GEN, dtype=torch.float64)
    shift, scale, gate = (torch.randn(2, 1, 32, generator=GEN, dtype=torch.float64) for _ in range(3))
    n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(wan_ops.modulated_norm_reference(x, shift, scale, 1e-6), n * (1 + scale) + shift)
    y = torch.randn(2, 5, 32, generator=GEN, dtype=torch.float64)
    torch.testing.assert_close(wan_ops.gated_residual_reference(x, y, gate), x + y * gate)


@pytest.mark.skipif(not ON_GPU, reason="a CUDA notion: the GPU path warns once when it must use the host's ops")
def test_gpu_call_the_kernel_cannot_take_warns():
    x, w = inputs(1, 4, 2, 16, torch.bfloat16, True)
    with pytest.warns(RuntimeWarning, match="q/k norm and rotary embedding runs on the reference backend"):
        y = wan_ops.norm_rope(x.float(), w.float(), 1e-6, wan_freqs(1, 4, 16), 2)
    assert y.dtype == torch.float32


@pytest.mark.skipif(not ON_GPU, reason="torch.compile of the custom ops needs the compiled GPU kernels")
def test_torch_compile():
    x, w = inputs(2, 64, 4, 32, torch.bfloat16, True)
    f = wan_freqs(1, 64, 32)
    e = modulation(2, 128, torch.bfloat16)

    def step(a):
        h = kernels.modulated_norm(a, e[0], e[1], 1e-6)
        return kernels.gated_residual(a, kernels.norm_rope(h, w, 1e-6, f, 4).flatten(2), e[2])

    got = torch.compile(step, fullgraph=True)(x)
    assert torch.equal(got, step(x))  # the same kernels, called by the compiled graph
    h = wan_ops.modulated_norm_reference(x, e[0], e[1], 1e-6)
    want = wan_ops.gated_residual_reference(x, wan_ops.norm_rope_reference(h, w, 1e-6, f, 4).flatten(2), e[2])
    assert (got.float() - want.float()).abs().max().item() < 0.1 * want.float().abs().max().item()
    assert (got != want).float().mean().item() < 0.05


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is a CUDA notion; needs the compiled GPU kernels")
def test_no_host_sync_and_only_outputs_allocated():
    x, w = inputs(2, 64, 4, 32, torch.bfloat16, True)
    f = wan_freqs(1, 64, 32)
    e = modulation(2, 128, torch.bfloat16, 4)

    def ops_once():
        h = wan_ops.modulated_norm(x, e[0], e[1], 1e-6)
        return wan_ops.gated_residual(x, wan_ops.norm_rope(h, w, 1e-6, f, 4).flatten(2), e[2])

    # nothing but the three outputs (and the norm_rope output's flatten is a view)
    assert allocations_without_host_sync(ops_once) == 3


def test_node_patch_refuses_a_changed_host_forward():
    """nodes/wan_blocks.py installs its versions of the host's forwards only where the host's forward has
    the signature and the names it copies (the real classes are checked against ComfyUI in tests/host)."""
    from torch import nn
    bf = pack.sub("block_fusion")
    wb = pack.sub("wan_blocks")

    class OtherSignature(nn.Module):
        def forward(self, x, context, transformer_options={}, **kwargs):
            return x

    class ExtraStep(nn.Module):
        def forward(self, x, freqs, transformer_options={}):
            return self.o(patch_hook(x, freqs))  # noqa: F821  (never called)

    assert "expected ('self', 'x', 'freqs', 'transformer_options')" in bf.host_forward_mismatch(OtherSignature,
                                                                                               wb.SELF_ATTENTION)
    assert "patch_hook" in bf.host_forward_mismatch(ExtraStep, wb.SELF_ATTENTION)
    assert "expected ('self', 'x', 'e', 'freqs'" in bf.host_forward_mismatch(ExtraStep, wb.BLOCK)
    assert wb.fuse_wan(nn.Linear(2, 2)) == (0, None)  # no Wan modules (and without ComfyUI: no import)
    os.environ["DVDQ_FUSE_WAN"] = "0"
    try:
        assert wb.fuse_wan(nn.Linear(2, 2)) == (0, "turned off by DVDQ_FUSE_WAN=0")
    finally:
        del os.environ["DVDQ_FUSE_WAN"]
