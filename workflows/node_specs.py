"""Node schemas the example workflows are built from and checked against.

A spec is what the front end needs to lay out a node: its inputs in ComfyUI's order (sockets and
widgets), whether a widget gets ComfyUI's extra "control after generate" value, and its outputs.

- Our nodes: read from the pack's own node classes (nodes/definitions.py), as ComfyUI's `/object_info`
  would give them (`our_node_specs`), so the workflows follow the nodes as they are.
- ComfyUI core nodes: `specs/core_nodes.json`, extracted from a running ComfyUI's `/object_info`
  (`python workflows/make_workflows.py --core-spec-from object_info.json`), so the types,
  widget counts and limits are the host's own, not retyped.
- The nodes of ComfyUI's official workflow templates: `specs/template_nodes.json`, the schemas of each ComfyUI
  version the host tests run (`--template-spec-from VERSION=object_info.json`, one per version): a template
  node's widget values were saved against one of them, and the generator picks the one they fit.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# in a folder of their own: ComfyUI lists a pack's workflows/*.json in its template browser
CORE_SPEC_PATH = os.path.join(HERE, "specs", "core_nodes.json")
TEMPLATE_SPEC_PATH = os.path.join(HERE, "specs", "template_nodes.json")

# Types the front end draws as a widget rather than a socket.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# COMBO inputs whose options are the files of a model folder (empty on a server without models),
# by input name, and where one node's input of that name reads another folder.
FILE_INPUTS = {
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "vae_name": "vae",
    "model_name": "diffusion_models",
    "lora_name": "loras",
}
NODE_FILE_INPUTS = {("CLIPVisionLoader", "clip_name"): "clip_vision", ("LoadImage", "image"): "input",
                    ("LatentUpscaleModelLoader", "model_name"): "latent_upscale_models"}
# ComfyUI's V3 schema types of inputs whose form depends on the graph: a combo whose options carry inputs of
# their own (drawn as a combo widget), a socket taking any type (its type follows what is linked), a socket
# that grows by one named input per link (`values.a`, `values.b`, ...)
DYNAMIC_COMBO, MATCH_TYPE, AUTOGROW = "COMFY_DYNAMICCOMBO_V3", "COMFY_MATCHTYPE_V3", "COMFY_AUTOGROW_V3"


def file_folder(node_type: str, name: str) -> str | None:
    """The folder whose files a node's COMBO input lists, or None for a fixed list of choices."""
    return NODE_FILE_INPUTS.get((node_type, name)) or FILE_INPUTS.get(name)



def spec_from_object_info(info):
    """One node's spec from its `/object_info` entry (V1 and V3 nodes alike). Hidden inputs (kept by V3
    nodes for older prompts, never drawn) are left out; a dynamic combo is read as a combo of its option
    keys (the inputs an option brings are not followed), a match-type input as a socket of type `*`."""
    inputs = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            raw = info["input"][section][name]
            type_, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            if opts.get("hidden"):
                continue
            d = {"name": name}
            if type_ == MATCH_TYPE:
                type_ = "*"
            if isinstance(type_, list) or type_ in ("COMBO", DYNAMIC_COMBO):
                d["type"] = "COMBO"
                options = type_ if isinstance(type_, list) else opts.get("options", [])
                options = [o["key"] if isinstance(o, dict) else o for o in options]
                folder = file_folder(info.get("name", ""), name)
                if folder:
                    d["files"] = folder
                else:
                    d["options"] = list(options)
            elif type_ == AUTOGROW:  # sockets `name.a`, `name.b`, ... of the template's type
                tmpl = opts.get("template", {})
                item = next(iter(tmpl.get("input", {}).get("required", {}).values()), ["*"])
                d["type"] = item[0]
                d["autogrow"] = [f"{name}.{n}" for n in tmpl.get("names", [])]
            else:
                d["type"] = type_
            d["widget"] = d["type"] in WIDGET_TYPES and "autogrow" not in d
            for key in ("default", "min", "max"):
                if key in opts and d["widget"]:
                    d[key] = opts[key]
            if opts.get("control_after_generate"):
                d["control_after_generate"] = True
            if opts.get("image_upload"):  # the front end adds an upload button whose value is "image"
                d["upload"] = "image"
            if section == "optional":
                d["optional"] = True
            inputs.append(d)
    outputs = [{"name": n, "type": "*" if t == MATCH_TYPE else t}
               for n, t in zip(info.get("output_name", info["output"]), info["output"])]
    return {
        "display_name": info.get("display_name") or info.get("name"),
        "inputs": inputs,
        "outputs": outputs,
        "output_node": bool(info.get("output_node")),
    }


def _pack_definitions():
    """The pack's nodes/definitions.py, imported as ComfyUI imports the pack (tests/pack.py, the one loader:
    the repository as a package whose modules import each other relatively)."""
    root = os.path.dirname(HERE)
    for path in (root, os.path.join(root, "tests")):
        if path not in sys.path:
            sys.path.append(path)
    import pack
    return pack.sub("definitions")


def our_node_specs():
    """The specs of the pack's nodes, from their classes through the same reading as `/object_info`'s."""
    defs = _pack_definitions()
    specs = {}
    for cid, cls in defs.NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        sections = ("required", "optional")
        specs[cid] = spec_from_object_info({
            "name": cid, "display_name": defs.NODE_DISPLAY_NAME_MAPPINGS[cid],
            "input": {s: types.get(s, {}) for s in sections}, "input_order": {s: list(types.get(s, {})) for s in sections},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))})
    return specs


def load_core_specs():
    with open(CORE_SPEC_PATH, encoding="utf-8") as f:
        return json.load(f)["nodes"]


def load_template_specs():
    """{node type: {ComfyUI version: spec}} of the template nodes (template_nodes.json), oldest version first."""
    with open(TEMPLATE_SPEC_PATH, encoding="utf-8") as f:
        return json.load(f)["nodes"]


def all_specs():
    specs = dict(load_core_specs())
    specs.update(OUR_NODES)
    return specs


OUR_NODES = our_node_specs()


def sockets(spec):
    """The socket inputs (drawn as connectable slots), in slot order."""
    return [i for i in spec["inputs"] if not i["widget"]]


def widgets(spec):
    """The widget inputs, in `widgets_values` order, without the control values."""
    return [i for i in spec["inputs"] if i["widget"]]


def has_control(w):
    """Whether the front end adds a "control after generate" widget (and value) after this one:
    INTs flagged so, and, as ComfyUI's front end still does for old nodes, INTs named seed/noise_seed."""
    return w.get("type") == "INT" and bool(w.get("control_after_generate") or w["name"] in ("seed", "noise_seed"))


def upload_value(w):
    """The value of the upload button the front end adds after this widget (LoadImage: "image"), or None."""
    return w.get("upload")


def widget_value_count(spec):
    """Length of a node's `widgets_values`: one per widget, plus one after each seed-like INT and each
    widget with an upload button."""
    return sum(1 + has_control(w) + (upload_value(w) is not None) for w in widgets(spec))
