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

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as exc:  # only while the nodes are being written; never hides a broken pack
    # also when imported as a plain module (pytest imports the repository's __init__.py, which has
    # no parent package when the checkout's folder name is not a Python identifier)
    if "nodes" not in str(exc) and "no known parent package" not in str(exc):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
