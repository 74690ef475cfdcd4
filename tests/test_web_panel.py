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
