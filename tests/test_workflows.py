"""The example workflows (workflows/*.json UI format, workflows/api/*.json API format) are valid
against the node schemas: our nodes' contract and ComfyUI core's (workflows/specs/core_nodes.json, taken
from ComfyUI's /object_info). The ones made from ComfyUI's official templates (workflows/*_dvdq.json of
make_workflows.TEMPLATES) keep all of the template but the loader, against the schemas of
workflows/specs/template_nodes.json. No ComfyUI needed (the template package, comfyui-workflow-templates-json, is).
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


UI_FILES = sorted(os.path.join(WF_DIR, name) for name in EXPECTED)  # our own examples
TEMPLATES = {make_workflows.template_name(t) + ".json": t for t in make_workflows.TEMPLATES}  # file -> its template
TEMPLATE_FILES = sorted(os.path.join(WF_DIR, name) for name in TEMPLATES)
TEMPLATE_SPECS = node_specs.load_template_specs()


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
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WF_DIR, "*.json")))
    assert names == sorted([*EXPECTED, *TEMPLATES]), names  # ComfyUI lists these in its template browser
    api = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WF_DIR, "api", "*.json")))
    assert api == sorted([*EXPECTED, *TEMPLATES]), api


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
    assert counts == {"DVDQuantLoader": 6, "DVDQuantApply": 4, "DVDQuantARQSettings": 7,
                      "DVDQuantBitSwitch": 7, "DVDQuantSave": 2, "DVDQuantAttention": 2}


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



# ---------------------------------------------------------------------- ComfyUI's templates with our loader

SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = make_workflows.SUBGRAPH_INPUT, make_workflows.SUBGRAPH_OUTPUT
SAMPLERS = ("KSampler", "KSamplerAdvanced", "BasicGuider", "CFGGuider")


def fits(a, b):
    """A link's type against a slot's: equal, a wildcard, or sharing one of comma-separated types."""
    return a == b or "*" in (a, b) or bool(set(a.split(",")) & set(b.split(",")))


def check_template_widgets(where, n, defs):
    """Our nodes: exactly our schema. A template node: its widget values fit the schema of one of the ComfyUI
    versions template_nodes.json records (the one it was saved with)."""
    if n["type"] in make_workflows.VIRTUAL_TYPES or n["type"] in defs:
        return []
    values = n.get("widgets_values") or []
    if n["type"] in node_specs.OUR_NODES:
        variants = {"ours": node_specs.OUR_NODES[n["type"]]}
    elif n["type"] in TEMPLATE_SPECS:
        variants = TEMPLATE_SPECS[n["type"]]
    else:
        return [f"{where}: no schema in template_nodes.json"]
    tried = {}
    for version, spec in variants.items():
        if node_specs.widget_value_count(spec) != len(values):
            tried[version] = f"{node_specs.widget_value_count(spec)} widgets"
            continue
        found, k = [], 0
        for w in node_specs.widgets(spec):
            found += check_widget_value(f"{where}.{w['name']}", w, values[k])
            k += 1 + node_specs.has_control(w) + (node_specs.upload_value(w) is not None)
        if not found:
            return []
        tried[version] = "; ".join(found)
    return [f"{where}: {len(values)} widget values fit no schema: {tried}"]


def check_template_ui(wf, template):
    """Problems of a template-made UI workflow: node types (the template's, ours, its subgraphs', notes), widget
    values, the links of the root and of every subgraph (subgraph inputs and outputs included), ids."""
    problems = []
    defs = make_workflows.subgraph_defs(wf)
    allowed = (make_workflows.template_node_types(template) | set(node_specs.OUR_NODES) | set(defs)
               | set(make_workflows.VIRTUAL_TYPES))
    graphs = make_workflows.graphs_of(wf)
    node_ids, link_ids = [], []
    for g in graphs:
        gname = "root" if g is wf else f"subgraph {g['name']!r}"
        nodes = {}
        for n in g["nodes"]:
            if n["id"] in nodes:
                problems.append(f"{gname}: node id {n['id']} used twice")
            nodes[n["id"]] = n
        links = make_workflows.graph_links(g)
        if len(links) != len(g["links"]):
            problems.append(f"{gname}: a link id is used twice")
        node_ids += list(nodes)
        link_ids += list(links)
        sub_in, sub_out = g.get("inputs", []), g.get("outputs", [])
        for n in nodes.values():
            where = f"{gname} node {n['id']} {n['type']}"
            if n["type"] not in allowed:
                problems.append(f"{where}: type is neither the template's nor ours")
            problems += check_template_widgets(where, n, defs)
            if n["type"] in node_specs.OUR_NODES:
                spec = node_specs.OUR_NODES[n["type"]]
                sockets = [(s["name"], s["type"]) for s in node_specs.sockets(spec)]
                got = [(i["name"], i["type"]) for i in n["inputs"] if "widget" not in i]
                widgets = [i["widget"]["name"] for i in n["inputs"] if "widget" in i]
                if got != sockets or not set(widgets) <= {w["name"] for w in node_specs.widgets(spec)}:
                    problems.append(f"{where}: inputs {got} + widgets {widgets} do not match the schema")
                if [(o["name"], o["type"]) for o in n["outputs"]] != [(o["name"], o["type"]) for o in spec["outputs"]]:
                    problems.append(f"{where}: outputs do not match the schema")
            if n["type"] in defs:
                sg = defs[n["type"]]
                names = {i["name"] for i in sg["inputs"]}
                if not {i["name"] for i in n.get("inputs", [])} <= names:
                    problems.append(f"{where}: inputs that its subgraph does not have")
                if [o["type"] for o in n["outputs"]] != [o["type"] for o in sg["outputs"]]:
                    problems.append(f"{where}: outputs differ from its subgraph's")
            for slot, i in enumerate(n.get("inputs", [])):
                lid = i.get("link")
                link = links.get(lid)
                if lid is not None and (link is None or link[3] != n["id"] or link[4] != slot):
                    problems.append(f"{where}.{i['name']}: link {lid} does not end here")
                elif lid is not None and not fits(link[5], i["type"]):
                    problems.append(f"{where}.{i['name']}: link {lid} carries {link[5]}, the input takes {i['type']}")
            for slot, o in enumerate(n.get("outputs", [])):
                for lid in o.get("links") or []:
                    link = links.get(lid)
                    if link is None or link[1] != n["id"] or link[2] != slot:
                        problems.append(f"{where} output {slot}: link {lid} does not start here")
                    elif not fits(o["type"], link[5]):
                        problems.append(f"{where} output {slot}: gives {o['type']}, link {lid} carries {link[5]}")
        for lid, origin, oslot, target, tslot, type_ in links.values():
            if origin == SUBGRAPH_INPUT:
                if not (0 <= oslot < len(sub_in) and lid in sub_in[oslot]["linkIds"]):
                    problems.append(f"{gname} link {lid}: subgraph input {oslot} does not list it")
            elif origin not in nodes:
                problems.append(f"{gname} link {lid}: origin node {origin} does not exist")
            elif not (0 <= oslot < len(nodes[origin]["outputs"]) and lid in (nodes[origin]["outputs"][oslot].get("links") or [])):
                problems.append(f"{gname} link {lid}: origin {origin} output {oslot} does not list it")
            if target == SUBGRAPH_OUTPUT:
                if not (0 <= tslot < len(sub_out) and lid in sub_out[tslot]["linkIds"]):
                    problems.append(f"{gname} link {lid}: subgraph output {tslot} does not list it")
            elif target not in nodes:
                problems.append(f"{gname} link {lid}: target node {target} does not exist")
            elif not (0 <= tslot < len(nodes[target].get("inputs", [])) and nodes[target]["inputs"][tslot].get("link") == lid):
                problems.append(f"{gname} link {lid}: target {target} input {tslot} is not linked to it")
        for k, io in enumerate(sub_in):
            for lid in io["linkIds"]:
                if lid not in links or links[lid][1:3] != (SUBGRAPH_INPUT, k):
                    problems.append(f"{gname}: subgraph input {io['name']} lists link {lid}, which does not start there")
        for k, io in enumerate(sub_out):
            for lid in io["linkIds"]:
                if lid not in links or links[lid][3:5] != (SUBGRAPH_OUTPUT, k):
                    problems.append(f"{gname}: subgraph output {io['name']} lists link {lid}, which does not end there")
    if wf["last_node_id"] < max(node_ids) or wf["last_link_id"] < max(link_ids, default=0):
        problems.append(f"last_node_id / last_link_id {wf['last_node_id']} / {wf['last_link_id']} below the ids in use")
    for sg in graphs[1:]:
        if sg["state"]["lastNodeId"] < max(node_ids) or sg["state"]["lastLinkId"] < max(link_ids):
            problems.append(f"subgraph {sg['name']!r}: state below the ids in use")
    return problems


def check_template_api(api):
    """Problems of a template-made API workflow: each node must fit the schema of one ComfyUI version that
    template_nodes.json records for its type (ours: the pack's), inputs, values and the types of its links."""
    def variants(ct):
        if ct in node_specs.OUR_NODES:
            return {"ours": node_specs.OUR_NODES[ct]}
        return TEMPLATE_SPECS.get(ct, {})

    def node_problems(nid, entry, spec):
        found, where = [], f"API node {nid} {entry['class_type']}"
        known = {n for i in spec["inputs"] for n in i.get("autogrow", [i["name"]])}
        found += [f"{where}: input {name!r} is not in the schema" for name in entry["inputs"] if name not in known]
        for i in spec["inputs"]:
            names = [n for n in i["autogrow"] if n in entry["inputs"]] if "autogrow" in i else [i["name"]]
            for name in names:
                if name not in entry["inputs"]:
                    if not i.get("optional"):
                        found.append(f"{where}: required input {name!r} missing")
                    continue
                v = entry["inputs"][name]
                if isinstance(v, list):
                    src = api.get(v[0])
                    outs = next(iter(variants(src["class_type"]).values()), {}).get("outputs", []) if src else []
                    if not 0 <= v[1] < len(outs):
                        found.append(f"{where}.{name}: links to {v[0]} output {v[1]}, which does not exist")
                    elif not fits(outs[v[1]]["type"], i["type"]):
                        found.append(f"{where}.{name}: takes {i['type']}, {src['class_type']}[{v[1]}] gives "
                                     f"{outs[v[1]]['type']}")
                elif i["widget"]:
                    found += check_widget_value(f"{where}.{name}", i, v)
                else:
                    found.append(f"{where}.{name}: a socket given the value {v!r}")
        return found

    problems = []
    for nid, entry in api.items():
        tried = {v: node_problems(nid, entry, spec) for v, spec in variants(entry["class_type"]).items()}
        if not tried:
            problems.append(f"API node {nid}: {entry['class_type']} has no schema")
        elif all(tried.values()):
            problems += min(tried.values(), key=len)
    return problems


def template_of(path):
    return make_workflows.load_template(TEMPLATES[os.path.basename(path)])


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=os.path.basename)
def test_template_ui_workflow_is_consistent(path):
    assert check_template_ui(load(path), template_of(path)) == []


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=os.path.basename)
def test_template_api_workflow_is_consistent(path):
    assert check_template_api(load(os.path.join(WF_DIR, "api", os.path.basename(path)))) == []


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=os.path.basename)
def test_template_keeps_all_but_the_loader(path):
    """Against the template: every node kept with its id, type, mode, inputs, widget values and properties, moved
    down at most (to make room); UNETLoader -> DVDQuantLoader with the template's model file; the only new nodes
    Bit Switch Schedulers, each on a MODEL link the template had; groups and subgraph interfaces kept; the
    template package's version recorded."""
    wf, tpl = load(path), template_of(path)
    loaders = {sg["id"]: {str(n["id"]) for n in sg["nodes"] if n["type"] == "UNETLoader"}
               for sg in make_workflows.subgraph_defs(tpl).values()}
    for g, t in zip(make_workflows.graphs_of(wf), make_workflows.graphs_of(tpl), strict=True):
        gn, tn = {n["id"]: n for n in g["nodes"]}, {n["id"]: n for n in t["nodes"]}
        added = set(gn) - set(tn)
        assert set(tn) <= set(gn) and {gn[i]["type"] for i in added} <= {"DVDQuantBitSwitch"}
        for nid, old in tn.items():
            new = gn[nid]
            assert new["pos"][0] == old["pos"][0] and new["pos"][1] >= old["pos"][1], nid
            if old["type"] == "UNETLoader":
                assert new["type"] == "DVDQuantLoader" and new["mode"] == old["mode"]
                assert new["widgets_values"][0] == old["widgets_values"][0]
                assert new["properties"].get("models") == old["properties"].get("models")
                continue
            skip = ("pos", "outputs")
            old = copy.deepcopy(old)
            if old["type"] in loaders:  # a subgraph instance showing its loaders' model widget: now model_name
                for p in old.get("properties", {}).get("proxyWidgets", []):
                    if p[0] in loaders[old["type"]] and p[1] == "unet_name":
                        p[1] = "model_name"
            assert {k: v for k, v in new.items() if k not in skip} == {k: v for k, v in old.items() if k not in skip}, nid
            assert [{k: v for k, v in o.items() if k != "links"} for o in new["outputs"]] == \
                [{k: v for k, v in o.items() if k != "links"} for o in old["outputs"]]
        links, old_links = make_workflows.graph_links(g), make_workflows.graph_links(t)
        for lid, (_, origin, oslot, target, tslot, type_) in old_links.items():
            _, o2, os2, t2, ts2, type2 = links[lid]
            assert (t2, type2) == (target, type_), lid
            assert ts2 == tslot or tn[target]["type"] == "UNETLoader", lid  # model_name sits after arq_settings
            if (o2, os2) != (origin, oslot):  # now from a Bit Switch Scheduler fed by the template's origin
                assert gn[o2]["type"] == "DVDQuantBitSwitch" and type_ == "MODEL", lid
                assert links[gn[o2]["inputs"][0]["link"]][1:3] == (origin, oslot), lid
        assert len(links) == len(old_links) + len(added)
        assert [(x["title"], x["bounding"][0], x["bounding"][2]) for x in g.get("groups", [])] == \
            [(x["title"], x["bounding"][0], x["bounding"][2]) for x in t.get("groups", [])]
        for key in ("inputs", "outputs"):
            assert [(x["name"], x["type"]) for x in g.get(key, [])] == [(x["name"], x["type"]) for x in t.get(key, [])]
    assert {k: v for k, v in wf["extra"].items() if k != "dvdq"} == tpl["extra"]
    assert wf["extra"]["dvdq"] == {"template": TEMPLATES[os.path.basename(path)], "template_package":
                                   "comfyui-workflow-templates-json", "template_version": make_workflows.TEMPLATE_VERSION}


