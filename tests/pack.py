"""The repository imported the way ComfyUI imports a custom-node folder (a package named after it).

The tests also import the core as the top-level `dvdq_core`; the pack's own `..dvdq_core` is made the
same module objects, so a model quantized by one is the other's (one QuantLinear class, one registry).
"""
import importlib
import importlib.util
import os
import pkgutil
import sys

import dvdq_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "ComfyUI-DVD-Quant"  # ComfyUI imports the pack under its folder name


def load_pack():
    if PACK not in sys.modules:
        for info in pkgutil.walk_packages(dvdq_core.__path__, "dvdq_core."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
        for name, mod in list(sys.modules.items()):
            if name == "dvdq_core" or name.startswith("dvdq_core."):
                sys.modules[f"{PACK}.{name}"] = mod
        spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return sys.modules[PACK]


def sub(name):
    """The pack's nodes.<name> module."""
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.{name}")
