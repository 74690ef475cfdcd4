"""The ComfyUI nodes without ComfyUI: schemas (docs/nodes.md), settings parsing, the step-from-sigma
logic, the per-step delta-GBS state machine and the sampler wrappers with fake executors."""

import types

import pytest
import torch
from torch import nn

from dvdq_core import QuantConfig, backends, get_bit_state, quantize_model
from pack import load_pack, sub  # noqa: E402

# ---------------------------------------------------------------- schemas (docs/nodes.md)

SPEC = {  # class id: (display name, required inputs in order, optional, outputs)
    "DVDQuantLoader": ("DVD-Quant Loader", ["model_name", "w_bits", "a_low", "a_high", "method", "save_quantized_copy"],
                       ["arq_settings"], ("MODEL",)),
    "DVDQuantApply": ("DVD-Quant Apply", ["model", "w_bits", "a_low", "a_high", "method"], ["arq_settings"], ("MODEL",)),
    "DVDQuantARQSettings": ("ARQ Settings", ["rotate", "had_block", "auto_scale", "granularity", "scale_block",
                                             "layer_overrides"], ["svd_rank"], ("ARQ_SETTINGS",)),
    "DVDQuantBitSwitch": ("Bit Switch Scheduler", ["model", "mode", "delta", "low", "high", "fixed_bits", "schedule"],
                          ["final_step_high"], ("MODEL",)),
    "DVDQuantSave": ("DVD-Quant Save", ["model", "filename_prefix"], ["loras"], ()),
    "DVDQuantAttention": ("DVD-Quant 8-bit Attention", ["model", "mode", "pv"], [], ("MODEL",)),
}


def test_pack_registers_the_six_nodes():
    pack = load_pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == set(SPEC)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {k: v[0] for k, v in SPEC.items()}
    assert pack.WEB_DIRECTORY == "./web"


@pytest.mark.parametrize("cid", sorted(SPEC))
def test_node_schema(cid):
    cls = load_pack().NODE_CLASS_MAPPINGS[cid]
    _, required, optional, outputs = SPEC[cid]
    types = cls.INPUT_TYPES()
    assert list(types["required"]) == required
    assert list(types.get("optional", {})) == optional
    assert cls.CATEGORY == "DVD-Quant"
    assert tuple(cls.RETURN_TYPES) == outputs
    assert callable(getattr(cls, cls.FUNCTION))
    for name, spec in {**types["required"], **types.get("optional", {})}.items():
        assert len(spec) == 2 and spec[1].get("tooltip"), f"{cid}.{name} has no tooltip"
    if cid in ("DVDQuantLoader", "DVDQuantApply", "DVDQuantBitSwitch"):
        assert types["hidden"] == {"unique_id": "UNIQUE_ID"}  # node ids of the server events
    assert getattr(cls, "OUTPUT_NODE", False) == (cid == "DVDQuantSave")


