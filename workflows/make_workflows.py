"""Writes the example workflows, UI format (drag and drop) in workflows/ and API format (POST
/prompt, scripting) in workflows/api/, from one description per workflow so both stay the same.

    python workflows/make_workflows.py            # rewrite every workflow
    python workflows/make_workflows.py --check    # exit 1 if a written file differs
    python workflows/make_workflows.py --core-spec-from object_info.json
        # refresh core_nodes.json from a running ComfyUI's /object_info (saved to a file)
    python workflows/make_workflows.py --template-spec-from 0.3.64=a.json --template-spec-from 0.8.0=b.json ...
        # refresh template_nodes.json: the template nodes' schemas, one /object_info per ComfyUI version

Two kinds of workflow:
- our own examples (WORKFLOWS), built node by node; model file names are those of ComfyUI's official Wan
  and HunyuanVideo examples;
- ComfyUI's official workflow templates (TEMPLATES, read from the pinned `comfyui-workflow-templates-json`
  package, the one ComfyUI's front end ships) with the diffusion-model loader swapped for ours and a Bit
  Switch Scheduler after it; everything else as the template has it.
"""
import argparse
import importlib.metadata
import importlib.resources
import json
import os
import re
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import node_specs  # noqa: E402  (this folder is not a package)

UI_VERSION = 0.4
WAN_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
WAN_PROMPT = (
    "a fox moving quickly in a beautiful winter scenery nature trees mountains daytime tracking camera"
)
HUNYUAN_I2V_PROMPT = "the person in the picture turns towards the camera and smiles, the wind moves the hair"
HUNYUAN_PROMPT = (
    "anime style anime girl with massive fennec ears and one big fluffy tail, she has blonde hair long "
    "hair blue eyes wearing a pink sweater and a long blue skirt walking in a beautiful outdoor "
    "scenery with snow mountains in the background"
)


class Node:
    def __init__(self, graph, id_, type_, spec, values, controls, pos, title):
        self.graph, self.id, self.type, self.spec = graph, id_, type_, spec
        self.values, self.controls, self.pos, self.title = values, controls, pos, title
        self.inputs = {}  # socket name -> (link id, source node, source slot)
        self.out_links = {}  # output slot -> [link ids]

    def widgets_values(self):
        """The UI's `widgets_values`: each widget's value, plus the front end's extra values (the control
        after a seed, the upload button's)."""
        values = []
        for w in node_specs.widgets(self.spec):
            values.append(self.values[w["name"]])
            if node_specs.has_control(w):
                values.append(self.controls.get(w["name"], "fixed"))
            if node_specs.upload_value(w) is not None:
                values.append(node_specs.upload_value(w))
        return values

    def __getitem__(self, output):
        """Output slot by index or name, for `graph.link(node["MODEL"], ...)`."""
        outs = self.spec["outputs"]
        if isinstance(output, int):
            if not 0 <= output < len(outs):
                raise IndexError(f"{self.type} has no output {output}")
            return self, output
        for i, o in enumerate(outs):
            if o["name"] == output:
                return self, i
        raise KeyError(f"{self.type} has no output {output!r}")


class Graph:
    def __init__(self, specs):
        self.specs = specs
        self.nodes = []
        self.links = []  # [id, src id, src slot, dst id, dst slot, type]

    def add(self, type_, pos, title=None, controls=None, **values):
        spec = self.specs[type_]
        names = [w["name"] for w in node_specs.widgets(spec)]
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"{type_} has no widget {sorted(unknown)}; widgets: {names}")
        full = {}
        for w in node_specs.widgets(spec):
            if w["name"] in values:
                full[w["name"]] = values[w["name"]]
            elif "default" in w:
                full[w["name"]] = w["default"]
            else:
                raise ValueError(f"{type_}.{w['name']} has no default: give a value")
        node = Node(self, len(self.nodes) + 1, type_, spec, full, controls or {}, pos, title)
        self.nodes.append(node)
        return node

    def link(self, source, dst, input_name):
        src, slot = source
        socket_names = [s["name"] for s in node_specs.sockets(dst.spec)]
        if input_name not in socket_names:
            raise KeyError(f"{dst.type} has no socket {input_name!r}; sockets: {socket_names}")
        dst_slot = socket_names.index(input_name)
        out_type = src.spec["outputs"][slot]["type"]
        in_type = node_specs.sockets(dst.spec)[dst_slot]["type"]
        if out_type != in_type:
            raise TypeError(f"{src.type}[{slot}] gives {out_type}, {dst.type}.{input_name} takes {in_type}")
        if input_name in dst.inputs:
            raise ValueError(f"{dst.type}.{input_name} is linked twice")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, slot, dst.id, dst_slot, out_type])
        dst.inputs[input_name] = (link_id, src, slot)
        src.out_links.setdefault(slot, []).append(link_id)
        return link_id

    def check_complete(self):
        for node in self.nodes:
            for s in node_specs.sockets(node.spec):
                if not s.get("optional") and s["name"] not in node.inputs:
                    raise ValueError(f"node {node.id} {node.type}: required input {s['name']} is not linked")

    # ------------------------------------------------------------------ output formats

    def _order(self):
        """Execution order for the UI's `order` field: sources before their consumers."""
        done, order = set(), []

        def visit(n):
            if n.id in done:
                return
            for _, src, _ in n.inputs.values():
                visit(src)
            done.add(n.id)
            order.append(n.id)

        for n in self.nodes:
            visit(n)
        return {nid: i for i, nid in enumerate(order)}

    def ui(self):
        self.check_complete()
        order = self._order()
        nodes = []
        for n in self.nodes:
            inputs = _socket_entries(n.spec)
            for d in inputs:
                d["link"] = n.inputs.get(d["name"], (None,))[0]
            outputs = []
            for i, o in enumerate(n.spec["outputs"]):
                outputs.append({"name": o["name"], "type": o["type"], "links": n.out_links.get(i, []), "slot_index": i})
            d = {
                "id": n.id,
                "type": n.type,
                "pos": list(n.pos),
                "size": list(_size(n)),
                "flags": {},
                "order": order[n.id],
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": n.type},
                "widgets_values": n.widgets_values(),
            }
            if n.title:
                d["title"] = n.title
            nodes.append(d)
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": [list(link) for link in self.links],
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
            "version": UI_VERSION,
        }

    def api(self):
        """The API form, made from the UI form as the front end makes it (ui_to_api: one conversion for our
        workflows and the templates')."""
        return ui_to_api(self.ui(), lambda node: self.specs[node["type"]])


