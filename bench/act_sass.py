"""sm_90 SASS of the activation kernels, compiled on a CPU machine (no GPU needed): instruction counts
of the whole kernel and of its hot loop (the longest span from a backward branch's target to the
branch), at the Wan 14B width K = 5120, hb = sb = 128 (C = 128, BM = 32, 4 warps, 3 stages), bf16.

usage: python bench/act_sass.py [--dump DIR]   (DIR: also write each kernel's SASS and TTGIR there)
"""
import argparse
import collections
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kernels import _triton as kt  # noqa: E402

CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
K, SB, C, R, TG, BM, WARPS, STAGES = 5120, 128, 128, 128, 128, 32, 4, 3
INSN = re.compile(r"/\*([0-9a-f]{4})\*/\s+([^;]*);")


def compile_sass(fn, types, consts):
    """types: run-time argument -> Triton type; consts: constexpr argument -> value. Pointers and
    stride_xm (5120 at the real launch) get divisibility 16, as Triton's specialization gives them."""
    names = list(fn.arg_names)
    sig = {n: types.get(n, "constexpr") for n in names}
    assert set(names) == set(types) | set(consts), set(names) ^ (set(types) | set(consts))
    div16 = [i for i, n in enumerate(names) if sig[n].startswith("*") or n == "stride_xm"]
    src = ASTSource(fn, sig, constexprs={(names.index(c),): v for c, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS, "num_stages": STAGES})
    path = "/tmp/_act_sass.cubin"
    with open(path, "wb") as f:
        f.write(ck.asm["cubin"])
    return ck.asm["ttgir"], subprocess.run([CUOBJ, "-sass", path], capture_output=True, text=True, check=True).stdout


def opcode(text):
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def stats(sass):
    insns = [(int(a, 16), t.strip()) for a, t in INSN.findall(sass)]
    insns = [(a, t) for a, t in insns if opcode(t) != "NOP"]
    loop = []
    for a, t in insns:
        if opcode(t) == "BRA":
            m = re.search(r"0x([0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                body = [x for x in insns if int(m.group(1), 16) <= x[0] <= a]
                if len(body) > len(loop):
                    loop = body
    return len(insns), len(loop), collections.Counter(opcode(t) for _, t in loop)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dump")
    a = p.parse_args()
    types = {"x_ptr": "*bf16", "r_ptr": "*bf16", "rscale": "fp32", "rowmax_ptr": "*fp32", "l_ptr": "*fp32",
             "M": "i32", "stride_xm": "i32"}
    consts = {"K": K, "NT": K // TG, "SB": SB, "TG": TG, "C": C, "R": R, "BM": BM, "INTERPRET": False}
    for auto in (True, False):
        for name, fn, t2, c2 in [
            ("absmax", kt._absmax_kernel, {}, {}),
            ("quantize", kt._quantize_kernel, {"q_ptr": "*i8", "s_ptr": "*fp32", "qmax": "fp32"}, {"TB": 64}),
        ]:
            ttgir, sass = compile_sass(fn, {**types, **t2}, {**consts, **c2, "AUTO_SCALE": auto})
            total, loop, ops = stats(sass)
            top = ", ".join(f"{k}={v}" for k, v in ops.most_common(14))
            print(f"{name:8s} auto_scale={auto!s:5s} kernel={total:4d} loop={loop:4d}  loop: {top}", flush=True)
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                for ext, text in (("sass", sass), ("ttgir", ttgir)):
                    with open(os.path.join(a.dump, f"{name}_auto{int(auto)}.{ext}"), "w") as f:
                        f.write(text)


if __name__ == "__main__":
    main()