def test_widget_defaults_and_ranges():
    m = load_pack().NODE_CLASS_MAPPINGS
    ld = m["DVDQuantLoader"].INPUT_TYPES()["required"]
    assert ld["model_name"][0] == []  # no ComfyUI here: no model folders
    assert (ld["w_bits"][1]["default"], ld["w_bits"][1]["min"], ld["w_bits"][1]["max"]) == (4, 2, 8)
    assert (ld["a_low"][1]["default"], ld["a_low"][1]["min"], ld["a_low"][1]["max"]) == (4, 4, 8)
    assert (ld["a_high"][1]["default"], ld["a_high"][1]["min"], ld["a_high"][1]["max"]) == (8, 4, 16)
    assert ld["method"][0] == ["dvdq", "minmax", "smoothquant", "quarot"] and ld["method"][1]["default"] == "dvdq"
    assert ld["save_quantized_copy"] == ("BOOLEAN", ld["save_quantized_copy"][1]) and not ld["save_quantized_copy"][1]["default"]
    arq = m["DVDQuantARQSettings"].INPUT_TYPES()["required"]
    assert arq["had_block"][0] == ["64", "128", "256"] and arq["had_block"][1]["default"] == "128"
    assert arq["granularity"][0] == ["block", "pow2", "pow2-fast", "channel"] and arq["layer_overrides"][1]["multiline"]
    # the ARQ node's widget defaults, its function's defaults and the loader's (no ARQ node) are the core's
    core = QuantConfig()
    widgets = {k: v[1]["default"] for k, v in {**arq, **m["DVDQuantARQSettings"].INPUT_TYPES()["optional"]}.items()}
    assert widgets == {"rotate": core.rotate, "had_block": str(core.had_block), "auto_scale": core.auto_scale,
                       "granularity": core.granularity, "scale_block": str(core.scale_block), "layer_overrides": "",
                       "svd_rank": core.svd_rank}
    settings = sub("settings")
    assert settings.arq_settings() == settings.arq_settings(**widgets) == settings.DEFAULT_ARQ
    bs = m["DVDQuantBitSwitch"].INPUT_TYPES()["required"]
    assert bs["mode"][0] == ["delta", "fixed", "manual"]
    d = bs["delta"][1]
    assert (d["default"], d["min"], d["max"], d["step"]) == (0.09, 0.0, 10.0, 0.005)
    assert [bs[k][1]["default"] for k in ("low", "high", "fixed_bits", "schedule")] == [4, 8, 8, ""]
    assert m["DVDQuantSave"].INPUT_TYPES()["required"]["filename_prefix"][1]["default"] == "dvdq/model"


# ---------------------------------------------------------------- settings

def test_build_config_and_arq_settings():
    settings = sub("settings")
    arq = settings.arq_settings(True, "64", False, "channel", "256", "blocks.0.*=8\nhead.*=16")
    cfg = settings.build_config(4, 4, 8, "dvdq", arq)
    assert isinstance(cfg, QuantConfig)
    assert (cfg.w_bits, cfg.a_bits, cfg.a_low, cfg.a_high, cfg.had_block, cfg.scale_block) == (4, 8, 4, 8, 64, 256)
    assert not cfg.auto_scale and cfg.granularity == "channel"
    assert cfg.rule_for("blocks.0.self_attn.q").w_bits == 8 and cfg.rule_for("head.head").skip
    assert settings.build_config(8, 8, 16, "quarot").a_bits == 16


@pytest.mark.parametrize("args,msg", [
    ((4, 8, 4, "dvdq"), "swap them"),
    ((4, 4, 12, "dvdq"), "activation bits must be 4, 5, 6, 7, 8 or 16"),
    ((9, 4, 8, "dvdq"), "weight bits must be an integer from 2 to 8"),
    ((4, 4, 8, "gptq"), "choose one of dvdq, minmax, smoothquant, quarot"),
])
def test_build_config_errors(args, msg):
    settings = sub("settings")
    with pytest.raises(settings.SettingsError, match=msg):
        settings.build_config(*args)


@pytest.mark.parametrize("text,msg", [
    ("blocks.0.*", "expected 'glob=precision'"),
    ("blocks.0.*=banana", "unknown precision 'banana'"),
    ("=8", "glob is empty"),
])
def test_override_errors_name_the_line(text, msg):
    settings = sub("settings")
    with pytest.raises(settings.SettingsError, match="layer_overrides") as e:
        settings.arq_settings(layer_overrides=text)
    assert msg in str(e.value)
    node = load_pack().NODE_CLASS_MAPPINGS["DVDQuantARQSettings"]()
    with pytest.raises(RuntimeError, match="layer_overrides"):  # the node raises the host's user error
        node.settings(True, "128", True, "block", "128", text)


@pytest.mark.parametrize("rank", [-1, 257, 8.0, True])
def test_svd_rank_out_of_range_is_refused_on_the_arq_node(rank):
    settings = sub("settings")
    with pytest.raises(settings.SettingsError, match="svd_rank must be a whole number from 0 to 256"):
        settings.arq_settings(svd_rank=rank)


def test_svd_rank_reaches_the_config_and_old_workflows_get_the_default():
    settings = sub("settings")
    node = load_pack().NODE_CLASS_MAPPINGS["DVDQuantARQSettings"]()
    (old,) = node.settings(True, "128", True, "pow2", "128", "")  # a workflow saved before the widget existed
    (off,) = node.settings(True, "128", True, "pow2", "128", "", svd_rank=0)
    assert settings.build_config(4, 4, 8, "dvdq", old).svd_rank == QuantConfig().svd_rank > 0
    cfg = settings.build_config(4, 4, 8, "dvdq", off)
    assert cfg.svd_rank == 0 and not cfg.uses_svd