def _web_panel_heights():
    """BIT_PANEL_H and QUANT_PANEL_H of the web extension (web/dvdq_panel.js): one source for both."""
    js = open(os.path.join(os.path.dirname(HERE), "web", "dvdq_panel.js"), encoding="utf-8").read()
    return {name: int(re.search(rf"const {name} = (\d+);", js).group(1)) for name in ("BIT_PANEL_H", "QUANT_PANEL_H")}


# Heights of the panels the web extension draws under the widgets of our nodes (LoadImage: its preview).
_WEB = _web_panel_heights()
_PANEL_H = {"DVDQuantBitSwitch": _WEB["BIT_PANEL_H"], "DVDQuantLoader": _WEB["QUANT_PANEL_H"],
            "DVDQuantApply": _WEB["QUANT_PANEL_H"], "LoadImage": 300}
_WIDE = {"CLIPTextEncode": (420, 180)}


def _size(n):
    if n.type in _WIDE:
        return _WIDE[n.type]
    rows = max(len(node_specs.sockets(n.spec)), len(n.spec["outputs"]), 1)
    ws = node_specs.widget_value_count(n.spec)
    return (320, 30 + 22 * rows + 24 * ws + _PANEL_H.get(n.type, 0))


# ---------------------------------------------------------------------- the workflows

# The settings every workflow gives our two nodes: W4, activations delta-switched between 4 and `high` bits.
def loader_settings(model_file, high=8):
    return dict(model_name=model_file, w_bits=4, a_low=4, a_high=high, method="dvdq", save_quantized_copy=False)


def bits_settings(high=8):
    return dict(mode="delta", delta=0.09, low=4, high=high, fixed_bits=8, schedule="", final_step_high=True)


def _dvdq_model(g, model_file, pos, *, arq=None, title=None, high=8):
    """DVD-Quant Loader -> Bit Switch Scheduler, the part that replaces a plain UNETLoader."""
    x, y = pos
    loader = g.add("DVDQuantLoader", (x, y), title=title, **loader_settings(model_file, high))
    if arq is not None:
        g.link(arq["ARQ_SETTINGS"], loader, "arq_settings")
    bits = g.add("DVDQuantBitSwitch", (x, y + _size(loader)[1] + 40), **bits_settings(high))  # below its panel
    g.link(loader["MODEL"], bits, "model")
    return bits


def _wan_text(g, pos):
    x, y = pos
    clip = g.add("CLIPLoader", (x, y), clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 device="default")
    pos_enc = g.add("CLIPTextEncode", (x + 360, y), title="Positive prompt", text=WAN_PROMPT)
    neg_enc = g.add("CLIPTextEncode", (x + 360, y + 230), title="Negative prompt", text=WAN_NEGATIVE)
    g.link(clip["CLIP"], pos_enc, "clip")
    g.link(clip["CLIP"], neg_enc, "clip")
    return pos_enc, neg_enc


def _decode_save(g, latent, vae_file, pos, fps, prefix, tiled=False, vae_pos=None, vae=None):
    """VAE decode (tiled for HunyuanVideo) and save; vae: a VAELoader the graph already has."""
    x, y = pos
    vae = vae or g.add("VAELoader", vae_pos or (x - 360, y + 480), vae_name=vae_file)
    if tiled:
        dec = g.add("VAEDecodeTiled", (x, y), tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8)
    else:
        dec = g.add("VAEDecode", (x, y))
    g.link(latent, dec, "samples")
    g.link(vae["VAE"], dec, "vae")
    save = g.add("SaveAnimatedWEBP", (x + 360, y), filename_prefix=prefix, fps=fps, lossless=False,
                 quality=90, method="default")
    g.link(dec["IMAGE"], save, "images")


