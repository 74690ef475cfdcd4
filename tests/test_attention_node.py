"""DVD-Quant 8-bit Attention node without ComfyUI: the override as ComfyUI's wrap_attn calls it
(override(func, q, k, v, heads, ..., transformer_options=...)), with a fake patcher and fake attention."""
import logging

import pytest
import torch

from dvdq_core.linear import BitState
from pack import load_pack, sub

ATT = sub("attention")


class FakePatcher:
    def __init__(self, model_options=None):
        self.model_options = model_options if model_options is not None else {"transformer_options": {}}

    def clone(self):
        import copy
        return FakePatcher(copy.deepcopy(self.model_options))


def host_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):
    """ComfyUI's attention_pytorch, in short."""
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("scale"))
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def reference_run(calls):
    def run(q, k, v, *, scale, pv, backend, out_layout):
        calls.append((tuple(q.shape), pv, out_layout))
        from dvdq_core import attention as core
        return core.attention_q8(q, k, v, scale=scale, pv="fp16", backend="reference", out_layout=out_layout)
    return run


def qkv(b=2, n=160, heads=2, d=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(b, n, heads * d, generator=g).to(dtype) for _ in range(3)]


@pytest.fixture
def kernel_here(monkeypatch):
    """Pretend the kernel can run these CPU tensors (the fake `run` computes the reference)."""
    monkeypatch.setattr(ATT.core, "why_not", lambda q, k, v, mask=None: ATT.core.shape_reason(q, k, v, mask))


def test_install_patches_a_clone_only():
    base = FakePatcher()
    m = ATT.install(base, ATT.ALWAYS, "fp8")
    assert "optimized_attention_override" not in base.model_options["transformer_options"]
    ov = m.model_options["transformer_options"]["optimized_attention_override"]
    assert ov.dvdq_attention == (ATT.ALWAYS, "fp8")
    # a second node replaces ours instead of chaining to it; "never" restores what was there before
    other = lambda func, *a, **kw: func(*a, **kw)  # noqa: E731  (another pack's override)
    base2 = FakePatcher({"transformer_options": {"optimized_attention_override": other}})
    m2 = ATT.install(ATT.install(base2, ATT.ALWAYS), ATT.LOW_BIT_STEPS, bit_state=BitState(4))
    assert m2.model_options["transformer_options"]["optimized_attention_override"].dvdq_previous is other
    assert ATT.install(m2, ATT.NEVER).model_options["transformer_options"]["optimized_attention_override"] is other
    assert "optimized_attention_override" not in ATT.install(m, ATT.NEVER).model_options["transformer_options"]


@pytest.mark.parametrize("layout", ["blc", "bhld"])
def test_override_runs_the_8bit_attention_in_the_hosts_layouts(layout, kernel_here):
    calls = []
    ov = ATT.make_override(ATT.ALWAYS, "auto", run=reference_run(calls))
    q, k, v = qkv()
    if layout == "blc":  # Wan: [B, L, H x D], heads by keyword
        got = ov(host_attention, q, k, v, heads=2, transformer_options={})
        want = host_attention(q, k, v, heads=2)
        assert calls == [((2, 2, 160, 64), "auto", "blhd")]
    else:  # flux / HunyuanVideo: [B, H, L, D], heads positional, output kept [B, H, L, D]
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))
        got = ov(host_attention, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options={})
        want = host_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True)
        assert calls == [((2, 2, 160, 64), "auto", "bhld")]
    assert got.shape == want.shape and got.dtype == want.dtype
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 0.02


def test_calls_it_does_not_take_go_back_with_one_warning(caplog):
    calls = []
    ov = ATT.make_override(run=reference_run(calls))
    q, k, v = qkv()
    ATT._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="dvdq"):
        for _ in range(2):  # CPU tensors: the kernel runs on CUDA GPUs only
            assert torch.equal(ov(host_attention, q, k, v, heads=2), host_attention(q, k, v, heads=2))
    msgs = [r.getMessage() for r in caplog.records if "8-bit Attention" in r.getMessage()]
    assert msgs == ["DVD-Quant 8-bit Attention: this call runs on ComfyUI's attention because the tensors are on "
                    "cpu, and the 8-bit attention kernel runs on CUDA GPUs only."]
    assert calls == []


def test_masks_dtypes_and_requests_for_full_precision_go_back(kernel_here, caplog):
    calls = []
    ov = ATT.make_override(run=reference_run(calls))
    q, k, v = qkv()
    mask = torch.zeros(160, 160)
    ATT._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="dvdq"):
        ov(host_attention, q, k, v, heads=2, mask=mask)
        ov(host_attention, *(t.float() for t in (q, k, v)), heads=2)
        ov(host_attention, q, k, v, heads=2, low_precision_attention=False)  # the model's own choice: no warning
        ov(host_attention, q[:, :16], k[:, :16], v[:, :16], heads=2)  # a few keys: no gain, no warning
    assert calls == []
    text = caplog.text
    assert "because the call has an attention mask" in text and "are not all bf16 or all fp16" in text
    assert len(caplog.records) == 2


def test_low_bit_steps_follow_the_models_bits(kernel_here):
    calls = []
    state = BitState(8)
    ov = ATT.make_override(ATT.LOW_BIT_STEPS, "fp8", bit_state=state, run=reference_run(calls))
    q, k, v = qkv()
    ov(host_attention, q, k, v, heads=2)  # an 8-bit step: 16-bit attention
    assert calls == []
    state.bits = 4  # what the Bit Switch Scheduler sets at a calm step
    ov(host_attention, q, k, v, heads=2)
    assert calls == [((2, 2, 160, 64), "fp8", "blhd")]
    state.bits = 16
    ov(host_attention, q, k, v, heads=2)
    assert len(calls) == 1


def test_previous_override_gets_the_calls_we_do_not_take():
    seen = []

    def other(func, *args, **kwargs):
        seen.append(kwargs.get("heads"))
        return func(*args, **kwargs)

    ov = ATT.make_override(ATT.NEVER, previous=other)
    q, k, v = qkv()
    ov(host_attention, q, k, v, heads=2)
    assert seen == [2]


def test_node_schema_and_mode_choices():
    cls = load_pack().NODE_CLASS_MAPPINGS["DVDQuantAttention"]
    req = cls.INPUT_TYPES()["required"]
    assert req["mode"][0] == ["always", "low-bit steps (δ-GBS)", "never"] and req["mode"][1]["default"] == "always"
    assert req["pv"][0] == ["auto", "fp8", "fp16"] and req["pv"][1]["default"] == "auto"
    (m,) = cls().patch(FakePatcher(), "always", "fp16")
    assert m.model_options["transformer_options"]["optimized_attention_override"].dvdq_attention == ("always", "fp16")
