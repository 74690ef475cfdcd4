
import pytest
import torch
from safetensors.torch import save_file
from test_linear import TinyModel

import dvdq_core as dq
from dvdq_core.cli import main as cli_main


def _quantized(config=None, seed=0):
    torch.manual_seed(seed)
    m = TinyModel()
    dq.quantize_model(m, config or dq.QuantConfig(overrides="blocks.0.up=w8a8", backend="reference"))
    return m


@pytest.mark.parametrize("granularity", ["block", "pow2"])
def test_roundtrip_is_bit_exact(tmp_path, granularity):
    cfg = dq.QuantConfig(overrides="blocks.0.up=w8a8", backend="reference", granularity=granularity)
    m = _quantized(cfg)
    p = tmp_path / "m.safetensors"
    dq.save_quantized(m, p, cfg, arch="test")
    fresh = TinyModel()
    got = dq.load_quantized(fresh, p)
    assert got == cfg
    a, b = m.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.blocks[0].up.w_bits == 8 and fresh.blocks[0].up.a_bits == 8
    assert fresh.blocks[1].up.granularity == granularity
    x = torch.randn(2, 5, 16)
    for bits in (4, 8):
        dq.set_activation_bits(m, bits)
        dq.set_activation_bits(fresh, bits)
        assert torch.equal(m(x), fresh(x))
    meta = dq.read_metadata(p)
    assert meta["arch"] == "test" and set(meta["layers"]) == {n for n, _ in dq.quantized_layers(m)}


def test_load_into_meta_model(tmp_path):
    cfg = dq.QuantConfig(backend="reference")
    m = _quantized(cfg)
    dq.save_quantized(m, tmp_path / "m.safetensors", cfg)
    with torch.device("meta"):
        skeleton = TinyModel()
    dq.load_quantized(skeleton, tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 16)
    assert torch.equal(m(x), skeleton(x))
    # its tensors are its own memory, not views at the file buffer's 8-byte offsets (where CPU matmuls round
    # differently: a saved copy gave another output than the model it was saved from)
    assert all(t.data_ptr() % 64 == 0 for t in skeleton.state_dict().values())


def test_mismatch_is_refused_naming_the_layer(tmp_path):
    cfg = dq.QuantConfig(backend="reference")
    m = _quantized(cfg)
    p = tmp_path / "m.safetensors"
    dq.save_quantized(m, p, cfg)
    other = TinyModel()
    other.blocks[1].up = torch.nn.Linear(128, 512)
    other.blocks[1].down = torch.nn.Linear(512, 128)
    with pytest.raises(ValueError, match="layer 'blocks.1.up' is 256x128 in the file but 512x128"):
        dq.load_quantized(other, p)
    assert type(other.blocks[0].q) is torch.nn.Linear  # nothing replaced on refusal
    other = TinyModel()
    other.head = torch.nn.Linear(128, 8)
    with pytest.raises(ValueError, match="tensor 'head.weight' has shape"):
        dq.load_quantized(other, p)
    assert type(other.blocks[0].q) is torch.nn.Linear
    renamed = torch.nn.Module()
    renamed.layers = TinyModel().blocks
    with pytest.raises(ValueError, match=r"layer 'blocks\.\d\.\w+' does not exist in the model"):
        dq.load_quantized(renamed, p)