def wan21_t2v(specs, model_file, prefix, with_arq):
    g = Graph(specs)
    arq = None
    if with_arq:
        arq = g.add("DVDQuantARQSettings", (-360, 0), rotate=True, had_block="128", auto_scale=True,
                    granularity="pow2", scale_block="128", layer_overrides="")
    bits = _dvdq_model(g, model_file, (0, 0), arq=arq)
    shift = g.add("ModelSamplingSD3", (0, 600), shift=8.0)
    g.link(bits["MODEL"], shift, "model")
    pos_enc, neg_enc = _wan_text(g, (360, 0))
    latent = g.add("EmptyHunyuanLatentVideo", (360, 480), width=832, height=480, length=33, batch_size=1)
    ks = g.add("KSampler", (1180, 0), controls={"seed": "randomize"}, seed=82628696717253, steps=30,
               cfg=6.0, sampler_name="uni_pc", scheduler="simple", denoise=1.0)
    g.link(shift["MODEL"], ks, "model")
    g.link(pos_enc["CONDITIONING"], ks, "positive")
    g.link(neg_enc["CONDITIONING"], ks, "negative")
    g.link(latent["LATENT"], ks, "latent_image")
    _decode_save(g, ks["LATENT"], "wan_2.1_vae.safetensors", (1540, 0), fps=16.0, prefix=prefix)
    return g


def wan22_a14b_t2v(specs):
    """Two experts, each DVD-Quant Loader -> Bit Switch -> ModelSamplingSD3, and two
    KSamplerAdvanced splitting one 20-step schedule at step 10 (high noise, then low noise)."""
    g = Graph(specs)
    arq = g.add("DVDQuantARQSettings", (-360, 0), rotate=True, had_block="128", auto_scale=True,
                granularity="pow2", scale_block="128", layer_overrides="")
    experts = []
    for k, (name, title) in enumerate([
        ("wan2.2_t2v_high_noise_14B_fp16.safetensors", "DVD-Quant Loader (high noise expert)"),
        ("wan2.2_t2v_low_noise_14B_fp16.safetensors", "DVD-Quant Loader (low noise expert)"),
    ]):
        x = 0 if k == 0 else 360
        bits = _dvdq_model(g, name, (x, 0), arq=arq, title=title)
        shift = g.add("ModelSamplingSD3", (x, 600), shift=8.0)
        g.link(bits["MODEL"], shift, "model")
        experts.append(shift)
    pos_enc, neg_enc = _wan_text(g, (720, 0))
    latent = g.add("EmptyHunyuanLatentVideo", (720, 480), width=640, height=640, length=81, batch_size=1)
    common = dict(steps=20, cfg=3.5, sampler_name="euler", scheduler="simple")
    high = g.add("KSamplerAdvanced", (1540, 0), title="KSampler (high noise, steps 0-10)",
                 controls={"noise_seed": "randomize"}, add_noise="enable", noise_seed=1034274237172778,
                 start_at_step=0, end_at_step=10, return_with_leftover_noise="enable", **common)
    low = g.add("KSamplerAdvanced", (1540, 420), title="KSampler (low noise, steps 10-20)",
                controls={"noise_seed": "fixed"}, add_noise="disable", noise_seed=0,
                start_at_step=10, end_at_step=10000, return_with_leftover_noise="disable", **common)
    for ks, model in ((high, experts[0]), (low, experts[1])):
        g.link(model["MODEL"], ks, "model")
        g.link(pos_enc["CONDITIONING"], ks, "positive")
        g.link(neg_enc["CONDITIONING"], ks, "negative")
    g.link(latent["LATENT"], high, "latent_image")
    g.link(high["LATENT"], low, "latent_image")
    _decode_save(g, low["LATENT"], "wan_2.1_vae.safetensors", (1900, 0), fps=16.0, prefix="video/wan2.2_dvdq",
                 vae_pos=(1900, 200))
    return g


def hunyuan_t2v(specs):
    """ComfyUI's HunyuanVideo T2V example (guidance embedded, custom sampler) with DVD-Quant."""
    g = Graph(specs)
    bits = _dvdq_model(g, "hunyuan_video_t2v_720p_bf16.safetensors", (0, 0))
    shift = g.add("ModelSamplingSD3", (0, 600), shift=7.0)
    g.link(bits["MODEL"], shift, "model")
    clip = g.add("DualCLIPLoader", (360, 0), clip_name1="clip_l.safetensors",
                 clip_name2="llava_llama3_fp8_scaled.safetensors", type="hunyuan_video", device="default")
    enc = g.add("CLIPTextEncode", (720, 0), title="Prompt", text=HUNYUAN_PROMPT)
    g.link(clip["CLIP"], enc, "clip")
    guidance = g.add("FluxGuidance", (720, 230), guidance=6.0)
    g.link(enc["CONDITIONING"], guidance, "conditioning")
    guider = g.add("BasicGuider", (1180, 0))
    g.link(shift["MODEL"], guider, "model")
    g.link(guidance["CONDITIONING"], guider, "conditioning")
    sampler = g.add("KSamplerSelect", (1180, 120), sampler_name="euler")
    sched = g.add("BasicScheduler", (1180, 230), scheduler="simple", steps=20, denoise=1.0)
    g.link(shift["MODEL"], sched, "model")
    noise = g.add("RandomNoise", (1180, 400), controls={"noise_seed": "randomize"}, noise_seed=1)
    latent = g.add("EmptyHunyuanLatentVideo", (720, 380), width=848, height=480, length=73, batch_size=1)
    adv = g.add("SamplerCustomAdvanced", (1540, 0))
    g.link(noise["NOISE"], adv, "noise")
    g.link(guider["GUIDER"], adv, "guider")
    g.link(sampler["SAMPLER"], adv, "sampler")
    g.link(sched["SIGMAS"], adv, "sigmas")
    g.link(latent["LATENT"], adv, "latent_image")
    _decode_save(g, adv["output"], "hunyuan_video_vae_bf16.safetensors", (1900, 0), fps=24.0,
                 prefix="video/hunyuan_video_dvdq", tiled=True)
    return g


