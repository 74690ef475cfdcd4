"""Host tests: a real ComfyUI with the pack installed. Skipped unless COMFYUI_PATH points to a ComfyUI
source tree whose requirements are installed in the Python running pytest (docs/host-tests.md)."""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NEEDED = ("aiohttp", "yaml", "torchsde", "transformers", "safetensors", "einops", "PIL", "scipy", "sqlalchemy",
          "alembic", "av", "comfyui_frontend_package", "torchvision")


def skip_reason():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "host tests need a ComfyUI source tree: set COMFYUI_PATH (see docs/host-tests.md)"
    if not os.path.isfile(os.path.join(path, "main.py")) or not os.path.isdir(os.path.join(path, "comfy")):
        return f"COMFYUI_PATH={path} is not a ComfyUI source tree (no main.py / comfy/)"
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        return (f"ComfyUI's requirements are not installed in this Python ({sys.executable}): missing "
                f"{', '.join(missing)}; run pip install -r $COMFYUI_PATH/requirements.txt")
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    if reason:
        for item in items:
            if str(item.fspath).startswith(HERE):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def host_dir(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy_host"))
    nodes = os.path.join(base, "custom_nodes")
    os.makedirs(nodes)
    os.symlink(REPO, os.path.join(nodes, "ComfyUI-DVD-Quant"))
    os.symlink(os.path.join(HERE, "fixtures", "dvdq_test_nodes"), os.path.join(nodes, "dvdq_test_nodes"))
    for d in ("models/dvdq", "output", "input", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.environ["COMFYUI_PATH"])
    subprocess.run([sys.executable, os.path.join(HERE, "make_models.py"), os.path.join(base, "models")],
                   check=True, env=env, cwd=base)
    with open(os.path.join(base, "extra_model_paths.yaml"), "w") as f:
        f.write("dvdq_host_tests:\n"
                f"  base_path: {base}\n"
                "  custom_nodes: custom_nodes\n"
                "  diffusion_models: models/diffusion_models\n"
                "  loras: models/loras\n"
                "  dvdq: models/dvdq\n")
    return base


@pytest.fixture(scope="session")
def server(host_dir):
    sys.path.insert(0, HERE)
    from comfy_server import ComfyServer
    s = ComfyServer(os.environ["COMFYUI_PATH"], host_dir)
    yield s
    s.stop()