def ui_model_roots(graph, node_id, socket="model", seen=()):
    """Every path of node types from a node's MODEL input to a node without one (both branches of a switch)."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = make_workflows.graph_links(graph)
    inputs = [i for i in nodes[node_id].get("inputs", []) if i["type"] == "MODEL" and i.get("link") is not None
              and (socket is None or i["name"] == socket)]
    if not inputs:
        return [[]]
    paths = []
    for i in inputs:
        src = links[i["link"]][1]
        assert src != SUBGRAPH_INPUT and src not in seen
        paths += [[nodes[src]["type"], *rest] for rest in ui_model_roots(graph, src, None, (*seen, src))]
    return paths


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=os.path.basename)
def test_template_samplers_get_the_loader_through_a_bit_switch(path):
    """No UNETLoader is left, and every sampler's MODEL (each branch of a switch) runs through a Bit Switch
    Scheduler to a DVD-Quant Loader, in the front end's graph and in the API prompt (where switches and
    bypassed nodes are resolved by the server and the front end)."""
    wf = load(path)
    found = 0
    for g in make_workflows.graphs_of(wf):
        assert not [n for n in g["nodes"] if n["type"] == "UNETLoader"]
        for n in g["nodes"]:
            if n["type"] in SAMPLERS:
                found += 1
                for p in ui_model_roots(g, n["id"]):
                    assert p[-1] == "DVDQuantLoader" and "DVDQuantBitSwitch" in p, (n["id"], p)
    assert found
    api = load(os.path.join(WF_DIR, "api", os.path.basename(path)))
    assert "UNETLoader" not in {e["class_type"] for e in api.values()}
    for nid, e in api.items():
        if e["class_type"] in SAMPLERS:
            chain, cur = [], nid
            while "model" in api[cur]["inputs"] or api[cur]["class_type"] == "ComfySwitchNode":
                cur = api[cur]["inputs"]["on_true" if api[cur]["class_type"] == "ComfySwitchNode" else "model"][0]
                chain.append(api[cur]["class_type"])
            assert chain[-1] == "DVDQuantLoader" and "DVDQuantBitSwitch" in chain, (nid, chain)


def test_wan22_14B_t2v_template_two_experts_lightning_loras_one_schedule():
    """video_wan2_2_14B_t2v: both experts through our Loader (the template's fp8_scaled files), each followed by its
    4-step distillation LoRA, a switch between the LoRA and the plain branch, then one Bit Switch Scheduler each
    (same settings: one schedule over both experts) and ModelSamplingSD3 shift 5; the switch's LoRA branch gives 4
    steps split at 2 and CFG 1 to the two KSamplerAdvanced, the high-noise one first."""
    api = load(os.path.join(WF_DIR, "api", "video_wan2_2_14B_t2v_dvdq.json"))

    def src(nid, name, branch="on_true"):
        ref = api[nid]["inputs"][name]
        while api[ref[0]]["class_type"] == "ComfySwitchNode":
            ref = api[ref[0]]["inputs"][branch]
        return ref[0], api[ref[0]]

    ks = sorted((nid for nid, e in api.items() if e["class_type"] == "KSamplerAdvanced"),
                key=lambda nid: api[nid]["inputs"]["add_noise"] != "enable")
    assert len(ks) == 2
    high, low = ks
    bits = []
    for nid, expert in ((high, "high"), (low, "low")):
        _, shift = src(nid, "model")
        assert shift["class_type"] == "ModelSamplingSD3" and round(shift["inputs"]["shift"], 6) == 5
        bs = api[shift["inputs"]["model"][0]]
        assert bs["class_type"] == "DVDQuantBitSwitch"
        bits.append({k: v for k, v in bs["inputs"].items() if k != "model"})
        switch = api[bs["inputs"]["model"][0]]
        assert switch["class_type"] == "ComfySwitchNode"
        lora, plain = api[switch["inputs"]["on_true"][0]], api[switch["inputs"]["on_false"][0]]
        assert lora["class_type"] == "LoraLoaderModelOnly" and plain["class_type"] == "DVDQuantLoader"
        assert lora["inputs"]["lora_name"] == f"wan2.2_t2v_lightx2v_4steps_lora_v1.1_{expert}_noise.safetensors"
        assert lora["inputs"]["model"] == switch["inputs"]["on_false"]  # the LoRA after our Loader
        assert plain["inputs"]["model_name"] == f"wan2.2_t2v_{expert}_noise_14B_fp8_scaled.safetensors"
        assert src(nid, "steps")[1]["inputs"]["value"] == 4 and src(nid, "cfg")[1]["inputs"]["value"] == 1
        assert src(nid, "steps", "on_false")[1]["inputs"]["value"] == 20
    assert bits[0] == bits[1] == make_workflows.bits_settings()
    assert src(high, "end_at_step")[1]["inputs"]["value"] == src(low, "start_at_step")[1]["inputs"]["value"] == 2
    assert api[high]["inputs"]["return_with_leftover_noise"] == "enable" and api[low]["inputs"]["add_noise"] == "disable"
    assert api[low]["inputs"]["latent_image"] == [high, 0]
    switches = {tuple(e["inputs"]["switch"]) for e in api.values() if e["class_type"] == "ComfySwitchNode"}
    assert len(switches) == 1 and api[next(iter(switches))[0]]["class_type"] == "PrimitiveBoolean"


def test_template_version_is_pinned_and_recorded():
    pins = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, "requirements-dev.txt"), encoding="utf-8")]
    assert f"comfyui-workflow-templates-json=={make_workflows.TEMPLATE_VERSION}" in pins
    readme = open(os.path.join(WF_DIR, "README.md"), encoding="utf-8").read()
    assert f"comfyui-workflow-templates-json {make_workflows.TEMPLATE_VERSION}" in readme
    for name in TEMPLATES:
        assert f"`{name}`" in readme, f"workflows/README.md does not list {name}"
    with open(node_specs.TEMPLATE_SPEC_PATH, encoding="utf-8") as f:
        assert json.load(f)["template_package"] == f"comfyui-workflow-templates-json=={make_workflows.TEMPLATE_VERSION}"


def test_template_spec_file_covers_every_template_node():
    types = set()
    for t in make_workflows.TEMPLATES:
        types |= make_workflows.template_node_types(make_workflows.load_template(t))
    assert sorted(TEMPLATE_SPECS) == sorted(types - set(node_specs.OUR_NODES))
    assert all(TEMPLATE_SPECS[t] for t in TEMPLATE_SPECS)


def test_ui_to_api_is_the_front_ends_conversion():
    """Subgraphs flattened (ids `instance:inner`), bypassed nodes passed through by type, muted and note nodes
    left out, a widget promoted from a subgraph input taking the instance's value (the older form)."""
    spec = {"display_name": "X", "inputs": [{"name": "model", "type": "MODEL", "widget": False},
                                            {"name": "n", "type": "INT", "widget": True}],
            "outputs": [{"name": "MODEL", "type": "MODEL"}]}
    source = {"display_name": "S", "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL"}]}

    def n(id_, type_="X", mode=0, inputs=(), outputs=(), values=()):
        return {"id": id_, "type": type_, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
                "widgets_values": list(values)}

    def out(*links):
        return {"name": "MODEL", "type": "MODEL", "links": list(links)}

    model_in = {"name": "model", "type": "MODEL", "link": 1}
    sub = {"id": "sg", "name": "sub", "inputNode": {}, "state": {},
           "inputs": [{"name": "m", "type": "MODEL", "linkIds": [10]}, {"name": "n", "type": "INT", "linkIds": [11]}],
           "outputs": [{"name": "out", "type": "MODEL", "linkIds": [12]}],
           "nodes": [n(5, inputs=[{"name": "model", "type": "MODEL", "link": 10},
                                  {"name": "n", "type": "INT", "widget": {"name": "n"}, "link": 11}], values=[1])],
           "links": [{"id": 10, "origin_id": -10, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "MODEL"},
                     {"id": 11, "origin_id": -10, "origin_slot": 1, "target_id": 5, "target_slot": 1, "type": "INT"},
                     {"id": 12, "origin_id": 5, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}]}
    wf = {"definitions": {"subgraphs": [sub]},
          "nodes": [n(1, "S", outputs=[out(1)]), n(2, mode=4, inputs=[model_in], outputs=[out(2)], values=[3]),
                    n(3, "MarkdownNote"), n(4, mode=2, values=[4]),
                    n(7, "sg", inputs=[{"name": "m", "type": "MODEL", "link": 2},
                                       {"name": "n", "type": "INT", "widget": {"name": "n"}, "link": None}],
                      outputs=[out(3)], values=[9]),
                    n(8, inputs=[{"name": "model", "type": "MODEL", "link": 3}], values=[5])],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 7, 0, "MODEL"], [3, 7, 0, 8, 0, "MODEL"]]}
    api = make_workflows.ui_to_api(wf, lambda node: source if node["type"] == "S" else spec)
    assert api == {"1": {"class_type": "S", "inputs": {}, "_meta": {"title": "S"}},
                   "7:5": {"class_type": "X", "inputs": {"model": ["1", 0], "n": 9}, "_meta": {"title": "X"}},
                   "8": {"class_type": "X", "inputs": {"model": ["7:5", 0], "n": 5}, "_meta": {"title": "X"}}}


