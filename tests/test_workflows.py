"""The example workflows (workflows/*.json UI format, workflows/api/*.json API format) are valid
against the node schemas: our nodes' contract and ComfyUI core's (workflows/core_nodes.json, taken
from ComfyUI's /object_info). No ComfyUI needed.
"""
import copy
import glob
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WF_DIR = os.path.join(ROOT, "workflows")
sys.path.insert(0, WF_DIR)

import make_workflows  # noqa: E402
import node_specs  # noqa: E402

SPECS = node_specs.all_specs()
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UI_FILES = sorted(
    p for p in glob.glob(os.path.join(WF_DIR, "*.json")) if os.path.basename(p) != "core_nodes.json"
)
EXPECTED = {
    "wan2.1_t2v_1.3B_dvdq.json": {
        "models": ["wan2.1_t2v_1.3B_fp16.safetensors"],
        "files": {"umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"},
    },
    "wan2.1_t2v_14B_dvdq.json": {
        "models": ["wan2.1_t2v_14B_fp16.safetensors"],
        "files": {"umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"},
    },
    "wan2.2_t2v_A14B_dvdq.json": {
        "models": ["wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"],
        "files": {"umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"},
    },
    "hunyuan_video_t2v_dvdq.json": {
        "models": ["hunyuan_video_t2v_720p_bf16.safetensors"],
        "files": {"clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video_vae_bf16.safetensors"},
    },
    "hunyuan_video_i2v_dvdq.json": {
        "models": ["hunyuan_video_v2_replace_image_to_video_720p_bf16.safetensors"],
        "files": {"clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video_vae_bf16.safetensors",
                  "llava_llama3_vision.safetensors"},
    },
}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------- checkers (return problems)