def hunyuan_i2v(specs):
    """ComfyUI's HunyuanVideo image-to-video "v2 (replace)" example with DVD-Quant: the start image
    replaces the first latent frame (a guiding frame: its tokens get their own modulation, which the
    pack's fused block steps take too); replace example.png with your image."""
    g = Graph(specs)
    bits = _dvdq_model(g, "hunyuan_video_v2_replace_image_to_video_720p_bf16.safetensors", (0, 0))
    shift = g.add("ModelSamplingSD3", (0, 600), shift=7.0)
    g.link(bits["MODEL"], shift, "model")
    clip = g.add("DualCLIPLoader", (360, 0), clip_name1="clip_l.safetensors",
                 clip_name2="llava_llama3_fp8_scaled.safetensors", type="hunyuan_video", device="default")
    vision = g.add("CLIPVisionLoader", (360, 200), clip_name="llava_llama3_vision.safetensors")
    image = g.add("LoadImage", (0, 760), title="Start image", image="example.png")
    seen = g.add("CLIPVisionEncode", (360, 320), crop="none")
    g.link(vision["CLIP_VISION"], seen, "clip_vision")
    g.link(image["IMAGE"], seen, "image")
    enc = g.add("TextEncodeHunyuanVideo_ImageToVideo", (720, 0), title="Prompt", prompt=HUNYUAN_I2V_PROMPT,
                image_interleave=2)
    g.link(clip["CLIP"], enc, "clip")
    g.link(seen["CLIP_VISION_OUTPUT"], enc, "clip_vision_output")
    guidance = g.add("FluxGuidance", (720, 260), guidance=6.0)
    g.link(enc["CONDITIONING"], guidance, "conditioning")
    vae = g.add("VAELoader", (720, 380), vae_name="hunyuan_video_vae_bf16.safetensors")
    i2v = g.add("HunyuanImageToVideo", (720, 500), width=848, height=480, length=53, batch_size=1,
                guidance_type="v2 (replace)")
    g.link(guidance["CONDITIONING"], i2v, "positive")
    g.link(vae["VAE"], i2v, "vae")
    g.link(image["IMAGE"], i2v, "start_image")
    guider = g.add("BasicGuider", (1180, 0))
    g.link(shift["MODEL"], guider, "model")
    g.link(i2v["positive"], guider, "conditioning")
    sampler = g.add("KSamplerSelect", (1180, 120), sampler_name="euler")
    sched = g.add("BasicScheduler", (1180, 230), scheduler="simple", steps=20, denoise=1.0)
    g.link(shift["MODEL"], sched, "model")
    noise = g.add("RandomNoise", (1180, 400), controls={"noise_seed": "randomize"}, noise_seed=1)
    adv = g.add("SamplerCustomAdvanced", (1540, 0))
    g.link(noise["NOISE"], adv, "noise")
    g.link(guider["GUIDER"], adv, "guider")
    g.link(sampler["SAMPLER"], adv, "sampler")
    g.link(sched["SIGMAS"], adv, "sigmas")
    g.link(i2v["latent"], adv, "latent_image")
    _decode_save(g, adv["output"], None, (1900, 0), fps=24.0, prefix="video/hunyuan_video_i2v_dvdq", tiled=True,
                 vae=vae)
    return g


WORKFLOWS = {
    "wan2.1_t2v_1.3B_dvdq": lambda s: wan21_t2v(s, "wan2.1_t2v_1.3B_fp16.safetensors", "video/wan2.1_1.3B_dvdq", False),
    "wan2.1_t2v_14B_dvdq": lambda s: wan21_t2v(s, "wan2.1_t2v_14B_fp16.safetensors", "video/wan2.1_14B_dvdq", True),
    "wan2.2_t2v_A14B_dvdq": wan22_a14b_t2v,
    "hunyuan_video_t2v_dvdq": hunyuan_t2v,
    "hunyuan_video_i2v_dvdq": hunyuan_i2v,
}


# ---------------------------------------------------------------------- ComfyUI's templates with DVD-Quant

TEMPLATE_PACKAGE = "comfyui-workflow-templates-json"  # what ComfyUI's front end ships (its module below)
TEMPLATE_MODULE = "comfyui_workflow_templates_json"
TEMPLATE_VERSION = "0.1.123"  # pinned in requirements-dev.txt; recorded in every file made from it

# The templates of the families the pack quantizes (Wan 2.1/2.2 T2V, I2V, TI2V 5B, FLF2V; HunyuanVideo T2V;
# HunyuanVideo 1.5 T2V/I2V, whose nodes ComfyUI has from 0.8.0 on); each gives `<template>_dvdq.json`.
TEMPLATES = [
    "text_to_video_wan.json",
    "image_to_video_wan.json",
    "wan2.1_flf2v_720_f16.json",
    "video_wan2_2_14B_t2v.json",
    "video_wan2_2_14B_i2v.json",
    "video_wan2_2_14B_flf2v.json",
    "video_wan2_2_5B_ti2v.json",
    "hunyuan_video_text_to_video.json",
    "video_hunyuan_video_1.5_720p_t2v.json",
    "video_hunyuan_video_1.5_720p_i2v.json",
]
# Nodes between the loader and the Bit Switch Scheduler: LoRAs (they run beside the packed weights) and the
# templates' switches between the plain and the LoRA branch (one schedule then serves both branches).
MODEL_SIDE = ("LoraLoaderModelOnly", "LoraLoader", "ComfySwitchNode")
VIRTUAL_TYPES = ("Note", "MarkdownNote")  # drawn by the front end only: no API node
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # the ids of a subgraph's input and output nodes in its links
TITLE_H, GAP = 30, 20  # a node's title bar (drawn above its pos) and the space left between nodes


