"""Synthetic test models (bench/synthetic.py): each option gives the float model the statistic it names,
the plain random model does not have it, and building is deterministic."""
import importlib.util
import operator
import os

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):  # by path: bench/ on sys.path would shadow the kernels package with bench/kernels.py
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(_ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


synthetic = _load("synthetic")
from demo.run import TINY  # noqa: E402

OPS = {">=": operator.ge, "<=": operator.le}


@pytest.fixture(scope="module")
def random_stats():
    model, label = synthetic.build("random", TINY, 0)
    assert label == "random weights"
    return synthetic.statistics(model)


@pytest.mark.parametrize("option", sorted(synthetic.STAT_CHECKS))
def test_option_has_its_statistic(option, random_stats):
    model, label = synthetic.build(option, TINY, 0)
    assert "synthetic" in label
    key, op, threshold = synthetic.STAT_CHECKS[option]
    got = synthetic.statistics(model)[key]
    assert OPS[op](got, threshold), f"{option}: {key} = {got:.4g}, want {op} {threshold}"
    assert not OPS[op](random_stats[key], threshold), f"the plain random model already has {key}"


def test_sinks_are_few(random_stats):
    s = synthetic.statistics(synthetic.build("sinks", TINY, 0)[0])
    assert 0 < s["token_fraction_over_10x_median"] <= 0.03
    assert random_stats["token_fraction_over_10x_median"] == 0


def test_constant_ffn_input():
    model, _ = synthetic.build("constant", TINY, 0)
    mid = len(model.blocks) // 2
    assert synthetic.statistics(model)[f"blocks.{mid}.ffn.0_input_spread"] < 0.05


def test_combined_and_deterministic():
    a, label = synthetic.build("massive+sinks", TINY, 3)
    b, _ = synthetic.build("massive+sinks", TINY, 3)
    assert "massive" in label and "sink" in label
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    s = synthetic.statistics(a)
    assert s["residual_channel_magnitude_max_over_median"] >= 100 and s["token_norm_max_over_median"] >= 10


def test_unknown_option():
    with pytest.raises(ValueError, match="unknown synthetic model option"):
        synthetic.build("massiv", TINY, 0)
