"""GELU fusion (dvdq_core.fusion): structure, equality with the unfused model, save/load, opt-out."""
import pytest
import torch
from torch import nn

import dvdq_core as dq
from demo.model import MiniWan, MiniWanConfig
from dvdq_core.fusion import FusedGELU, fuse_gelu, unfuse_gelu

CFG = MiniWanConfig(dim=64, ffn_dim=128, freq_dim=64, text_dim=32, num_heads=2, num_layers=2)


def _model(seed=0):
    torch.manual_seed(seed)
    return MiniWan(CFG).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([0.3, 0.8]),
            torch.randint(1, CFG.vocab_size, (2, CFG.text_len), generator=g))


def _quantize(model, **kw):
    dq.quantize_model(model, dq.QuantConfig(backend="reference", **kw))
    return model


def test_quantize_model_fuses_the_feed_forward_gelu():
    m = _quantize(_model())
    for block in m.blocks:
        assert block.ffn[0].act == "gelu_tanh" and isinstance(block.ffn[1], FusedGELU)
        assert block.ffn[2].act is None
        assert "act=gelu_tanh" in repr(block.ffn[0])
    # text_embedding's GELU follows a Linear the default config does not quantize: left alone
    assert type(m.text_embedding[1]) is nn.GELU and isinstance(m.text_embedding[0], nn.Linear)
    assert fuse_gelu(m) == 0  # idempotent
    assert unfuse_gelu(m) == 2 and type(m.blocks[0].ffn[1]) is nn.GELU and m.blocks[0].ffn[0].act is None
    assert fuse_gelu(m) == 2


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fused_equals_unfused(monkeypatch, bits):
    x = _inputs()
    fused = _quantize(_model())
    monkeypatch.setenv("DVDQ_FUSE_GELU", "0")
    plain = _quantize(_model())
    assert type(plain.blocks[0].ffn[1]) is nn.GELU and plain.blocks[0].ffn[0].act is None
    for m in (fused, plain):
        dq.set_activation_bits(m, bits)
    with torch.no_grad():
        assert torch.equal(fused(*x), plain(*x))


def test_only_tanh_gelu_right_after_a_quantized_linear():
    torch.manual_seed(0)
    m = nn.Module()
    m.blocks = nn.ModuleList([
        nn.Sequential(nn.Linear(64, 64), nn.GELU()),                      # exact (erf) GELU: not fused
        nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.0), nn.GELU(approximate="tanh")),  # not adjacent
        nn.Sequential(nn.Linear(64, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 64)),
    ])
    _quantize(m)
    assert m.blocks[0][0].act is None and type(m.blocks[0][1]) is nn.GELU
    assert m.blocks[1][0].act is None and type(m.blocks[1][2]) is nn.GELU
    assert m.blocks[2][0].act == "gelu_tanh" and isinstance(m.blocks[2][1], FusedGELU)


def test_saved_file_loads_fused(tmp_path):
    """Nothing of the fusion is stored: the loader fuses again, and the outputs are identical."""
    cfg = dq.QuantConfig(backend="reference")
    m = _quantize(_model())
    p = tmp_path / "m.safetensors"
    dq.save_quantized(m, p, cfg, arch="mini")
    fresh = _model(seed=1)
    dq.load_quantized(fresh, p)
    assert fresh.blocks[1].ffn[0].act == "gelu_tanh" and isinstance(fresh.blocks[1].ffn[1], FusedGELU)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*x), m(*x))


def test_offloaded_layer_view_keeps_the_fused_gelu():
    """Low-VRAM offload runs a layer through a view with its buffers moved (linear._View): the view
    carries `act`, so an offloaded feed-forward still applies its GELU."""
    from dvdq_core.backends import reference_forward
    from dvdq_core.linear import _View
    from dvdq_core.lowrank import branch_of
    m = _quantize(_model())
    lin = m.blocks[0].ffn[0]
    view = _View(lin, torch.device("cpu"), lin.act, branch_of(lin))
    assert view.act == "gelu_tanh"
    x = torch.randn(7, lin.in_features)
    assert torch.equal(reference_forward(view, x, 8), reference_forward(lin, x, 8))