# ---------------------------------------------------------------- step from sigma

SCHED = [1.0, 0.75, 0.5, 0.25, 0.0]


def test_locate_step():
    steps = sub("steps")
    assert steps.locate_step(0.75, SCHED) == 1
    assert steps.locate_step(0.75 * (1 + 1e-6), SCHED) == 1  # float noise of a device round trip
    assert steps.locate_step(0.6, SCHED) is None  # an intermediate sigma (dpm_2, dpmpp_2s)
    assert steps.locate_step(0.0, SCHED) is None  # the final entry never starts a step
    assert steps.locate_step(1.0, SCHED, start=1) is None


def test_tracker_heun_and_intermediate_calls():
    steps = sub("steps")
    t = steps.StepTracker()
    t.begin(torch.tensor(SCHED))
    # heun: each step calls at sigma_i, then at sigma_{i+1}; its last step is a plain Euler step
    calls = [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert [t.on_call(s) for s in calls] == [(0, True), (1, True), (1, False), (2, True), (2, False), (3, True),
                                             (3, False)]
    t.begin(SCHED)
    assert [t.on_call(s) for s in [1.0, 0.9, 0.75, 0.6, 0.5]] == [(0, True), (0, False), (1, True), (1, False),
                                                                 (2, True)]
    assert t.total == 4
    t.begin([1.0, 0.75, 0.5], offset=0)
    assert t.total is None  # ends with leftover noise: the rest of the schedule is another sampler's


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event, data):
        self.events.append((event, data))

    def of(self, kind):
        return [d for e, d in self.events if e == kind]


def run_steps(hook, schedule, outputs, shape=(2, 4, 1, 2, 2)):
    """One sampling run with one (CFG-batched) model call per step."""
    hook.begin_run(torch.tensor(schedule), shape)
    bits = []
    for sigma, out in zip(schedule[:-1], outputs):
        bits.append(hook.bits_for_call(sigma))
        hook.after_call(out)
    hook.end_run(True)
    return bits


def test_delta_state_machine_and_events():
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    hook = steps.BitScheduleHook("7", mode="delta", delta=0.09, low=4, high=8, emit=rec)
    x = torch.ones(2, 4, 1, 2, 2)
    outs = [x, x * 1.05, x * 1.10, x * 1.5]  # changes 0.05, 0.048 (acc 0.098 >= 0.09), then a big one
    assert run_steps(hook, SCHED, outs) == [8, 4, 4, 8]
    assert rec.of("dvdq.bits_reset") == [{"node": "7"}]
    ev = rec.of("dvdq.bits")
    assert [e["step"] for e in ev] == [0, 1, 2, 3] and all(e["total"] == 4 and e["mode"] == "delta" for e in ev)
    assert ev[0]["indicator"] is None and ev[1]["indicator"] == pytest.approx(0.05, rel=1e-5)
    assert ev[2]["accumulated"] == pytest.approx(0.05, rel=1e-5)
    # the same node output reused for a second run starts over
    rec.events.clear()
    assert run_steps(hook, SCHED, outs) == [8, 4, 4, 8]
    assert len(rec.of("dvdq.bits_reset")) == 1 and [e["step"] for e in rec.of("dvdq.bits")] == [0, 1, 2, 3]


