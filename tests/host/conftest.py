"""Host tests: a real ComfyUI with the pack installed. Skipped unless COMFYUI_PATH names one or more ComfyUI
source trees (separated by os.pathsep, e.g. `/src/comfy-0.3.64:/src/comfy-0.33.0`); every test runs against
each of them in turn (docs/host-tests.md)."""
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NEEDED = ("aiohttp", "yaml", "torchsde", "transformers", "safetensors", "einops", "PIL", "scipy", "sqlalchemy",
          "alembic", "av", "comfyui_frontend_package", "torchvision")
HOSTS = [p for p in os.environ.get("COMFYUI_PATH", "").split(os.pathsep) if p]


def host_python(path: str) -> str:
    """The Python of a ComfyUI tree: its own virtual environment (`.venv` or `venv` inside it) if it has one,
    else the one running pytest (which then needs ComfyUI's requirements)."""
    for venv in (".venv", "venv"):
        py = os.path.join(path, venv, "bin", "python")
        if os.path.isfile(py):
            return py
    return sys.executable


def host_version(path: str) -> str:
    try:
        with open(os.path.join(path, "comfyui_version.py")) as f:
            return f.read().split('"')[1]
    except (OSError, IndexError):
        return os.path.basename(os.path.normpath(path))


def skip_reason():
    if not HOSTS:
        return "host tests need a ComfyUI source tree: set COMFYUI_PATH (see docs/host-tests.md)"
    for path in HOSTS:
        if not os.path.isfile(os.path.join(path, "main.py")) or not os.path.isdir(os.path.join(path, "comfy")):
            return f"COMFYUI_PATH entry {path} is not a ComfyUI source tree (no main.py / comfy/)"
        if host_python(path) == sys.executable:
            missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
            if missing:
                return (f"ComfyUI's requirements are not installed in this Python ({sys.executable}): missing "
                        f"{', '.join(missing)}; run pip install -r {path}/requirements.txt, or give that "
                        "ComfyUI tree a virtual environment of its own (.venv or venv inside it)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    if reason:
        for item in items:
            if str(item.fspath).startswith(HERE):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", params=HOSTS or [None], ids=[host_version(p) for p in HOSTS] or ["no-host"])
def comfy(request):
    """One ComfyUI host: its source tree, its Python and version; the environment its scripts run in."""
    path = request.param
    return SimpleNamespace(path=path, python=host_python(path), version=host_version(path),
                           env=dict(os.environ, PYTHONPATH=path))


@pytest.fixture(scope="session")
def host_dir(comfy, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy_host"))
    nodes = os.path.join(base, "custom_nodes")
    os.makedirs(nodes)
    os.symlink(REPO, os.path.join(nodes, "ComfyUI-DVD-Quant"))
    os.symlink(os.path.join(HERE, "fixtures", "dvdq_test_nodes"), os.path.join(nodes, "dvdq_test_nodes"))
    for d in ("models/dvdq", "output", "input", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    subprocess.run([comfy.python, os.path.join(HERE, "make_models.py"), os.path.join(base, "models")],
                   check=True, env=comfy.env, cwd=base)
    with open(os.path.join(base, "extra_model_paths.yaml"), "w") as f:
        f.write("dvdq_host_tests:\n"
                f"  base_path: {base}\n"
                "  custom_nodes: custom_nodes\n"
                "  diffusion_models: models/diffusion_models\n"
                "  loras: models/loras\n"
                "  dvdq: models/dvdq\n")
    return base


@pytest.fixture(scope="session")
def server(comfy, host_dir):
    sys.path.insert(0, HERE)
    from comfy_server import ComfyServer
    s = ComfyServer(comfy.path, host_dir, python=comfy.python)
    yield s
    s.stop()
