"""ComfyUI entry point of the DVD-Quant node pack.

ComfyUI imports this folder as a package. The core (`dvdq_core`) is a plain top-level package, so
the pack folder goes on sys.path first; our `nodes` package is imported relatively because ComfyUI
has a top-level module of that name.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

WEB_DIRECTORY = "./web"

if not __package__:
    # Imported as a plain file, not as ComfyUI's pack (pytest collecting the repository root).
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:  # no fallback: a broken import must show as "(IMPORT FAILED)" in ComfyUI's log
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
