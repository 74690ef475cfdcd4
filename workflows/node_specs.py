"""Node schemas the example workflows are built from and checked against.

A spec is what the front end needs to lay out a node: its inputs in ComfyUI's order (sockets and
widgets), whether a widget gets ComfyUI's extra "control after generate" value, and its outputs.

- Our nodes: read from the pack's own node classes (nodes/definitions.py), as ComfyUI's `/object_info`
  would give them (`our_node_specs`), so the workflows follow the nodes as they are.
- ComfyUI core nodes: `core_nodes.json`, extracted from a running ComfyUI's `/object_info`
  (`python workflows/make_workflows.py --core-spec-from object_info.json`), so the types,
  widget counts and limits are the host's own, not retyped.
"""
import importlib
import importlib.util
import json
import os
import sys

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


def _pack_definitions():
    """The pack's nodes/definitions.py, imported as ComfyUI imports the pack: the repository as a package
    (its modules import each other relatively; nothing goes on sys.path)."""
    name = "dvdq_workflow_pack"
    if name not in sys.modules:
        root = os.path.dirname(HERE)
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(name + ".nodes.definitions")


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