def template_name(template_file):
    return os.path.splitext(template_file)[0] + "_dvdq"


def load_template(template_file):
    """A template of the installed template package, which must be the pinned version."""
    try:
        version = importlib.metadata.version(TEMPLATE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the workflow templates are not installed: pip install {TEMPLATE_PACKAGE}=={TEMPLATE_VERSION} "
                         "(requirements-dev.txt)") from None
    if version != TEMPLATE_VERSION:
        raise SystemExit(f"{TEMPLATE_PACKAGE} {version} is installed; the workflows are made from {TEMPLATE_VERSION} "
                         "(change TEMPLATE_VERSION and requirements-dev.txt together, then regenerate)")
    path = importlib.resources.files(TEMPLATE_MODULE).joinpath("templates", template_file)
    return json.loads(path.read_text(encoding="utf-8"))


def subgraph_defs(wf):
    return {sg["id"]: sg for sg in wf.get("definitions", {}).get("subgraphs", [])}


def graphs_of(wf):
    """The root graph and every subgraph definition: each has nodes, links and groups of its own."""
    return [wf, *subgraph_defs(wf).values()]


_LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def graph_links(graph):
    """{link id: (id, origin, origin slot, target, target slot, type)}: the root's links are lists, a
    subgraph's are objects."""
    out = {}
    for link in graph.get("links", []):
        t = tuple(link[f] for f in _LINK_FIELDS) if isinstance(link, dict) else tuple(link[:6])
        out[t[0]] = t
    return out


def _set_link(graph, link_id, **fields):
    for link in graph["links"]:
        if (link["id"] if isinstance(link, dict) else link[0]) == link_id:
            for k, v in fields.items():
                if isinstance(link, dict):
                    link[k] = v
                else:
                    link[_LINK_FIELDS.index(k)] = v
            return
    raise KeyError(f"no link {link_id}")


def _add_link(graph, *values):
    is_subgraph = "inputNode" in graph
    graph["links"].append(dict(zip(_LINK_FIELDS, values)) if is_subgraph else list(values))


def template_node_types(wf):
    """The node types a template's API form can hold (its own nodes, subgraphs entered)."""
    defs = subgraph_defs(wf)
    return {n["type"] for g in graphs_of(wf) for n in g["nodes"] if n["type"] not in defs and n["type"] not in VIRTUAL_TYPES}


def widget_map(spec, values):
    """{widget name: value} of a node's `widgets_values` (the front end's control and upload values left out)."""
    out, k = {}, 0
    for w in node_specs.widgets(spec):
        out[w["name"]] = values[k]
        k += 1 + node_specs.has_control(w) + (node_specs.upload_value(w) is not None)
    return out


class _Value:
    """A widget value that reaches an inner node from its subgraph's instance (no link outside)."""

    def __init__(self, value):
        self.value = value


