"""Writes the example workflows, UI format (drag and drop) in workflows/ and API format (POST
/prompt, scripting) in workflows/api/, from one description per workflow so both stay the same.

    python workflows/make_workflows.py            # rewrite every workflow
    python workflows/make_workflows.py --check    # exit 1 if a written file differs
    python workflows/make_workflows.py --core-spec-from object_info.json
        # refresh core_nodes.json from a running ComfyUI's /object_info (saved to a file)

Model file names are those of ComfyUI's official Wan and HunyuanVideo examples.
"""
import argparse
import json
import os
import re
import sys

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
            inputs = []
            for s in node_specs.sockets(n.spec):
                d = {"name": s["name"], "type": s["type"], "link": n.inputs.get(s["name"], (None,))[0]}
                if s.get("optional"):
                    d["shape"] = 7  # drawn hollow: optional
                inputs.append(d)
            outputs = []
            for i, o in enumerate(n.spec["outputs"]):
                outputs.append({"name": o["name"], "type": o["type"], "links": n.out_links.get(i, []), "slot_index": i})
            values = []
            for w in node_specs.widgets(n.spec):
                values.append(n.values[w["name"]])
                if node_specs.has_control(w):
                    values.append(n.controls.get(w["name"], "fixed"))
                if node_specs.upload_value(w) is not None:
                    values.append(node_specs.upload_value(w))
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
                "widgets_values": values,
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
        self.check_complete()
        out = {}
        for n in self.nodes:
            inputs = {}
            for i in n.spec["inputs"]:
                if i["widget"]:
                    inputs[i["name"]] = n.values[i["name"]]
                elif i["name"] in n.inputs:
                    _, src, slot = n.inputs[i["name"]]
                    inputs[i["name"]] = [str(src.id), slot]
            title = n.title or n.spec.get("display_name", n.type)
            out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": title}}
        return out


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

def _dvdq_model(g, model_file, pos, *, arq=None, title=None, high=8):
    """DVD-Quant Loader -> Bit Switch Scheduler, the part that replaces a plain UNETLoader."""
    x, y = pos
    loader = g.add("DVDQuantLoader", (x, y), title=title, model_name=model_file, w_bits=4, a_low=4,
                   a_high=high, method="dvdq", save_quantized_copy=False)
    if arq is not None:
        g.link(arq["ARQ_SETTINGS"], loader, "arq_settings")
    bits = g.add("DVDQuantBitSwitch", (x, y + 290), mode="delta", delta=0.09, low=4, high=high,
                 fixed_bits=8, schedule="", final_step_high=True)
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


def render_all(specs=None):
    """{relative path: JSON text} of every workflow, UI and API format."""
    specs = specs or node_specs.all_specs()
    files = {}
    for name, build in WORKFLOWS.items():
        g = build(specs)
        files[f"{name}.json"] = _dump(g.ui())
        files[os.path.join("api", f"{name}.json")] = _dump(g.api())
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
    args = ap.parse_args(argv)
    if args.core_spec_from:
        write_core_spec(args.core_spec_from, CORE_TYPES, args.comfyui_version)
        print(f"wrote {node_specs.CORE_SPEC_PATH}")
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
