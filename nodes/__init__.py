"""ComfyUI nodes of DVD-Quant: a thin layer over dvdq_core (the nodes: docs/nodes.md)."""
from .definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def _setup_host():
    """Inside ComfyUI: register the models/dvdq folder and guard LoRA loading on quantized models."""
    try:
        import folder_paths  # noqa: F401  (only present inside ComfyUI)
    except ImportError:
        return
    from . import host
    host.register_folder()
    host.install_lora_guard()


_setup_host()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
