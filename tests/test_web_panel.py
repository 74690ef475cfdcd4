"""Runs the web panel's JavaScript unit tests (web/tests/*.test.mjs) with Node's test runner.

Node is part of the CI machine, so a missing `node` is a failure with a clear message, not a skip.
"""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_web_panel_js_unit_tests():
    node = shutil.which("node")
    assert node, (
        "`node` (Node.js >= 18) is not on PATH: the web panel's unit tests need it. "
        "Install Node.js (e.g. `apt-get install nodejs`) and run the tests again."
    )
    tests_dir = os.path.join("web", "tests")
    proc = subprocess.run(
        [node, "--test", tests_dir], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"node --test {tests_dir} failed:\n{out[-4000:]}"
    # Guard against a runner that found no test file (it would still exit 0).
    assert "# pass 0" not in out and "# tests 0" not in out, f"node --test ran no tests:\n{out[-2000:]}"


def test_browser_check_scripts_are_well_formed():
    """The browser check (tests/browser/, run by hand against a real ComfyUI) at least parses, its
    test-only nodes compile and its tiny workflows build, so that CI notices when they rot."""
    import importlib.util
    import json

    node = shutil.which("node")
    assert node, "`node` (Node.js >= 18) is not on PATH"
    mjs = os.path.join(ROOT, "tests", "browser", "web_panel_check.mjs")
    proc = subprocess.run([node, "--check", mjs], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    spec = importlib.util.spec_from_file_location(
        "web_panel_check", os.path.join(ROOT, "tests", "browser", "web_panel_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    compile(check.TEST_NODES, "dvdq_web_check_nodes/__init__.py", "exec")
    for wf in (check.tiny_workflow(0.2), check.tiny_split_workflow(0.2)):
        types = [n["type"] for n in json.loads(json.dumps(wf))["nodes"]]
        assert types.count("DVDQuantBitSwitch") >= 1 and "KSampler" in "".join(types), types
    assert "DVDQWebCheckSlow" in [n["type"] for n in check.tiny_workflow(0.2)["nodes"]]
