"""The weight's 16-bit SVD branch (docs/method.md): W = up @ down + residual, the residual rotated and
quantized; the layer adds (x·downᵀ)·upᵀ; files keep it; older specs, configs and files have none."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_linear import TinyModel

import dvdq_core as dq
from dvdq_core import weights
from dvdq_core.hadamard import rotate
from dvdq_core.lowrank import LowRankTerm, stack
from dvdq_core.spec import layer_spec

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def spec(rank, a_bits=16, w_bits=4):
    return dq.LayerSpec(w_bits, a_bits, "dvdq", 64, 64, True, True, "pow2", rank)


def outlier_linear():
    """A weight with two outlier input columns and one outlier row block: what the branch is for."""
    lin = torch.nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(randn(96, 256) * 0.05)
        lin.weight[:, [3, 77]] *= 40
        lin.weight[10:14] += randn(4, 1) * randn(1, 256)
    return lin


def test_svd_split_is_exact_and_the_randomized_path_close(monkeypatch):
    w = randn(300, 200) + 8 * randn(300, 1) @ randn(1, 200)
    up, down, res = weights.svd_split(w, 8)
    assert up.shape == (300, 8) and down.shape == (8, 200)
    torch.testing.assert_close(up @ down + res, w)
    exact = res.norm()
    monkeypatch.setattr(weights, "SVD_EXACT_MAX", 16)  # the range finder, as for real layer widths
    a = weights.svd_split(w, 8)
    b = weights.svd_split(w, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "deterministic"
    torch.testing.assert_close(a[0] @ a[1] + a[2], w)
    assert a[2].norm() < 1.01 * exact
    up0, down0, res0 = weights.svd_split(w, 0)
    assert up0.shape == (300, 0) and torch.equal(res0, w)


def test_branch_cuts_the_weight_error_and_the_layer_computes_it():
    lin = outlier_linear()
    x = randn(40, 256)
    errs = {}
    for rank in (0, 16):
        q, r = dq.QuantLinear.from_linear(lin, spec(rank), dq.BitState(16), backend="reference")
        assert hasattr(q, "svd_up") == bool(rank)
        errs[rank] = (r, rel(q(x), lin(x)))
    assert errs[16][0] < 0.5 * errs[0][0] and errs[16][1] < 0.5 * errs[0][1], errs
    # the layer is the quantized residual plus the branch, exactly
    w = rotate(q.dequantized_weight(), 64) + q.svd_up @ q.svd_down
    torch.testing.assert_close(q(x), x @ w.t() + lin.bias, rtol=1e-4, atol=1e-4)


def test_lora_branch_stacks_with_the_svd_branch():
    """`lowrank`, when set, is the whole branch: the SVD factors stacked with the LoRA's (nodes/lora.py)."""
    lin = outlier_linear()
    q, _ = dq.QuantLinear.from_linear(lin, spec(8, w_bits=4), dq.BitState(16), backend="reference")
    x = randn(3, 256)
    base = q(x)
    up, down = randn(96, 4) / 3, randn(4, 256) / 3
    own = q.svd_branch()
    q.lowrank = stack([LowRankTerm(own.up, own.down, 1.0), LowRankTerm(up, down, 0.5)], [], 96, 256, x.device,
                      x.dtype)
    torch.testing.assert_close(q(x), base + 0.5 * x @ (up @ down).t(), rtol=1e-4, atol=1e-4)
    q.lowrank = None
    torch.testing.assert_close(q(x), base)


def test_spec_rules_and_old_specs_and_configs():
    cfg = dq.QuantConfig(overrides="blocks.0.up=8")
    assert cfg.svd_rank == 32
    assert layer_spec(cfg, "blocks.1.up", 128).svd_rank == 32
    assert layer_spec(cfg, "blocks.0.up", 128).svd_rank == 0  # 8-bit weights: no branch
    assert layer_spec(dq.QuantConfig(method="quarot"), "blocks.1.up", 128).svd_rank == 0
    old = {k: v for k, v in layer_spec(cfg, "blocks.1.up", 128).to_dict().items() if k != "svd_rank"}
    assert dq.LayerSpec.from_dict(old).svd_rank == 0
    d = json.loads(cfg.to_json())
    del d["svd_rank"]
    assert dq.QuantConfig.from_json(json.dumps(d)).svd_rank == 0
    for bad in (-1, 1.5, True, 100000):
        with pytest.raises(ValueError, match="svd_rank"):
            dq.QuantConfig(svd_rank=bad)


