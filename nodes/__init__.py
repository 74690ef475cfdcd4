"""ComfyUI nodes of DVD-Quant: a thin layer over dvdq_core (the nodes: docs/nodes.md)."""
from .definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def _setup_host():
    """Inside ComfyUI: register the models/dvdq folder (nothing else of the host changes at import)."""
    try:
        import folder_paths  # noqa: F401  (only present inside ComfyUI)
    except ImportError:
        return
    from . import host
    host.register_folder()


_setup_host()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
