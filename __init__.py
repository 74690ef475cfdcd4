"""ComfyUI entry point of the DVD-Quant node pack.

ComfyUI imports this folder as a package; everything inside imports relatively (`nodes` ->
`..dvdq_core`), so the pack never puts its folder on sys.path and cannot shadow another module.
"""
WEB_DIRECTORY = "./web"

if not __package__:
    # Imported as a plain file, not as ComfyUI's pack (pytest collecting the repository root).
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:  # no fallback: a broken import must show as "(IMPORT FAILED)" in ComfyUI's log
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