def test_cfg_halves_in_separate_calls_decide_as_one_batched_call():
    """ComfyUI's MultiGPU CFG split runs a step's cond and uncond halves as separate, concurrent calls (their
    order varies). The step is observed once, from both halves, so the bits and indicators are the batched
    run's; observing whichever half came first compared cond with uncond outputs when the order flipped.
    A CFG-1 run has only the cond part: each step is observed at the next step (or the run's end)."""
    steps = sub("steps")
    g = torch.Generator().manual_seed(0)
    cond = [torch.randn(1, 4, 1, 2, 2, generator=g) * (1 + 0.3 * i) for i in range(4)]
    uncond = [torch.randn(1, 4, 1, 2, 2, generator=g) * (1 + 0.2 * i) for i in range(4)]

    def run(split, cfg1=False):
        steps.record_run_end(None)
        rec = Recorder()
        hook = steps.BitScheduleHook("5", mode="delta", delta=0.5, low=4, high=8, emit=rec)
        hook.begin_run(torch.tensor(SCHED), (2, 4, 1, 2, 2))
        bits = []
        for i, sigma in enumerate(SCHED[:-1]):
            if cfg1:
                bits.append(hook.bits_for_call(sigma))
                hook.after_call(cond[i], [0], sigma)
            elif split:
                halves = [([0], cond[i]), ([1], uncond[i])][::(-1) ** i]  # the order flips every step
                for parts, out in halves:
                    bits.append(hook.bits_for_call(sigma))
                    hook.after_call(out, parts, sigma)
            else:
                bits.append(hook.bits_for_call(sigma))
                hook.after_call(torch.cat([uncond[i], cond[i]]), [1, 0], sigma)
        hook.end_run(True)
        return hook.bits_per_step(), [e["indicator"] for e in rec.of("dvdq.bits")], [e["step"] for e in rec.of("dvdq.bits")]

    batched, split = run(False), run(True)
    assert split[0] == batched[0] and split[2] == batched[2] == [0, 1, 2, 3]
    assert split[1][0] is None and split[1][1:] == pytest.approx(batched[1][1:], rel=1e-5)
    assert len(set(batched[0])) == 2  # the decisions are not all the same: the test can tell them apart
    cfg1 = run(False, cfg1=True)
    assert cfg1[2] == [0, 1, 2, 3] and cfg1[1][0] is None and None not in cfg1[1][1:]


def test_calls_after_the_first_of_a_step_are_not_observed():
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    hook = steps.BitScheduleHook("1", mode="fixed", fixed_bits=6, emit=rec)
    hook.begin_run(SCHED, (1, 4))
    for sigma in [1.0, 0.75, 0.75, 0.5, 0.5, 0.25]:  # heun: two calls for most steps
        assert hook.bits_for_call(sigma) == 6
        hook.after_call(torch.randn(1, 4))
    hook.end_run(True)
    assert [e["step"] for e in rec.of("dvdq.bits")] == [0, 1, 2, 3]
    assert len(hook.bs.log) == 4


def test_split_schedule_continues_across_nodes():
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    hi = steps.BitScheduleHook("hi", mode="delta", emit=rec)
    lo = steps.BitScheduleHook("lo", mode="delta", emit=rec)
    x = torch.ones(2, 4, 1, 2, 2)
    assert run_steps(hi, [1.0, 0.75, 0.5], [x, x]) == [8, 4]
    # continues: acc 0 < delta, no first-step high; the schedule's final step runs high (the first expert's
    # last step is not the schedule's: it stays low)
    assert run_steps(lo, [0.5, 0.25, 0.0], [x, x * 2]) == [4, 8]
    ev = rec.of("dvdq.bits")
    assert [(e["node"], e["step"], e["total"]) for e in ev] == [("hi", 0, None), ("hi", 1, None), ("lo", 2, 4),
                                                                ("lo", 3, 4)]
    assert ev[2]["indicator"] == 0.0  # compared with the high-noise expert's last output
    assert [e["node"] for e in rec.of("dvdq.bits_reset")] == ["hi", "lo"]


def test_split_schedule_on_one_node_keeps_its_strip():
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    hook = steps.BitScheduleHook("one", mode="fixed", fixed_bits=8, emit=rec)
    x = torch.ones(1, 4)
    run_steps(hook, [1.0, 0.75, 0.5], [x, x], shape=(1, 4))
    run_steps(hook, [0.5, 0.25, 0.0], [x, x], shape=(1, 4))
    assert [e["step"] for e in rec.of("dvdq.bits")] == [0, 1, 2, 3]
    assert len(rec.of("dvdq.bits_reset")) == 1  # the continuation does not clear the node's bit strip