def test_files_keep_the_branch_and_version_2_files_load(tmp_path):
    torch.manual_seed(0)
    m = TinyModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dq.quantize_model(m, dq.QuantConfig(svd_rank=4, backend="reference"))
    p = tmp_path / "m.safetensors"
    dq.save_quantized(m, p, dq.QuantConfig(svd_rank=4))
    with safe_open(str(p), "pt") as f:
        assert f.metadata()["dvdq.format_version"] == "3"
        assert f.get_tensor("blocks.0.up.svd_up").shape == (m.blocks[0].up.out_features, 4)
    torch.manual_seed(1)
    n = TinyModel()
    dq.load_quantized(n, p)
    for k, t in m.state_dict().items():
        assert torch.equal(t, n.state_dict()[k]), k
    # a version-2 file (no branch) still loads
    torch.manual_seed(0)
    m2 = TinyModel()
    dq.quantize_model(m2, dq.QuantConfig(svd_rank=0, backend="reference"))
    p2 = tmp_path / "v2.safetensors"
    dq.save_quantized(m2, p2, dq.QuantConfig(svd_rank=0))
    with safe_open(str(p2), "pt") as f:
        meta = dict(f.metadata(), **{"dvdq.format_version": "2"})
        meta["dvdq.layers"] = json.dumps({n: {k: v for k, v in e.items() if k != "svd_rank"}
                                          for n, e in json.loads(meta["dvdq.layers"]).items()})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    o = TinyModel()
    dq.load_quantized(o, tmp_path / "old.safetensors")
    assert not hasattr(o.blocks[0].up, "svd_up")
    for k, t in m2.state_dict().items():
        assert torch.equal(t, o.state_dict()[k]), k


def test_torch_compile_traces_the_svd_branch():
    q, _ = dq.QuantLinear.from_linear(outlier_linear(), spec(8), dq.BitState(16), backend="reference")
    x = randn(4, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = q(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(q, fullgraph=True, backend="eager")(x), want)


def test_the_layer_runs_its_branch_itself_without_a_per_call_copy(monkeypatch):
    """On the layer's own device and dtype the backends read the SVD branch from the layer (branch_of): no
    per-call _View of every buffer; the output is the same as through a _View."""
    from dvdq_core import linear
    layer, _ = dq.QuantLinear.from_linear(outlier_linear(), spec(32), dq.BitState(16), backend="reference")
    x = randn(5, 256)

    def no_view(*a, **k):
        raise AssertionError("a _View was built for a layer on its own device and dtype")
    y = layer(x)
    monkeypatch.setattr(linear, "_View", no_view)
    assert torch.equal(layer(x), y)
    monkeypatch.undo()
    # the same through a _View (what an offloaded layer gets): the branch is applied there too
    from dvdq_core import backends
    view = linear._View(layer, x.device, layer.act, layer.svd_branch())
    assert torch.equal(backends.select("linear", (view, x, 16), "reference", "t")(view, x, 16), y)
    # and the branch is really in the output
    layer.svd_up.zero_()
    assert not torch.equal(layer(x), y)


def test_float64_math_of_an_mps_weight_runs_on_the_cpu():
    assert weights.float64_device(torch.device("mps")) == torch.device("cpu")
    assert weights.float64_device(torch.device("cpu")) == torch.device("cpu")


def massive_reader(n=96, k=256, ch=(5, 140)):
    """A weight that reads a residual stream with massive channels: those columns 1/300 of the others."""
    w = randn(n, k) * 0.05
    w[:, list(ch)] /= 300
    return w


def test_guard_channels_finds_the_tiny_columns_only():
    w = massive_reader()
    assert weights.guard_channels(w, 32).tolist() == [5, 140]
    assert weights.guard_channels(randn(96, 256), 32).numel() == 0  # an ordinary weight: none
    w[:, 10:30] /= 300
    assert weights.guard_channels(w, 32).numel() == weights.GUARD_MAX  # capped, the smallest kept
    assert weights.guard_channels(w, 16).numel() == 4  # and at a quarter of the rank
    assert weights.guard_channels(w, 3).numel() == 0


def test_quantize_split_same_factors_at_any_thread_count():
    """The SVD rows are 0 in the guarded columns up to float64 noise whose sign follows the thread count:
    they are zeroed, so the stored (16-bit) factors are the same on every machine."""
    w = massive_reader()
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(weights.quantize_split(w, 16, 4, "dvdq", 64))
    finally:
        torch.set_num_threads(threads)
    a, b = runs
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.svd_up, b.svd_up) and torch.equal(a.svd_down, b.svd_down)
    rest = a.svd_down[2:]  # the rows after the two guarded one-hot rows
    assert torch.count_nonzero(rest[:, [5, 140]]) == 0