def test_template_checkers_catch_broken_workflows():
    path = os.path.join(WF_DIR, "video_wan2_2_14B_t2v_dvdq.json")
    base, tpl = load(path), template_of(path)
    assert check_template_ui(base, tpl) == []
    sg = base["definitions"]["subgraphs"][0]

    wf = copy.deepcopy(base)  # a stale widget value on a template node
    node = next(n for n in wf["definitions"]["subgraphs"][0]["nodes"] if n["type"] == "KSamplerAdvanced")
    node["widgets_values"].append(1)
    assert any("fit no schema" in p for p in check_template_ui(wf, tpl))

    wf = copy.deepcopy(base)  # ours with one widget value too few
    node = next(n for n in wf["definitions"]["subgraphs"][0]["nodes"] if n["type"] == "DVDQuantBitSwitch")
    node["widgets_values"].pop()
    assert any("fit no schema" in p for p in check_template_ui(wf, tpl))

    wf = copy.deepcopy(base)  # a node type that is neither the template's nor ours
    wf["definitions"]["subgraphs"][0]["nodes"][0]["type"] = "SomeoneElsesLoader"
    assert any("neither the template's nor ours" in p for p in check_template_ui(wf, tpl))

    wf = copy.deepcopy(base)  # a subgraph link whose target does not list it
    link = wf["definitions"]["subgraphs"][0]["links"][0]
    link["target_slot"] += 5
    assert any(f"link {link['id']}" in p for p in check_template_ui(wf, tpl))

    wf = copy.deepcopy(base)  # a subgraph input listing a link that does not start there
    wf["definitions"]["subgraphs"][0]["inputs"][0]["linkIds"].append(sg["links"][0]["id"])
    assert any("does not start there" in p for p in check_template_ui(wf, tpl))

    wf = copy.deepcopy(base)
    wf["definitions"]["subgraphs"][0]["state"]["lastNodeId"] = 1
    assert any("state below" in p for p in check_template_ui(wf, tpl))

    api = load(os.path.join(WF_DIR, "api", "video_wan2_2_14B_t2v_dvdq.json"))
    assert check_template_api(api) == []
    bad = copy.deepcopy(api)
    ks = next(k for k, v in bad.items() if v["class_type"] == "KSamplerAdvanced")
    bad[ks]["inputs"]["positive"] = bad[ks]["inputs"]["latent_image"]
    bad[ks]["inputs"]["sampler_name"] = "banana"
    problems = check_template_api(bad)
    assert any("takes CONDITIONING" in p for p in problems) and any("'banana' not in" in p for p in problems)