def test_interrupted_or_unrelated_runs_are_not_continued():
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    a = steps.BitScheduleHook("a", emit=rec)
    b = steps.BitScheduleHook("b", emit=rec, final_step_high=False)
    a.begin_run([1.0, 0.75, 0.5], (1, 4))
    a.bits_for_call(1.0)
    a.after_call(torch.ones(1, 4))
    a.end_run(False)  # interrupted
    assert run_steps(b, [0.5, 0.25, 0.0], [torch.ones(1, 4)] * 2, shape=(1, 4)) == [8, 4]
    assert [e["step"] for e in rec.of("dvdq.bits") if e["node"] == "b"] == [0, 1]
    run_steps(a, [1.0, 0.75, 0.5], [torch.ones(1, 4)] * 2, shape=(1, 4))
    assert steps.find_continuation(0.5, (2, 4)) is None  # another latent shape
    assert steps.find_continuation(0.4, (1, 4)) is None  # not where the last run stopped
    assert steps.find_continuation(0.5, (1, 4)) is not None


def test_manual_schedule_too_short_is_a_clear_error():
    steps = sub("steps")
    hook = steps.BitScheduleHook("m", mode="manual", schedule="8,4")
    hook.begin_run(SCHED, (1, 4))
    for s in SCHED[:2]:
        hook.bits_for_call(s)
        hook.after_call(torch.ones(1, 4))
    with pytest.raises(ValueError, match="end it with '...'"):
        hook.bits_for_call(SCHED[2])
    with pytest.raises(ValueError, match="schedule is empty"):
        steps.BitScheduleHook("m", mode="manual", schedule="")


# ---------------------------------------------------------------- wrappers with fake executors

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(64, 64)])

    def forward(self, x):
        return self.blocks[0](x)


class FakeExecutor:
    def __init__(self, fn, class_obj=None):
        self.fn, self.class_obj = fn, class_obj

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def test_wrappers_set_bits_per_step_and_reset_on_failure():
    sched = sub("scheduler")
    steps = sub("steps")
    steps.record_run_end(None)
    model = Tiny()
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8))
    rec = Recorder()
    hook = steps.BitScheduleHook("9", mode="manual", schedule="8,5,6,...", emit=rec)
    outer, inner = sched.make_outer_sample_wrapper(hook), sched.make_diffusion_model_wrapper(hook)
    seen = []

    def forward(x, timestep, context, transformer_options):  # Wan-like: options as the last positional
        seen.append(get_bit_state(model).bits)
        return model(x)

    def sample(noise, latent, sampler, sigmas, *rest):
        for s in sigmas[:-1]:
            s2 = torch.full((2,), float(s))  # CFG: cond and uncond in one batch
            inner(FakeExecutor(forward, model), noise, s2, None, {"sigmas": s2, "sample_sigmas": sigmas})
        return noise

    noise = torch.randn(2, 64)
    outer(FakeExecutor(sample), noise, noise, None, torch.tensor(SCHED), None, None, False, 0)
    assert seen == [8, 5, 6, 6]
    assert [e["bits"] for e in rec.of("dvdq.bits")] == [8, 5, 6, 6]
    assert steps._LAST_RUN[0].end_sigma == 0.0  # completed; ends at sigma 0, so nothing can continue it
    assert steps.find_continuation(0.0, (2, 64)) is None

    def failing(*args):
        raise KeyboardInterrupt  # ComfyUI's interrupt
    with pytest.raises(KeyboardInterrupt):
        outer(FakeExecutor(failing), noise, noise, None, torch.tensor([1.0, 0.5]), None, None, False, 0)
    assert not hook.running and steps._LAST_RUN[0] is None


