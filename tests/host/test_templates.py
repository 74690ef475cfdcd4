"""ComfyUI's official workflow templates with the DVD-Quant Loader swapped in (workflows/*_dvdq.json made from
the `comfyui-workflow-templates-json` package by workflows/make_workflows.py), against real ComfyUI servers:

- the schemas template_nodes.json records for this host's version are the host's own;
- the API form of every such workflow validates against the host (its /object_info, then POST /prompt, whose
  only complaints may be the model and image files, which the host tests do not have), skipped where the host
  lacks a node type the workflow needs, naming it;
- the Wan 2.1 T2V, Wan 2.2 14B T2V and HunyuanVideo 1.5 T2V ones run: the template's model and sampler part as
  it is, on the tiny models make_models.py builds (and a tiny HunyuanVideo 1.5 built here), with the text
  encoders, the VAE and the empty latent replaced by the test fixtures' conditioning and latent nodes and the
  decode-and-save tail by SaveLatent; the 4-step distillation LoRAs by the tiny LoRA.
"""
import copy
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from prompt_runs import events, rel, run_latent
from prompts import HY_COND, WAN_COND, node

HERE = os.path.dirname(os.path.abspath(__file__))
WF_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "workflows")
sys.path.insert(0, WF_DIR)

import make_workflows  # noqa: E402
import node_specs  # noqa: E402

NAMES = [make_workflows.template_name(t) for t in make_workflows.TEMPLATES]
TINY_LORA = "tiny_wan_lora.safetensors"
LATENTS = ("EmptyHunyuanLatentVideo", "EmptyHunyuanVideo15Latent")  # the templates' empty latents
TINY_HY15 = "tiny_hunyuan_video_1.5_t2v.safetensors"
# Qwen 2.5 VL 7B's hidden states, as HunyuanVideo 1.5 takes them; a pooled vector too, which ComfyUI's
# HunyuanVideo model class reads for every model (1.5 has no vector_in, so nothing uses it)
HY15_COND = {"tokens": 8, "dim": 3584, "pooled": 768}


