"""GELU fusion (dvdq_core.fusion): structure, equality with the unfused model, save/load, opt-out."""
import pytest
import torch
from torch import nn

import dvdq_core as dq
from dvdq_core.demo.model import MiniWan, MiniWanConfig
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
    """Low-VRAM offload runs a layer through a view with its buffers moved (linear._Moved): the view
    carries `act`, so an offloaded feed-forward still applies its GELU."""
    from dvdq_core.backends import reference_forward
    from dvdq_core.linear import _Moved
    m = _quantize(_model())
    lin = m.blocks[0].ffn[0]
    view = _Moved(lin, torch.device("cpu"))
    assert view.act == "gelu_tanh"
    x = torch.randn(7, lin.in_features)
    assert torch.equal(reference_forward(view, x, 8), reference_forward(lin, x, 8))
    lin = _quantize(_parallel_model()).single_blocks[0].linear1  # and a GELU from a column on
    view = _Moved(lin, torch.device("cpu"))
    assert view.act_from == 96
    assert torch.equal(reference_forward(view, x[:, :32], 8), reference_forward(lin, x[:, :32], 8))


class ParallelBlock(nn.Module):
    """The shape of HunyuanVideo's single-stream block (ComfyUI's flux SingleStreamBlock): linear1 gives
    [qkv | mlp], mlp_act runs on the mlp columns, linear2 reads [attention | GELU(mlp)]."""

    def __init__(self, hidden=32, mlp=64, act=None):
        super().__init__()
        self.hidden_size, self.mlp_hidden_dim = hidden, mlp
        self.linear1 = nn.Linear(hidden, 3 * hidden + mlp)
        self.linear2 = nn.Linear(hidden + mlp, hidden)
        self.mlp_act = act if act is not None else nn.GELU(approximate="tanh")

    def forward(self, x):
        qkv, mlp = torch.split(self.linear1(x), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        return x + self.linear2(torch.cat((qkv[..., :self.hidden_size], self.mlp_act(mlp)), -1))


def _parallel_model(act=None):
    torch.manual_seed(0)
    m = nn.Module()
    m.single_blocks = nn.ModuleList([ParallelBlock(act=act), ParallelBlock(act=act)])
    return m


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_parallel_block_gelu_fused_from_the_mlp_columns(monkeypatch, bits):
    """linear1 applies the GELU to its columns from 3 x hidden on; the block's mlp_act passes through;
    the outputs equal the unfused model's bit for bit."""
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    fused = _quantize(_parallel_model())
    for block in fused.single_blocks:
        assert block.linear1.act == "gelu_tanh" and block.linear1.act_from == 96
        assert isinstance(block.mlp_act, FusedGELU) and block.linear2.act is None
    monkeypatch.setenv("DVDQ_FUSE_GELU", "0")
    plain = _quantize(_parallel_model())
    assert type(plain.single_blocks[0].mlp_act) is nn.GELU and plain.single_blocks[0].linear1.act is None
    for m in (fused, plain):
        dq.set_activation_bits(m, bits)
    with torch.no_grad():
        assert torch.equal(fused.single_blocks[0](x), plain.single_blocks[0](x))
    monkeypatch.delenv("DVDQ_FUSE_GELU")
    assert fuse_gelu(fused) == 0  # idempotent
    assert unfuse_gelu(fused) == 2 and type(fused.single_blocks[1].mlp_act) is nn.GELU
    assert fused.single_blocks[1].linear1.act is None and fused.single_blocks[1].linear1.act_from == 0
    assert fuse_gelu(fused) == 2


def test_parallel_block_other_activation_or_shape_not_fused():
    m = _quantize(_parallel_model(act=nn.GELU()))  # exact (erf) GELU: the kernels' epilogue is the tanh form
    assert m.single_blocks[0].linear1.act is None and type(m.single_blocks[0].mlp_act) is nn.GELU
    m = _parallel_model()
    m.single_blocks[0].mlp_hidden_dim = 60  # linear1's width no longer [qkv | mlp]
    _quantize(m)
    assert m.single_blocks[0].linear1.act is None and type(m.single_blocks[0].mlp_act) is nn.GELU
    assert m.single_blocks[1].linear1.act == "gelu_tanh"