def _cached_run(order, skip, outs, mode="delta"):
    """A sampling run through the scheduler's wrappers where a cache (EasyCache's form) serves the steps in
    `skip` from its last output: "outside" = its wrapper around ours (a skipped step never reaches us),
    "inside" = ours around it (its cached output comes back through ours, with its holder saying so)."""
    sched, steps = sub("scheduler"), sub("steps")
    steps.record_run_end(None)
    model = Tiny()
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8))
    rec = Recorder()
    hook = steps.BitScheduleHook("c", mode=mode, delta=0.09, low=4, high=8, schedule="8,7,6,5,4", emit=rec)
    outer, inner = sched.make_outer_sample_wrapper(hook), sched.make_diffusion_model_wrapper(hook)
    holder = types.SimpleNamespace(skip_current_step=False)
    ran, last = [], [None]

    def forward(x, timestep, context, to):
        ran.append(get_bit_state(model).bits)
        return outs[len(ran) - 1]

    def sample(noise, latent, sampler, sigmas, *rest):
        for i, s in enumerate(sigmas[:-1].tolist()):
            s2 = torch.full((2,), s)
            to = {"sigmas": s2, "sample_sigmas": sigmas, "easycache": holder, "cond_or_uncond": [1, 0]}
            holder.skip_current_step = False  # (EasyCache's CALC_COND_BATCH wrapper)
            if i in skip and order == "outside":
                continue
            if i in skip:  # inside: our wrapper around EasyCache's, which returns its cache
                def cached(*a):
                    holder.skip_current_step = True
                    return last[0]
                inner(FakeExecutor(cached, model), noise, s2, None, to)
            else:
                last[0] = inner(FakeExecutor(forward, model), noise, s2, None, to)
        return noise

    noise = torch.randn(2, 64)
    outer(FakeExecutor(sample), noise, noise, None, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]), None, None, False, 0)
    return ran, rec.of("dvdq.bits"), hook


@pytest.mark.parametrize("order", ["outside", "inside"])
def test_steps_a_cache_skips_are_marked_and_not_observed(order):
    """EasyCache / LazyCache: a skipped step gets no decision and no observation, an event marks it, and
    the next observed step's indicator is the change per step over the gap (no jump after skips)."""
    x = torch.ones(2, 4)
    outs = [x, x * 1.02, x * 1.08, x * 1.09]  # the model's outputs at steps 0, 1, 3, 4 (step 2 cached)
    ran, ev, hook = _cached_run(order, {2}, outs)
    assert [e["step"] for e in ev] == [0, 1, 2, 3, 4]
    assert [e.get("skipped", False) for e in ev] == [False, False, True, False, False]
    assert ev[2]["bits"] is None and ev[2]["indicator"] is None
    assert ev[1]["indicator"] == pytest.approx(0.02, rel=1e-4)
    assert ev[3]["indicator"] == pytest.approx((1.08 / 1.02 - 1) / 2, rel=1e-4)  # over two steps, per step
    assert ev[4]["indicator"] == pytest.approx(0.01 / 1.08, rel=1e-4)
    assert [r.step for r in hook.bs.log] == [0, 1, 3, 4] and len(ran) == 4
    assert ran == [8, 4, 4, 8]  # accumulated 0.02, then 0.049 < 0.09; the final step high: one decision per model run
    assert [e["accumulated"] for e in ev if not e.get("skipped")][3] == pytest.approx(0.02 + 0.0294, rel=1e-2)
    # a manual schedule is indexed by the step, skipped or not
    ran, ev, _ = _cached_run(order, {1, 2}, outs, mode="manual")
    assert ran == [8, 5, 4] and [e["bits"] for e in ev] == [8, None, None, 5, 4]


def test_steps_without_a_call_are_not_called_skipped_without_a_cache():
    """dpm_adaptive and the like call the model off the schedule's sigmas: without a cache in the run those
    steps get no event (they were not served from a cache)."""
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    hook = steps.BitScheduleHook("n", emit=rec)
    hook.begin_run(SCHED, (1, 4))
    for sigma in (1.0, 0.25):
        hook.bits_for_call(sigma)
        hook.after_call(torch.ones(1, 4), None, sigma)
    hook.end_run(True)
    assert [e["step"] for e in rec.of("dvdq.bits")] == [0, 3] and not any(e.get("skipped") for e in rec.of("dvdq.bits"))


