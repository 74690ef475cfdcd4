"""Triton kernels against the core's reference backend.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by `make test`, and
set here too if missing) at small sizes; with CUDA they run compiled at full sizes as well. Nothing
here skips itself when the interpreter is available: the interpreter path is the CI path.
"""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels module is first imported

from dvdq_core import (  # noqa: E402
    LayerSpec,
    QuantLinear,
    kernels,  # noqa: E402
)
from dvdq_core.activations import POW2_OCTAVES, auto_scale, quantize_per_token  # noqa: E402
from dvdq_core.backends import reference_forward  # noqa: E402
from dvdq_core.hadamard import effective_block, rotate  # noqa: E402
from dvdq_core.kernels import configs, ops  # noqa: E402
from dvdq_core.linear import BitState  # noqa: E402
from gpu_checks import ON_CPU, allocations_without_host_sync, linear_reason, machine_reason  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
GEN = torch.Generator().manual_seed(1234)  # one stream: every test draws fresh inputs
# A Gluon GEMM that fails falls back to the Triton GEMM with a warning (same numbers): here that
# is a failure, or a test of the Gluon path could pass on the fallback.
pytestmark = pytest.mark.filterwarnings("error:DVD-Quant. the Hopper Gluon GEMM failed")


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=GEN) * scale).to(dtype).to(DEV)