def check_widget_value(where, w, v):
    t = w["type"]
    if t == "COMBO":
        if "files" in w:  # a model file, or an image of the input folder
            ext = (".png", ".jpg", ".jpeg", ".webp") if w["files"] == "input" else (".safetensors",)
            ok = isinstance(v, str) and v.endswith(ext)
            return [] if ok else [f"{where}: {v!r} is not a {' / '.join(ext)} file name"]
        return [] if v in w["options"] else [f"{where}: {v!r} not in {w['options']}"]
    if t == "BOOLEAN":
        return [] if isinstance(v, bool) else [f"{where}: {v!r} is not a boolean"]
    if t == "STRING":
        return [] if isinstance(v, str) else [f"{where}: {v!r} is not a string"]
    if t in ("INT", "FLOAT"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (t == "INT" and not isinstance(v, int)):
            return [f"{where}: {v!r} is not an {t}"]
        if ("min" in w and v < w["min"]) or ("max" in w and v > w["max"]):
            return [f"{where}: {v!r} outside [{w.get('min')}, {w.get('max')}]"]
    return []


def check_ui(wf):
    problems = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            problems.append(f"missing top-level {key!r}")
    if problems:
        return problems
    nodes = {}
    for n in wf["nodes"]:
        if n["id"] in nodes:
            problems.append(f"node id {n['id']} used twice")
        nodes[n["id"]] = n
    links = {}
    for link in wf["links"]:
        if len(link) != 6:
            problems.append(f"link {link} is not [id, origin, slot, target, slot, type]")
            continue
        if link[0] in links:
            problems.append(f"link id {link[0]} used twice")
        links[link[0]] = link
    if nodes and wf["last_node_id"] < max(nodes):
        problems.append(f"last_node_id {wf['last_node_id']} < largest node id {max(nodes)}")
    if links and wf["last_link_id"] < max(links):
        problems.append(f"last_link_id {wf['last_link_id']} < largest link id {max(links)}")

    for n in nodes.values():
        where = f"node {n['id']} {n['type']}"
        spec = SPECS.get(n["type"])
        if spec is None:
            problems.append(f"{where}: type is neither ours nor a listed ComfyUI core node")
            continue
        # Sockets: names and types in the schema's order, optional ones may be absent at the end.
        sockets = node_specs.sockets(spec)
        got = [(i["name"], i["type"]) for i in n.get("inputs", [])]
        want = [(s["name"], s["type"]) for s in sockets]
        required = [(s["name"], s["type"]) for s in sockets if not s.get("optional")]
        if got != want[: len(got)] or len(got) < len(required):
            problems.append(f"{where}: inputs {got} do not match the schema {want}")
        for s in sockets:
            linked = any(i["name"] == s["name"] and i.get("link") is not None for i in n.get("inputs", []))
            if not s.get("optional") and not linked:
                problems.append(f"{where}: required input {s['name']} is not connected")
        outs = [(o["name"], o["type"]) for o in n.get("outputs", [])]
        if outs != [(o["name"], o["type"]) for o in spec["outputs"]]:
            problems.append(f"{where}: outputs {outs} do not match the schema {spec['outputs']}")
        # Widgets.
        values = n.get("widgets_values", [])
        expected = node_specs.widget_value_count(spec)
        if len(values) != expected:
            problems.append(f"{where}: {len(values)} widgets_values, the schema has {expected}")
        else:
            k = 0
            for w in node_specs.widgets(spec):
                problems += check_widget_value(f"{where}.{w['name']}", w, values[k])
                k += 1
                if node_specs.has_control(w):
                    if values[k] not in CONTROL_VALUES:
                        problems.append(f"{where}.{w['name']}: control {values[k]!r} not in {sorted(CONTROL_VALUES)}")
                    k += 1
                if node_specs.upload_value(w) is not None:
                    if values[k] != node_specs.upload_value(w):
                        problems.append(f"{where}.{w['name']}: upload widget {values[k]!r}")
                    k += 1
        # Each input's link is a real link that ends here.
        for slot, i in enumerate(n.get("inputs", [])):
            lid = i.get("link")
            if lid is None:
                continue
            link = links.get(lid)
            if link is None:
                problems.append(f"{where}.{i['name']}: link {lid} does not exist")
            elif link[3] != n["id"] or link[4] != slot:
                problems.append(f"{where}.{i['name']}: link {lid} ends at node {link[3]} slot {link[4]}")
        for slot, o in enumerate(n.get("outputs", [])):
            for lid in o.get("links") or []:
                link = links.get(lid)
                if link is None or link[1] != n["id"] or link[2] != slot:
                    problems.append(f"{where} output {slot}: link {lid} does not start here")

    for lid, (_, src, src_slot, dst, dst_slot, type_) in links.items():
        a, b = nodes.get(src), nodes.get(dst)
        if a is None or b is None:
            problems.append(f"link {lid}: node {src if a is None else dst} does not exist")
            continue
        outs, ins = a.get("outputs", []), b.get("inputs", [])
        if not 0 <= src_slot < len(outs):
            problems.append(f"link {lid}: node {src} has no output {src_slot}")
        elif outs[src_slot]["type"] != type_ or lid not in (outs[src_slot].get("links") or []):
            problems.append(f"link {lid}: origin {a['type']}[{src_slot}] is {outs[src_slot]['type']} / does not list it")
        if not 0 <= dst_slot < len(ins):
            problems.append(f"link {lid}: node {dst} has no input {dst_slot}")
        elif ins[dst_slot]["type"] != type_ or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: target {b['type']}.{ins[dst_slot]['name']} is {ins[dst_slot]['type']} "
                            "/ not linked to it")
    return problems


def check_api(api, ui):
    problems = []
    ui_nodes = {str(n["id"]): n for n in ui["nodes"]}
    if set(api) != set(ui_nodes):
        problems.append(f"API node ids {sorted(api)} differ from the UI's {sorted(ui_nodes)}")
    for nid, entry in api.items():
        where = f"API node {nid}"
        spec = SPECS.get(entry.get("class_type"))
        if spec is None:
            problems.append(f"{where}: unknown class_type {entry.get('class_type')!r}")
            continue
        if nid in ui_nodes and ui_nodes[nid]["type"] != entry["class_type"]:
            problems.append(f"{where}: class {entry['class_type']} but the UI node is {ui_nodes[nid]['type']}")
        inputs = entry.get("inputs", {})
        names = {i["name"]: i for i in spec["inputs"]}
        for name in inputs:
            if name not in names:
                problems.append(f"{where}: input {name!r} is not in the schema")
        for name, i in names.items():
            if name not in inputs:
                if not i.get("optional"):
                    problems.append(f"{where}: required input {name!r} missing")
                continue
            v = inputs[name]
            if i["widget"]:
                problems += check_widget_value(f"{where}.{name}", i, v)
                continue
            if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)):
                problems.append(f"{where}.{name}: {v!r} is not a [node id, output index] link")
                continue
            src = api.get(v[0])
            if src is None:
                problems.append(f"{where}.{name}: node {v[0]} does not exist")
                continue
            outs = SPECS[src["class_type"]]["outputs"]
            if not 0 <= v[1] < len(outs):
                problems.append(f"{where}.{name}: {src['class_type']} has no output {v[1]}")
            elif outs[v[1]]["type"] != i["type"]:
                problems.append(f"{where}.{name}: takes {i['type']}, {src['class_type']}[{v[1]}] gives {outs[v[1]]['type']}")
        # Same widget values as the UI workflow (without the UI-only control values).
        if nid in ui_nodes:
            ui_values = [x for x in ui_nodes[nid].get("widgets_values", [])]
            api_values = []
            for w in node_specs.widgets(spec):
                api_values.append(inputs.get(w["name"]))
                if node_specs.has_control(w):
                    api_values.append(ui_values[len(api_values)] if len(api_values) < len(ui_values) else None)
                if node_specs.upload_value(w) is not None:  # UI-only too
                    api_values.append(node_specs.upload_value(w))
            if api_values != ui_values:
                problems.append(f"{where}: widget values {api_values} differ from the UI's {ui_values}")
    return problems