def test_wrong_version_and_non_dvdq_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a DVD-Quant file"):
        dq.load_quantized(TinyModel(), plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dq.load_quantized(TinyModel(), garbage)
    v4 = tmp_path / "v4.safetensors"
    save_file({"a": torch.zeros(2)}, v4, metadata={"dvdq.format_version": "4"})
    with pytest.raises(ValueError, match="format version 4, this version reads 1, 2, 3"):
        dq.load_quantized(TinyModel(), v4)


def test_reads_format_1_files(tmp_path):
    """Format 1 named the packed codes `qweight`; such files load to the same layers as format 2."""
    from safetensors import safe_open
    m = _quantized()
    new = tmp_path / "v2.safetensors"
    dq.save_quantized(m, new, dq.QuantConfig())
    layers = {n for n, _ in dq.quantized_layers(m)}
    with safe_open(str(new), "pt") as f:
        meta = dict(f.metadata(), **{"dvdq.format_version": "1"})
        old = {(k[:-len(".weight")] + ".qweight" if k[:-len(".weight")] in layers and k.endswith(".weight") else k):
               f.get_tensor(k) for k in f.keys()}
    assert any(k.endswith(".qweight") for k in old)
    save_file(old, tmp_path / "v1.safetensors", metadata=meta)
    a, b = TinyModel(), TinyModel()
    dq.load_quantized(a, new)
    dq.load_quantized(b, tmp_path / "v1.safetensors")
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k


def _wan_like_state_dict():
    """A tiny state dict with ComfyUI's Wan key names (enough for detection and the CLI)."""
    torch.manual_seed(0)
    sd = {"head.modulation": torch.randn(1, 2, 64), "patch_embedding.weight": torch.randn(64, 16, 1, 2, 2),
          "head.head.weight": torch.randn(64, 64), "text_embedding.0.weight": torch.randn(64, 128)}
    for i in range(2):
        for n in ("q", "k", "v", "o"):
            sd[f"blocks.{i}.self_attn.{n}.weight"] = torch.randn(64, 64, dtype=torch.bfloat16)
            sd[f"blocks.{i}.self_attn.{n}.bias"] = torch.randn(64, dtype=torch.bfloat16)
        sd[f"blocks.{i}.ffn.0.weight"] = torch.randn(128, 64, dtype=torch.bfloat16)
        sd[f"blocks.{i}.ffn.2.weight"] = torch.randn(64, 128, dtype=torch.bfloat16)
        sd[f"blocks.{i}.norm3.weight"] = torch.ones(64)
        sd[f"blocks.{i}.modulation"] = torch.randn(1, 6, 64)
    return sd


def test_cli_quantize_matches_quantize_model(tmp_path, capsys):
    sd = _wan_like_state_dict()
    src, dst = tmp_path / "wan.safetensors", tmp_path / "wan_dvdq.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, src)
    assert cli_main(["quantize", str(src), str(dst), "--device", "cpu", "--override", "blocks.1.ffn.*=skip"]) == 0
    meta = dq.read_metadata(dst)
    assert meta["arch"] == "wan"
    attention = {f"blocks.{i}.self_attn.{n}" for i in range(2) for n in "qkvo"}
    assert set(meta["layers"]) == attention | {"blocks.0.ffn.0", "blocks.0.ffn.2"}
    from safetensors import safe_open
    with safe_open(str(dst), "pt") as f:
        keys = set(f.keys())
        assert "blocks.1.ffn.0.w_scale" not in keys and "blocks.0.ffn.0.w_scale" in keys and "head.modulation" in keys
        assert f.get_tensor("blocks.0.ffn.0.weight").dtype == torch.uint8  # packed codes
        assert f.get_tensor("blocks.1.ffn.0.weight").dtype == torch.bfloat16
        # the same weight through quantize_model's path gives the same codes
        lin = torch.nn.Linear(64, 64)
        lin.weight.data = sd["blocks.0.self_attn.q.weight"].float()
        spec = dq.LayerSpec.from_dict(meta["layers"]["blocks.0.self_attn.q"])
        q, _ = dq.QuantLinear.from_linear(lin, spec, dq.BitState())
        assert torch.equal(f.get_tensor("blocks.0.self_attn.q.weight"), q.weight)
        assert f.get_tensor("blocks.0.self_attn.q.bias").dtype == torch.bfloat16
    assert cli_main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "DVD-Quant format 3, arch wan" in out and "10 quantized layers" in out
    # refuses to overwrite, refuses a non-DiT and a DVD-Quant input, with one clear line
    assert cli_main(["quantize", str(src), str(dst)]) == 2
    assert "exists" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    save_file({"x.weight": torch.randn(4, 4)}, other)
    assert cli_main(["quantize", str(other), str(tmp_path / "o.safetensors")]) == 2
    assert "does not look like a Wan" in capsys.readouterr().err
    assert cli_main(["quantize", str(dst), str(tmp_path / "again.safetensors")]) == 2
    assert "already a DVD-Quant file" in capsys.readouterr().err
    assert cli_main(["inspect", str(src)]) == 2
    assert "not a DVD-Quant file" in capsys.readouterr().err


def test_cli_reads_an_fp8_scaled_file_as_the_weights_it_stands_for(tmp_path):
    """ComfyUI's fp8_scaled form (as its Wan files): each Linear weight in fp8 divided by its
    scale_weight, a scaled_fp8 marker, fp8 biases. The CLI quantizes weight * scale_weight (the codes
    equal those of that float weight), writes the unquantized Linear weights as those products in
    float32 and drops the marker and the scale keys: a plain DVD-Quant file."""
    sd = _wan_like_state_dict()
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, t in sd.items():
        if k.endswith(".weight") and t.ndim == 2:
            s = t.float().abs().amax() / 448
            scaled[k], scaled[k[:-6] + "scale_weight"] = (t.float() / s).to(torch.float8_e4m3fn), s.reshape(())
            scaled[k[:-6] + "scale_input"] = torch.ones(())
        else:
            scaled[k] = t.to(torch.float8_e4m3fn) if k.endswith(".bias") else t
    src, dst = tmp_path / "wan_fp8_scaled.safetensors", tmp_path / "wan_dvdq.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in scaled.items()}, src)
    assert cli_main(["quantize", str(src), str(dst), "--device", "cpu"]) == 0
    from safetensors import safe_open
    with safe_open(str(dst), "pt") as f:
        keys = set(f.keys())
        assert not any(k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")) for k in keys), keys
        real = scaled["head.head.weight"].float() * scaled["head.head.scale_weight"]
        assert f.get_tensor("head.head.weight").dtype == torch.float32 and torch.equal(f.get_tensor("head.head.weight"), real)
        assert f.get_tensor("blocks.0.self_attn.q.bias").dtype == torch.float32
        lin = torch.nn.Linear(64, 64)
        lin.weight.data = scaled["blocks.0.self_attn.q.weight"].float() * scaled["blocks.0.self_attn.q.scale_weight"]
        spec = dq.LayerSpec.from_dict(dq.read_metadata(dst)["layers"]["blocks.0.self_attn.q"])
        q, _ = dq.QuantLinear.from_linear(lin, spec, dq.BitState())
        assert torch.equal(f.get_tensor("blocks.0.self_attn.q.weight"), q.weight)
        assert torch.equal(f.get_tensor("blocks.0.self_attn.q.w_scale"), q.w_scale)


def test_writer_refuses_unplanned_tensor(tmp_path):
    from dvdq_core.serialization import SafetensorsWriter
    w = SafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,))}, {})
    with pytest.raises(RuntimeError, match="planned"):
        w.write("a", torch.zeros(3))
    w.abort()
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.partial").exists()