def ui_to_api(wf, spec_of):
    """The API form of a UI workflow, as ComfyUI's front end makes it (graphToPrompt): subgraphs are flattened
    (an inner node's id is the path of instance ids, `57:12`), front-end-only and muted nodes left out, a
    bypassed node's consumers linked to what feeds its first input of the same type (that slot tried first),
    and a widget linked from a subgraph input that has no link outside takes the instance's widget value
    (older front ends store it there) or else its own. spec_of(node) -> the node's schema."""
    defs = subgraph_defs(wf)
    out = {}

    class Scope:
        def __init__(self, graph, path=(), instance=None, parent=None):
            self.graph, self.path, self.instance, self.parent = graph, path, instance, parent
            self.nodes = {n["id"]: n for n in graph["nodes"]}
            self.links = graph_links(graph)

        def api_id(self, node_id):
            return ":".join((*self.path, str(node_id)))

        def inner(self, node):
            if node.get("mode", MODE_ALWAYS) != MODE_ALWAYS:
                raise ValueError(f"subgraph node {node['id']} is muted or bypassed: not supported")
            return Scope(defs[node["type"]], (*self.path, str(node["id"])), node, self)

    def source(scope, link_id):
        """What a link carries: an API [node id, slot], a _Value, or None (nothing: a muted node, ...)."""
        _, origin, slot, *_ = scope.links[link_id]
        if origin != SUBGRAPH_INPUT:
            return output(scope, scope.nodes[origin], slot)
        sub_inputs = scope.graph["inputs"]
        name = sub_inputs[slot]["name"]
        outer = next((i for i in scope.instance.get("inputs", []) if i["name"] == name), None)
        if outer is not None and outer.get("link") is not None:
            return source(scope.parent, outer["link"])
        stored = scope.instance.get("widgets_values") or []
        promoted = [i["name"] for i in sub_inputs if i["type"] in node_specs.WIDGET_TYPES]
        return _Value(stored[promoted.index(name)]) if name in promoted and len(stored) == len(promoted) else None

    def output(scope, node, slot):
        if node["type"] in defs:
            inner = scope.inner(node)
            link_ids = inner.graph["outputs"][slot]["linkIds"]
            return source(inner, link_ids[0]) if link_ids else None
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            type_, ins = node["outputs"][slot]["type"], node.get("inputs", [])
            k = next((k for k in (slot, *range(len(ins))) if k < len(ins) and ins[k]["type"] == type_), None)
            return None if k is None or ins[k].get("link") is None else source(scope, ins[k]["link"])
        if mode != MODE_ALWAYS:
            raise ValueError(f"node {node['id']} {node['type']}: mode {mode}")
        return [scope.api_id(node["id"]), slot]

    def emit(scope):
        for node in scope.graph["nodes"]:
            if node["type"] in VIRTUAL_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
                continue
            if node["type"] in defs:
                emit(scope.inner(node))
                continue
            spec = spec_of(node)
            values = widget_map(spec, node.get("widgets_values") or [])
            linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
            inputs = {}
            for i in spec["inputs"]:
                for name in ([n for n in linked if n in i["autogrow"]] if "autogrow" in i else [i["name"]]):
                    src = source(scope, linked[name]) if name in linked else None
                    if isinstance(src, _Value):
                        inputs[name] = src.value
                    elif src is not None:
                        inputs[name] = src
                    elif i["widget"]:
                        inputs[name] = values[name]
            title = node.get("title") or spec.get("display_name", node["type"])
            out[scope.api_id(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}

    emit(Scope(wf))
    return out


def template_spec_of(template_specs, our_specs=None):
    """spec_of for ui_to_api on a template-made workflow: ours from the pack, a template node's from the
    schemas of template_nodes.json, the oldest version whose widget count its `widgets_values` fit (what
    every newer ComfyUI still accepts; a node saved with a widget that only a newer version has gets that one)."""
    our_specs = our_specs or node_specs.OUR_NODES

    def spec_of(node):
        if node["type"] in our_specs:
            return our_specs[node["type"]]
        versions = template_specs.get(node["type"])
        if not versions:
            raise ValueError(f"node {node['id']}: {node['type']} is not in template_nodes.json (--template-spec-from)")
        n = len(node.get("widgets_values") or [])
        for spec in versions.values():
            if node_specs.widget_value_count(spec) == n:
                return spec
        counts = {v: node_specs.widget_value_count(s) for v, s in versions.items()}
        raise ValueError(f"node {node['id']} {node['type']}: {n} widget values, the schemas have {counts}")
    return spec_of


class _Ids:
    """New node and link ids of a template: above every id its graphs use (the front end counts them for the
    root and its subgraphs together)."""

    def __init__(self, wf):
        graphs = graphs_of(wf)
        self.last_node = max([wf.get("last_node_id", 0)] + [sg["state"]["lastNodeId"] for sg in graphs[1:]]
                             + [n["id"] for g in graphs for n in g["nodes"]])
        self.last_link = max([wf.get("last_link_id", 0)] + [sg["state"]["lastLinkId"] for sg in graphs[1:]]
                             + [lid for g in graphs for lid in graph_links(g)])

    def node(self):
        self.last_node += 1
        return self.last_node

    def link(self):
        self.last_link += 1
        return self.last_link

    def store(self, wf):
        wf["last_node_id"], wf["last_link_id"] = self.last_node, self.last_link
        for sg in graphs_of(wf)[1:]:
            sg["state"]["lastNodeId"], sg["state"]["lastLinkId"] = self.last_node, self.last_link


def _box(n):
    """A node's drawn box (x0, y0, x1, y1), title bar included."""
    (x, y), (w, h) = n["pos"], n["size"]
    return x, y - TITLE_H, x + w, y + h


def _group_box(group):
    gx, gy, gw, gh = group["bounding"]
    return gx, gy, gx + gw, gy + gh


def _inside(box, group):
    gx0, gy0, gx1, gy1 = _group_box(group)
    return gx0 <= box[0] and gy0 <= box[1] and box[2] <= gx1 and box[3] <= gy1


def _make_room(graph, x0, x1, y0, dy):
    """Moves down by dy what lies below y0 in the column [x0, x1], so a node that grew or a new one fits there.
    A group across y0 grows by dy and so moves what lies below it across its own width; a group that moves
    takes all it holds along (nodes and groups, wherever they are)."""
    groups = graph.get("groups", [])
    grown, moved, nodes = [], [], []

    def below(x0, x1, y0):
        for g in groups:
            gx0, gy0, gx1, gy1 = _group_box(g)
            if g in grown or g in moved or not (gx0 < x1 and gx1 > x0):
                continue
            if gy0 < y0 < gy1:
                grown.append(g)
                below(gx0, gx1, gy1)
            elif gy0 >= y0:
                moved.append(g)
        nodes.extend(n for n in graph["nodes"] if n not in nodes and _box(n)[1] >= y0 - 1 and _box(n)[0] < x1
                     and _box(n)[2] > x0)

    below(x0, x1, y0)
    more = True
    while more:  # what a moved group holds moves with it
        more = [g for g in groups if g not in moved and g not in grown and any(_inside(_group_box(g), m) for m in moved)]
        moved += more
    nodes += [n for n in graph["nodes"] if n not in nodes and any(_inside(_box(n), g) for g in moved)]
    for g in grown:
        g["bounding"][3] += dy
    for g in moved:
        g["bounding"][1] += dy
    for n in nodes:
        n["pos"] = [n["pos"][0], n["pos"][1] + dy]


def _socket_entries(spec):
    """A node's socket inputs as the UI form lists them (an optional one drawn hollow: shape 7), none linked."""
    return [{"name": s["name"], "type": s["type"], "link": None, **({"shape": 7} if s.get("optional") else {})}
            for s in node_specs.sockets(spec)]


def _our_properties(node, type_):
    """The template node's properties for a node of ours: the model download hints stay, the core package's
    id and version go."""
    props = {k: v for k, v in node.get("properties", {}).items() if k not in ("cnr_id", "ver")}
    props["Node name for S&R"] = type_
    return props


def _swap_loader(graph, node, specs):
    """UNETLoader -> DVD-Quant Loader in place: same id, position, mode, outputs and links; its model file (or
    the subgraph input feeding it) becomes the Loader's model_name; what lies below it moves down by what it
    grew."""
    unet = widget_map(specs["UNETLoader"], node["widgets_values"])
    loader = Graph(specs).add("DVDQuantLoader", node["pos"], **loader_settings(unet["unet_name"]))
    inputs = _socket_entries(loader.spec)
    for i in node.get("inputs", []):
        if i.get("link") is None:
            continue
        if i["name"] != "unet_name":
            raise ValueError(f"UNETLoader {node['id']}: its input {i['name']} is linked; DVD-Quant Loader has none such")
        inputs.append({"name": "model_name", "type": "COMBO", "widget": {"name": "model_name"}, "link": i["link"]})
        _set_link(graph, i["link"], target_slot=len(inputs) - 1)
    node.update(type="DVDQuantLoader", inputs=inputs, widgets_values=loader.widgets_values(),
                properties=_our_properties(node, "DVDQuantLoader"))
    for o in node["outputs"]:
        o.pop("localized_name", None)
    (old_w, old_h), (w, h) = node["size"], _size(loader)
    node["size"] = [max(old_w, w), max(old_h, h)]
    x, y = node["pos"]
    _make_room(graph, x, x + node["size"][0], y + old_h, node["size"][1] - old_h)


def _model_side(graph, loader):
    """The loader and the nodes its MODEL passes through before the Bit Switch Scheduler (MODEL_SIDE), each
    taking MODELs only from there; and the MODEL links that leave them."""
    nodes, links = {n["id"]: n for n in graph["nodes"]}, graph_links(graph)
    side, grew = {loader["id"]}, True
    while grew:
        grew = False
        for n in graph["nodes"]:
            ins = [i["link"] for i in n.get("inputs", []) if i["type"] == "MODEL" and i.get("link") is not None]
            if n["id"] not in side and n["type"] in MODEL_SIDE and ins and all(links[lid][1] in side for lid in ins):
                side.add(n["id"])
                grew = True
    exits = [link for link in links.values() if link[1] in side and link[3] not in side and link[5] == "MODEL"]
    return [nodes[i] for i in side], exits


def _insert_bit_switch(graph, loader, ids, specs):
    """A Bit Switch Scheduler on the MODEL that leaves the loader's side (after its LoRAs and switches), below
    the node it comes from, in that node's mode (a bypassed group's nodes stay bypassed together)."""
    side, exits = _model_side(graph, loader)
    sources = {(link[1], link[2]) for link in exits}
    if len(sources) != 1 or any(link[3] == SUBGRAPH_OUTPUT for link in exits):
        raise ValueError(f"loader {loader['id']}: its MODEL leaves {sorted(n['id'] for n in side)} through "
                         f"{sorted(sources)}: no single place for one Bit Switch Scheduler")
    ((src_id, src_slot),) = sources
    src = next(n for n in graph["nodes"] if n["id"] == src_id)
    x0, _, x1, y1 = _box(src)
    bits = Graph(specs).add("DVDQuantBitSwitch", (x0, y1 + GAP + TITLE_H), **bits_settings())
    size = _size(bits)
    _make_room(graph, x0, max(x1, x0 + size[0]), y1, size[1] + TITLE_H + GAP)
    node_id, link_id = ids.node(), ids.link()
    exit_ids = [link[0] for link in exits]
    graph["nodes"].append({
        "id": node_id, "type": "DVDQuantBitSwitch", "pos": list(bits.pos), "size": list(size), "flags": {},
        "order": src.get("order", 0), "mode": src.get("mode", MODE_ALWAYS),
        "inputs": [{"name": "model", "type": "MODEL", "link": link_id}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "links": exit_ids, "slot_index": 0}],
        "properties": {"Node name for S&R": "DVDQuantBitSwitch"}, "widgets_values": bits.widgets_values()})
    out = src["outputs"][src_slot]
    out["links"] = [link_id] + [lid for lid in out["links"] if lid not in exit_ids]
    for lid in exit_ids:
        _set_link(graph, lid, origin_id=node_id, origin_slot=0)
    _add_link(graph, link_id, src_id, src_slot, node_id, 0, "MODEL")