def test_a_step_half_served_from_the_cache_keeps_its_decision_unobserved():
    """CFG halves as separate calls, the cache deciding on the second: the first half ran the model with the
    step's bits, the second came from the cache. The step is reported without an indicator and the next
    step still compares whole outputs."""
    steps = sub("steps")
    steps.record_run_end(None)
    rec = Recorder()
    hook = steps.BitScheduleHook("h", mode="fixed", fixed_bits=6, emit=rec)
    hook.begin_run(SCHED, (2, 4))
    out = {0: torch.ones(1, 4), 1: torch.ones(1, 4) * 2}
    for i, sigma in enumerate(SCHED[:-1]):
        for part in (0, 1):
            hook.bits_for_call(sigma, cache=True)
            hook.after_call(out[part] * (1 + 0.1 * i), [part], sigma, skipped=(i == 1 and part == 1))
    hook.end_run(True)
    ev = rec.of("dvdq.bits")
    assert [(e["step"], e["bits"], e.get("skipped", False)) for e in ev] == [(0, 6, False), (1, 6, False),
                                                                             (2, 6, False), (3, 6, False)]
    assert ev[1]["indicator"] is None and ev[2]["indicator"] == pytest.approx(0.2 / 1.0 / 2, rel=1e-4)


def test_only_easycache_says_a_call_was_served_from_its_cache():
    sched = sub("scheduler")
    assert sched.served_from_cache({"easycache": types.SimpleNamespace(name="EasyCache", skip_current_step=True)})
    assert not sched.served_from_cache({"easycache": types.SimpleNamespace(name="EasyCache", skip_current_step=False)})
    # LazyCache keeps its holder under the same key and never clears the flag; it wraps outside the scheduler
    assert not sched.served_from_cache({"easycache": types.SimpleNamespace(name="LazyCache", skip_current_step=True)})
    assert not sched.served_from_cache({})


def test_the_last_steps_skipped_are_marked_at_the_runs_end():
    x = torch.ones(2, 4)
    ran, ev, _ = _cached_run("outside", {3, 4}, [x, x * 1.01, x * 1.02])
    assert [e["step"] for e in ev] == [0, 1, 2, 3, 4] and [e.get("skipped", False) for e in ev][3:] == [True, True]


def test_find_transformer_options():
    sched = sub("scheduler")
    to = {"sigmas": torch.tensor([0.5]), "cond_or_uncond": [0]}
    assert sched.find_transformer_options((1, 2, to), {}) is to  # Wan: the last positional
    assert sched.find_transformer_options((1, 2, to, None, None), {}) is to  # HunyuanVideo: followed by more
    assert sched.find_transformer_options((1,), {"transformer_options": to}) is to
    assert sched.call_sigma(to) == 0.5 and sched.call_sigma({}) is None


# ---------------------------------------------------------------- host helpers that need no ComfyUI

def test_lora_hits_every_naming():
    host = sub("host")
    layers = {"diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.1.ffn.0"}
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": 0, "lora_unet_blocks_1_ffn_0.lora_up.weight": 0,
            "blocks.1.ffn.0.alpha": 0, "diffusion_model.head.head.lora_A.weight": 0,
            "diffusion_model.blocks.0.self_attn.qq.lora_A.weight": 0}
    assert sorted(host.lora_hits(lora, layers)) == sorted(list(lora)[:3])
    msg = host.lora_after_message("a weight wrapper", ["x.weight"])
    assert msg.startswith("DVD-Quant: a weight wrapper would change quantized layers such as x.weight")
    assert "before 'DVD-Quant Apply'" in msg


def test_save_names_never_overwrite(tmp_path):
    host = sub("host")
    assert host.split_prefix("dvdq/model") == ("", "model")
    assert host.split_prefix("dvdq/wan/model") == ("wan", "model")
    assert host.split_prefix("") == ("", "model")
    with pytest.raises(RuntimeError, match="relative name"):
        host.split_prefix("dvdq/../../etc/x")
    first = host.unique_path(str(tmp_path), "m")
    open(first, "w").close()
    second = host.unique_path(str(tmp_path), "m")
    assert first.endswith("m.safetensors") and second.endswith("m_2.safetensors")


def test_not_a_video_dit_message():
    host = sub("host")

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = Tiny()
    with pytest.raises(host.DVDQuantError, match="Wan 2.1/2.2, HunyuanVideo"):
        host.video_dit_arch(Base())


