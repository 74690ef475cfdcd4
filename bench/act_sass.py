"""sm_90 SASS of the activation kernels, compiled on a CPU machine (no GPU needed): instruction counts
of the whole kernel and of its hot loop (the longest span from a backward branch's target to the
branch), at the Wan 14B width K = 5120, hb = sb = 128 (C = 128, bf16) with the launch settings of kernels/configs.py.
(The counts in the commit that made the quantizer one-multiply were taken at BM = 32 rows.)

usage: python bench/act_sass.py [--dump DIR]   (DIR: also write each kernel's SASS and TTGIR there)
"""
import argparse
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_targets import compile_sass  # noqa: E402  (bench/compile_targets.py)
from dvdq_core.kernels import _triton as kt, configs  # noqa: E402

K, SB, C, R, TG = 5120, 128, 128, 128, 128
BM, WARPS, STAGES = configs.ACT_ELEMS_PER_TILE // C, configs.ACT_NUM_WARPS, configs.ACT_NUM_STAGES
INSN = re.compile(r"/\*([0-9a-f]{4})\*/\s+([^;]*);")


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
            ck, sass, _ = compile_sass(fn, {**types, **t2}, {**consts, **c2, "AUTO_SCALE": auto}, 90, WARPS, STAGES)
            ttgir = ck.asm["ttgir"]
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
