"""The backend registry (dvdq_core.backends): capabilities as data, priority order, use_backend."""
import warnings

import pytest
import torch

import dvdq_core as dq
from dvdq_core import backends

SPEC = dq.LayerSpec(w_bits=4, a_bits=None, method="dvdq", had_block=64, scale_block=64, rotate=True, auto_scale=True,
                    granularity="block")


def layer(backend="auto", **kw):
    q, _ = dq.QuantLinear.from_linear(torch.nn.Linear(64, 32), dq.LayerSpec(**{**SPEC.__dict__, **kw}),
                                      dq.BitState(8), backend=backend)
    return q


def test_list_backends_in_priority_order():
    listed = backends.list_backends()
    assert list(listed) == ["triton", "reference"]
    assert listed["reference"] == {"priority": 0, "available": True, "reason": None, "ops": sorted(backends.OPS)}
    assert set(listed["triton"]["ops"]) == set(backends.OPS)
    assert listed["triton"]["available"] == (listed["triton"]["reason"] is None)
    assert "reference (available)" in backends.describe()


def test_bits_text_and_bits_reason():
    assert backends._bits_text((4, 5, 6, 7, 8, 16)) == "4..8 or 16"
    assert backends._bits_text((4,)) == "4" and backends._bits_text((4, 5)) == "4 or 5"
    caps = backends.get("triton").capabilities["linear"]
    assert backends.bits_reason(caps, 4, 6) is None
    assert backends.bits_reason(caps, 8, 8) == "weights of 8 bits are not supported (4-bit weights only)"
    assert backends.bits_reason(caps, 4, 3) == "activation bits 3 are not supported (4..8 or 16)"


def test_machine_checks_come_before_the_calls():
    """On the CPU the reason is the device, whatever else the call has (the sentence a user then reads)."""
    q, x = layer(), torch.zeros(2, 64)  # float32: the call's checks alone would name the dtype
    assert backends.call_reason("triton", "linear", q, x, 8) == "input dtype torch.float32 is not supported (bf16 or fp16 only)"
    assert backends.unsupported_reason("triton", "linear", q, x, 8) == \
        "the input is on cpu, and the Triton kernels run on CUDA GPUs only"
    assert backends.unsupported_reason("reference", "linear", q, x, 8) is None


def test_auto_falls_back_and_says_why_once():
    q, x = layer(), torch.randn(3, 64)
    b, skipped = backends.choose("linear", (q, x, 8))
    assert b.name == "reference" and skipped.startswith("the input is on cpu")
    assert backends.linear_backend(q, torch.bfloat16) == f"reference ({skipped})"
    backends._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="quantized linear layers run on the reference backend"):
        q(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(x)  # once per sentence


def test_named_backend_that_cannot_run_the_call_raises():
    q = layer(backend="triton")
    with pytest.raises(RuntimeError, match="the triton backend cannot run .*input is on cpu.*Use backend 'auto'"):
        q(torch.randn(3, 64))
    with pytest.raises(ValueError, match="unknown backend 'cuda': choose one of auto, reference, triton"):
        backends.get("cuda")


def test_use_backend_overrides_the_layers_choice_and_nests():
    q, x = layer(backend="triton"), torch.randn(3, 64)
    with backends.use_backend("reference"):
        y = q(x)  # would raise on the CPU as a triton layer
        with backends.use_backend("triton"), pytest.raises(RuntimeError, match="triton backend cannot run"):
            q(x)
        assert torch.equal(q(x), y)
    with pytest.raises(RuntimeError):
        q(x)  # the scope is over
    with pytest.raises(ValueError):
        with backends.use_backend("nope"):
            pass


def test_a_registered_backend_takes_calls_by_priority():
    """A backend registered above the built-ins runs the calls its capabilities allow, and only those."""
    calls = []

    def fake_linear(lay, x2d, a_bits):
        calls.append(a_bits)
        return backends.reference_forward(lay, x2d, a_bits)

    fake = backends.Backend("fake", 20, {"linear": backends.Capabilities(devices=("cpu",), a_bits=(8,))},
                            load=lambda: {"linear": fake_linear}, label="the fake kernels")
    backends.register(fake)
    try:
        q, x = layer(), torch.randn(3, 64)
        assert list(backends.list_backends())[0] == "fake"
        q(x)
        assert calls == [8]
        dq.set_activation_bits(q, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q(x)  # 4-bit activations: not the fake's, the next in order runs it
        assert calls == [8]
        assert backends.call_reason("fake", "linear", q, x, 4) == "activation bits 4 are not supported (8)"
        assert backends.call_reason("fake", "norm_rope", x) == "the fake backend does not implement norm_rope"
    finally:
        del backends._REGISTRY["fake"]


def test_dispatch_compiles_without_graph_breaks():
    """ComfyUI's TorchCompileModel compiles the model with our layers and fused steps in it: choosing the
    backend must not break the graph (a ContextVar or a lock in the dispatch would)."""
    from dvdq_core import wan_ops
    q, x = layer(), torch.randn(3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = q(x)  # the one-time fallback warning, outside the compiled region
    torch._dynamo.reset()
    got = torch.compile(q, fullgraph=True, backend="eager")(x)
    assert torch.allclose(got, want, atol=1e-5)
    with backends.use_backend("reference"):
        assert torch.allclose(torch.compile(q, fullgraph=True, backend="eager")(x), want, atol=1e-5)

    def step(a, v):
        return wan_ops.gated_residual(a, wan_ops.modulated_norm(a, v, v, 1e-6), v)
    a, v = torch.randn(1, 8, 32), torch.randn(1, 1, 32)
    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(a, v), step(a, v))