def test_gpu_bits_problem_names_the_fix():
    host = sub("host")
    settings = sub("settings")

    caps = backends.get("triton").capabilities["linear"]  # the kernels' data, no GPU asked
    assert host.gpu_bits_problem(settings.build_config(4, 4, 8, "dvdq"), caps) is None
    msg = host.gpu_bits_problem(settings.build_config(8, 8, 8, "dvdq"), caps)
    assert "W8A8" in msg and "w_bits 4" in msg and "4-bit weights only" in msg and host.ALLOW_SLOW_ENV in msg
    eight_only = backends.Capabilities(w_bits=(4,), a_bits=(8,))  # a backend that takes fewer bit-widths
    assert "W4A4: activation bits 4 are not supported (8)" in host.gpu_bits_problem(
        settings.build_config(4, 4, 8, "dvdq"), eight_only)


def test_hook_lora_on_quantized_layers_is_refused():
    """A conditioning hook LoRA ("Create Hook LoRA") would be dropped silently on packed layers."""
    host = sub("host")
    from types import SimpleNamespace as NS

    layers = {"diffusion_model.blocks.0.self_attn.q"}
    hook = NS(weights={"diffusion_model.blocks.0.self_attn.q.lora_A.weight": 0})
    other = NS(weights={"diffusion_model.head.head.lora_A.weight": 0})
    guider = NS(original_conds={"positive": [{"hooks": NS(hooks=[other, hook])}], "negative": [{}]})
    assert host.hook_lora_hits(guider, layers) == ["diffusion_model.blocks.0.self_attn.q.lora_A.weight"]
    assert host.hook_lora_hits(NS(original_conds={"positive": [{"hooks": NS(hooks=[other])}]}), layers) == []

    from dvdq_core import LayerSpec, QuantLinear
    spec = LayerSpec(w_bits=4, a_bits=None, method="dvdq", had_block=64, scale_block=64, rotate=True,
                     auto_scale=True, granularity="block")
    dm = nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({"self_attn": nn.ModuleDict({"q": QuantLinear(64, 64, spec)})})]),
                        "head": nn.ModuleDict({"head": nn.Linear(64, 64)})})
    base = NS(diffusion_model=dm)
    assert host.quantized_keys(base) == layers  # found from the model's layers, nothing stored on host objects
    patcher = NS(model=base, patches={}, weight_wrapper_patches={}, hook_patches={})

    class Executor:
        def __init__(self, conds):
            self.class_obj = NS(model_patcher=patcher, original_conds=conds)

        def __call__(self, *args, **kwargs):
            return "sampled"

    import pytest
    with pytest.raises(host.DVDQuantError, match="before 'DVD-Quant Apply'"):
        host.guard_outer_sample(Executor(guider.original_conds))
    assert host.guard_outer_sample(Executor({"positive": [{"hooks": NS(hooks=[other])}]})) == "sampled"


def test_tree_copy_shares_data_not_objects_or_host_state():
    """Apply's and the host copies' module tree (nodes/models.py _tree_copy): the source's tensors without a
    copy of the data, but Parameter objects, hook dicts and children of its own (torch moves a Parameter's
    data in place: converting the copy must leave the source alone), and none of the host's load state."""
    models = sub("models")
    src = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    src[0].register_buffer("extra", torch.ones(2))
    src[0].comfy_cast_weights, src[0]._v, src.current_patcher = True, object(), object()
    src[0].register_forward_hook(lambda m, i, o: o)
    new = models._tree_copy(src, torch.device("cpu"))
    assert new is not src and new[0] is not src[0] and type(new[0]) is nn.Linear
    assert new[0].weight is not src[0].weight and new[0].weight.data_ptr() == src[0].weight.data_ptr()
    assert new[0].extra.data_ptr() == src[0].extra.data_ptr()
    assert new[0]._forward_hooks is not src[0]._forward_hooks and len(new[0]._forward_hooks) == 1
    assert "comfy_cast_weights" not in new[0].__dict__ and "_v" not in new[0].__dict__ and new.current_patcher is None
    new.to(torch.float64)
    assert src[0].weight.dtype == torch.float32 and src[1].weight.dtype == torch.float32
    x = torch.randn(3, 4)
    assert torch.allclose(new(x.double()).float(), src(x), atol=1e-6)
