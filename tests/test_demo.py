"""The demo's model, clips, detector, sampler and main path (CPU, small sizes)."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from demo import clips, media, run
from demo.model import MiniWanConfig, load_mini_wan, save_mini_wan
from demo.sampling import flow_sigmas, sample

TINY = MiniWanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, freq_dim=64, text_dim=32)


def tiny_model(seed=0):
    return run.random_model(TINY, seed).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shape_and_dtype(dtype):
    model = tiny_model().to(dtype)
    x = torch.randn(2, 3, 16, 32, 32)
    ids = clips.labels_to_prompt_ids(clips.all_labels()[:2])
    out = model(x.to(dtype), torch.tensor([0.3, 0.9]), ids)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_layer_names_match_wan():
    names = {n for n, m in tiny_model().named_modules() if isinstance(m, torch.nn.Linear)}
    for n in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2",
              "text_embedding.0", "time_embedding.2", "time_projection.1", "head.head"):
        assert n in names


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="multiples of the patch"):
        tiny_model()(torch.randn(1, 3, 15, 32, 32), torch.tensor([0.5]), torch.zeros(1, 3, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    save_mini_wan(model, tmp_path / "m.safetensors", dtype=torch.float32)
    back = load_mini_wan(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 16, 32, 32)
    ids = torch.tensor([[1, 7, 10]])
    assert torch.equal(model(x, torch.tensor([0.5]), ids), back(x, torch.tensor([0.5]), ids))


def test_sampler_is_deterministic_and_uses_the_noise():
    model = tiny_model()
    ids = clips.labels_to_prompt_ids(clips.all_labels()[:2])
    n1 = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    n2 = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    a, b, c = (sample(model, n, ids, steps=3) for n in (n1, n1, n2))
    assert torch.equal(a.video, b.video)
    assert not torch.allclose(a.video, c.video)
    assert len(a.latents) == 3 and a.bits == [None] * 3


def test_flow_schedule():
    s = flow_sigmas(10, shift=3.0)
    assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert s[5] > 0.5  # the shift keeps more steps at high noise


def test_detector_on_generated_clips():
    # Measured 100% on 2000 clips; 64 here must all be read right (colour, shape, motion).
    video, labels = clips.make_clips(64, torch.Generator().manual_seed(3))
    acc = clips.task_accuracy(video, labels)
    assert acc["all"] >= 0.98, acc
    assert acc["traj_rmse_px"] < 0.5 and acc["area_cv"] < 0.1


def test_detector_rejects_wrong_labels_and_empty_clips():
    video, labels = clips.make_clips(16, torch.Generator().manual_seed(4))
    wrong = labels.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % len(clips.COLOURS)
    assert clips.task_accuracy(video, wrong)["colour"] == 0.0
    det = clips.detect(-torch.ones(2, 3, 16, 32, 32))
    assert not det["found"].any() and (det["labels"] == -1).all()


def test_prompt_parsing():
    assert clips.prompt_text(clips.parse_prompt("A green triangle moving up")) == "a green triangle moving up"
    with pytest.raises(ValueError, match="exactly one of"):
        clips.parse_prompt("a purple square moving left")


def _png_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + n
    return out


def test_apng_writer(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (3, 5, 7, 3), dtype=np.uint8)
    media.write_apng(tmp_path / "a.png", frames)
    chunks = _png_chunks((tmp_path / "a.png").read_bytes())
    kinds = [k for k, _ in chunks]
    assert kinds.count(b"fcTL") == 3 and kinds.count(b"fdAT") == 2 and kinds[-1] == b"IEND"
    idat = next(b for k, b in chunks if k == b"IDAT")
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(5, 1 + 7 * 3)
    assert np.array_equal(rows[:, 1:].reshape(5, 7, 3), frames[0])


def test_demo_main_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(["--tiny", "--steps", "3", "--out", str(out), "--prompt", "a red square moving left",
                     "--prompt", "a blue circle moving up"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM" in text and "delta-GBS bits per step" in text
    metrics = json.loads((out / "metrics.json").read_text())
    names = [v["variant"] for v in metrics["variants"]]
    assert names == ["full precision", "min-max W4A4", "DVD-Quant W4A4", "DVD-Quant delta-GBS"]
    gbs = metrics["variants"][-1]
    assert len(gbs["bits_per_step"]) == 3 and set(gbs["bits_per_step"]) <= {4, 8}
    assert gbs["bits_per_step"][0] == 8  # no history at the first step: high bits
    assert metrics["variants"][1]["avg_bits"] == 4 and metrics["variants"][0]["psnr_db"] == float("inf")
    assert 0 < metrics["variants"][1]["rel_error"] < 1
    kinds = [k for k, _ in _png_chunks((out / "demo.png").read_bytes())]
    assert kinds.count(b"fcTL") == 16
    assert (out / "bits_per_step.svg").read_text().startswith("<svg")


def test_demo_bad_prompt_is_a_clear_error():
    with pytest.raises(SystemExit, match="exactly one of"):
        run.main(["--tiny", "--prompt", "a square"])


def test_shipped_weights_draw_what_the_prompt_says():
    # The trained default: 8 prompts, 8 steps: the detector read all right (measured 8/8).
    if not __import__("os").path.exists(run.WEIGHTS):
        pytest.skip("trained weights not present")
    model = load_mini_wan(run.WEIGHTS)
    labels = clips.all_labels()[::9]
    noise = torch.randn(len(labels), 3, 16, 32, 32, generator=torch.Generator().manual_seed(7))
    video = sample(model, noise, clips.labels_to_prompt_ids(labels), steps=8, record=False).video
    assert clips.task_accuracy(video, labels)["all"] >= 7 / 8