def model_chain(ui, node_id, socket="model"):
    """Node types from a sampler's MODEL input up to its source, following MODEL links."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    chain, cur = [], nodes[node_id]
    name = socket
    while True:
        inp = next((i for i in cur.get("inputs", []) if i["name"] == name), None)
        if inp is None or inp.get("link") is None:
            return chain
        cur = nodes[links[inp["link"]][1]]
        chain.append(cur["type"])
        name = "model"


# ---------------------------------------------------------------------- tests

def test_every_expected_workflow_exists_in_both_formats():
    names = sorted(os.path.basename(p) for p in UI_FILES)
    assert names == sorted(EXPECTED), names
    for name in names:
        assert os.path.isfile(os.path.join(WF_DIR, "api", name)), f"workflows/api/{name} is missing"


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_ui_workflow_is_consistent(path):
    wf = load(path)
    assert check_ui(wf) == []


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_api_workflow_matches_ui(path):
    api = load(os.path.join(WF_DIR, "api", os.path.basename(path)))
    assert check_api(api, load(path)) == []


@pytest.mark.parametrize("path", UI_FILES, ids=os.path.basename)
def test_our_nodes_replace_the_plain_loader(path):
    wf = load(path)
    types = [n["type"] for n in wf["nodes"]]
    assert "UNETLoader" not in types
    samplers = [n for n in wf["nodes"] if n["type"] in ("KSampler", "KSamplerAdvanced", "BasicGuider", "BasicScheduler")]
    assert samplers
    for s in samplers:
        assert model_chain(wf, s["id"]) == ["ModelSamplingSD3", "DVDQuantBitSwitch", "DVDQuantLoader"], s
    expected = EXPECTED[os.path.basename(path)]
    loaders = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "DVDQuantLoader"]
    assert sorted(loaders) == sorted(expected["models"])
    files = {v for n in wf["nodes"] if n["type"] in ("CLIPLoader", "DualCLIPLoader", "VAELoader", "CLIPVisionLoader")
             for v in n["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")}
    assert files == expected["files"]


def test_wan22_experts_split_one_schedule():
    wf = load(os.path.join(WF_DIR, "wan2.2_t2v_A14B_dvdq.json"))
    spec = SPECS["KSamplerAdvanced"]
    names = []
    for w in node_specs.widgets(spec):
        names.append(w["name"])
        if node_specs.has_control(w):
            names.append(w["name"] + ".control")
    ks = sorted((dict(zip(names, n["widgets_values"])) | {"id": n["id"]} for n in wf["nodes"]
                 if n["type"] == "KSamplerAdvanced"), key=lambda d: d["start_at_step"])
    assert len(ks) == 2
    high, low = ks
    assert high["steps"] == low["steps"] and high["sampler_name"] == low["sampler_name"]
    assert high["scheduler"] == low["scheduler"]
    assert high["start_at_step"] == 0 and high["end_at_step"] == low["start_at_step"] < high["steps"]
    assert low["end_at_step"] >= low["steps"]
    assert high["add_noise"] == "enable" and high["return_with_leftover_noise"] == "enable"
    assert low["add_noise"] == "disable"
    # The low-noise sampler continues the high-noise one's latent, each with its own expert.
    links = {link[0]: link for link in wf["links"]}
    low_node = next(n for n in wf["nodes"] if n["id"] == low["id"])
    latent_in = next(i for i in low_node["inputs"] if i["name"] == "latent_image")
    assert links[latent_in["link"]][1] == high["id"]
    nodes = {n["id"]: n for n in wf["nodes"]}

    def loader_of(sampler_id):
        cur = nodes[sampler_id]
        while cur["type"] != "DVDQuantLoader":
            inp = next(i for i in cur["inputs"] if i["type"] == "MODEL")
            cur = nodes[links[inp["link"]][1]]
        return cur["widgets_values"][0]

    assert "high_noise" in loader_of(high["id"]) and "low_noise" in loader_of(low["id"])


def test_workflow_files_are_what_the_script_writes():
    stale = [rel for rel, text in make_workflows.render_all().items()
             if open(os.path.join(WF_DIR, rel), encoding="utf-8").read() != text]
    assert not stale, f"run `python workflows/make_workflows.py`: out of date: {stale}"


def test_core_node_list_is_the_one_the_script_uses():
    core = node_specs.load_core_specs()
    assert sorted(core) == sorted(make_workflows.CORE_TYPES)
    assert not set(core) & set(node_specs.OUR_NODES)
    # Spot checks against ComfyUI's real schemas: widget counts as the front end stores them.
    counts = {t: node_specs.widget_value_count(core[t]) for t in core}
    assert counts["KSampler"] == 7  # seed, control, steps, cfg, sampler, scheduler, denoise
    assert counts["KSamplerAdvanced"] == 10
    assert counts["CLIPLoader"] == 3 and counts["DualCLIPLoader"] == 4
    assert counts["EmptyHunyuanLatentVideo"] == 4 and counts["SaveAnimatedWEBP"] == 5


def test_our_specs_follow_the_contract_widget_counts():
    counts = {t: node_specs.widget_value_count(s) for t, s in node_specs.OUR_NODES.items()}
    assert counts == {"DVDQuantLoader": 6, "DVDQuantApply": 4, "DVDQuantARQSettings": 6,
                      "DVDQuantBitSwitch": 7, "DVDQuantSave": 1}


# ---------------------------------------------------------------------- the checkers can fail

def _wan13():
    return load(os.path.join(WF_DIR, "wan2.1_t2v_1.3B_dvdq.json"))


def test_checker_catches_broken_links_types_and_widgets():
    base = _wan13()
    assert check_ui(base) == []

    wf = copy.deepcopy(base)
    wf["links"][0][5] = "CLIP"  # type differs from both ends
    assert any("link 1" in p for p in check_ui(wf))

    wf = copy.deepcopy(base)
    wf["links"][0][4] = 3  # target slot that does not exist
    assert any("no input 3" in p for p in check_ui(wf))

    wf = copy.deepcopy(base)
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    ks["inputs"][0]["link"] = 999
    assert any("999" in p for p in check_ui(wf))

    wf = copy.deepcopy(base)
    bits = next(n for n in wf["nodes"] if n["type"] == "DVDQuantBitSwitch")
    bits["widgets_values"].pop()
    assert any("6 widgets_values" in p for p in check_ui(wf))

    wf = copy.deepcopy(base)
    bits = next(n for n in wf["nodes"] if n["type"] == "DVDQuantBitSwitch")
    bits["widgets_values"][0] = "sometimes"
    assert any("'sometimes' not in" in p for p in check_ui(wf))

    wf = copy.deepcopy(base)
    wf["nodes"][0]["type"] = "SomeoneElsesLoader"
    assert any("neither ours nor" in p for p in check_ui(wf))

    wf = copy.deepcopy(base)
    wf["last_link_id"] = 1
    assert any("last_link_id" in p for p in check_ui(wf))


def test_checker_catches_bad_api_references():
    ui = _wan13()
    api = load(os.path.join(WF_DIR, "api", "wan2.1_t2v_1.3B_dvdq.json"))
    assert check_api(api, ui) == []
    ks = next(k for k, v in api.items() if v["class_type"] == "KSampler")

    bad = copy.deepcopy(api)
    bad[ks]["inputs"]["model"] = ["404", 0]
    assert any("404 does not exist" in p for p in check_api(bad, ui))

    bad = copy.deepcopy(api)
    src = bad[ks]["inputs"]["model"][0]
    bad[ks]["inputs"]["model"] = [src, 3]
    assert any("no output 3" in p for p in check_api(bad, ui))

    bad = copy.deepcopy(api)
    bad[ks]["inputs"]["positive"] = bad[ks]["inputs"]["latent_image"]
    assert any("takes CONDITIONING" in p for p in check_api(bad, ui))

    bad = copy.deepcopy(api)
    bad[ks]["inputs"]["steps"] = 31
    assert any("differ from the UI" in p for p in check_api(bad, ui))

