"""DVD-Quant inside a real ComfyUI (started with --cpu), driven through POST /prompt and the websocket.

Tiny random-weight Wan 2.1 T2V/I2V, Wan 2.2 5B, an A14B-style expert pair and HunyuanVideo are built
from ComfyUI's own classes (make_models.py). Each prompt runs a few denoising steps on the CPU.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from prompt_runs import events, latent, rel, run_error, run_ok
from prompts import HY_COND, bitswitch, loader, node, sample_graph

T2V = "tiny_wan2.1_t2v.safetensors"


def wan_fused_modules(server) -> int:
    """Modules of the tiny quantized Wan (2 blocks) that switch to fused forwards: blocks and
    self-attentions, and where the host has it (0.33.0) the WanFeedForward that applies its GELU itself."""
    with open(os.path.join(server.comfy_path, "comfy", "ldm", "wan", "model.py")) as f:
        return 4 + 2 * ("class WanFeedForward" in f.read())


def check_fusion(server, summary, n, family="Wan"):
    """The summary's fused block steps: n modules with nothing off where this host's model code of the family
    is what the fused forwards follow; elsewhere fewer, with the reason shown and logged (fail closed)."""
    got = (summary["fused_steps"], summary["fusion_off"])
    if f"ComfyUI's {family}" in server.log():  # block_fusion.host_changed's warning
        assert got[0] < n and "changed" in got[1], got
    else:
        assert got == (n, None), got


def float_graph(name, prefix, **kw):
    return sample_graph({"unet": node("UNETLoader", unet_name=name, weight_dtype="default")}, ["unet", 0], prefix, **kw)


def quant_graph(prefix, name=T2V, w_bits=4, a_low=4, a_high=8, mode="delta", fixed_bits=8, schedule="", **kw):
    nodes = {"load": loader(name, w_bits=w_bits, a_low=a_low, a_high=a_high),
             "bs": bitswitch(["load", 0], mode=mode, low=a_low, high=a_high, fixed_bits=fixed_bits, schedule=schedule)}
    return sample_graph(nodes, ["bs", 0], prefix, **kw)


def svd_branch_bytes(server, name, rank=32) -> int:
    """Bytes of the default SVD branch (ARQ Settings' svd_rank) over the quantized layers of a tiny model: its
    blocks' 2-D weights, kept in their float dtype."""
    from safetensors import safe_open
    total = 0
    with safe_open(os.path.join(server.base_dir, "models", "diffusion_models", name), "pt") as f:
        for key in f.keys():
            if re.match(r"blocks\.\d+\..*\.weight$", key):
                t = f.get_slice(key)
                shape = t.get_shape()
                if len(shape) == 2:
                    total += min(rank, *shape) * sum(shape) * (4 if t.get_dtype() == "F32" else 2)
    return total


def test_pack_loads_without_import_failure(server):
    log = server.log()
    assert "(IMPORT FAILED)" not in log, log[-3000:]
    info = server.get("/object_info/DVDQuantLoader")["DVDQuantLoader"]
    assert info["category"] == "DVD-Quant"
    choices = info["input"]["required"]["model_name"][0]
    assert T2V in choices and "not_a_dit.safetensors" in choices


def test_w8a8_close_to_float_w4a4_further(server, capsys):
    base = latent(server, run_ok(server, float_graph(T2V, "float_t2v"))[0])
    h8, m8 = run_ok(server, quant_graph("w8a8", w_bits=8, a_low=8, a_high=8, mode="fixed", fixed_bits=8))
    h4, m4 = run_ok(server, quant_graph("w4a4", w_bits=4, a_low=4, a_high=4, mode="fixed", fixed_bits=4))
    q8, q4 = latent(server, h8), latent(server, h4)
    assert torch.isfinite(q8).all() and torch.isfinite(q4).all()
    e8, e4 = rel(q8, base), rel(q4, base)
    with capsys.disabled():
        print(f"\n[host] tiny Wan 2.1 T2V, 4 euler steps, CFG 5: rel. latent error W8A8 {e8:.4f}, W4A4 {e4:.4f}")
    assert e8 < 0.05
    assert e4 > 2 * e8
    bits = events(m8, "dvdq.bits")
    assert [b["step"] for b in bits] == [0, 1, 2, 3] and {b["bits"] for b in bits} == {8}
    assert all(b["total"] == 4 and b["mode"] == "fixed" and b["node"] == "bs" for b in bits)
    assert events(m8, "dvdq.bits_reset") == [{"node": "bs"}]
    prog = events(m4, "dvdq.quant_progress")
    assert prog and prog[-1]["done"] == prog[-1]["total"] == len(prog) and prog[0]["node"] == "load"
    (summary,) = events(m4, "dvdq.quant_summary")
    assert summary["source"] == "quantized" and summary["w_bits"] == 4
    # 4-bit codes: under a third of the float bytes, once the 16-bit SVD branch (rank 32 of these 256-wide
    # layers: larger here than the codes; 3-5% of the codes at Wan's widths) is counted apart
    assert (summary["bytes_after"] - svd_branch_bytes(server, T2V)) * 3 < summary["bytes_before"]
    assert 0 < summary["mean_rel_error"] < 1
    n = wan_fused_modules(server)
    assert f"elementwise steps fused in {n} Wan blocks and self-attention modules" in server.log()
    check_fusion(server, summary, n)  # shown in the web panel
    # the host tests run ComfyUI with --cpu: the reference backend, and the summary and log say why
    assert summary["backend"].startswith("reference (the input is on cpu, and the Triton kernels run on CUDA GPUs")
    assert f"backend {summary['backend']}" in server.log()
    assert "DVD-Quant backends, in priority order: triton (" in server.log()  # logged once, at the first load


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_one_decision_per_step_with_multi_call_samplers(server, sampler):
    hist, msgs = run_ok(server, quant_graph(f"delta_{sampler}", sampler=sampler, steps=5))
    bits = events(msgs, "dvdq.bits")
    assert [b["step"] for b in bits] == [0, 1, 2, 3, 4]
    assert bits[0]["bits"] == 8 and bits[0]["indicator"] is None
    assert all(b["indicator"] is not None and b["indicator"] >= 0 for b in bits[1:])
    assert torch.isfinite(latent(server, hist)).all()


@pytest.mark.parametrize("cache,order", [("EasyCache", "after"), ("EasyCache", "before"), ("LazyCache", "after")])
def test_cache_skipped_steps_are_marked_not_observed(server, cache, order):
    """ComfyUI's EasyCache / LazyCache with the Bit Switch Scheduler, either order: every step has one event;
    the steps the cache served are marked skipped (as many as the cache says it skipped) and get no decision."""
    steps = 10
    c = node(cache, model=["load", 0], reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)
    nodes = {"load": loader(T2V)}
    if order == "after":  # its wrapper inside the scheduler's (EasyCache) or around the whole prediction (LazyCache)
        nodes.update(bs=bitswitch(["load", 0]), cache={**c, "inputs": {**c["inputs"], "model": ["bs", 0]}})
        ref = ["cache", 0]
    else:
        nodes.update(cache=c, bs=bitswitch(["cache", 0]))
        ref = ["bs", 0]
    before = server.log().count(f"{cache} - skipped ")
    hist, msgs = run_ok(server, sample_graph(nodes, ref, f"{cache}_{order}", steps=steps))
    log = server.log()
    assert log.count(f"{cache} - skipped ") == before + 1, log[-2000:]
    skipped_by_cache = int(re.findall(rf"{cache} - skipped (\d+)/{steps} steps", log)[-1])
    bits = events(msgs, "dvdq.bits")
    assert sorted(b["step"] for b in bits) == list(range(steps))
    marked = [b["step"] for b in bits if b.get("skipped")]
    assert skipped_by_cache > 0 and len(marked) == skipped_by_cache, (skipped_by_cache, marked)
    ran = [b for b in bits if not b.get("skipped")]
    assert all(b["bits"] in (4, 8) for b in ran) and ran[0]["step"] == 0 and ran[0]["bits"] == 8
    assert all(b["bits"] is None and b["indicator"] is None for b in bits if b.get("skipped"))
    assert all(b["indicator"] is not None and math.isfinite(b["indicator"]) for b in ran[1:])
    assert torch.isfinite(latent(server, hist)).all()


def test_manual_schedule(server):
    _, msgs = run_ok(server, quant_graph("manual", mode="manual", schedule="8,4,..."))
    assert [b["bits"] for b in events(msgs, "dvdq.bits")] == [8, 4, 4, 4]


@pytest.mark.parametrize("name,lat,cond,cfg", [
    ("tiny_wan2.1_i2v.safetensors", (16, 2, 8, 8), None, 5.0),
    ("tiny_wan2.2_ti2v_5B.safetensors", (48, 2, 8, 8), None, 5.0),
    ("tiny_hunyuan_video_t2v.safetensors", (16, 2, 8, 8), HY_COND, 1.0),
])
def test_architectures(server, name, lat, cond, cfg):
    kw = {"cond": cond} if cond else {}
    base = latent(server, run_ok(server, float_graph(name, "float_" + name[:-12], latent=lat, cfg=cfg, **kw))[0])
    hist, msgs = run_ok(server, quant_graph("q_" + name[:-12], name=name, latent=lat, cfg=cfg, **kw))
    q = latent(server, hist)
    assert q.shape == base.shape and torch.isfinite(q).all()
    assert rel(q, base) < 0.5  # W4 with delta-switched A4/A8 on random weights: near, not equal
    assert len(events(msgs, "dvdq.bits")) == 4


def test_two_experts_share_one_schedule(server):
    g = {
        "hi": loader("tiny_wan2.2_t2v_high_noise.safetensors"), "lo": loader("tiny_wan2.2_t2v_low_noise.safetensors"),
        "bsA": bitswitch(["hi", 0]), "bsB": bitswitch(["lo", 0], mode="manual", schedule="8,8,8,8"),
        "pos": node("DVDQTestCond", seed=11, tokens=8, dim=4096, pooled=0),
        "neg": node("DVDQTestCond", seed=12, tokens=8, dim=4096, pooled=0),
        "lat": node("DVDQTestLatent", channels=16, frames=2, height=8, width=8),
        "k1": node("KSamplerAdvanced", model=["bsA", 0], add_noise="enable", noise_seed=5, steps=4, cfg=5.0,
                   sampler_name="euler", scheduler="simple", positive=["pos", 0], negative=["neg", 0],
                   latent_image=["lat", 0], start_at_step=0, end_at_step=2, return_with_leftover_noise="enable"),
        "k2": node("KSamplerAdvanced", model=["bsB", 0], add_noise="disable", noise_seed=5, steps=4, cfg=5.0,
                   sampler_name="euler", scheduler="simple", positive=["pos", 0], negative=["neg", 0],
                   latent_image=["k1", 0], start_at_step=2, end_at_step=10000, return_with_leftover_noise="disable"),
        "save": node("SaveLatent", samples=["k2", 0], filename_prefix="experts"),
    }
    hist, msgs = run_ok(server, g)
    bits = events(msgs, "dvdq.bits")
    assert [(b["node"], b["step"]) for b in bits] == [("bsA", 0), ("bsA", 1), ("bsB", 2), ("bsB", 3)]
    assert bits[0]["total"] is None and bits[-1]["total"] == 4
    assert bits[2]["indicator"] is not None  # compared with the high-noise expert's last output
    assert sorted(e["node"] for e in events(msgs, "dvdq.bits_reset")) == ["bsA", "bsB"]
    assert torch.isfinite(latent(server, hist)).all()


def test_host_made_copy_of_a_quantized_model(server):
    """ComfyUI 0.33.0 makes a model of its own for a MODEL (the non-dynamic delegate that conditioning hooks
    need under dynamic VRAM; the per-GPU copy of its MultiGPU nodes, deepclone_multigpu) from the patcher's
    cached_patcher_init, which its own loaders register; without one it stops with "cached_patcher_init is
    not initialized". The pack registers a factory copying the quantized module tree (no re-quantizing, no
    float model): both copies sample to the same latent, on this CPU-only run the same device."""
    with open(os.path.join(server.comfy_path, "comfy", "model_patcher.py")) as f:
        if "cached_patcher_init" not in f.read():
            pytest.skip("this ComfyUI makes no copies of a MODEL from cached_patcher_init (added after 0.8.0)")
    direct = latent(server, run_ok(server, quant_graph("copy_a", mode="fixed", fixed_bits=8))[0])
    # a clone with another sampling shift samples first and leaves the shared module patched (ComfyUI
    # unpatches only when it unloads): the copy must still be the Loader's model as loaded
    shifted = quant_graph("copy_shifted", mode="fixed", fixed_bits=8)
    shifted["shift"] = node("ModelSamplingSD3", model=["load", 0], shift=3.0)
    shifted["bs"]["inputs"]["model"] = ["shift", 0]
    assert not torch.equal(latent(server, run_ok(server, shifted)[0]), direct)
    for how in ("force_deepcopy", "multigpu"):  # multigpu: the copy MultiGPU CFG Split makes per GPU
        g = quant_graph("copy_" + how, mode="fixed", fixed_bits=8)
        g["copy"] = node("DVDQTestHostCopy", model=["load", 0], how=how)
        g["bs"]["inputs"]["model"] = ["copy", 0]
        hist, msgs = run_ok(server, g)
        assert torch.equal(latent(server, hist), direct), how
        # the Loader's output is the first run's (cached by the server): quantizing here would be the copy's
        assert events(msgs, "dvdq.quant_progress") == [] and events(msgs, "dvdq.quant_summary") == [], how
    # a LoRA'd MODEL samples, then the LoRA goes and the host makes its plain-class non-dynamic copy: the copy
    # must run without the branch the module had (its layers are copies), and a LoRA on such a copy runs
    lora = quant_graph("copy_lora", mode="fixed", fixed_bits=8)
    lora["l"] = node("LoraLoaderModelOnly", model=["load", 0], lora_name="tiny_wan_lora.safetensors", strength_model=1.0)
    lora["bs"]["inputs"]["model"] = ["l", 0]
    with_lora = latent(server, run_ok(server, lora)[0])
    g = quant_graph("copy_non_dynamic", mode="fixed", fixed_bits=8)
    g["copy"] = node("DVDQTestHostCopy", model=["load", 0], how="non_dynamic")
    g["bs"]["inputs"]["model"] = ["copy", 0]
    assert torch.equal(latent(server, run_ok(server, g)[0]), direct)
    g["l"] = node("LoraLoaderModelOnly", model=["copy", 0], lora_name="tiny_wan_lora.safetensors", strength_model=1.0)
    g["bs"]["inputs"]["model"] = ["l", 0]
    g["save"]["inputs"]["filename_prefix"] = "copy_non_dynamic_lora"
    assert rel(latent(server, run_ok(server, g)[0]), with_lora) < 1e-5


def test_saved_copy_loads_to_identical_results(server):
    dvdq_dir = os.path.join(server.base_dir, "models", "dvdq")
    before = set(os.listdir(dvdq_dir))
    g = quant_graph("saved_a", mode="fixed", fixed_bits=8)
    g["load"]["inputs"]["save_quantized_copy"] = True
    hist_a, _ = run_ok(server, g)
    new = sorted(set(os.listdir(dvdq_dir)) - before)
    assert len(new) == 1 and new[0].endswith(".safetensors"), new
    g2 = quant_graph("saved_b", name="dvdq/" + new[0], mode="fixed", fixed_bits=8)
    hist_b, msgs = run_ok(server, g2)
    assert torch.equal(latent(server, hist_a), latent(server, hist_b))
    (summary,) = events(msgs, "dvdq.quant_summary")
    assert summary["source"] == "loaded" and summary["mean_rel_error"] is None
    check_fusion(server, summary, wan_fused_modules(server))  # a loaded file gets them too
    # the Save node never overwrites: two saves of one model give two files
    save = {"load": loader(T2V), "s1": node("DVDQuantSave", model=["load", 0], filename_prefix="dvdq/tiny_saved")}
    run_ok(server, save)
    save["s1"]["inputs"]["filename_prefix"] = "dvdq//tiny_saved"  # same target, new prompt signature
    run_ok(server, save)
    assert sum(f.startswith("tiny_saved") for f in os.listdir(dvdq_dir)) == 2


def test_hunyuan_saved_copy_and_arq_overrides(server):
    name = "tiny_hunyuan_video_t2v.safetensors"
    dvdq_dir = os.path.join(server.base_dir, "models", "dvdq")
    before = set(os.listdir(dvdq_dir))
    g = quant_graph("hy_a", name=name, mode="fixed", fixed_bits=8, cond=HY_COND, cfg=1.0)
    g["arq"] = node("DVDQuantARQSettings", rotate=True, had_block="64", auto_scale=True, granularity="block",
                    scale_block="64", layer_overrides="double_blocks.0.*=8\n*.img_mlp.*=skip")
    g["load"]["inputs"].update(arq_settings=["arq", 0], save_quantized_copy=True)
    hist_a, msgs = run_ok(server, g)
    (summary,) = events(msgs, "dvdq.quant_summary")
    new = sorted(set(os.listdir(dvdq_dir)) - before)
    assert len(new) == 1
    g2 = quant_graph("hy_b", name="dvdq/" + new[0], mode="fixed", fixed_bits=8, cond=HY_COND, cfg=1.0)
    hist_b, msgs_b = run_ok(server, g2)
    assert torch.equal(latent(server, hist_a), latent(server, hist_b))
    (loaded,) = events(msgs_b, "dvdq.quant_summary")
    assert loaded["layers"] == summary["layers"] and loaded["bytes_after"] == summary["bytes_after"]
    # the double- and single-stream block switch to the fused forwards (nodes/hunyuan_blocks.py)
    assert (loaded["fused_steps"], loaded["fusion_off"]) == (summary["fused_steps"], summary["fusion_off"])
    assert (loaded["fused_steps"], loaded["fusion_off"]) == (2, None)  # on every host with a known form
    # *.img_mlp.* skipped: its two Linear layers of the one double block stay float
    full = run_ok(server, quant_graph("hy_c", name=name, cond=HY_COND, cfg=1.0))[1]
    assert summary["layers"] == events(full, "dvdq.quant_summary")[0]["layers"] - 2


@pytest.mark.parametrize("name,cond,cfg,bits", [(T2V, None, 5.0, 8), ("tiny_hunyuan_video_t2v.safetensors", HY_COND, 1.0, 8),
                                               ("tiny_wan2.1_t2v_fp8_scaled.safetensors", None, 5.0, 16)])
def test_cli_quantized_file_loads_in_comfyui(server, name, cond, cfg, bits):
    """A file from `python -m dvdq_core quantize` (no ComfyUI involved) loads as dvdq/<file> and gives the
    Loader's own result; also from an fp8_scaled file (compared with 16-bit activations: its unquantized
    layers are float32 products in the file and ComfyUI's scaled ops in the Loader, 1e-7 apart, ties
    that 8-bit codes would amplify). Without the SVD branch: the file keeps it in the source file's 16-bit
    dtype, while ComfyUI on the CPU computes these tiny models in float32 and so does the Loader's branch
    (test_saved_copy_loads_to_identical_results covers a file with the branch)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = os.path.join(server.base_dir, "models", "dvdq", "cli_" + name)
    src = os.path.join(server.base_dir, "models", "diffusion_models", name)
    subprocess.run([sys.executable, "-m", "dvdq_core", "quantize", src, out, "--svd-rank", "0"], check=True,
                   cwd=repo, capture_output=True)
    kw = dict(cond=cond) if cond else {}
    kw.update(mode="fixed", fixed_bits=bits, a_high=bits, cfg=cfg)
    g = quant_graph("cli_own_" + name[:-12], name=name, **kw)
    g["arq"] = node("DVDQuantARQSettings", rotate=True, had_block="128", auto_scale=True, granularity="pow2",
                    scale_block="128", layer_overrides="", svd_rank=0)
    g["load"]["inputs"]["arq_settings"] = ["arq", 0]
    own = latent(server, run_ok(server, g)[0])
    cli = latent(server, run_ok(server, quant_graph("cli_" + name[:-12], name="dvdq/cli_" + name, **kw))[0])
    assert rel(cli, own) < 1e-3


def test_apply_merges_lora_and_leaves_input_untouched(server):
    lora = node("LoraLoaderModelOnly", model=["unet", 0], lora_name="tiny_wan_lora.safetensors", strength_model=1.0)
    unet = node("UNETLoader", unet_name=T2V, weight_dtype="default")
    apply8 = dict(w_bits=8, a_low=8, a_high=8, method="dvdq")
    # the float + LoRA run leaves the shared module LoRA'd (ComfyUI unpatches only when it unloads): Apply
    # without the LoRA (nq below) must still read the original weights
    lf = latent(server, run_ok(server, sample_graph({"unet": unet, "lora": lora}, ["lora", 0], "lora_float"))[0])
    lq_graph = sample_graph({"unet": unet, "lora": lora, "apply": node("DVDQuantApply", model=["lora", 0], **apply8),
                             "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)}, ["bs", 0], "lora_q8")
    lq = latent(server, run_ok(server, lq_graph)[0])
    nq_graph = sample_graph({"unet": unet, "apply": node("DVDQuantApply", model=["unet", 0], **apply8),
                             "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)}, ["bs", 0], "nolora_q8")
    nq_graph["inspect"] = node("DVDQTestInspect", model=["apply", 0], reference=["unet", 0])
    hist, _ = run_ok(server, nq_graph)
    nq = latent(server, hist)
    assert rel(lq, lf) < 0.05, "LoRA before Apply must end up in the quantized weights"
    assert rel(lq, nq) > 4 * rel(lq, lf), "the LoRA must change the quantized model's output"
    info = json.loads(hist["outputs"]["inspect"]["info"][0])
    assert info["reference_quant_layers"] == 0 and not info["same_module"], info
    assert info["shared_tensors"] > 0, "non-quantized tensors should be shared with the input, not copied"
    assert info["shared_param_objects"] == 0, info


def test_apply_reads_the_loaders_model_after_a_patched_clone_sampled(server):
    """A clone with another sampling shift (ModelSamplingSD3, an object patch) that sampled last leaves the
    shared module's model_sampling swapped until it unloads; Apply on the unshifted MODEL must build its
    model from the original, not carry the other clone's shift."""
    unet = node("UNETLoader", unet_name=T2V, weight_dtype="default")
    run_ok(server, sample_graph({"unet": unet, "shift": node("ModelSamplingSD3", model=["unet", 0], shift=3.0)},
                                ["shift", 0], "shifted_float"))
    g = sample_graph({"unet": unet, "apply": node("DVDQuantApply", model=["unet", 0], w_bits=8, a_low=8, a_high=8,
                                                  method="dvdq"),
                      "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)}, ["bs", 0], "apply_after_shift")
    g["inspect"] = node("DVDQTestInspect", model=["apply", 0], reference=["unet", 0])
    info = json.loads(run_ok(server, g)[0]["outputs"]["inspect"]["info"][0])
    assert info["sampling_shift"] == info["config_shift"] != 3.0, info


def test_fp8_sources_quantize_from_their_real_weights(server, capsys):
    """ComfyUI's fp8 forms as the source: an "fp8_scaled" file (weights stored divided by a per-tensor
    scale_weight, as ComfyUI's own Wan files) through the Loader and through UNETLoader -> Apply, and
    UNETLoader's weight_dtype fp8_e4m3fn -> Apply. Each must quantize the weights the model really
    computes with: W8A8 as close to ComfyUI's own run of that fp8 model as the fp16 source's W8A8 is
    to its float run (quantizing the stored fp8 values of the scaled file gave 1.04). Saved copies
    load back (the unquantized scaled layers, embeddings and head, failed on scale_input). A LoRA
    before Apply: on quantized layers no further from the fp16 model + LoRA than ComfyUI's own fp8 run
    (which rounds the patched weight back to fp8); on layers left unquantized it is stored back
    through ComfyUI's set_weight (scaled) like ComfyUI's own patching."""
    fp8 = "tiny_wan2.1_t2v_fp8_scaled.safetensors"
    w8 = dict(w_bits=8, a_low=8, a_high=8)
    dvdq_dir = os.path.join(server.base_dir, "models", "dvdq")

    def graph(name, dtype, prefix, lora=False, quantize=True, save=None, skip=None):
        g = {"unet": node("UNETLoader", unet_name=name, weight_dtype=dtype)}
        if lora:
            g["unet0"], g["unet"] = g["unet"], node("LoraLoaderModelOnly", model=["unet0", 0], strength_model=1.0,
                                                     lora_name="tiny_wan_lora.safetensors")
        if not quantize:
            return sample_graph(g, ["unet", 0], prefix)
        g["apply"] = node("DVDQuantApply", model=["unet", 0], method="dvdq", **w8)
        if skip:
            g["arq"] = node("DVDQuantARQSettings", rotate=True, had_block="128", auto_scale=True, granularity="pow2",
                            scale_block="128", layer_overrides=skip + "=skip")
            g["apply"]["inputs"]["arq_settings"] = ["arq", 0]
        if save:
            g["qsave"] = node("DVDQuantSave", model=["apply", 0], filename_prefix="dvdq/" + save)
        g["bs"] = bitswitch(["apply", 0], mode="fixed", low=8, high=8)
        return sample_graph(g, ["bs", 0], prefix)

    def run(g):
        hist, msgs = run_ok(server, g)
        return latent(server, hist), msgs

    def saved(prefix, quantized, bits=8):
        (f,) = [f for f in os.listdir(dvdq_dir) if f.startswith(prefix)]
        back, _ = run(quant_graph(prefix + "_reloaded", name="dvdq/" + f, mode="fixed", fixed_bits=bits,
                                  **dict(w8, a_high=bits)))
        assert rel(back, quantized) < 1e-5, f"the saved copy {f} must load back to the same output"

    base, ref = run(float_graph(T2V, "fp8_base"))[0], run(quant_graph("fp8_ref", mode="fixed", **w8))
    loaded = run(quant_graph("fp8_loader", name=fp8, mode="fixed", **w8))
    # The saved copy's unquantized layers are the float32 weights ComfyUI's scaled layers compute with
    # (1e-7 apart per layer): compared with unquantized activations, as 8-bit codes would flip on such ties
    g = quant_graph("fp8_loader16", name=fp8, mode="fixed", fixed_bits=16, **dict(w8, a_high=16))
    g["load"]["inputs"]["save_quantized_copy"] = True
    saved("tiny_wan2.1_t2v_fp8_scaled_dvdq", run(g)[0], bits=16)
    scaled_float, cast_float = run(graph(fp8, "default", "fp8_f1", quantize=False))[0], \
        run(graph(T2V, "fp8_e4m3fn", "fp8_f2", quantize=False))[0]
    cast = run(graph(T2V, "fp8_e4m3fn", "fp8_apply_cast", save="fp8_cast"))
    saved("fp8_cast", cast[0])
    cases = {"loader, fp8_scaled file": (loaded[0], scaled_float),
             "apply, fp8_scaled file": (run(graph(fp8, "default", "fp8_apply_scaled"))[0], scaled_float),
             "apply, weight_dtype fp8": (cast[0], cast_float),
             "apply, fp8_scaled + LoRA, LoRA'd layers left unquantized":
                 (run(graph(fp8, "default", "fp8_lora_skip", lora=True, skip="blocks.*.self_attn.*"))[0],
                  run(graph(fp8, "default", "fp8_f3", lora=True, quantize=False))[0])}
    q_lora = run(graph(fp8, "default", "fp8_lora", lora=True))[0]
    lora16 = run(graph(T2V, "default", "fp8_f4", lora=True, quantize=False))[0]
    f_lora = cases["apply, fp8_scaled + LoRA, LoRA'd layers left unquantized"][1]
    with capsys.disabled():
        print(f"\n[host] W8A8 rel. latent error vs that model's float run: fp16 source {rel(ref[0], base):.4f}, "
              + ", ".join(f"{k} {rel(q, f):.4f}" for k, (q, f) in cases.items())
              + f" (the fp8 models' own float runs vs fp16's: {rel(scaled_float, base):.4f}, {rel(cast_float, base):.4f})"
              + f"\n[host] fp8_scaled + LoRA vs the fp16 model + LoRA: ours W8A8 {rel(q_lora, lora16):.4f}, ComfyUI's "
              f"float run {rel(f_lora, lora16):.4f}; the LoRA moves ours by "
              f"{rel(q_lora, cases['apply, fp8_scaled file'][0]):.4f}")
    for label, (q, f) in cases.items():
        assert torch.isfinite(q).all() and rel(q, f) < 2 * rel(ref[0], base) + 0.01, label
    assert rel(q_lora, lora16) < rel(f_lora, lora16) + 0.01
    assert rel(q_lora, cases["apply, fp8_scaled file"][0]) > 2 * rel(q_lora, lora16), "the LoRA must take effect"
    # the summary counts the source's stored bytes (fp8: about half of fp16's), not the float32 it is read as
    (s16,), (s8,) = events(ref[1], "dvdq.quant_summary"), events(loaded[1], "dvdq.quant_summary")
    assert s8["bytes_before"] < 0.6 * s16["bytes_before"], (s8, s16)


def lora_node(model_ref, name="tiny_wan_lora.safetensors", strength=1.0):
    return node("LoraLoaderModelOnly", model=model_ref, lora_name=name, strength_model=strength)


KOHYA = "tiny_wan_lora_kohya.safetensors"


def test_lora_after_quantization_runs_beside_the_packed_weights(server, capsys):
    """Two stacked LoRAs after the Loader (diffusers-style lora_A/B on self-attention; kohya with alpha on the
    feed-forward, whose GELU the quantized ffn.0 applies, plus a bias difference, at negative strength): within
    quantization noise of the same LoRAs merged before quantizing (Apply); strength changes and removal take
    effect without quantizing again; the float model stays as it was."""
    q8 = dict(w_bits=8, a_low=8, a_high=8)
    unet = node("UNETLoader", unet_name=T2V, weight_dtype="default")

    def after(strength2, prefix, loras=True):
        g = {"load": loader(T2V, **q8), "l1": lora_node(["load", 0]), "l2": lora_node(["l1", 0], KOHYA, strength2)}
        g["bs"] = bitswitch(["l2", 0] if loras else ["load", 0], mode="fixed", low=8, high=8)
        return run_ok(server, sample_graph(g, ["bs", 0], prefix))

    f0 = latent(server, run_ok(server, float_graph(T2V, "lora_float_before"))[0])
    plain_h, plain_m = after(-0.5, "lora_none", loras=False)
    assert events(plain_m, "dvdq.quant_progress"), "the first run quantizes"
    h, m = after(-0.5, "lora_after")
    h2, m2 = after(1.0, "lora_after_strength")
    h3, m3 = after(1.0, "lora_none_again", loras=False)
    # DVD-Quant Save of the LoRA'd MODEL after it sampled (its float text embedding patched in place): the base
    # model without the LoRAs
    saved = {"load": loader(T2V, **q8), "l1": lora_node(["load", 0]), "l2": lora_node(["l1", 0], KOHYA, 1.0),
             "s": node("DVDQuantSave", model=["l2", 0], filename_prefix="dvdq/lora_saved"),
             "sm": node("DVDQuantSave", model=["l2", 0], filename_prefix="dvdq/lora_merged",
                        loras="merge and quantize again")}
    saved_out = run_ok(server, saved)[0]["outputs"]
    saved_name, merged_name = ("dvdq/" + saved_out[k]["text"][0] for k in ("s", "sm"))
    base_again, merged_file = (latent(server, run_ok(server, quant_graph(prefix, name=name, w_bits=8, a_low=8, a_high=8,
                                                                         mode="fixed", fixed_bits=8))[0])
                               for prefix, name in (("lora_saved_base", saved_name), ("lora_saved_merged", merged_name)))
    for msgs in (m, m2, m3):  # the Loader's output stays cached while it is in every prompt
        assert not events(msgs, "dvdq.quant_progress"), "adding, changing or removing a LoRA must not quantize again"
    merged_g = {"unet": unet, "l1": lora_node(["unet", 0]), "l2": lora_node(["l1", 0], KOHYA, -0.5),
                "apply": node("DVDQuantApply", model=["l2", 0], method="dvdq", **q8),
                "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)}
    merged = latent(server, run_ok(server, sample_graph(merged_g, ["bs", 0], "lora_merged"))[0])
    plain, lora_after = latent(server, plain_h), latent(server, h)
    strength2, plain_again = latent(server, h2), latent(server, h3)
    f1 = latent(server, run_ok(server, float_graph(T2V, "lora_float_after", seed=3))[0])
    effect = rel(merged, plain)
    with capsys.disabled():
        print(f"\n[host] LoRAs after quantization (W8A8): vs merged before quantizing {rel(lora_after, merged):.4f}, "
              f"the LoRAs' own effect {effect:.4f}")
    assert rel(lora_after, merged) < 0.5 * effect
    assert rel(strength2, lora_after) > 0.2 * effect, "a new strength must take effect"
    assert torch.equal(plain_again, plain), "without the LoRAs the quantized model must give what it gave before"
    assert rel(base_again, plain) < 1e-4, "DVD-Quant Save writes the base model without the LoRAs"
    # or, when asked, with them merged and quantized again: close to the LoRAs running beside the base model
    assert rel(merged_file, strength2) < 0.5 * rel(strength2, plain), (rel(merged_file, strength2), rel(strength2, plain))
    assert torch.equal(f1, f0), "the float model must not change"


def test_lora_branch_matches_comfyuis_merge(comfy, host_dir):
    """tests/host/lora_checks.py in this host's Python: each LoRA form a branch runs (alpha / rank, strengths,
    stacks, offsets along either dimension, bias differences, with and without the fused GELU) against the
    float layer with ComfyUI's calculate_weight, within 1% where the patch moves the output by 5% or more;
    LoHa, DoRA, full-weight differences and strength_model refused naming the form."""
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([comfy.python, os.path.join(here, "lora_checks.py"), comfy.path], capture_output=True,
                         text=True, env=comfy.env, cwd=host_dir)
    assert res.returncode == 0 and "RESULT: all checks passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


def test_lora_after_apply(server):
    """UNETLoader -> DVD-Quant Apply -> LoRA: within half the LoRA's effect of UNETLoader -> LoRA -> Apply."""
    q8 = dict(w_bits=8, a_low=8, a_high=8, method="dvdq")
    unet = node("UNETLoader", unet_name=T2V, weight_dtype="default")
    after = {"unet": unet, "apply": node("DVDQuantApply", model=["unet", 0], **q8), "l": lora_node(["apply", 0], KOHYA),
             "bs": bitswitch(["l", 0], mode="fixed", low=8, high=8)}
    before = {"unet": unet, "l": lora_node(["unet", 0], KOHYA), "apply": node("DVDQuantApply", model=["l", 0], **q8),
              "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)}
    plain = {"unet": unet, "apply": node("DVDQuantApply", model=["unet", 0], **q8),
             "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)}
    a, b, p = (latent(server, run_ok(server, sample_graph(g, ["bs", 0], name))[0])
               for g, name in ((after, "apply_lora_after"), (before, "apply_lora_before"), (plain, "apply_no_lora")))
    assert rel(a, b) < 0.5 * rel(b, p), (rel(a, b), rel(b, p))


def test_hunyuan_lora_after_quantization(server):
    """A LoRA after the Loader on HunyuanVideo (double-block qkv and MLP, whose GELU the quantized layer applies;
    single-block linears): within half the LoRA's effect of the same LoRA before Apply."""
    name, q8 = "tiny_hunyuan_video_t2v.safetensors", dict(w_bits=8, a_low=8, a_high=8)
    unet = node("UNETLoader", unet_name=name, weight_dtype="default")
    hy_lora = "tiny_hunyuan_lora.safetensors"
    graphs = {
        "hy_lora_after": {"load": loader(name, **q8), "l": lora_node(["load", 0], hy_lora),
                          "bs": bitswitch(["l", 0], mode="fixed", low=8, high=8)},
        "hy_lora_before": {"unet": unet, "l": lora_node(["unet", 0], hy_lora),
                           "apply": node("DVDQuantApply", model=["l", 0], method="dvdq", **q8),
                           "bs": bitswitch(["apply", 0], mode="fixed", low=8, high=8)},
        "hy_no_lora": {"load": loader(name, **q8), "bs": bitswitch(["load", 0], mode="fixed", low=8, high=8)},
    }
    a, b, p = (latent(server, run_ok(server, sample_graph(g, ["bs", 0], prefix, cond=HY_COND, cfg=1.0))[0])
               for prefix, g in graphs.items())
    assert rel(b, p) > 0.05, "the LoRA must reach the model"
    assert rel(a, b) < 0.5 * rel(b, p), (rel(a, b), rel(b, p))


def test_lora_after_quantization_on_every_load_path(server):
    """ComfyUI hands a LoRA to a fully loaded layer through patch_weight_to_device and to an offloaded one as
    LowVramPatch functions: both give the same output, and unloading removes it."""
    g = {"load": loader(T2V, w_bits=8, a_low=8, a_high=8), "l1": lora_node(["load", 0]),
         "l2": lora_node(["l1", 0], KOHYA, 0.7)}
    g["paths"] = node("DVDQTestLoadPaths", model=["l2", 0], reference=["load", 0])
    info = json.loads(run_ok(server, g)[0]["outputs"]["paths"]["info"][0])
    assert info["full_patched_layers"] > 0 and info["after_unpatch"] == 0, info
    assert info["lowvram_patch_layers"] > 0, info
    assert info["lora_effect"] > 0.01 and info["lowvram_vs_full"] < 1e-5 and info["reference_again"] == 0, info


def test_bypass_lora_after_quantization(server):
    """ComfyUI's bypass LoRA (0.33 on) wraps the layers' forwards: on attention layers it gives what the
    pack's branch gives; on the feed-forward whose GELU the quantized layer applies it is refused."""
    if "LoraLoaderBypassModelOnly" not in server.get("/object_info"):
        pytest.skip("this host has no bypass LoRA node (0.33.0 on)")
    q8 = dict(w_bits=8, a_low=8, a_high=8)

    def g(lora_class, name, prefix):
        nodes = {"load": loader(T2V, **q8), "l": node(lora_class, model=["load", 0], lora_name=name, strength_model=0.7),
                 "bs": bitswitch(["l", 0], mode="fixed", low=8, high=8)}
        return sample_graph(nodes, ["bs", 0], prefix)
    ours = latent(server, run_ok(server, g("LoraLoaderModelOnly", "tiny_wan_lora.safetensors", "branch_attn"))[0])
    bypass = latent(server, run_ok(server, g("LoraLoaderBypassModelOnly", "tiny_wan_lora.safetensors", "bypass_attn"))[0])
    assert rel(bypass, ours) < 0.02, rel(bypass, ours)
    err = run_error(server, g("LoraLoaderBypassModelOnly", KOHYA, "bypass_ffn"))
    assert "LoraLoaderModelOnly" in err and "GELU" in err, err


def test_lora_forms_without_a_low_rank_branch_are_refused(server):
    g = quant_graph("loha_after")
    g["lora"] = lora_node(["load", 0], "tiny_wan_loha.safetensors")
    g["bs"]["inputs"]["model"] = ["lora", 0]
    err = run_error(server, g)
    assert "LoHa" in err and "before 'DVD-Quant Apply'" in err, err
    g["lora"]["inputs"]["lora_name"] = "tiny_wan_lora_other_size.safetensors"  # a clear error, not a torch one
    err = run_error(server, g)
    assert "does not fit the layer" in err and "256 x 256" in err, err


def test_hook_lora_on_quantized_model(server, capsys):
    """Create Hook LoRA -> Conditioning Set Properties on the positive prompt: on the quantized model (W8A8) the
    hook LoRA runs as the branch, within quantization noise of ComfyUI's own float run with the same hook; a
    LoHa hook is refused, naming the form."""
    def hooked(g, lora="tiny_wan_lora.safetensors"):
        g["hook"] = node("CreateHookLora", lora_name=lora, strength_model=1.0, strength_clip=1.0)
        g["pos_hooked"] = node("ConditioningSetProperties", cond_NEW=["pos", 0], strength=1.0,
                               set_cond_area="default", hooks=["hook", 0])
        g["ks"]["inputs"]["positive"] = ["pos_hooked", 0]
        return g
    q8 = dict(w_bits=8, a_low=8, a_high=8, mode="fixed", fixed_bits=8)
    f_plain = latent(server, run_ok(server, float_graph(T2V, "hook_f_plain"))[0])
    f_hook = latent(server, run_ok(server, hooked(float_graph(T2V, "hook_f")))[0])
    q_hook = latent(server, run_ok(server, hooked(quant_graph("hook_q", **q8)))[0])
    q_plain = latent(server, run_ok(server, quant_graph("hook_q_plain", **q8))[0])
    with capsys.disabled():
        print(f"\n[host] hook LoRA (W8A8): vs ComfyUI's float run with the hook {rel(q_hook, f_hook):.4f}, the hook's own "
              f"effect {rel(f_hook, f_plain):.4f}, quantization alone {rel(q_plain, f_plain):.4f}")
    assert rel(q_hook, f_hook) < 0.5 * rel(f_hook, f_plain)
    assert rel(q_hook, q_plain) > 0.5 * rel(f_hook, f_plain), "the hook LoRA must take effect"
    err = run_error(server, hooked(quant_graph("hook_loha", **q8), "tiny_wan_loha.safetensors"))
    assert "LoHa" in err and "before 'DVD-Quant Apply'" in err, err


def test_memory_accounting_and_lowvram_path(server):
    g = {"load": loader(T2V), "inspect": node("DVDQTestInspect", model=["load", 0])}
    hist, _ = run_ok(server, g)
    info = json.loads(hist["outputs"]["inspect"]["info"][0])
    assert info["quant_layers"] > 0 and info["quant_in_load_list"], info
    # Wan's q/k/v (and cross-attention k/v) quantize their shared input once under inference mode
    assert info["shared_input"] == {"blocks.0.self_attn.q": 1, "blocks.0.self_attn.k": 1, "blocks.0.self_attn.v": 2,
                                    "blocks.0.cross_attn.k": 1, "blocks.0.cross_attn.v": 2}, info
    assert info["model_size"] == info["state_dict_bytes"], "ModelPatcher.size must be re-measured after quantizing"
    assert info["lowvram_cast_flags"] == info["quant_layers"], info
    assert info["lowvram_forward_finite"], info
    assert info["lowvram_loaded_bytes"] < info["packed_bytes"], info  # packed layers were left offloaded
    assert info["reloaded_bytes"] == info["model_size"] and info["reloaded_cast_flags"] == 0, info


def test_clear_errors(server):
    assert "not a diffusion model ComfyUI recognizes" in run_error(server, quant_graph("bad1", name="not_a_dit.safetensors"))
    err = run_error(server, quant_graph("bad8", name="tiny_flux_image.safetensors"))
    assert "is a FluxSchnell model, not a video diffusion transformer" in err, err
    assert err.startswith("dvdq.DVDQuantError: "), err
    dvdq_dir = os.path.join(server.base_dir, "models", "dvdq")
    src = os.path.join(server.base_dir, "models", "diffusion_models", T2V)
    with open(src, "rb") as f, open(os.path.join(dvdq_dir, "corrupt.safetensors"), "wb") as g:
        g.write(f.read()[:4096])
    assert "corrupt.safetensors" in run_error(server, quant_graph("bad2", name="dvdq/corrupt.safetensors"))
    shutil.copy(src, os.path.join(dvdq_dir, "plain.safetensors"))
    assert "not a DVD-Quant file" in run_error(server, quant_graph("bad3", name="dvdq/plain.safetensors"))
    run_ok(server, {"load": loader(T2V), "s": node("DVDQuantSave", model=["load", 0], filename_prefix="dvdq/for_errors")})
    saved = next(f for f in os.listdir(dvdq_dir) if f.startswith("for_errors"))
    shutil.copy(os.path.join(dvdq_dir, saved), os.path.join(server.base_dir, "models", "diffusion_models", "q.safetensors"))
    assert "already DVD-Quant quantized" in run_error(server, quant_graph("bad7", name="q.safetensors"))
    g = quant_graph("bad4")
    g["arq"] = node("DVDQuantARQSettings", rotate=True, had_block="128", auto_scale=True, granularity="block",
                    scale_block="128", layer_overrides="blocks.0.*=banana")
    g["load"]["inputs"]["arq_settings"] = ["arq", 0]
    assert "layer_overrides" in run_error(server, g)
    g["arq"]["inputs"]["layer_overrides"] = "transformer_blocks.*=8"
    assert "matches no layer" in run_error(server, g)
    g = quant_graph("bad5", a_high=12)
    assert "activation bits must be 4, 5, 6, 7, 8 or 16" in run_error(server, g)
    g = sample_graph({"unet": node("UNETLoader", unet_name=T2V, weight_dtype="default"),
                      "bs": bitswitch(["unet", 0])}, ["bs", 0], "bad6")
    assert "needs a MODEL quantized by DVD-Quant" in run_error(server, g)
    g = sample_graph({"unet": node("UNETLoader", unet_name=T2V, weight_dtype="default"),
                      "foreign": node("DVDQTestForeignWeights", model=["unet", 0]),
                      "apply": node("DVDQuantApply", model=["foreign", 0], w_bits=4, a_low=4, a_high=8, method="dvdq"),
                      "bs": bitswitch(["apply", 0])}, ["bs", 0], "bad9")
    err = run_error(server, g)
    assert "layer blocks.0.self_attn.q holds its weight as ForeignTensor" in err and "Load Diffusion Model" in err, err


def test_failed_run_leaves_next_run_correct(server):
    err = run_error(server, quant_graph("short", mode="manual", schedule="8,4", steps=4))
    assert "schedule" in err
    hist, msgs = run_ok(server, quant_graph("after_fail", seed=8))
    bits = events(msgs, "dvdq.bits")
    assert [b["step"] for b in bits] == [0, 1, 2, 3] and bits[0]["bits"] == 8
    assert events(msgs, "dvdq.bits_reset") == [{"node": "bs"}]
    assert torch.isfinite(latent(server, hist)).all()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: ComfyUI refuses --lowvram together with --cpu; the low-VRAM load "
                           "path itself runs in test_memory_accounting_and_lowvram_path")
def test_lowvram_server(comfy, host_dir):
    from comfy_server import ComfyServer
    s = ComfyServer(comfy.path, host_dir, extra_args=["--lowvram"], cpu=False, python=comfy.python)
    try:
        hist, msgs = run_ok(s, quant_graph("lowvram", seed=9))
        assert torch.isfinite(latent(s, hist)).all() and len(events(msgs, "dvdq.bits")) == 4
        assert "(IMPORT FAILED)" not in s.log()
    finally:
        s.stop()


def test_fusions_find_comfyui_models(comfy, host_dir):
    """The GELU fusion (dvdq_core.fusion) finds the feed-forward of ComfyUI's own Wan and HunyuanVideo
    classes, the block fusions (nodes/wan_blocks.py, nodes/hunyuan_blocks.py) ComfyUI's Wan and
    HunyuanVideo blocks; if ComfyUI restructured them, the pack would still be correct but slower:
    this says so."""
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([comfy.python, os.path.join(here, "fused_layers.py")], capture_output=True, text=True,
                         env=comfy.env, cwd=host_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    fused = json.loads(res.stdout.strip().splitlines()[-1])
    # the GELU fold only where the feed-forward is a Sequential running its children: ComfyUI 0.33.0's
    # WanFeedForward applies the GELU itself (linear_input_act), so folding it would run it twice
    assert fused["wan21_t2v_ffn_sequential"] == [comfy.version in ("0.3.64", "0.8.0")]
    assert fused["wan21_t2v"] == (["blocks.0.ffn.0", "blocks.1.ffn.0"] if fused["wan21_t2v_ffn_sequential"][0] else [])
    assert fused["hunyuan_video"] == ["double_blocks.0.img_mlp.0", "double_blocks.0.txt_mlp.0"]
    # Wan's blocks and self-attention with their elementwise steps fused (nodes/wan_blocks.py; each of the
    # three hosts has its own form of the block): both blocks and both self-attentions switch (the
    # cross-attentions keep their class), each fused op runs twice per block (Wan 2.2 with per-frame
    # modulation vectors too), and on the CPU (the host's own ops) the output is bit for bit the host's,
    # also with attention patches in transformer_options (which 0.33.0 runs and older hosts ignore)
    for case, r in fused["wan"].items():
        # 0.33.0's WanFeedForward switches too where its layers are ours: it then lets ffn.0 apply the GELU
        n, gelu = (6, ["blocks.0.ffn.0", "blocks.1.ffn.0"]) if not fused["wan21_t2v_ffn_sequential"][0] \
            and r["quantized"] else (4, [])
        assert (r["fused"], r["off"], r["again"], r["restored"], r["gelu_by_fused_ffn"]) == (n, None, 0, n, gelu), case
        assert r["gelu_after_unfuse"] == [], case
        vectors = [2] if case.startswith("wan22_5b") else [1]  # Wan 2.2: per-frame timesteps, 2 latent frames
        assert r["calls"] == {"norm_rope": 4, "norm_rope_weighted": 4, "modulated_norm": 4, "gated_residual": 4,
                              "gate_vectors": vectors}, case
        assert r["equal"] and r["finite"], case
        assert r["host_runs_patches"] == ("patches" in case and comfy.version not in ("0.3.64", "0.8.0")), case
        if "another pack" in case:  # subclasses that keep the host's forwards, defined elsewhere
            assert {"DVDQTheirWanSelfAttention", "DVDQTheirWanAttentionBlock"} <= set(r["classes"]), case
        else:
            assert {"DVDQWanSelfAttention", "DVDQWanAttentionBlock"} <= set(r["classes"]), case
        assert not {"WanSelfAttention", "WanAttentionBlock"} & set(r["classes"]), case
    # HunyuanVideo's double- and single-stream blocks (nodes/hunyuan_blocks.py), float32 / bf16 / fp16
    # (the host's nan_to_num) / quantized / manual_cast layers, with a text mask: per call 5 modulations
    # (4 double, 1 single), q and k of both blocks and 5 gates: 2 out of place (image, `img = img + ...`) and 3
    # in place (text, single stream) on 0.3.64, all 5 in place on 0.8.0 and 0.33.0 (`img += ...`); bit for bit
    # the host's on the CPU (0.8.0 on: text first on 0.33.0, comfy-kitchen's rotation, comfy.ops' q/k norms on
    # 0.33.0). With a guiding frame (I2V, modulation_dims: the first latent frame's tokens on one vector, the
    # rest and the text on another) the same fused ops run, still bit for bit the host's (its roundings:
    # product, then sum). A batch of two with a guiding frame goes to the host's forward (no fused op runs;
    # ComfyUI 0.3.64 itself fails there, and the fused model fails alike). With attention patches in
    # transformer_options (which 0.33.0 runs and older hosts ignore) the blocks run the host's forward where
    # the host runs them. The pack's modulate computes what flux's apply_mod does, bit for bit (float32 / bf16
    # / fp16, with and without dims and shift). Every host here has a form the fused forwards follow: the
    # fusion staying off (a changed fingerprint) fails this test, and so does a call the GPU kernels' shape
    # rules refuse ("kernel_refused" in the calls: on a GPU it would run the slower reference).
    assert fused["modulate_same"]
    assert set(fused["hunyuan"]) == {"float32/float", "bfloat16/float", "float16/float", "bfloat16/quantized",
                                     "bfloat16/manual_cast layers", "float32/attention patches"}
    gates = {"gated_add": 2, "gated_add_": 3} if comfy.version == "0.3.64" else {"gated_add_": 5}
    for case, r in fused["hunyuan"].items():
        assert r["equal"] and r["finite"], case
        assert (r["fused"], r["off"], r["again"], r["restored"]) == (2, None, 0, 2), case
        assert r["classes"] == ["DVDQDoubleStreamBlock", "DVDQSingleStreamBlock"], case
        assert r["host_runs_patches"] == ("patches" in case and comfy.version not in ("0.3.64", "0.8.0")), case
        if r["host_runs_patches"]:  # every block call to the host's forward
            assert r["calls"] == r["guided_calls"] == {} and r["guided_equal"], case
        else:
            assert r["calls"] == {"modulated_norm": 5, "head_norm_rope": 4, **gates}, case
            assert r["guided_calls"] == r["calls"] and r["guided_equal"] and r["guided_differs"], case
        assert r["batch2_calls"] == {} and r["batch2_same"], case
        assert (r["batch2_host"] == "ran") == (comfy.version not in ("0.3.64", "0.8.0")), case  # 0.33.0: [:, i:i + 1]


def test_pow2_fast_granularity_through_the_nodes(server):
    """ARQ Settings' granularity "pow2-fast" reaches the layers: 4-bit steps equal the default
    ("pow2") run, 8-bit steps drop the auto-scale and so differ from it."""
    def run(prefix, granularity, schedule):
        g = quant_graph(prefix, mode="manual", schedule=schedule)
        g["arq"] = node("DVDQuantARQSettings", rotate=True, had_block="128", auto_scale=True, granularity=granularity,
                        scale_block="128", layer_overrides="")
        g["load"]["inputs"]["arq_settings"] = ["arq", 0]
        return latent(server, run_ok(server, g)[0])

    assert torch.equal(run("fast4", "pow2-fast", "4,4,4,4"), run("pow2_4", "pow2", "4,4,4,4"))
    fast8, pow2_8 = run("fast8", "pow2-fast", "8,8,8,8"), run("pow2_8", "pow2", "8,8,8,8")
    assert not torch.equal(fast8, pow2_8) and rel(fast8, pow2_8) < 0.05


def test_installing_the_pack_changes_no_other_workflow(comfy, server):
    """Workflows without our nodes (one with a LoRA loader, one plain) give bit-identical latents on a
    server with the pack installed and one without it (same host, same models, only the test nodes)."""
    from comfy_server import ComfyServer
    bare = os.path.join(server.base_dir, "without_pack")
    os.makedirs(os.path.join(bare, "custom_nodes"), exist_ok=True)
    for d in ("output", "input", "user"):
        os.makedirs(os.path.join(bare, d), exist_ok=True)
    fixture = os.path.join(server.base_dir, "custom_nodes", "dvdq_test_nodes")
    if not os.path.exists(os.path.join(bare, "custom_nodes", "dvdq_test_nodes")):
        os.symlink(os.path.realpath(fixture), os.path.join(bare, "custom_nodes", "dvdq_test_nodes"))
    with open(os.path.join(server.base_dir, "extra_model_paths.yaml")) as f:
        yaml = f.read().replace("custom_nodes: custom_nodes", f"custom_nodes: {bare}/custom_nodes")
    with open(os.path.join(bare, "extra_model_paths.yaml"), "w") as f:
        f.write(yaml)
    lora = {"unet": node("UNETLoader", unet_name=T2V, weight_dtype="default"),
            "lora": node("LoraLoaderModelOnly", model=["unet", 0], lora_name="tiny_wan_lora.safetensors",
                         strength_model=0.8)}
    graphs = {"lora": sample_graph(lora, ["lora", 0], "nopack_lora", seed=5),
              "plain": float_graph(T2V, "nopack_plain", seed=5)}
    with_pack = {k: latent(server, run_ok(server, g)[0]) for k, g in graphs.items()}
    s = ComfyServer(comfy.path, bare, python=comfy.python)
    try:
        assert "ComfyUI-DVD-Quant" not in s.log() and "DVDQuantLoader" not in s.get("/object_info")
        without = {k: latent(s, run_ok(s, g)[0]) for k, g in graphs.items()}
    finally:
        s.stop()
    for k in graphs:
        assert torch.equal(with_pack[k], without[k]), k
    assert not torch.equal(with_pack["lora"], with_pack["plain"])  # the LoRA took effect


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise"])
def test_comfyui_quantized_layouts_are_read_through_the_host(server, fmt, capsys):
    """A file in newer ComfyUI's own quantized format (QuantizedTensor weights, `.comfy_quant` per layer)
    is quantized from the weights the host dequantizes, not refused and not read as raw codes: the
    Loader's W8A8 run is as close to ComfyUI's own run of that file as the fp16 file's is to its own."""
    name = f"tiny_wan2.1_t2v_{fmt}.safetensors"
    if not os.path.exists(os.path.join(server.base_dir, "models", "diffusion_models", name)):
        pytest.skip(f"this ComfyUI has no {fmt} QuantizedTensor layout (added in 0.8.0)")
    kw = dict(mode="fixed", fixed_bits=8, a_low=8, a_high=8, w_bits=4)
    own = latent(server, run_ok(server, float_graph(name, "cq_float_" + fmt))[0])
    q = latent(server, run_ok(server, quant_graph("cq_q_" + fmt, name=name, **kw))[0])
    base = latent(server, run_ok(server, float_graph(T2V, "cq_float16"))[0])
    q16 = latent(server, run_ok(server, quant_graph("cq_q16", **kw))[0])
    with capsys.disabled():
        print(f"\n[host] {fmt} file: W4A8 vs its float run {rel(q, own):.4f} (fp16 file: {rel(q16, base):.4f})")
    assert torch.isfinite(q).all() and rel(q, own) < 2 * rel(q16, base) + 0.01