def dvdq_template(template_file, specs):
    """A template with every UNETLoader (the root's and the subgraphs') swapped for the DVD-Quant Loader and a
    Bit Switch Scheduler after the loader's LoRAs / switches; all else as the template has it."""
    wf = load_template(template_file)
    defs = subgraph_defs(wf)
    ids = _Ids(wf)
    swapped = {}  # subgraph id (or None: the root) -> ids of swapped loaders
    for graph in graphs_of(wf):
        for node in [n for n in graph["nodes"] if n["type"] == "UNETLoader"]:
            _swap_loader(graph, node, specs)
            _insert_bit_switch(graph, node, ids, specs)
            swapped.setdefault(graph.get("id") if graph is not wf else None, set()).add(str(node["id"]))
    if not swapped:
        raise ValueError(f"{template_file} has no UNETLoader")
    for graph in graphs_of(wf):  # widgets an instance shows from the loaders inside (newer front ends)
        for node in graph["nodes"]:
            proxies = node.get("properties", {}).get("proxyWidgets") if node["type"] in defs else None
            for p in proxies or []:
                if p[0] in swapped.get(node["type"], ()) and p[1] == "unet_name":
                    p[1] = "model_name"
    ids.store(wf)
    name = template_name(template_file)
    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dvd-quant/workflows/{name}"))
    wf.setdefault("extra", {})["dvdq"] = {"template": template_file, "template_package": TEMPLATE_PACKAGE,
                                          "template_version": TEMPLATE_VERSION}
    return wf