@pytest.mark.parametrize("block", [1, 64])
def test_quantize_split_zero_error_on_guarded_channels_and_below_the_one_shot_split(block):
    w = massive_reader()
    w[10:14, 150:] += randn(4, 1) * randn(1, 106) * 0.2  # an outlier block away from the guarded columns
    qw = weights.quantize_split(w, 8, 4, "dvdq", block)
    assert qw.svd_up.shape == (96, 8) and qw.svd_down.shape == (8, 256)
    layer = rotate(qw.dequantize(), block) + qw.svd_up @ qw.svd_down
    err = layer - w
    # the guarded columns are exact (float32 rounding only), though the residual's grid covers them
    assert err[:, [5, 140]].abs().max() < 1e-6 * w.abs().max()
    # stored in bf16 (svd_buffers of a bf16 model) the factors keep most of that
    up16, down16 = qw.svd_up.bfloat16().float(), qw.svd_down.bfloat16().float()
    err16 = rotate(qw.dequantize(), block) + up16 @ down16 - w
    # the old one-shot split: branch = top-8 SVD of W, residual quantized once
    up, down, res = weights.svd_split(w, 8)
    old = rotate(weights.bgr_quantize(rotate(res, block), 4).dequantize(), block) + up @ down - w
    assert err.norm() < old.norm()
    if block > 1:  # (without the rotation the old split's guarded-column error is small already)
        assert err16[:, [5, 140]].norm() < 0.05 * old[:, [5, 140]].norm()
    # on a massive input in those channels, the output error is below the old split's; far below with the
    # rotation, which spreads every row's grid error onto the guarded channels
    x = randn(32, 256)
    x[:, [5, 140]] = 300.0
    assert (x @ err.t()).norm() < (0.5 if block > 1 else 1.0) * (x @ old.t()).norm()
    again = weights.quantize_split(w, 8, 4, "dvdq", block)
    assert torch.equal(again.codes, qw.codes) and torch.equal(again.svd_up, qw.svd_up), "deterministic"


def test_quantize_split_without_guard_or_rank():
    w = randn(64, 128)
    qw = weights.quantize_split(w, 0, 4, "dvdq", 64)
    assert qw.svd_up is None and qw.svd_down is None
    assert torch.equal(qw.codes, weights.bgr_quantize(rotate(w, 64), 4).codes)
    qw = weights.quantize_split(w, 4, 4, "minmax", 64, guard=False)
    # the residual of the plain split, its branch refitted (never worse than the split's own: exact SVD here)
    up, down, res = weights.svd_split(w, 4)
    q0 = weights.minmax_quantize(rotate(res, 64), 4)
    assert torch.equal(qw.codes, q0.codes)
    old = rotate(q0.dequantize(), 64) + up @ down - w
    new = rotate(qw.dequantize(), 64) + qw.svd_up @ qw.svd_down - w
    assert new.norm() <= old.norm() + 1e-6