def make_layer(n, k, *, method="dvdq", had_block=128, scale_block=128, bias=True, dtype=torch.bfloat16,
               granularity="block"):
    rot = method in ("dvdq", "quarot")
    spec = LayerSpec(w_bits=4, a_bits=None, method=method,
                     had_block=effective_block(had_block, k) if rot else 1,
                     scale_block=effective_block(scale_block, k), rotate=rot,
                     auto_scale=method == "dvdq", granularity=granularity)
    layer = QuantLinear(k, n, spec, bias=bias, bias_dtype=dtype, state=BitState(8), backend="triton", device=DEV)
    layer.weight.copy_(torch.randint(0, 256, (n, k // 2), generator=GEN, dtype=torch.uint8))
    layer.w_zero.copy_(torch.randint(0, 16, (n,), generator=GEN, dtype=torch.uint8))
    layer.w_scale.copy_(torch.rand(n, generator=GEN) * 0.02 + 1e-3)
    if bias:
        layer.bias.copy_(rand(n, dtype=dtype))
    return layer


def activations(m, k, dtype):
    """Gaussian tokens with a few massive channels, as in video DiTs."""
    x = rand(m, k, dtype=torch.float32)
    x[:, torch.randint(0, k, (3,), generator=GEN)] *= 40.0
    return x.to(dtype)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def run_linear(layer, x, bits, cfg=None, **variant):
    """The kernels' forward into a NaN-poisoned output (so an unwritten element fails the check)."""
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=x.device)
    y = ops.w4_linear_impl(x, layer.weight, layer.w_scale, layer.w_zero, layer.bias, bits, layer.had_block,
                           layer.scale_block, layer.auto_scale, gemm_cfg=cfg, out=out,
                           pow2=layer.granularity == "pow2", gelu=layer.act == "gelu_tanh", **variant)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y).any(), "some output elements were not written"
    return y


# (M, N, K): M = 1 and ragged M, an odd number of K-blocks (K = 320 = 5 x 64), N not a multiple
# of any tile.
SMALL_SHAPES = [(1, 48, 192), (37, 40, 320), (19, 96, 256)]
GPU_SHAPES = [(1, 1536, 1536), (333, 5120, 5120), (4097, 1000, 1536), (2048, 13824, 5120), (1024, 5120, 13824)]
SHAPES = SMALL_SHAPES + (GPU_SHAPES if ON_GPU else [])


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bits,granularity", [(4, "block"), (6, "block"), (8, "block"), (4, "pow2"), (8, "pow2")])
def test_linear_matches_reference(m, n, k, bits, granularity):
    dtype = torch.bfloat16 if (m + bits) % 2 else torch.float16
    layer = make_layer(n, k, had_block=64 if k % 128 else 128, scale_block=64 if k == 320 else 128,
                       bias=bits != 6, dtype=dtype, granularity=granularity)
    x = activations(m, k, dtype)
    y = run_linear(layer, x, bits)
    ref = reference_forward(layer, x, bits)
    # A rounding tie may flip one activation code; the rest is float rounding.
    assert rel_err(y, ref) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("bits,granularity", [(4, "pow2"), (8, "block"), (16, "block")])
def test_float32_bias(bits, granularity):
    """A float32 bias (what the core keeps of an fp8 checkpoint's bias) with 16-bit activations, on
    every GEMM path (the Gluon ones at this size on sm_90)."""
    m, n, k = (9000, 1000, 1536) if ON_GPU else (37, 40, 256)
    layer = make_layer(n, k, dtype=torch.float32, granularity=granularity)
    x = activations(m, k, torch.bfloat16)
    assert layer.bias.dtype == torch.float32
    assert rel_err(run_linear(layer, x, bits), reference_forward(layer, x, bits)) < 4e-3


@pytest.mark.parametrize("method", ["minmax", "quarot"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_baseline_methods(method, dtype):
    m, n, k = (300, 1000, 1536) if ON_GPU else (21, 40, 128)
    layer = make_layer(n, k, method=method, dtype=dtype, bias=dtype == torch.float16)
    x = activations(m, k, dtype)
    for bits in (4, 8):
        # Without rotation, bf16 inputs hit exact rounding ties of x / s often, and one flipped
        # 4-bit code moves an output by a whole step: allow more there.
        tol = 1e-2 if (method == "minmax" and bits == 4) else 4e-3
        assert rel_err(run_linear(layer, x, bits), reference_forward(layer, x, bits)) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unquantized_activations(dtype):
    m, n, k = (700, 3000, 5120) if ON_GPU else (23, 40, 192)
    layer = make_layer(n, k, had_block=64, dtype=dtype)
    x = activations(m, k, dtype)
    assert rel_err(run_linear(layer, x, 16), reference_forward(layer, x, 16)) < 5e-3


# (128, 64, 256): a column tile of the quantize kernel spans two scale blocks.
@pytest.mark.parametrize("hb,sb,k", [(128, 128, 256), (64, 128, 384), (16, 64, 192), (256, 256, 512), (1, 64, 128),
                                     (128, 64, 256)])
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_codes(hb, sb, k, bits):
    m = 4096 if ON_GPU else 33
    x = activations(m, k, torch.bfloat16)
    q = torch.full((m, k), -77, dtype=torch.int8, device=DEV)
    s = torch.full((m,), float("nan"), device=DEV)
    q, s, l = ops.quantize_activations(x, hb, sb, bits, True, q=q, s=s)
    xr = rotate(x.float(), hb) if hb > 1 else x.float()
    l_ref = auto_scale(xr, "block", sb)
    q_ref, s_ref = quantize_per_token(xr, bits, l_ref)
    torch.testing.assert_close(l, l_ref[::sb], rtol=1e-5, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (ops.unpermute_columns(q, ops.layout_group(k, sb)).int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # rounding ties only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("auto", [True, False])
@pytest.mark.parametrize("sb,k", [(128, 256), (64, 192)])
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_codes_exact_without_rotation(dtype, auto, sb, k, bits):
    """Without rotation Xr = X on both sides, so s and every code must equal the reference's,
    rounding ties included (frequent with 16-bit inputs): both multiply by the same float32
    r = 1 / (l_b * s_i)."""
    m = 4096 if ON_GPU else 257
    x = activations(m, k, dtype)
    q, s, l = ops.quantize_activations(x, 1, sb, bits, auto)
    xr = x.float()
    l_ref = auto_scale(xr, "block", sb) if auto else None
    q_ref, s_ref = quantize_per_token(xr, bits, l_ref)
    if auto:
        assert torch.equal(l, l_ref[::sb])
    assert torch.equal(s, s_ref)
    assert torch.equal(ops.unpermute_columns(q, ops.layout_group(k, sb)), q_ref)


def _pow2_folded_reference(xr, bits):
    """The reference's codes and scales for granularity "pow2", folded as the kernels store them."""
    l = auto_scale(xr, "pow2", 64)
    q, s = quantize_per_token(xr, bits, l)
    e = torch.log2(l).round().int()  # l holds exact powers of two
    e_lo = int(e.max()) - POW2_OCTAVES
    assert int(e.min()) >= e_lo  # the window
    return q.int() * (2 ** (e - e_lo)), s * 2.0 ** e_lo


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sb,k", [(128, 256), (64, 192)])
def test_pow2_codes_exact_without_rotation(dtype, sb, k):
    """Granularity "pow2" at 4 bits: the folded codes q * 2**(e_j - e_lo) and s * 2**e_lo equal the
    reference's exactly (power-of-two scales change no rounding), and they fit int8."""
    m = 4096 if ON_GPU else 129
    x = activations(m, k, dtype)
    x[:, 5] *= 1e-3  # a quiet channel: clamped to the window's floor
    q = torch.full((m, k), -77, dtype=torch.int8, device=DEV)
    s = torch.full((m,), float("nan"), device=DEV)
    q, s, l = ops.quantize_activations(x, 1, sb, 4, True, q=q, s=s, pow2=True)
    assert l is None
    q_ref, s_ref = _pow2_folded_reference(x.float(), 4)
    assert int(q_ref.min()) >= -128 and int(q_ref.max()) <= 127
    assert torch.equal(s, s_ref)
    assert torch.equal(ops.unpermute_columns(q, ops.layout_group(k, sb)).int(), q_ref)


@pytest.mark.parametrize("hb,k", [(128, 256), (64, 384), (16, 192)])
def test_pow2_codes_rotated(hb, k):
    m = 4096 if ON_GPU else 41
    x = activations(m, k, torch.bfloat16)
    q, s, _ = ops.quantize_activations(x, hb, 64, 4, True, pow2=True)
    q_ref, s_ref = _pow2_folded_reference(rotate(x.float(), hb), 4)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (ops.unpermute_columns(q, ops.layout_group(k, 64)).int() - q_ref).abs()
    # a rounding tie may flip one code by one step, which the fold multiplies by up to 2**4
    assert (diff > 0).float().mean() < 1e-3 and diff.max() <= 16


# Every GEMM code path: both operand orders, layout groups (= BK) of 64 (K = 192) and 128, tiles
# wider than N and M, one or two token sub-tiles per program.
GEMM_CONFIGS = [configs.GemmConfig(16, 32, 64, 4, False, 4, 1), configs.GemmConfig(32, 16, 128, 2, True, 4, 1),
                configs.GemmConfig(16, 64, 128, 8, False, 4, 1)]
if ON_GPU:
    GEMM_CONFIGS = [configs.SM90_CANDIDATES[0], configs.SM90_CANDIDATES[4], configs.SM90_CANDIDATES[5],
                    configs.SM8X_CANDIDATES[0],
                    configs.GemmConfig(128, 128, 128, 8, False, 8, 4), configs.GemmConfig(64, 64, 64, 8, False, 4, 3)]


@pytest.mark.parametrize("k", [1600, 1536] if ON_GPU else [192, 256])  # layout group 64 / 128
@pytest.mark.parametrize("asm", [False, True])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("cfg", GEMM_CONFIGS, ids=str)
def test_gemm_configs(cfg, split, asm, k):
    """asm: inline PTX on the GPU; the interpreter runs the plain unpack instead."""
    m, n = (1000, 1000) if ON_GPU else (40, 48)
    layer = make_layer(n, k, had_block=64, scale_block=256)
    x = activations(m, k, torch.bfloat16)
    for bits in (8, 16):
        y = run_linear(layer, x, bits, cfg, ASM_UNPACK=asm, SPLIT=split)
        assert rel_err(y, reference_forward(layer, x, bits)) < 5e-3


@pytest.mark.parametrize("m,n,k", SMALL_SHAPES + ([(4097, 13824, 5120), (333, 8960, 1536)] if ON_GPU else []))
@pytest.mark.parametrize("bits,granularity", [(4, "pow2"), (8, "pow2"), (4, "block"), (16, "block")])
def test_fused_gelu_epilogue(m, n, k, bits, granularity):
    """A QuantLinear with act "gelu_tanh" (dvdq_core.fusion) equals the reference's linear then
    F.gelu, through every GEMM path: the Gluon one (4-bit pow2 on an H100), the Triton int8 one
    with and without K-block scales, and the 16-bit one. Only float rounding may differ (the
    kernels' exp-based tanh vs torch's)."""
    dtype = torch.bfloat16 if m % 2 else torch.float16
    layer = make_layer(n, k, had_block=64 if k % 128 else 128, scale_block=64 if k == 320 else 128,
                       dtype=dtype, granularity=granularity)
    x = activations(m, k, dtype)
    plain = reference_forward(layer, x, bits)
    layer.act = "gelu_tanh"
    ref = reference_forward(layer, x, bits)
    assert torch.equal(ref, torch.nn.functional.gelu(plain, approximate="tanh"))
    y = run_linear(layer, x, bits)
    # the 16-bit path rounds the rotated activations to the input dtype (the reference keeps float32)
    tol = (4e-3 if dtype == torch.bfloat16 else 1e-3) * (2 if bits == 16 else 1)
    assert rel_err(y, ref) < tol
    assert rel_err(y, plain) > 0.1  # the GELU really ran
    if not ON_GPU:  # the epilogue alone: the same GEMM without GELU, then torch's GELU
        layer.act = None
        z = run_linear(layer, x, bits)
        gz = torch.nn.functional.gelu(z, approximate="tanh").float()
        # one or two output ulps, plus 1e-6 absolute: for v near -4..-5 both forms compute
        # 1 + tanh(u) ~ 1e-5 by cancellation in float32 (measured differences up to 5e-7)
        ulps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -9
        assert ((y.float() - gz).abs() <= ulps * gz.abs() + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_pow2_fast_granularity_selects_the_paths(bits):
    """linear_forward with granularity "pow2-fast" runs the pow2 path at 4 bits and the path without
    auto-scale at 8 bits (the same kernels, bit for bit), and matches the reference."""
    m, n, k = (2048, 1000, 1536) if ON_GPU else (21, 40, 256)
    layer = make_layer(n, k, granularity="pow2-fast")
    x = activations(m, k, torch.bfloat16)
    y = kernels.linear_forward(layer, x, bits)
    same = _with(layer, granularity="pow2") if bits == 4 else _with(layer, auto_scale=False)
    assert torch.equal(y, kernels.linear_forward(same, x, bits))
    assert rel_err(y, reference_forward(layer, x, bits)) < 4e-3


def test_public_forward_and_backend():
    """linear_forward (the custom op) and the core's QuantLinear with backend 'triton' on CUDA."""
    layer = make_layer(40, 128, bias=False)
    x = activations(9, 128, torch.bfloat16)
    y = kernels.linear_forward(layer, x, 8)
    assert y.shape == (9, 40) and y.dtype == torch.bfloat16
    assert rel_err(y, reference_forward(layer, x, 8)) < 4e-3
    if ON_GPU:
        y2 = layer(x.reshape(3, 3, 128))  # through the core's registry
        assert rel_err(y2.reshape(9, 40), y) < 1e-6


def test_empty_input():
    layer = make_layer(40, 128)
    y = kernels.linear_forward(layer, activations(0, 128, torch.bfloat16), 8)
    assert y.shape == (0, 40)


def test_unsupported_reason():
    layer = make_layer(40, 128)
    x = activations(4, 128, torch.bfloat16)
    assert machine_reason("linear", copy.deepcopy(layer).cpu(), x.cpu(), 8) == ON_CPU
    assert "float32" in linear_reason(layer, 8, x.float())
    assert "channel" in linear_reason(_with(layer, granularity="channel"), 8, x)
    assert linear_reason(_with(layer, granularity="pow2"), 4, x) == linear_reason(layer, 4, x)
    assert "smoothquant" in linear_reason(_with(layer, method="smoothquant"), 8, x)
    assert "activation bits" in linear_reason(layer, 3, x)
    assert "fused activation 'silu'" in linear_reason(_with(layer, act="silu"), 8, x)
    odd = make_layer(40, 96, had_block=32, scale_block=32)
    assert "multiple of 64" in linear_reason(odd, 8, activations(4, 96, torch.bfloat16))
    if ON_GPU:
        assert linear_reason(layer, 8, x) is None


class _with:
    """A layer view with some attributes replaced."""

    def __init__(self, layer, **over):
        self._layer, self._over = layer, over

    def __getattr__(self, name):
        return self._over[name] if name in self._over else getattr(self._layer, name)


# the architecture the kernels are compiled for: with TRITON_OVERRIDE_ARCH=sm80/sm86/sm89 a Hopper
# card runs this file through the Ampere/Ada code path (configs.target_capability)
HOPPER = ON_GPU and ops._capability(torch.device("cuda")) == (9, 0)


def test_target_capability_follows_triton_override_arch():
    """Triton's TRITON_OVERRIDE_ARCH makes it compile for another architecture; the launch
    configurations follow it (else an sm_80 compile would be handed Hopper-only Gluon kernels)."""
    assert configs.target_capability((9, 0), env={}) == (9, 0)
    assert configs.target_capability((9, 0), env={"TRITON_OVERRIDE_ARCH": "sm80"}) == (8, 0)
    assert configs.target_capability((9, 0), env={"TRITON_OVERRIDE_ARCH": "sm89"}) == (8, 9)
    assert configs.target_capability((8, 6), env={"TRITON_OVERRIDE_ARCH": "sm120"}) == (12, 0)
    for bad in ("80", "sm_80", "smx", "sm8"):
        with pytest.raises(ValueError, match="TRITON_OVERRIDE_ARCH must look like sm80"):
            configs.target_capability((9, 0), env={"TRITON_OVERRIDE_ARCH": bad})


def test_only_hopper_takes_the_wgmma_tiles():
    """Blackwell (sm_100, RTX 50xx's sm_120) has no wgmma: Triton lowers to mma.sync there as on Ampere,
    and the sm_90 tile would need 120 KB of shared memory (sm_120 allows 99 KB per block: the launch
    would fail) and spill; so those cards take the SM8X tiles, no Gluon GEMM, no workspace."""
    m = configs.U8_MIN_M
    for cap in ((8, 0), (8, 6), (8, 9), (10, 0), (12, 0)):
        assert not configs.wgmma(cap) and not configs.use_workspace(cap, m, False, False)
        assert configs.gemm_config(cap, m, 5120, 5120, 128, False, False) == configs.SM8X_CANDIDATES[0]
        assert configs.gemm_candidates(cap) == configs.SM8X_CANDIDATES
    assert configs.wgmma((9, 0)) and configs.gemm_config((9, 0), m, 5120, 5120, 128, False, False) == \
        configs.SM90_DEFAULT


def unpack_reference(qweight, w_zero, g):
    """int8 (u - z) [N, K] in the codes' layout: per group of g columns, the low nibbles of its g/2
    bytes (the even columns), then their high nibbles (the odd ones)."""
    b = qweight.long()
    z = w_zero.long()[:, None]
    n, kb = b.shape
    lo = ((b & 15) - z).reshape(n, kb * 2 // g, g // 2)
    hi = ((b >> 4) - z).reshape(n, kb * 2 // g, g // 2)
    return torch.cat([lo, hi], dim=2).reshape(n, kb * 2).to(torch.int8)


@pytest.mark.parametrize("n,k,g", [(40, 256, 128), (33, 192, 64), (96, 320, 64), (5, 128, 128), (33, 256, 64)]
                         + ([(13824, 5120, 128), (1000, 1536, 64)] if ON_GPU else []))
def test_unpack_weights_equals_reference(n, k, g):
    """The workspace of the sm_90 GEMM: every element written (poisoned first), ragged row blocks, an odd
    number of groups (one group per program) and both layout groups."""
    qweight = torch.randint(0, 256, (n, k // 2), generator=GEN, dtype=torch.uint8).to(DEV)
    w_zero = torch.randint(0, 16, (n,), generator=GEN, dtype=torch.uint8).to(DEV)
    out = torch.full((n, k), 99, dtype=torch.int8, device=DEV)
    got = ops.unpack_weights(qweight, w_zero, g, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, unpack_reference(qweight, w_zero, g))


def test_pow2_gemm_takes_the_workspace_path_from_u8_min_m(monkeypatch):
    """On sm_90 the GEMM without per-K-block scales goes through the int8 weight workspace from
    configs.U8_MIN_M tokens on, through the chain kernel below (where the unpack pass costs more
    than it saves)."""
    seen = []
    monkeypatch.setattr(ops, "chain_gemm_applies", lambda *a: True)
    monkeypatch.setattr(ops, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    monkeypatch.setattr(ops, "workspace_or_none", lambda *a: "the int8 weights")
    monkeypatch.setattr(ops, "w4_gemm_u8", lambda a, *r, **kw: seen.append(("u8", a.shape[0])))
    monkeypatch.setattr(ops, "w4_gemm_chain", lambda a, *r, **kw: seen.append(("chain", a.shape[0])))
    for m in (configs.U8_MIN_M - 1, configs.U8_MIN_M):
        ops.w4_gemm(torch.zeros((m, 128), dtype=torch.int8), torch.zeros((8, 64), dtype=torch.uint8), None, None,
                    None, None, None, torch.bfloat16, 128, False)
    assert seen == [("chain", configs.U8_MIN_M - 1), ("u8", configs.U8_MIN_M)]
    # only where it was measured: Hopper, int8 codes, compiled kernels
    m = configs.U8_MIN_M
    assert configs.use_workspace((9, 0), m, False, False)
    assert not any(configs.use_workspace(*case) for case in [((8, 9), m, False, False), ((9, 0), m - 1, False, False),
                                                             ((9, 0), m, True, False), ((9, 0), m, False, True)])


def test_no_room_for_the_workspace_means_unpacking_in_the_loop(monkeypatch):
    """Where the GPU has no room for the int8 weight workspace (N x K bytes), the GEMM unpacks in its
    loop instead (the chain kernel on sm_90; the Triton GEMM without W8): same result, no error."""
    def no_room(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    layer = make_layer(40, 256)
    x = activations(37, 256, torch.bfloat16)
    hb, sb = ops.effective_blocks(layer, 256)
    q, s, l = ops.quantize_activations(x, hb, sb, 8, True)
    args = (q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.bfloat16, sb, True)
    want = ops.w4_gemm(*args)
    monkeypatch.setattr(ops, "unpack_weights", no_room)
    monkeypatch.setattr(configs, "use_workspace", lambda *a: True)
    assert torch.equal(ops.w4_gemm(*args), want)  # the Triton GEMM (8-bit steps), W8 dropped
    seen = []
    monkeypatch.setattr(ops, "chain_gemm_applies", lambda *a: True)
    monkeypatch.setattr(ops, "w4_gemm_u8", lambda *a, **kw: seen.append("u8"))
    monkeypatch.setattr(ops, "w4_gemm_chain", lambda *a, **kw: seen.append("chain"))
    ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias, torch.bfloat16, sb, False)
    assert seen == ["chain"]


@pytest.mark.parametrize("m,n,k", [(37, 40, 256), (19, 96, 320)] + ([(9000, 5120, 5120), (8192, 1000, 1600)]
                                                                     if ON_GPU else []))
@pytest.mark.parametrize("auto", [True, False])
def test_triton_gemm_from_the_workspace_equals_unpacking_in_the_loop(m, n, k, auto):
    """W8 (the Triton GEMM reading the unpacked int8 workspace, as on sm_90 from U8_MIN_M tokens on)
    gives the same output bit for bit, with ARQ's per-block promotion (8-bit steps) and without."""
    layer = make_layer(n, k)
    x = activations(m, k, torch.bfloat16)
    hb, sb = ops.effective_blocks(layer, k)
    q, s, l = ops.quantize_activations(x, hb, sb, 8, auto)
    args = (q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.bfloat16, sb, auto)
    cfg = configs.SM90_DEFAULT if ON_GPU else configs.INTERPRETER_CONFIG
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    got = ops.w4_gemm(*args, cfg=cfg, out=out, W8=True)
    assert torch.equal(got, ops.w4_gemm(*args, cfg=cfg, W8=False))


@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMMs run on sm_90 only; without one, test_compile_targets "
                                       "compiles them for sm_90 on the CPU")
@pytest.mark.parametrize("path", ["chain", "u8"])
@pytest.mark.parametrize("m,n,k", [(333, 5120, 5120), (4097, 1000, 1600), (2048, 13824, 5120), (200, 256, 128),
                                   (65, 96, 192), (5000, 3072, 3072)])
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("gelu", [False, True])
def test_gluon_gemms_equal_triton_gemm(path, m, n, k, dtype, bias, gelu):
    """Without per-K-block scales both sm_90 Gluon GEMMs (packed weights; int8 workspace) compute what
    the Triton GEMM does, bit for bit (exact int32 sums, the same epilogue, fused GELU or not),
    including ragged M and N (not multiples of the 256-row tile), 64-wide layout groups and fewer
    K steps than stages; every output element is written (poisoned first)."""
    layer = make_layer(n, k, bias=bias, dtype=dtype)
    x = activations(m, k, dtype)
    sb = ops.effective_blocks(layer, k)[1]
    q, s, _ = ops.quantize_activations(x, layer.had_block, sb, 4, True, pow2=True)
    assert ops.chain_gemm_applies(q, layer.weight, False)
    gemm = ops.w4_gemm_chain if path == "chain" else ops.w4_gemm_u8
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    y = gemm(q, layer.weight, layer.w_zero, layer.w_scale, s, layer.bias, dtype, sb, out=out, gelu=gelu)
    y_triton = ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias, dtype, sb, False,
                           cfg=configs.SM90_DEFAULT, gelu=gelu)
    assert y.data_ptr() == out.data_ptr() and torch.equal(y, y_triton)


@pytest.mark.skipif(not ON_GPU, reason="the persistent grid is GPU-only (the interpreter cannot loop to a run-time "
                                        "bound); on the CPU the pow2 tests check the per-block body it strides over")
@pytest.mark.parametrize("m,k", [(4097, 5120), (65520, 1536), (333, 13824), (17, 256)])
def test_pow2_pass2_persistent_grid_equals_one_program_per_block(m, k):
    """The shipped persistent pass 2 (programs striding over row blocks) writes the same codes and
    scales as one program per block, bit for bit, including a ragged last block and fewer blocks
    than programs."""
    x = activations(m, k, torch.bfloat16)
    cmax = ops.channel_absmax(x, 128, 128)
    q0 = torch.full((m, k), 99, dtype=torch.int8, device=DEV)
    s0 = torch.full((m,), float("nan"), device=DEV)
    q1, s1 = ops.quantize_pow2(x, 128, 128, 4, cmax, q=q0, s=s0)
    q2, s2 = ops.quantize_pow2(x, 128, 128, 4, cmax, act_cfg=(configs.ACT_ELEMS_PER_TILE, configs.ACT_NUM_WARPS,
                                                               configs.ACT_NUM_STAGES, 0))
    assert torch.equal(q1, q2) and torch.equal(s1, s2)


def test_gluon_gemm_failure_falls_back_loudly_once(monkeypatch):
    """Gluon is an experimental API: if a newer triton breaks the Gluon GEMM, the Triton GEMM takes
    over with a warning that says so (same numbers), and the Gluon one is not tried again; running
    out of memory is not such a failure and propagates."""
    layer = make_layer(96, 192)
    x = activations(40, 192, torch.bfloat16)
    sb = ops.effective_blocks(layer, 192)[1]
    q, s, _ = ops.quantize_activations(x, layer.had_block, sb, 4, True, pow2=True)
    args = (q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias, torch.bfloat16, sb, False)
    want = ops.w4_gemm(*args, cfg=configs.INTERPRETER_CONFIG if not ON_GPU else configs.SM90_DEFAULT)
    monkeypatch.setattr(ops, "_gluon_state", [object()])
    monkeypatch.setattr(ops, "chain_gemm_applies", lambda *a: ops._gluon_state[0] is not None)

    def broken(*a, **k):
        raise TypeError("warpgroup_mma() got an unexpected keyword argument")
    monkeypatch.setattr(ops, "w4_gemm_chain", broken)
    with pytest.warns(UserWarning, match="Gluon GEMM failed .*TypeError.*Triton GEMM runs from now on"):
        got = ops.w4_gemm(*args)
    assert ops._gluon_state == [None] and torch.equal(got, want)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("out of memory")
    monkeypatch.setattr(ops, "_gluon_state", [object()])
    monkeypatch.setattr(ops, "w4_gemm_chain", oom)
    with pytest.raises(torch.OutOfMemoryError):
        ops.w4_gemm(*args)


def test_weight_bits_reason():
    layer = make_layer(40, 128)
    x = activations(4, 128, torch.bfloat16)
    assert "8 bits" in linear_reason(_with(layer, w_bits=8), 8, x)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; from dvdq_core import kernels; import torch; "
            "from types import SimpleNamespace as S;"
            "print(kernels._triton_missing('linux')); print(kernels._triton_missing('win32'))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    old = ("import sys, types; sys.modules['triton'] = types.SimpleNamespace(__version__='3.0.0'); from dvdq_core import kernels;"
           "print(kernels._triton_missing())")
    out_old = subprocess.run([sys.executable, "-c", old], cwd=root, capture_output=True, text=True, timeout=120)
    assert "triton 3.0.0 is older than the 3.1 the kernels need" in out_old.stdout, out_old.stderr
    linux, windows = out.stdout.splitlines()[-2:]
    assert "triton is not importable" in linux and "install triton>=3.1" in linux
    assert "triton is not importable" in windows and "install `triton-windows` into ComfyUI's Python" in windows


@pytest.mark.skipif(not ON_GPU, reason="compiles for the GPU; on the CPU test_compile_targets checks each target's "
                                        "MMA instructions")
@pytest.mark.parametrize("arch", ["sm80", "sm89", "sm120"])
def test_override_arch_runs_the_ampere_ada_code_path(arch):
    """How the Ampere/Ada (and RTX 50xx) path is tested without such a card: with TRITON_OVERRIDE_ARCH
    Triton lowers for that architecture (mma.sync, no wgmma) and assembles for the card in hand, and
    the launch choices follow (no Gluon GEMM, no workspace). The results are checked by running this
    whole file that way (tests/README.md); here: that the override really changes the code."""
    code = ("import sys, torch; sys.path.insert(0, '.'); from dvdq_core.kernels import ops, _triton as kt;"
            "from dvdq_core.backends import reference_forward;"
            "g = torch.Generator().manual_seed(0); d = 'cuda';"
            "x = torch.randn(9000, 256, generator=g).to(torch.bfloat16).to(d);"
            "qw = torch.randint(0, 256, (128, 128), generator=g, dtype=torch.uint8).to(d);"
            "wz = torch.randint(0, 16, (128,), generator=g, dtype=torch.uint8).to(d);"
            "ws = (torch.rand(128, generator=g) * 0.02 + 1e-3).to(d);"
            "q, s, _ = ops.quantize_activations(x, 128, 128, 4, True, pow2=True);"
            "y = ops.w4_gemm(q, qw, wz, ws, None, s, None, torch.bfloat16, 128, False);"
            "ptx = [k.asm['ptx'] for c in kt._w4_gemm_kernel.device_caches.values() for k in c[0].values()];"
            "print('cap', ops._capability(x.device), 'kernels', len(ptx), 'gluon', ops._gluon_state,"
            "      'mma.sync', sum(p.count('mma.sync') for p in ptx), 'wgmma', sum(p.count('wgmma') for p in ptx))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_OVERRIDE_ARCH"] = arch
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    cap = configs.target_capability((0, 0), env={"TRITON_OVERRIDE_ARCH": arch})
    assert f"cap {cap} kernels 1 gluon []" in out.stdout, out.stdout  # the Triton GEMM ran
    assert int(words[words.index("mma.sync") + 1]) > 0 and int(words[words.index("wgmma") + 1]) == 0, out.stdout


@pytest.mark.skipif(not ON_GPU, reason="torch.compile of the custom op needs the compiled GPU kernels")
def test_torch_compile():
    layer = make_layer(1536, 1536)
    x = activations(777, 1536, torch.bfloat16)

    def f(x):
        return torch.nn.functional.gelu(kernels.linear_forward(layer, x * 2.0, 4))

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is a CUDA notion; needs the compiled GPU kernels")
@pytest.mark.parametrize("m", [300, configs.U8_MIN_M + 5])
def test_no_host_sync_in_forward(m):
    """A forward (activation kernels, GEMM, reuse cache; from U8_MIN_M tokens on the weight workspace
    too) never waits for the GPU: CUDA's sync debug mode raises on any synchronising call. Its
    intermediates come from PyTorch's caching allocator: once warm, no call reaches cudaMalloc."""
    layer = make_layer(512, 1536)
    x = activations(m, 1536, torch.bfloat16)

    def forwards():
        with torch.inference_mode():
            for bits in (4, 8, 16):
                kernels.linear_forward(layer, x, bits)
    forwards()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    assert allocations_without_host_sync(forwards) > 0  # (the outputs and intermediates, from the cache)
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments


@pytest.mark.skipif(not (ON_GPU and torch.cuda.device_count() >= 2),
                    reason="needs two GPUs (a model on the second while the first is current)")
@pytest.mark.parametrize("granularity", ["block", "pow2"])
def test_ops_on_a_second_gpu(granularity, monkeypatch):
    """A multi-GPU setup may run the model on cuda:1 while cuda:0 is current, and Triton launches on the
    current device: every op makes its input's device current while it runs (checked directly: with
    peer access between the cards a launch on cuda:0 may still read cuda:1's memory and agree). Same
    results as on cuda:0, bit for bit (the Gluon GEMMs and the weight workspace included on sm_90)."""
    assert torch.cuda.current_device() == 0
    seen = []
    for name in ("w4_linear_impl", "modulated_norm", "gated_residual"):
        def spy(*a, _real=getattr(ops, name), **k):
            seen.append((a[0].device.index, torch.cuda.current_device()))
            return _real(*a, **k)
        monkeypatch.setattr(ops, name, spy)
    layer = make_layer(512, 1536, granularity=granularity)
    x = activations(configs.U8_MIN_M + 5, 1536, torch.bfloat16)
    v = rand(2, 1, 1536, dtype=torch.bfloat16)
    x3 = x[:8192].reshape(2, 4096, 1536)
    want = [kernels.linear_forward(layer, x, bits) for bits in (4, 8, 16)]
    want += [kernels.modulated_norm(x3, v, v, 1e-6), kernels.gated_residual(x3, x3, v)]
    layer1, x1, v1, x31 = layer.to("cuda:1"), x.to("cuda:1"), v.to("cuda:1"), x3.to("cuda:1")
    got = [kernels.linear_forward(layer1, x1, bits) for bits in (4, 8, 16)]
    got += [kernels.modulated_norm(x31, v1, v1, 1e-6), kernels.gated_residual(x31, x31, v1)]
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert len(seen) == 10 and all(data == current for data, current in seen), seen
    for w, g in zip(want, got):
        assert g.device == x1.device and torch.equal(g.cpu(), w.cpu())


def test_activation_reuse():
    """q, k, v on one input: the second call reuses the codes; an in-place change invalidates them."""
    a, b = make_layer(40, 128), make_layer(56, 128)
    x = activations(11, 128, torch.bfloat16)
    ops.clear_activation_cache()
    with torch.no_grad():
        ya = kernels.linear_forward(a, x, 8)
        yb = kernels.linear_forward(b, x, 8)
        owners = list({id(m): m for n, m in list(sys.modules.items()) if n.endswith("dvdq_core.kernels.ops")}.values())
        assert any(m._last[1] is x for m in owners)  # the op runs in whichever copy registered it
        assert rel_err(yb, reference_forward(b, x, 8)) < 4e-3
        x.mul_(3.0)
        ya2 = kernels.linear_forward(a, x, 8)
        assert rel_err(ya2, reference_forward(a, x, 8)) < 4e-3 and rel_err(ya2, ya) > 0.5
    with torch.inference_mode():
        xi = activations(11, 128, torch.bfloat16)
        kernels.linear_forward(a, xi, 8)
        assert all(m._last[1] is not xi for m in owners)
    for m in owners:
        m.clear_activation_cache()


def test_activation_reuse_inference_mode(monkeypatch):
    """Under inference mode (ComfyUI) only a known shared-input group reuses, and its last member
    releases the entry; the outputs equal uncached ones."""
    from dvdq_core.linear import SHARE_LAST, SHARE_MEMBER, input_sharing
    assert [input_sharing(f"blocks.3.{n}") for n in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                     "cross_attn.q", "cross_attn.k", "cross_attn.v_img", "ffn.0")] \
        == [SHARE_MEMBER, SHARE_MEMBER, SHARE_LAST, 0, 0, SHARE_MEMBER, SHARE_LAST, 0]
    q, k, v, o = (make_layer(n, 128) for n in (40, 56, 24, 32))
    q.shares_input = k.shares_input = SHARE_MEMBER
    v.shares_input = SHARE_LAST
    owners = list({id(m): m for n, m in list(sys.modules.items()) if n.endswith("dvdq_core.kernels.ops")}.values())
    calls = []
    for m in owners:
        real = m.quantize_activations
        monkeypatch.setattr(m, "quantize_activations", lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
        m.clear_activation_cache()
    with torch.inference_mode():
        x = activations(11, 128, torch.bfloat16)
        ys = [kernels.linear_forward(layer, x, 4) for layer in (q, k, v)]
        assert len(calls) == 1  # quantized once for the three projections
        assert all(m._last[0] is None for m in owners)  # v (last) released the entry
        kernels.linear_forward(o, x, 4)
        kernels.linear_forward(o, x, 4)
        assert len(calls) == 3  # not a group member: no reuse without a version counter
    for layer, y in zip((q, k, v), ys):
        assert rel_err(y, reference_forward(layer, x, 4)) < 2e-2


def test_gelu_constants():
    """The epilogue's GELU constants are the tanh form's, folded with log2(e) for exp2."""
    from dvdq_core.kernels import _triton
    c1 = 2 * math.sqrt(2 / math.pi) * math.log2(math.e)
    assert _triton.GELU_C1.value == pytest.approx(c1, rel=1e-15)
    assert _triton.GELU_C2.value == pytest.approx(c1 * 0.044715, rel=1e-15)


# ---- LoRAs after quantization: the branch fused into the kernels (ops.LORA_IMPLS) ----

def lora_factors(n, k, rank, dtype, bias=True):
    """A branch's factors in the activations' dtype (dvdq_core.lowrank.LowRank), of a size that moves the output."""
    from dvdq_core.lowrank import LowRank
    down = rand(rank, k, dtype=dtype, scale=1.0 / math.sqrt(k))
    up = rand(n, rank, dtype=dtype, scale=0.5 / math.sqrt(rank))
    return LowRank(down, up, rand(n, dtype=dtype, scale=0.1) if bias else None)


def ulp(v, dtype):
    """The spacing of `dtype` numbers at |v| (float64), for bf16 (7 stored mantissa bits) or fp16 (10), taken
    from the exponent field (torch.frexp) and built from bits: exact on every device. (Not torch.log2: on CUDA
    a float64 log2 is libdevice's log(v) * log2(e), which returns 2.9999999999999996 for 8.0 (also for 2**-3,
    2**6, 2**12, ...); its floor then halved the spacing at |v| = 8, the common output size here, and the GPU
    runs of these tests failed at up to 2**-6 past their bounds with correct results.)"""
    _, e = torch.frexp(v.abs().clamp_min(2.0 ** -14))  # |v| = m * 2**e with m in [0.5, 1)
    bits = e.to(torch.int64) - 1 - (7 if dtype == torch.bfloat16 else 10) + 1023  # biased float64 exponent
    return (bits << 52).view(torch.float64)


def within_rounding(y, exact, slack, dtype):
    """y (dtype) is `exact` (float64) rounded once to dtype, after float32 arithmetic whose error is at most
    `slack` (float64, per element): |y - exact| <= half an ulp of y + slack (where the float32 error pushes
    a value across a rounding boundary, the result is the neighbouring dtype value; half the spacing above
    |y| bounds the rounding error of every value that rounds to y, also at a power of two)."""
    err = (y.double() - exact).abs()
    bound = 0.5 * ulp(y.double(), dtype) + slack
    assert (err <= bound).all(), f"{(err > bound).sum().item()} elements off, worst {(err - bound).max().item()}"


GELU_SLOPE = 1.13  # max |d/dv gelu_tanh(v)| (1.1289 at v = 2.42; the minimum is -0.13)


def within_gelu_rounding(y, exact, slack, dtype):
    """y = round(gelu_tanh(r)) with r = round(exact + e), |e| <= slack (float32 arithmetic), gelu_tanh evaluated
    in float32 (the epilogues' form): |r - exact| <= half an ulp of r + slack, so gelu_tanh moves by at most
    GELU_SLOPE times that; its float32 evaluation adds a few 2**-24 relative (2**-18 here) and 1e-6 absolute
    where its two terms cancel (v near -4, kernels/README.md); then the output's own rounding (within_rounding).
    The ulp of r is bounded by that of |exact| raised by half a bf16/fp16 step and the slack."""
    r_ulp = ulp(exact.abs() * (1 + 2.0 ** -7) + slack, dtype)
    g = torch.nn.functional.gelu(exact, approximate="tanh")
    within_rounding(y, g, GELU_SLOPE * (0.5 * r_ulp + slack) + 2.0 ** -18 * g.abs() + 1e-6, dtype)


LORA_PATHS = [(4, "pow2"), (8, "block"), (16, "block")]


@pytest.mark.parametrize("bits,granularity", LORA_PATHS)
@pytest.mark.parametrize("rank", [5, 16] + ([64, 100] if ON_GPU else []))
def test_lora_down_projection_in_the_activation_pass(bits, granularity, rank):
    """The pass that quantizes X (pow2's pass 2, the block form's pass 2, the 16-bit rotation) also writes a
    branch's T = X @ A^T from the unrotated tiles it reads: float32 sums rounded once, so within half an
    ulp (+ float32 slack) of the exact product; the codes stay bit for bit those without a branch. A rank
    that is not a power of two reads the padded rows as zero."""
    m, k = (4097, 1536) if ON_GPU else (37, 256)
    dtype = torch.bfloat16 if rank % 2 else torch.float16
    x = activations(m, k, dtype)
    down = lora_factors(8, k, rank, dtype).down
    t = torch.full((m, rank), float("nan"), dtype=dtype, device=DEV)
    if bits == 16:
        xr = ops.rotate_activations(x, 128, down, t)
        assert torch.equal(xr, ops.rotate_activations(x, 128))
    else:
        pow2 = granularity == "pow2"
        got = ops.quantize_activations(x, 128, 128, bits, True, pow2=pow2, down=down, t=t)
        want = ops.quantize_activations(x, 128, 128, bits, True, pow2=pow2)
        assert all(torch.equal(a, b) for a, b in zip(got, want) if a is not None)
    exact = x.double() @ down.double().t()
    # float32 slack: tensor cores sum a dot's products with truncation, at most ~K/16 steps of 2**-23 of the sum of
    # magnitudes; 2**-16 of it is far below half an ulp of bf16/fp16 for all but heavily cancelling sums
    within_rounding(t, exact, 2.0 ** -16 * (x.double().abs() @ down.double().abs().t()), dtype)


@pytest.mark.parametrize("bits,granularity", LORA_PATHS)
@pytest.mark.parametrize("cfg", [None, GEMM_CONFIGS[1]], ids=["default", "swapped"])
@pytest.mark.parametrize("split", [1, 2])
def test_lora_up_projection_in_the_gemm_epilogue(bits, granularity, cfg, split):
    """The Triton GEMM's epilogue adds T @ U^T to the float32 result (scales and bias applied) before the one
    rounding: equal to the same GEMM's float32 output plus the exact product, rounded once, up to float32
    slack; in both operand orders and with two token sub-tiles per program."""
    m, n, k, rank = (1000, 1000, 1536, 64) if ON_GPU else (37, 40, 256, 5)
    dtype = torch.bfloat16
    layer = make_layer(n, k, granularity=granularity, dtype=dtype)
    lr = lora_factors(n, k, rank, dtype)
    x = activations(m, k, dtype)
    t = torch.empty((m, rank), dtype=dtype, device=DEV)
    pow2 = granularity == "pow2"
    if bits == 16:
        a, l, s, auto = ops.rotate_activations(x, layer.had_block, lr.down, t), None, None, False
    else:
        a, s, l = ops.quantize_activations(x, layer.had_block, layer.scale_block, bits, True, pow2=pow2,
                                           down=lr.down, t=t)
        auto = not pow2
    cfg = cfg or configs.gemm_config(ops._capability(x.device), m, n, k, layer.scale_block, bits == 16, not ON_GPU)
    args = (a, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias)
    v = ops.w4_gemm(*args, torch.float32, layer.scale_block, auto, cfg=cfg, SPLIT=split)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    y = ops.w4_gemm(*args, dtype, layer.scale_block, auto, cfg=cfg, out=out, lora=(t, lr.up), SPLIT=split)
    assert not torch.isnan(y).any()
    tb = t.double() @ lr.up.double().t()
    within_rounding(y, v.double() + tb, 2.0 ** -18 * (v.double().abs() + t.double().abs() @ lr.up.double().abs().t()),
                    dtype)
    assert rel_err(y, v) > 0.05  # the branch really joined


def ops_copies():
    """Every imported copy of kernels.ops (the custom op runs in whichever copy registered it)."""
    return list({id(m): m for n, m in list(sys.modules.items()) if n.endswith("dvdq_core.kernels.ops")}.values())


def clear_activation_caches():
    for m in ops_copies():
        m.clear_activation_cache()


def branch_exact(layer, x, bits, granularity, lr, t, slack_t=2.0 ** -18):
    """(exact, slack) of a layer with a branch whose T is t: the same GEMM without the branch in float32 (its
    scales and bias, as the branch's epilogue sees them) plus the bias difference plus t @ up^T, in float64;
    slack bounds the float32 arithmetic (the epilogue's 16-bit dot with its float32 accumulator, the bias
    difference folded into the bias in float32) relative to the magnitudes summed."""
    hb, sb = ops.effective_blocks(layer, x.shape[1])
    if bits == 16:
        a, l, s, auto = ops.rotate_activations(x, hb), None, None, False
    else:
        pow2 = granularity == "pow2"
        a, s, l = ops.quantize_activations(x, hb, sb, bits, True, pow2=pow2)
        auto = not pow2
    v = ops.w4_gemm(a, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.float32, sb, auto).double()
    db = lr.bias.double() if lr.bias is not None else torch.zeros_like(v[0])
    exact = v + db + t.double() @ lr.up.double().t()
    return exact, slack_t * (v.abs() + db.abs() + t.double().abs() @ lr.up.double().abs().t())


# "triton" differs from "fused" on sm_90 only (the Gluon GEMMs)
@pytest.mark.parametrize("impl", ["fused", "epilogue"] + (["triton"] if HOPPER else []))
@pytest.mark.parametrize("bits,granularity", LORA_PATHS)
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_linear_with_lora_matches_reference(impl, bits, granularity, act, monkeypatch):
    """A layer with a branch (down and up factors, a bias difference; the fused GELU) through the custom op
    equals the reference backend's math (the base layer, then the branch, then the GELU) whichever way the
    branch runs. The kernel ways round once: their output is the float64 sum of the same GEMM's float32 result,
    the bias difference and T @ U^T, rounded once (then the GELU, rounded again), with T as that way makes it
    (the activation pass's for "fused"/"triton", cuBLAS's x @ A^T for "epilogue")."""
    m, n, k, rank = (4097, 1000, 1536, 64) if ON_GPU else (37, 48, 256, 5)
    dtype = torch.bfloat16 if bits != 8 else torch.float16
    layer = make_layer(n, k, granularity=granularity, dtype=dtype)
    layer.act = act
    x = activations(m, k, dtype)
    base = kernels.linear_forward(layer, x, bits)
    layer.lowrank = lr = lora_factors(n, k, rank, dtype)
    ref = reference_forward(layer, x, bits)
    got = {}
    for name in ("unfused", impl):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        got[name] = ops.w4_linear_impl(x, layer.weight, layer.w_scale, layer.w_zero, layer.bias, bits, layer.had_block,
                                       layer.scale_block, layer.auto_scale, out=out, pow2=granularity == "pow2",
                                       gelu=act == "gelu_tanh", lora_down=lr.down, lora_up=lr.up,
                                       lora_bias=lr.bias, lora_impl=name)
        assert got[name].data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    tol = (4e-3 if dtype == torch.bfloat16 else 1e-3) * (2 if bits == 16 else 1)
    assert rel_err(got[impl], ref) < tol and rel_err(got["unfused"], ref) < tol
    assert rel_err(base, ref) > 0.05  # the branch changes the output
    if impl == "epilogue":
        t = x @ lr.down.t()
    else:  # the activation pass's T (the same launch as in the layer: bit for bit)
        t = torch.empty((m, rank), dtype=dtype, device=DEV)
        if bits == 16:
            ops.rotate_activations(x, layer.had_block, lr.down, t)
        else:
            ops.quantize_activations(x, layer.had_block, layer.scale_block, bits, True, pow2=granularity == "pow2",
                                     down=lr.down, t=t)
    exact, slack = branch_exact(layer, x, bits, granularity, lr, t)
    (within_gelu_rounding if act else within_rounding)(got[impl], exact, slack, dtype)
    for mod in ops_copies():  # the custom op (what QuantLinear's triton backend calls) runs the module's choice
        monkeypatch.setattr(mod, "LORA_IMPL", impl)
    clear_activation_caches()  # (a cached input's T would come from a torch GEMM: equal up to rounding)
    assert torch.equal(kernels.linear_forward(layer, x, bits), got[impl])


@pytest.mark.parametrize("impl", ["unfused", "epilogue", "fused"])
def test_lora_branch_on_a_reused_activation(impl, monkeypatch):
    """q, k, v reading one input quantize it once (the reuse cache); each projection's own branch still joins
    (T is per layer; k runs first, without a branch, so q's and v's T come from a GEMM of the cached input in the
    kernel ways, and "unfused" adds the branch after the GEMM)."""
    from dvdq_core.linear import SHARE_LAST, SHARE_MEMBER
    k = 256
    q, kk, v = (make_layer(n, k, granularity="pow2") for n in (40, 56, 24))
    q.shares_input = kk.shares_input = SHARE_MEMBER
    v.shares_input = SHARE_LAST
    q.lowrank, v.lowrank = lora_factors(40, k, 5, torch.bfloat16), lora_factors(24, k, 16, torch.bfloat16, bias=False)
    owners = ops_copies()
    for m in owners:
        monkeypatch.setattr(m, "LORA_IMPL", impl)
    clear_activation_caches()
    with torch.inference_mode():
        x = activations(19, k, torch.bfloat16)
        ys = [kernels.linear_forward(layer, x, 4) for layer in (kk, q, v)]  # k first: q's branch on a hit
        for layer, y in zip((kk, q, v), ys):
            assert rel_err(y, reference_forward(layer, x, 4)) < 4e-3
        assert all(m._last[0] is None for m in owners)


@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMMs run on sm_90 only; without one, test_compile_targets "
                                       "compiles their branch epilogue for sm_90 on the CPU")
@pytest.mark.parametrize("path", ["chain", "u8"])
@pytest.mark.parametrize("m,n,k,rank", [(333, 5120, 5120, 64), (4097, 1000, 1600, 5), (2048, 13824, 5120, 128),
                                        (9000, 1536, 8960, 16), (200, 256, 128, 40)])
@pytest.mark.parametrize("dtype,gelu", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)])
def test_gluon_gemms_with_lora_epilogue(path, m, n, k, rank, dtype, gelu):
    """The sm_90 Gluon GEMMs' branch epilogue (U and T tiles in the rings' shared memory, one 16-bit wgmma
    into the float32 result), and the Triton GEMM's for the same codes: within half an ulp (+ float32 slack)
    of the same GEMM's float32 output plus the exact T @ U^T; with GELU, of GELU of that (within_gelu_rounding:
    a bound on GELU's input rounding, not a fraction of its output, which for v near -3 is a tenth of what one
    input ulp moves GELU by)."""
    layer = make_layer(n, k, dtype=dtype)
    lr = lora_factors(n, k, rank, dtype)
    x = activations(m, k, dtype)
    sb = ops.effective_blocks(layer, k)[1]
    t = torch.empty((m, rank), dtype=dtype, device=DEV)
    q, s, _ = ops.quantize_activations(x, layer.had_block, sb, 4, True, pow2=True, down=lr.down, t=t)
    gemm = ops.w4_gemm_chain if path == "chain" else ops.w4_gemm_u8
    args = (q, layer.weight, layer.w_zero, layer.w_scale, s, layer.bias)
    v = gemm(*args, torch.float32, sb)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    y = gemm(*args, dtype, sb, out=out, gelu=gelu, lora=(t, lr.up))
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    y_triton = ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias, dtype, sb, False,
                           cfg=configs.SM90_DEFAULT, gelu=gelu, lora=(t, lr.up))
    exact = v.double() + t.double() @ lr.up.double().t()
    slack = 2.0 ** -18 * (v.double().abs() + t.double().abs() @ lr.up.double().abs().t())
    check = within_gelu_rounding if gelu else within_rounding
    check(y, exact, slack, dtype)
    check(y_triton, exact, slack, dtype)
    print(f"gluon {path} vs triton epilogue: {(y != y_triton).float().mean().item():.2e} of the elements differ")


def test_gluon_lora_fits_the_rings():
    """The Gluon branch epilogue reuses the rings, whose size follows K: Wan's and HunyuanVideo's widths take
    every fused rank; one K step of 128 (one stage) holds RP 64, 64-wide layout groups RP 64."""
    for k in (1536, 3072, 5120, 8960, 12288, 13824, 15360):
        assert ops.gluon_lora_fits(k, 128, 128)
    assert ops.gluon_lora_fits(128, 128, 64) and not ops.gluon_lora_fits(128, 128, 65)
    assert ops.gluon_lora_fits(1600, 128, 64) and not ops.gluon_lora_fits(1600, 128, 100)  # groups of 64


def test_lora_paths_by_rank_and_impl(monkeypatch):
    """Which kernels take the branch: "fused" its down-projection in the activation pass and its up-projection
    in the Gluon epilogue on sm_90 (the Triton one elsewhere), "epilogue" the same epilogue with T from torch
    (the activation pass without the branch), DVDQ_LORA_IMPL=triton the Triton GEMM's epilogue, and a padded
    rank over LORA_FUSED_MAX_RP (a stack of LoRAs) the unfused branch; all of them the reference's result."""
    calls = []
    real = ops.w4_gemm
    monkeypatch.setattr(ops, "w4_gemm", lambda *a, **kw: calls.append((kw.get("lora") is not None,
                                                                        kw.get("lora_gluon"))) or real(*a, **kw))
    for name in ("w4_gemm_u8", "w4_gemm_chain"):
        monkeypatch.setattr(ops, name, lambda *a, _f=getattr(ops, name), **kw: calls.append("gluon") or _f(*a, **kw))
    real_q = ops.quantize_activations
    monkeypatch.setattr(ops, "quantize_activations", lambda *a, **kw: calls.append(
        "down" if kw.get("down") is not None else "codes") or real_q(*a, **kw))
    m, n, k = (configs.U8_MIN_M + 5, 512, 1536) if ON_GPU else (21, 40, 256)
    layer = make_layer(n, k, granularity="pow2")
    x = activations(m, k, torch.bfloat16)
    gluon = ["gluon"] if HOPPER else []
    for rank, impl, want in ((64, "fused", ["down", (True, True)] + gluon),
                             (64, "epilogue", ["codes", (True, True)] + gluon),
                             (64, "triton", ["down", (True, False)]),
                             (64, "unfused", ["codes", (False, True)] + gluon),
                             (200, "fused", ["codes", (False, True)] + gluon)):
        calls.clear()
        clear_activation_caches()
        layer.lowrank = lora_factors(n, k, rank, torch.bfloat16)
        y = ops.w4_linear_impl(x, layer.weight, layer.w_scale, layer.w_zero, layer.bias, 4, 128, 128, True, pow2=True,
                               lora_down=layer.lowrank.down, lora_up=layer.lowrank.up, lora_bias=layer.lowrank.bias,
                               lora_impl=impl)
        assert calls == want, (rank, impl, calls)
        assert rel_err(y, reference_forward(layer, x, 4)) < 4e-3


def test_lora_impls_and_default(monkeypatch):
    """DVDQ_LORA_IMPL's values; by default the branch runs in the GEMM's epilogue on sm_90 (measured there:
    bench/kernels.py --lora) and unfused elsewhere; DVDQ_LORA_IMPL, when set, holds for every device."""
    assert set(ops.LORA_IMPLS) == {"unfused", "epilogue", "fused", "triton"}
    assert set(ops.DEFAULT_LORA_IMPL.values()) <= set(ops.LORA_IMPLS)
    monkeypatch.setattr(ops, "LORA_IMPL", None)
    assert ops.lora_impl_for(torch.device("cpu")) == "unfused"
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ops, "_gluon", lambda: object())
    assert ops.lora_impl_for(torch.device("cuda", 0)) == "epilogue"
    monkeypatch.setattr(ops, "_gluon", lambda: None)  # no Gluon GEMM (old triton, DVDQ_GEMM_IMPL=triton): measured with it
    assert ops.lora_impl_for(torch.device("cuda", 0)) == "unfused"
    monkeypatch.setattr(ops, "_capability", lambda device: (8, 9))
    assert ops.lora_impl_for(torch.device("cuda", 0)) == "unfused"
    monkeypatch.setattr(ops, "LORA_IMPL", "fused")
    assert ops.lora_impl_for(torch.device("cuda", 0)) == "fused"


@pytest.mark.skipif(not ON_GPU, reason="torch.compile of the custom op needs the compiled GPU kernels")
def test_torch_compile_with_lora():
    """The branch's factors are optional tensor arguments of the custom op: fullgraph compile, same result."""
    layer = make_layer(1536, 1536, granularity="pow2")
    layer.lowrank = lora_factors(1536, 1536, 32, torch.bfloat16)
    x = activations(777, 1536, torch.bfloat16)

    def f(x):
        return kernels.linear_forward(layer, x * 2.0, 4)

    eager = f(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(x)
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is a CUDA notion; needs the compiled GPU kernels")
@pytest.mark.parametrize("impl", ops.LORA_IMPLS)
@pytest.mark.parametrize("m", [300, configs.U8_MIN_M + 5])
def test_no_host_sync_in_forward_with_lora(m, impl, monkeypatch):
    """With a branch, in every form (including the reuse cache's hit), a forward still never waits for the GPU."""
    monkeypatch.setattr(ops, "LORA_IMPL", impl)
    from dvdq_core.linear import SHARE_LAST, SHARE_MEMBER
    a, b = make_layer(512, 1536, granularity="pow2"), make_layer(256, 1536, granularity="pow2")
    a.shares_input, b.shares_input = SHARE_MEMBER, SHARE_LAST
    a.lowrank, b.lowrank = lora_factors(512, 1536, 64, torch.bfloat16), lora_factors(256, 1536, 8, torch.bfloat16)
    x = activations(m, 1536, torch.bfloat16)

    def forwards():
        with torch.inference_mode():
            for bits in (4, 8, 16):
                kernels.linear_forward(a, x, bits)
                kernels.linear_forward(b, x, bits)
    forwards()
    assert allocations_without_host_sync(forwards) > 0
