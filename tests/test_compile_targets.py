"""The shipped kernels compile for every target the triton backend accepts (sm_80/86/89/90/100/120), with
the configurations configs.py picks: no register spills, shared memory within each target's limit,
tensor-core instructions of the expected kind. CPU only (Triton's bundled ptxas and cuobjdump);
run in a subprocess because this test session may use Triton's interpreter."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_all_targets():
    # each target compiled as itself (an override would make Triton lower every target for one arch)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_OVERRIDE_ARCH")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_targets.py"), "--check"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for cc in (80, 86, 89, 90, 100, 120):
        assert f"sm_{cc}" in r.stdout
        assert re.search(rf"sm_{cc}\s+attention q8 16-bit P.V", r.stdout), r.stdout[-3000:]  # the 8-bit attention
    assert re.search(r"sm_90\s+attention q8 fp8 P.V", r.stdout)
    assert re.search(r"sm_90\s+attention q8 fp8 P.V \(Gluon\) D128", r.stdout)  # the opt-in Gluon kernel
    assert re.search(r"sm_90\s+attention q8 fp8 P.V \(Gluon\) D64", r.stdout)