def load_api(name):
    with open(os.path.join(WF_DIR, "api", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def object_info(server):
    if not hasattr(server, "_object_info"):
        server._object_info = server.get("/object_info")
    return server._object_info


def missing_types(server, prompt):
    return sorted({n["class_type"] for n in prompt.values()} - set(object_info(server)))


def skip_if_missing(server, prompt, comfy, what):
    """Skip where the host lacks a node type of the prompt, or the template's own latent node that a tiny prompt
    replaced (a host without it has no such model: HunyuanVideo 1.5 before 0.8.0)."""
    missing = sorted(set(missing_types(server, prompt)) | (set(getattr(prompt, "replaced", ())) - set(object_info(server))))
    if missing:
        pytest.skip(f"ComfyUI {comfy.version} lacks the node type(s) {', '.join(missing)} that {what} needs")


# ---------------------------------------------------------------------- validation against /object_info

def _types_fit(out_type, in_type):
    """ComfyUI's type check of a link: equal, either side `*`, or one of an input's comma-separated types."""
    if "*" in (out_type, in_type) or node_specs.MATCH_TYPE in (out_type, in_type):
        return True
    return set(out_type.split(",")) & set(in_type.split(",")) != set()


def _input_kinds(info):
    """{input name: (type, options)} of a node's /object_info entry, autogrow inputs by their item names."""
    kinds = {}
    for section in ("required", "optional"):
        for name, raw in info["input"].get(section, {}).items():
            type_, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            if type_ == node_specs.AUTOGROW:
                tmpl = opts.get("template", {})
                item = next(iter(tmpl.get("input", {}).get("required", {}).values()), ["*"])
                for n in tmpl.get("names", []):
                    kinds[f"{name}.{n}"] = (item[0], {}, "optional")
                continue
            kinds[name] = (type_, opts, section)
    return kinds


def validate_api(prompt, info):
    """What ComfyUI's validation would find wrong with an API prompt (unknown inputs too, which it ignores but a
    node's function would be given), file names left to the server."""
    problems = []
    for nid, n in prompt.items():
        where = f"{nid} {n['class_type']}"
        if n["class_type"] not in info:
            problems.append(f"{where}: unknown node type")
            continue
        node_info = info[n["class_type"]]
        kinds = _input_kinds(node_info)
        for name in n["inputs"]:
            if name not in kinds:
                problems.append(f"{where}: input {name!r} is not one of {sorted(kinds)}")
        for name, (type_, opts, section) in kinds.items():
            if name not in n["inputs"]:
                if section == "required":
                    problems.append(f"{where}: required input {name!r} missing")
                continue
            v = n["inputs"][name]
            if isinstance(v, list):
                src = prompt.get(v[0])
                if src is None or src["class_type"] not in info:
                    problems.append(f"{where}.{name}: links to {v[0]}, which is not a known node of the prompt")
                    continue
                outs = info[src["class_type"]]["output"]
                if not 0 <= v[1] < len(outs):
                    problems.append(f"{where}.{name}: {src['class_type']} has no output {v[1]}")
                elif not _types_fit(outs[v[1]], "COMBO" if isinstance(type_, list) else type_):
                    problems.append(f"{where}.{name}: takes {type_}, {src['class_type']}[{v[1]}] gives {outs[v[1]]}")
                continue
            if isinstance(type_, list) or type_ in ("COMBO", node_specs.DYNAMIC_COMBO):
                if node_specs.file_folder(n["class_type"], name):
                    continue  # a file of a model folder: the server checks it
                options = type_ if isinstance(type_, list) else opts.get("options", [])
                options = [o["key"] if isinstance(o, dict) else o for o in options]
                if v not in options:
                    problems.append(f"{where}.{name}: {v!r} not in {options}")
            elif type_ in ("INT", "FLOAT"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (type_ == "INT" and v != int(v)):
                    problems.append(f"{where}.{name}: {v!r} is not an {type_}")
                elif ("min" in opts and v < opts["min"]) or ("max" in opts and v > opts["max"]):
                    problems.append(f"{where}.{name}: {v!r} outside [{opts.get('min')}, {opts.get('max')}]")
            elif type_ == "BOOLEAN" and not isinstance(v, bool):
                problems.append(f"{where}.{name}: {v!r} is not a boolean")
            elif type_ == "STRING" and not isinstance(v, str):
                problems.append(f"{where}.{name}: {v!r} is not a string")
            elif type_ not in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                problems.append(f"{where}.{name}: a {type_} socket given the value {v!r}")
    return problems


def post_prompt(server, prompt):
    """POST /prompt: (HTTP status, answer)."""
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def file_complaint(class_type, err):
    """An error about a model or image file the host tests do not have, the only kind these prompts may get."""
    name = (err.get("extra_info") or {}).get("input_name")
    if err.get("type") == "value_not_in_list":
        return node_specs.file_folder(class_type, name) is not None
    return class_type == "LoadImage" and name == "image" and err.get("type") == "custom_validation_failed"


# ---------------------------------------------------------------------- the tests

def test_template_specs_are_this_hosts_own(server, comfy):
    """template_nodes.json holds, for this host's version, the schemas its /object_info gives."""
    recorded = node_specs.load_template_specs()
    versions = {v for specs in recorded.values() for v in specs}
    if comfy.version not in versions:
        pytest.skip(f"template_nodes.json has no schemas of ComfyUI {comfy.version} (recorded: {sorted(versions)}); "
                    "add them with make_workflows.py --template-spec-from")
    info = object_info(server)
    differ = [t for t, specs in recorded.items()
              if comfy.version in specs and specs[comfy.version] != node_specs.spec_from_object_info(info[t])]
    absent = [t for t, specs in recorded.items() if comfy.version not in specs and t in info]
    recorded_absent = [t for t, specs in recorded.items() if comfy.version in specs and t not in info]
    assert not differ and not absent and not recorded_absent, (differ, absent, recorded_absent)


@pytest.mark.parametrize("name", NAMES)
def test_template_api_validates(server, comfy, name):
    """The API form validates against this host: its /object_info (types, inputs, links, values), then the server's
    own check, whose only complaints are the model and image files."""
    prompt = load_api(name)
    skip_if_missing(server, prompt, comfy, f"workflows/api/{name}.json")
    assert validate_api(prompt, object_info(server)) == []
    status, answer = post_prompt(server, prompt)
    if status == 200:  # every file present: nothing here has them, so this would be a surprise
        server.post("/interrupt", {})
        pytest.fail(f"the prompt was queued though its model files are not installed: {answer}")
    errors = answer.get("node_errors") or {}
    assert errors, f"refused without node errors: {answer.get('error')}"
    other = {nid: [e for e in ne["errors"] if not file_complaint(ne["class_type"], e)] for nid, ne in errors.items()}
    assert not any(other.values()), {k: v for k, v in other.items() if v}
    complained = {(prompt[nid]["class_type"], (e.get("extra_info") or {}).get("input_name"))
                  for nid, ne in errors.items() for e in ne["errors"]}
    assert any(ct == "DVDQuantLoader" for ct, _ in complained), complained  # the Loader was checked too


def test_template_validation_catches_errors(server):
    """The checks above can fail: a value outside a combo's choices, a link of the wrong type, an input the node
    does not have, a missing required input; the server refuses the first two for more than a missing file."""
    prompt = load_api("text_to_video_wan_dvdq")
    ks = next(nid for nid, n in prompt.items() if n["class_type"] == "KSampler")
    bs = next(nid for nid, n in prompt.items() if n["class_type"] == "DVDQuantBitSwitch")
    latent = prompt[ks]["inputs"]["latent_image"]
    prompt[ks]["inputs"].update(sampler_name="banana", positive=latent, bogus=1)
    del prompt[bs]["inputs"]["delta"]
    problems = " | ".join(validate_api(prompt, object_info(server)))
    for part in ("'banana' not in", "positive: takes CONDITIONING", "input 'bogus' is not one of",
                 "required input 'delta' missing"):
        assert part in problems, problems
    status, answer = post_prompt(server, prompt)
    assert status == 400
    errors = answer.get("node_errors") or {}
    other = [e["type"] for ne in errors.values() for e in ne["errors"] if not file_complaint(ne["class_type"], e)]
    assert "value_not_in_list" in other and "return_type_mismatch" in other, other


# ---------------------------------------------------------------------- runs on tiny models

def tiny_prompt(api, model_for, cond, channels, prefix):
    """The template's model and sampler part on tiny inputs: our Loader on a tiny model, LoRAs on the tiny LoRA,
    text encoding -> DVDQTestCond, the empty latent -> DVDQTestLatent, decode and save -> SaveLatent of the
    latent the VAE would decode; what nothing uses any more (encoders, VAE, frame-count maths) left out."""
    g = copy.deepcopy(api)
    seed = 11
    for nid, n in sorted(g.items()):
        ct, inputs = n["class_type"], n["inputs"]
        if ct == "DVDQuantLoader":
            inputs["model_name"] = model_for(inputs["model_name"])
        elif ct == "LoraLoaderModelOnly":
            inputs["lora_name"] = TINY_LORA
        elif ct == "CLIPTextEncode":
            g[nid] = node("DVDQTestCond", seed=seed, **cond)
            seed += 1
        elif ct in LATENTS:
            g[nid] = node("DVDQTestLatent", channels=channels, frames=2, height=8, width=8)
    for nid, n in list(g.items()):
        if n["class_type"] == "SaveVideo":  # SaveVideo <- CreateVideo <- VAEDecode <- the sampler's latent
            create = g[n["inputs"]["video"][0]]
            decode = g[create["inputs"]["images"][0]]
            g[nid] = node("SaveLatent", samples=decode["inputs"]["samples"], filename_prefix=prefix)
    keep, todo = set(), [nid for nid, n in g.items() if n["class_type"] == "SaveLatent"]
    while todo:
        nid = todo.pop()
        if nid not in keep:
            keep.add(nid)
            todo += [v[0] for v in g[nid]["inputs"].values() if isinstance(v, list)]
    out = TinyPrompt({nid: n for nid, n in g.items() if nid in keep})
    out.replaced = sorted({n["class_type"] for n in api.values() if n["class_type"] in LATENTS})
    return out


class TinyPrompt(dict):
    """A prompt that remembers the template's latent node types it replaced."""


def model_chain(prompt, nid):
    """(id, class type) from a node's MODEL input up to the loader (a switch followed on its LoRA branch)."""
    out, name = [], "model"
    while name in prompt[nid]["inputs"]:
        nid = prompt[nid]["inputs"][name][0]
        out.append((nid, prompt[nid]["class_type"]))
        name = "on_true" if prompt[nid]["class_type"] == "ComfySwitchNode" else "model"
    return out


def float_twin(prompt, prefix):
    """The same graph as the template has it: UNETLoader instead of our Loader, no Bit Switch Scheduler."""
    g = copy.deepcopy(prompt)
    for nid, n in list(g.items()):
        if n["class_type"] == "DVDQuantLoader":
            g[nid] = node("UNETLoader", unet_name=n["inputs"]["model_name"], weight_dtype="default")
        elif n["class_type"] == "SaveLatent":
            n["inputs"]["filename_prefix"] = prefix
    for bs in [nid for nid, n in g.items() if n["class_type"] == "DVDQuantBitSwitch"]:
        for n in g.values():
            for k, v in n["inputs"].items():
                if v == [bs, 0]:
                    n["inputs"][k] = g[bs]["inputs"]["model"]
        del g[bs]
    return g


def ensure_tiny_hunyuan_15(server, comfy):
    path = os.path.join(server.base_dir, "models", "diffusion_models", TINY_HY15)
    if not os.path.exists(path):
        subprocess.run([comfy.python, "-c", BUILD_HY15, path, HERE], check=True, env=comfy.env, cwd=server.base_dir)


@pytest.mark.parametrize("name,model,cond,channels", [
    ("text_to_video_wan_dvdq", "tiny_wan2.1_t2v.safetensors", WAN_COND, 16),
    ("hunyuan_video_text_to_video_dvdq", "tiny_hunyuan_video_t2v.safetensors", HY_COND, 16),
    ("video_hunyuan_video_1.5_720p_t2v_dvdq", TINY_HY15, HY15_COND, 32),
], ids=["wan2.1_t2v", "hunyuan_video_t2v", "hunyuan_video_1.5_t2v"])
def test_template_runs(server, comfy, name, model, cond, channels):
    """The template's sampler part as it is on a tiny model of its family: text_to_video_wan (ModelSamplingSD3
    shift 8, KSampler 30 uni_pc steps at CFG 6), hunyuan_video_text_to_video (FluxGuidance 6, BasicGuider,
    20 euler steps; its BasicScheduler reads the Loader's MODEL as the template's reads the UNETLoader's),
    video_hunyuan_video_1.5_720p_t2v (EasyCache bypassed, ModelSamplingSD3 shift 7, CFGGuider 6, 20 steps; a tiny
    HunyuanVideo 1.5, ComfyUI's own class in its 1.5 form with 32 latent channels, built here): quantized once,
    one bit decision per step, the first and the last at 8 bits, near the template's own graph (UNETLoader)."""
    prompt = tiny_prompt(load_api(name), lambda _: model, cond, channels, f"tpl_{name}")
    skip_if_missing(server, prompt, comfy, f"{name}'s sampler part")
    if model == TINY_HY15:
        ensure_tiny_hunyuan_15(server, comfy)
    sampler = next(nid for nid, n in prompt.items() if n["class_type"] in ("KSampler", "BasicGuider", "CFGGuider"))
    assert [ct for _, ct in model_chain(prompt, sampler)] == ["ModelSamplingSD3", "DVDQuantBitSwitch", "DVDQuantLoader"]
    steps = next(n["inputs"]["steps"] for n in prompt.values() if n["class_type"] in ("KSampler", "BasicScheduler"))
    q, msgs = run_latent(server, prompt)
    bits = events(msgs, "dvdq.bits")
    assert [b["step"] for b in bits] == list(range(steps)) and bits[0]["bits"] == bits[-1]["bits"] == 8, bits
    assert {b["bits"] for b in bits} <= {4, 8}
    (summary,) = events(msgs, "dvdq.quant_summary")
    assert summary["layers"] > 0 and summary["bytes_after"] < summary["bytes_before"], summary
    f, _ = run_latent(server, float_twin(prompt, f"tpl_{name}_float"))
    assert q.shape == f.shape and q.shape[1] == channels and torch.isfinite(q).all()
    assert rel(q, f) < 0.5  # W4 with delta-switched A4/A8 on random weights: near, not equal (as test_architectures)


def _expert_bit_switches(prompt):
    """The Bit Switch Schedulers of the high- and low-noise samplers (KSamplerAdvanced adding noise first)."""
    ks = sorted((nid for nid, n in prompt.items() if n["class_type"] == "KSamplerAdvanced"),
                key=lambda nid: prompt[nid]["inputs"]["add_noise"] != "enable")
    return [next(nid for nid, ct in model_chain(prompt, k) if ct == "DVDQuantBitSwitch") for k in ks]


@pytest.mark.parametrize("turbo", [True, False], ids=["lightning_lora_4_steps", "plain_20_steps"])
def test_wan22_14B_t2v_template_runs(server, comfy, turbo):
    """video_wan2_2_14B_t2v (two experts, each DVD-Quant Loader -> 4-step LoRA, a switch between the LoRA and the
    plain branch, Bit Switch Scheduler, ModelSamplingSD3 shift 5; two KSamplerAdvanced) on the tiny Wan 2.2 pair:
    with the template's "Enable Lightning LoRA" on, 4 steps at CFG 1 split 2 + 2 through the LoRAs after our
    Loaders; off, 20 steps at CFG 3.5 split 10 + 10. One schedule across both experts: the steps continue from
    one Bit Switch Scheduler to the other and the schedule's last step runs at 8 bits. With the LoRAs at strength 0
    the result changes and nothing is quantized again."""
    api = load_api("video_wan2_2_14B_t2v_dvdq")

    def model_for(name):
        return "tiny_wan2.2_t2v_high_noise.safetensors" if "high_noise" in name else "tiny_wan2.2_t2v_low_noise.safetensors"

    prefix = "tpl_wan22_" + ("turbo" if turbo else "plain")
    prompt = tiny_prompt(api, model_for, WAN_COND, 16, prefix)
    skip_if_missing(server, prompt, comfy, "video_wan2_2_14B_t2v_dvdq's sampler part")
    (switch,) = [nid for nid, n in prompt.items() if n["class_type"] == "PrimitiveBoolean"]
    prompt[switch]["inputs"]["value"] = turbo
    high_bs, low_bs = _expert_bit_switches(prompt)
    loras = [nid for nid, n in prompt.items() if n["class_type"] == "LoraLoaderModelOnly"]
    assert len(loras) == 2
    lora_log = server.log().count("lora key not loaded")
    q, msgs = run_latent(server, prompt)
    steps, split = (4, 2) if turbo else (20, 10)
    bits = events(msgs, "dvdq.bits")
    assert [(b["node"], b["step"]) for b in bits] == [(high_bs, s) for s in range(split)] + \
        [(low_bs, s) for s in range(split, steps)], bits
    assert bits[split]["indicator"] is not None  # compared with the high-noise expert's last output
    assert bits[0]["bits"] == bits[-1]["bits"] == 8 and bits[-1]["total"] == steps
    assert sorted(e["node"] for e in events(msgs, "dvdq.bits_reset")) == sorted([high_bs, low_bs])
    assert torch.isfinite(q).all()
    assert server.log().count("lora key not loaded") == lora_log, "the tiny LoRA's keys must all load"
    if not turbo:
        return
    for nid in loras:
        prompt[nid]["inputs"]["strength_model"] = 0.0
    next(n for n in prompt.values() if n["class_type"] == "SaveLatent")["inputs"]["filename_prefix"] = prefix + "_no_lora"
    q0, msgs0 = run_latent(server, prompt)
    assert not events(msgs0, "dvdq.quant_progress"), "a new LoRA strength must not quantize again"
    assert rel(q, q0) > 1e-3, "the LoRAs after the Loaders must change the result"


BUILD_HY15 = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
import make_models as mm
from comfy.ldm.hunyuan_video.model import HunyuanVideo
from safetensors.torch import save_file
import comfy.model_detection
m = HunyuanVideo(image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=3584,
                 hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                 theta=256, patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False,
                 use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True, operations=mm.OPS)
sd = mm.randomize(m.state_dict(), 10)
found = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
assert found == "HunyuanVideo15", found
save_file(sd, sys.argv[1])
"""