def test_shared_input_groups_marked_on_quantize_and_load(tmp_path):
    """Wan's q/k/v (and cross-attention k/v) are marked as one shared-input group, on quantizing and
    on loading a file: the kernels quantize their common input once under inference mode."""
    from demo.model import MiniWan, MiniWanConfig
    from dvdq_core.linear import SHARE_LAST, SHARE_MEMBER
    cfg = dq.QuantConfig(method="minmax", backend="reference")
    m = MiniWan(MiniWanConfig(dim=64, num_heads=2, num_layers=1, ffn_dim=128))
    dq.quantize_model(m, cfg)
    p = tmp_path / "w.safetensors"
    dq.save_quantized(m, p, cfg, arch="wan")
    fresh = MiniWan(MiniWanConfig(dim=64, num_heads=2, num_layers=1, ffn_dim=128))
    dq.load_quantized(fresh, p)
    want = {"blocks.0.self_attn.q": SHARE_MEMBER, "blocks.0.self_attn.k": SHARE_MEMBER,
            "blocks.0.self_attn.v": SHARE_LAST, "blocks.0.cross_attn.k": SHARE_MEMBER,
            "blocks.0.cross_attn.v": SHARE_LAST}
    for model in (m, fresh):
        got = {n: q.shares_input for n, q in dq.quantized_layers(model)}
        assert {n: s for n, s in got.items() if s} == want


def test_cli_refuses_comfyui_quantized_layouts(tmp_path, capsys):
    """Newer ComfyUI's quantized files (a '.comfy_quant' JSON per layer, scales beside the codes): the CLI
    names the layout instead of quantizing the stored codes without their scales."""
    import json as _json
    sd = {"model.diffusion_model." + k: v for k, v in _wan_like_state_dict().items()}
    key = "model.diffusion_model.blocks.0.self_attn.q"
    sd[key + ".weight"] = sd[key + ".weight"].float().clamp(-1, 1).mul(127).to(torch.int8)
    sd[key + ".weight_scale"] = torch.tensor(1 / 127)
    sd[key + ".comfy_quant"] = torch.tensor(list(_json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
    src, dst = tmp_path / "int8.safetensors", tmp_path / "out.safetensors"
    save_file(sd, src)
    assert cli_main(["quantize", str(src), str(dst), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "int8_tensorwise" in err and "DVD-Quant Loader" in err and not dst.exists()


def test_cli_svd_rank_option_reaches_the_config():
    from dvdq_core.cli import _config_from_args, build_parser
    args = build_parser().parse_args(["quantize", "in.safetensors", "out.safetensors", "--svd-rank", "0"])
    args.include = ["*blocks.*"]
    assert _config_from_args(args).svd_rank == 0
    args = build_parser().parse_args(["quantize", "in.safetensors", "out.safetensors"])
    args.include = ["*blocks.*"]
    assert _config_from_args(args).svd_rank == dq.QuantConfig().svd_rank > 0
