"""Node schemas the example workflows are built from and checked against.

A spec is what the front end needs to lay out a node: its inputs in ComfyUI's order (sockets and
widgets), whether a widget gets ComfyUI's extra "control after generate" value, and its outputs.

- Our nodes: written here from the pack's node contract (widget order = `widgets_values` order).
- ComfyUI core nodes: `core_nodes.json`, extracted from a running ComfyUI's `/object_info`
  (`python workflows/make_workflows.py --core-spec-from object_info.json`), so the types,
  widget counts and limits are the host's own, not retyped.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CORE_SPEC_PATH = os.path.join(HERE, "core_nodes.json")

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
}
NODE_FILE_INPUTS = {("CLIPVisionLoader", "clip_name"): "clip_vision", ("LoadImage", "image"): "input"}


def file_folder(node_type: str, name: str) -> str | None:
    """The folder whose files a node's COMBO input lists, or None for a fixed list of choices."""
    return NODE_FILE_INPUTS.get((node_type, name)) or FILE_INPUTS.get(name)


def _inp(name, type_, *, widget=None, optional=False, **limits):
    d = {"name": name, "type": type_, "widget": type_ in WIDGET_TYPES if widget is None else widget}
    if optional:
        d["optional"] = True
    d.update(limits)
    return d


_BITS = dict(min=2, max=8)
_A_BITS = dict(min=4, max=16)
_METHODS = ["dvdq", "minmax", "smoothquant", "quarot"]
_BLOCKS = ["64", "128", "256"]

# Our nodes, in the contract's order. `a_high` also accepts 16 (full precision), so its range is
# 4..16 for the checks; the node itself refuses 9..15.
OUR_NODES = {
    "DVDQuantLoader": {
        "display_name": "DVD-Quant Loader",
        "inputs": [
            _inp("model_name", "COMBO", files="diffusion_models"),
            _inp("w_bits", "INT", default=4, **_BITS),
            _inp("a_low", "INT", default=4, min=4, max=8),
            _inp("a_high", "INT", default=8, **_A_BITS),
            _inp("method", "COMBO", options=_METHODS, default="dvdq"),
            _inp("save_quantized_copy", "BOOLEAN", default=False),
            _inp("arq_settings", "ARQ_SETTINGS", optional=True),
        ],
        "outputs": [{"name": "MODEL", "type": "MODEL"}],
        "output_node": False,
    },
    "DVDQuantApply": {
        "display_name": "DVD-Quant Apply",
        "inputs": [
            _inp("model", "MODEL"),
            _inp("w_bits", "INT", default=4, **_BITS),
            _inp("a_low", "INT", default=4, min=4, max=8),
            _inp("a_high", "INT", default=8, **_A_BITS),
            _inp("method", "COMBO", options=_METHODS, default="dvdq"),
            _inp("arq_settings", "ARQ_SETTINGS", optional=True),
        ],
        "outputs": [{"name": "MODEL", "type": "MODEL"}],
        "output_node": False,
    },
    "DVDQuantARQSettings": {
        "display_name": "ARQ Settings",
        "inputs": [
            _inp("rotate", "BOOLEAN", default=True),
            _inp("had_block", "COMBO", options=_BLOCKS, default="128"),
            _inp("auto_scale", "BOOLEAN", default=True),
            _inp("granularity", "COMBO", options=["block", "pow2", "pow2-fast", "channel"], default="pow2"),
            _inp("scale_block", "COMBO", options=_BLOCKS, default="128"),
            _inp("layer_overrides", "STRING", default=""),
        ],
        "outputs": [{"name": "ARQ_SETTINGS", "type": "ARQ_SETTINGS"}],
        "output_node": False,
    },
    "DVDQuantBitSwitch": {
        "display_name": "Bit Switch Scheduler",
        "inputs": [
            _inp("model", "MODEL"),
            _inp("mode", "COMBO", options=["delta", "fixed", "manual"], default="delta"),
            _inp("delta", "FLOAT", default=0.09, min=0.0, max=10.0),
            _inp("low", "INT", default=4, min=4, max=16),
            _inp("high", "INT", default=8, min=4, max=16),
            _inp("fixed_bits", "INT", default=8, min=4, max=16),
            _inp("schedule", "STRING", default=""),
        ],
        "outputs": [{"name": "MODEL", "type": "MODEL"}],
        "output_node": False,
    },
    "DVDQuantSave": {
        "display_name": "DVD-Quant Save",
        "inputs": [
            _inp("model", "MODEL"),
            _inp("filename_prefix", "STRING", default="dvdq/model"),
        ],
        "outputs": [],
        "output_node": True,
    },
}


def spec_from_object_info(info):
    """One node's spec from its `/object_info` entry (V1 and V3 nodes alike)."""
    inputs = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            raw = info["input"][section][name]
            type_, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            d = {"name": name}
            if isinstance(type_, list) or type_ == "COMBO":
                d["type"] = "COMBO"
                options = type_ if isinstance(type_, list) else opts.get("options", [])
                folder = file_folder(info.get("name", ""), name)
                if folder:
                    d["files"] = folder
                else:
                    d["options"] = list(options)
            else:
                d["type"] = type_
            d["widget"] = d["type"] in WIDGET_TYPES
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
    outputs = [{"name": n, "type": t} for n, t in zip(info.get("output_name", info["output"]), info["output"])]
    return {
        "display_name": info.get("display_name") or info.get("name"),
        "inputs": inputs,
        "outputs": outputs,
        "output_node": bool(info.get("output_node")),
    }


def load_core_specs():
    with open(CORE_SPEC_PATH, encoding="utf-8") as f:
        return json.load(f)["nodes"]


def all_specs():
    specs = dict(load_core_specs())
    specs.update(OUR_NODES)
    return specs


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
