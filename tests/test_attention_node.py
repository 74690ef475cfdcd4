"""DVD-Quant 8-bit Attention node without ComfyUI: the override as ComfyUI's wrap_attn calls it
(override(func, q, k, v, heads, ..., transformer_options=...)), with a fake patcher and fake attention."""
import logging

import pytest
import torch

from dvdq_core.linear import BitState
from pack import load_pack, sub

ATT = sub("attention")


class FakePatcher:
    def __init__(self, model_options=None, wrappers=None):
        self.model_options = model_options if model_options is not None else {"transformer_options": {}}
        self.wrappers = wrappers if wrappers is not None else {}  # {kind: {key: [fn]}}, as ComfyUI's

    def clone(self):
        import copy
        return FakePatcher(copy.deepcopy(self.model_options), copy.deepcopy(self.wrappers))

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)


class Events:
    def __init__(self):
        self.sent = []

    def __call__(self, event, data):
        self.sent.append((event, data))

    def of(self, event):
        return [d for e, d in self.sent if e == event]


def fake_run(q, k, v, *, scale, pv, backend, out_layout):
    """The 8-bit attention's result shape without its math."""
    out = torch.zeros_like(q)
    return out.transpose(1, 2).contiguous() if out_layout == "blhd" else out


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


def test_stats_count_the_calls_and_why_they_went_back(kernel_here):
    state = BitState(4)
    stats = ATT.AttentionStats("5", ATT.LOW_BIT_STEPS, "fp8")
    ov = ATT.make_override(ATT.LOW_BIT_STEPS, "fp8", bit_state=state, run=fake_run, stats=stats)
    assert ov.dvdq_stats is stats
    q, k, v = qkv()
    ov(host_attention, q, k, v, heads=2)  # 8-bit
    ov(host_attention, q[:, :16], k[:, :16], v[:, :16], heads=2)  # 16 keys: the host's
    state.bits = 8
    ov(host_attention, q, k, v, heads=2)  # a high-bit step: the host's
    assert stats.counts() == (1, 2)
    ev = stats.event()
    assert ev == {"node": "5", "mode": ATT.LOW_BIT_STEPS, "pv": "fp8", "q8": 1, "host": 2,
                  "reasons": {"fewer than 128 keys": 1, "a high-bit step": 1}, "running": False}


def test_stats_events_are_throttled_and_sent_at_run_start_and_end():
    events, now = Events(), [0.0]
    stats = ATT.AttentionStats("7", ATT.ALWAYS, "auto", emit=events, every_s=0.5, clock=lambda: now[0])
    wrapper = ATT.make_outer_sample_wrapper(stats)

    def sample(*args, **kwargs):
        for t in (0.0, 0.1, 0.2, 0.6, 0.7):  # the run's start sent at 0 s: the next event at 0.6 s
            now[0] = t
            stats.count(None)
        stats.count("fewer than 128 keys")
        return "latent"

    assert wrapper(sample) == "latent"
    sent = events.of("dvdq.attention")
    assert [(e["q8"], e["host"], e["running"]) for e in sent] == [(0, 0, True), (4, 0, True), (5, 1, False)]
    assert sent[-1]["reasons"] == {"fewer than 128 keys": 1}
    wrapper(lambda: None)  # the next run starts from zero
    assert [(e["q8"], e["host"]) for e in events.of("dvdq.attention")[-2:]] == [(0, 0), (0, 0)]


def test_node_sends_its_status_and_installs_one_counting_wrapper(monkeypatch):
    events = Events()
    monkeypatch.setattr(sub("host"), "emit", events)
    cls = load_pack().NODE_CLASS_MAPPINGS["DVDQuantAttention"]
    assert cls.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}  # hidden: no widget, no widgets_values
    (m,) = cls().patch(FakePatcher(), "always", "fp8", unique_id="12")
    assert events.of("dvdq.attention") == [{"node": "12", "mode": "always", "pv": "fp8", "q8": 0, "host": 0,
                                            "reasons": {}, "running": False}]
    key = ATT.outer_sample_key()
    assert len(m.wrappers[key][ATT.WRAPPER_KEY]) == 1
    (m2,) = cls().patch(m, "always", "fp16", unique_id="13")  # a second node replaces the first's wrapper
    assert len(m2.wrappers[key][ATT.WRAPPER_KEY]) == 1
    (m3,) = cls().patch(m2, "never", "auto", unique_id="14")
    assert ATT.WRAPPER_KEY not in m3.wrappers[key]
    assert events.of("dvdq.attention")[-1]["mode"] == "never"