def write_template_spec(sources):
    """template_nodes.json from /object_info files, `VERSION=PATH` each: every node type the templates use (not
    ours), the schema of each version that has it, oldest version first as given."""
    infos = []
    for item in sources:
        version, _, path = item.partition("=")
        with open(path, encoding="utf-8") as f:
            infos.append((version, json.load(f)))
    types = sorted(set().union(*(template_node_types(load_template(t)) for t in TEMPLATES)) - set(node_specs.OUR_NODES))
    missing = [t for t in types if not any(t in info for _, info in infos)]
    if missing:
        raise SystemExit(f"no /object_info given has {missing}")
    out = {
        "about": "Schemas of the nodes of ComfyUI's workflow templates (make_workflows.py --template-spec-from), "
                 "per ComfyUI version that has the node. File-list inputs keep only their folder.",
        "template_package": f"{TEMPLATE_PACKAGE}=={TEMPLATE_VERSION}",
        "comfyui_versions": [v for v, _ in infos],
        "nodes": {t: {v: node_specs.spec_from_object_info(info[t]) for v, info in infos if t in info} for t in types},
    }
    with open(node_specs.TEMPLATE_SPEC_PATH, "w", encoding="utf-8") as f:
        f.write(_dump(out))


def render_all(specs=None):
    """{relative path: JSON text} of every workflow, UI and API format."""
    specs = specs or node_specs.all_specs()
    files = {}
    for name, build in WORKFLOWS.items():
        g = build(specs)
        files[f"{name}.json"] = _dump(g.ui())
        files[os.path.join("api", f"{name}.json")] = _dump(g.api())
    spec_of = template_spec_of(node_specs.load_template_specs())
    for template_file in TEMPLATES:
        wf = dvdq_template(template_file, specs)
        files[f"{template_name(template_file)}.json"] = _dump(wf)
        files[os.path.join("api", f"{template_name(template_file)}.json")] = _dump(ui_to_api(wf, spec_of))
    return files


def _dump(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_core_spec(object_info_path, types, version):
    with open(object_info_path, encoding="utf-8") as f:
        info = json.load(f)
    missing = [t for t in types if t not in info]
    if missing:
        raise SystemExit(f"{object_info_path} has no node {missing}: is it ComfyUI's /object_info?")
    out = {
        "about": "ComfyUI core node schemas used by the example workflows, from a running ComfyUI's "
                 "/object_info (make_workflows.py --core-spec-from). File-list inputs keep only their folder.",
        "comfyui_version": version,
        "nodes": {t: node_specs.spec_from_object_info(info[t]) for t in sorted(types)},
    }
    with open(node_specs.CORE_SPEC_PATH, "w", encoding="utf-8") as f:
        f.write(_dump(out))


# Core node types the workflows use (and the tiny test graphs: SaveLatent, ConditioningZeroOut).
CORE_TYPES = [
    "BasicGuider", "BasicScheduler", "CLIPLoader", "CLIPTextEncode", "CLIPVisionEncode", "CLIPVisionLoader",
    "DualCLIPLoader", "EmptyHunyuanLatentVideo", "FluxGuidance", "HunyuanImageToVideo", "KSampler",
    "KSamplerAdvanced", "KSamplerSelect", "LoadImage", "ModelSamplingSD3", "RandomNoise", "SamplerCustomAdvanced",
    "SaveAnimatedWEBP", "SaveLatent", "TextEncodeHunyuanVideo_ImageToVideo", "UNETLoader", "VAEDecode",
    "VAEDecodeTiled", "VAELoader", "ConditioningZeroOut",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a written workflow is out of date")
    ap.add_argument("--core-spec-from", metavar="OBJECT_INFO_JSON",
                    help="rewrite core_nodes.json from ComfyUI's /object_info saved to a file")
    ap.add_argument("--comfyui-version", default="unknown", help="the version that served /object_info")
    ap.add_argument("--template-spec-from", metavar="VERSION=OBJECT_INFO_JSON", action="append",
                    help="rewrite template_nodes.json from ComfyUI's /object_info of each version (oldest first)")
    args = ap.parse_args(argv)
    if args.core_spec_from:
        write_core_spec(args.core_spec_from, CORE_TYPES, args.comfyui_version)
        print(f"wrote {node_specs.CORE_SPEC_PATH}")
    if args.template_spec_from:
        write_template_spec(args.template_spec_from)
        print(f"wrote {node_specs.TEMPLATE_SPEC_PATH}")
    stale = []
    for rel, text in render_all().items():
        path = os.path.join(HERE, rel)
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old == text:
            continue
        stale.append(rel)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if args.check and stale:
        print("out of date (run python workflows/make_workflows.py):", ", ".join(stale))
        return 1
    print("up to date" if not stale else "wrote " + ", ".join(stale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
