"""Per-layer error split (bench/layer_error.py) and bench/quality.py's quick synthetic run."""
import copy
import importlib.util
import json
import os
import sys

import pytest
import torch

import dvdq_core

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):  # by path: bench/ on sys.path would shadow the kernels package with bench/kernels.py
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(_ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


layer_error = _load("layer_error")


@pytest.mark.parametrize("method", ["minmax", "smoothquant", "quarot", "dvdq"])
def test_split_matches_the_layer(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    model = torch.nn.Sequential()
    model.add_module("blocks", torch.nn.Sequential(copy.deepcopy(lin)))
    dvdq_core.quantize_model(model, dvdq_core.QuantConfig(method=method, backend="reference", include=("blocks.*",)))
    q = model.blocks[0]
    x = torch.randn(64, 256) * (1 + 10 * (torch.arange(256) < 3))  # a few outlier channels
    out = layer_error.split_outputs(q, lin.weight, x, 4)
    assert torch.allclose(out["ref"], lin(x), atol=1e-4)
    # the layer as it runs (its SVD branch, if any, included)
    for part, bits in (("both", 4), ("W", 16)):
        dvdq_core.set_activation_bits(model, bits)
        assert torch.allclose(out[part], q(x), atol=1e-4), part
    # float weights: the activation part alone vanishes at 16 bits, and is nonzero at 4
    at16 = layer_error.split_outputs(q, lin.weight, x, 16)
    assert torch.allclose(at16["A"], out["ref"], atol=1e-3)
    assert (out["A"] - out["ref"]).norm() > 1e-3 * out["ref"].norm()


def test_quality_quick_synthetic(tmp_path, capsys):
    sys.path.insert(0, _ROOT)
    quality = _load("quality")
    path = tmp_path / "q.json"
    quality.main(["--tiny", "--device", "cpu", "--models", "sinks", "--prompts", "1", "--steps", "2",
                  "--skip-ablations", "--layer-split", "--json", str(path)])
    text = capsys.readouterr().out
    assert "sink tokens (synthetic)" in text and "W only" in text
    res = json.loads(path.read_text())[0]
    split = res["layer_split"]["layers"]
    assert set(split) == {"minmax", "smoothquant", "quarot", "dvdq-nosvd", "dvdq"}
    for layers in split.values():
        assert len(layers) == 20  # 2 blocks x 10 Linear layers
        for e in layers.values():
            assert 0 < e["W"] < 1 and 0 < e["A"] < 2 and 0 < e["both"] < 2