def test_bit_switch_step_events_say_whether_attention_ran_in_8_bits(kernel_here):
    """A sampling run through the scheduler's wrappers and the attention node's override (mode low-bit steps):
    each dvdq.bits event counts that step's 8-bit and handed-back attention calls."""
    from dvdq_core import QuantConfig, get_bit_state, quantize_model
    sched, steps = sub("scheduler"), sub("steps")
    steps.record_run_end(None)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(64, 64)])
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8))
    events = Events()
    hook = steps.BitScheduleHook("3", mode="manual", schedule="8,4,4,8", emit=events)
    stats = ATT.AttentionStats("4", ATT.LOW_BIT_STEPS, "fp8", emit=events)
    ov = ATT.make_override(ATT.LOW_BIT_STEPS, "fp8", bit_state=get_bit_state(model), run=fake_run, stats=stats)
    outer = sched.make_outer_sample_wrapper(hook)
    attn_outer, inner = ATT.make_outer_sample_wrapper(stats), sched.make_diffusion_model_wrapper(hook)
    q, k, v = qkv()

    class Exec:
        class_obj = model

        def __call__(self, x, timestep, context, to):
            to["optimized_attention_override"](host_attention, q, k, v, heads=2)  # self-attention
            to["optimized_attention_override"](host_attention, q, k[:, :3], v[:, :3], heads=2)  # 3 text keys
            return x

    def sample(noise, latent, sampler, sigmas, *rest):
        for s in sigmas[:-1].tolist():
            s2 = torch.full((2,), s)
            inner(Exec(), noise, s2, None, {"sigmas": s2, "sample_sigmas": sigmas, "optimized_attention_override": ov})
        return noise

    noise = torch.randn(2, 64)
    sched_ = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    attn_outer(lambda *a: outer(lambda *b: sample(*b), *a), noise, noise, None, sched_, None, None, False, 0)
    bits = events.of("dvdq.bits")
    assert [e["bits"] for e in bits] == [8, 4, 4, 8]
    assert [e["attention"] for e in bits] == [{"q8": 0, "host": 2}, {"q8": 1, "host": 1}, {"q8": 1, "host": 1},
                                              {"q8": 0, "host": 2}]
    last = events.of("dvdq.attention")[-1]
    assert (last["q8"], last["host"], last["running"]) == (2, 6, False)
    assert last["reasons"] == {"a high-bit step": 4, "fewer than 128 keys": 2}
    hook2 = steps.BitScheduleHook("3", mode="manual", schedule="8,4", emit=events)  # no 8-bit attention node
    hook2.begin_run([1.0, 0.0], (2, 64))
    hook2.bits_for_call(1.0)
    hook2.after_call(torch.ones(2, 4))
    assert "attention" not in events.of("dvdq.bits")[-1]


def test_quality_bench_runs_the_demo_models_attention_under_the_nodes_rule():
    """bench/quality.py --attention: the mini-Wan's attention through the node's override (the reference in place
    of the kernel): self-attention (256 tokens) in 8 bits, the 3-key text cross-attention on the 16-bit one."""
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_quality", os.path.join(root, "bench", "quality.py"))
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    from demo.run import TINY, random_model
    model = random_model(TINY, 0).to(torch.bfloat16).eval()
    x, t, ids = torch.randn(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0.5]), \
        torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        want = model(x, t, ids).float()
        with quality.attention_form("sdpa") as none:
            same = model(x, t, ids).float()
        with quality.attention_form("q8") as stats:
            got = model(x, t, ids).float()
    assert none is None and torch.equal(same, want)
    assert stats.counts() == (2, 2) and stats.reasons == {"fewer than 128 keys": 2}  # 2 blocks
    assert quality.demo_model.F is torch.nn.functional  # put back
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 0.05, err
