"""Compile the shipped kernels for every GPU target the triton backend claims (sm_80, sm_86, sm_89,
sm_90, sm_100, sm_120; the Gluon GEMM for sm_90 only) on a machine without a GPU, with the launch
configurations configs.py picks, and check what
can be checked without the card: the compile succeeds, no registers spill to local memory, the
shared memory fits the target's per-block limit, and the MMA instructions are the expected kind
(wgmma on sm_90: IGMMA / HGMMA in SASS; mma.sync elsewhere: IMMA / HMMA, Blackwell included).

Nothing here measures speed: the Ampere/Ada/Blackwell configurations have never run on such a card.

usage: python bench/compile_targets.py [--check]   (--check: exit status 1 on any problem)
Needs triton's bundled ptxas/cuobjdump (the PyPI wheel ships them); run WITHOUT TRITON_INTERPRET.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dvdq_core.kernels import _triton as kt, configs, ops  # noqa: E402

CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
K, SB, HB = 5120, 128, 128
LORA_RP = 64  # a rank-64 LoRA branch (ops.lora_rp)


def compile_sass(fn, types, consts, cc, warps, stages):
    """Compile one kernel for sm_<cc> on the CPU -> (compiled kernel, SASS text, cuobjdump resource
    usage). types: run-time argument -> Triton type; consts: constexpr -> value (missing ones take
    their defaults). Pointers and strides get divisibility 16, as Triton's specialisation gives
    them at the real launches."""
    names = list(fn.arg_names)
    sig = {n: types.get(n, "constexpr") for n in names}
    missing = set(names) - set(types) - set(consts)
    consts = {**{n: fn.params[names.index(n)].default for n in missing}, **consts}
    div16 = [i for i, n in enumerate(names) if sig[n].startswith("*") or n in ("stride_xm", "LQP", "LKP")]  # (LQP, LKP:
    # the attention's padded lengths, whole tiles)
    src = ASTSource(fn, sig, constexprs={(names.index(c),): v for c, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([CUOBJ, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([CUOBJ, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return ck, sass, res


def compile_kernel(fn, types, consts, cc, warps, stages, main_mma=None):
    """Registers, shared memory, spill stores and tensor-core instruction counts of one kernel. The K loop
    is taken to run from the first to the last MMA instruction (of kind main_mma if given: a GEMM with a
    LoRA epilogue has 16-bit MMAs after its int8 loop)."""
    ck, sass, res = compile_sass(fn, types, consts, cc, warps, stages)
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    lines = sass.splitlines()
    mma = [i for i, line in enumerate(lines) if re.search(rf"\b{main_mma or '[IH]G?MMA'}\b", line)]
    in_loop = sum(1 for i, line in enumerate(lines) if "STL" in line and mma and mma[0] <= i <= mma[-1])
    return {"regs": regs, "smem": ck.metadata.shared, "spills": sass.count("STL"), "loop_spills": in_loop,
            "mma": {op: sass.count(op) for op in ("IGMMA", "HGMMA", "IMMA", "HMMA") if op in sass}}


def compile_gluon_gemm(kind="chain", cfg=None, gelu=False, lora_rp=0):
    """One of the sm_90-only Gluon GEMMs (kernels/_gluon.py: "chain" on packed weights with
    configs.CHAIN_SM90, "u8" on the int8 workspace with configs.U8_SM90, or cfg) -> (result dict,
    ptxas advisories, wgmma wait depths in SASS). It must keep one wgmma in flight (a wait depth
    of 1) and get no ptxas "wgmma ... serialized" advisory (C751x). lora_rp: with a LoRA branch's
    up-projection of that padded rank in the epilogue (a bf16 wgmma: HGMMA)."""
    from triton.experimental.gluon import language as gl

    from dvdq_core.kernels import _gluon as kg
    cfg = cfg or (configs.CHAIN_SM90 if kind == "chain" else configs.U8_SM90)
    bm, bn, bk = cfg["BM"], cfg["BN"], ops.layout_group(K, SB)
    a_lay = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)
    types = {"a_desc": f"tensordesc<i8[{bm}, {bk}],{a_lay!r}>", "d_ptr": "*fp32", "s_ptr": "*fp32",
             "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32"}
    if kind == "chain":
        fn = kg._w4_gemm_chain_kernel
        w_lay = gl.NVMMASharedLayout.get_default_for([bn, bk // 2], gl.uint8)
        types.update(w_desc=f"tensordesc<u8[{bn}, {bk // 2}],{w_lay!r}>", z_ptr="*u8")
    else:
        fn = kg._w4_gemm_u8_kernel
        w_lay = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)
        types.update(w_desc=f"tensordesc<i8[{bn}, {bk}],{w_lay!r}>")
    consts = dict(K=K, GROUP_M=cfg["group_m"], STAGES=cfg["stages"], HAS_BIAS=True, num_warps=cfg["num_warps"],
                  GELU=gelu)
    if lora_rp:
        types.update(t_ptr="*bf16", lu_ptr="*bf16", stride_t="i32", RANK="i32")
        consts.update(LORA=True, RP=lora_rp)
    return compile_gluon(fn, types, consts, cfg["num_warps"])


def compile_gluon(fn, types, consts, warps, maxnreg=None):
    """A Gluon kernel for sm_90a on the CPU -> (registers / shared memory / spill stores / wgmma count,
    ptxas advisories C751x, wgmma wait depths in SASS)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    names = list(fn.arg_names)
    sig = {n: types.get(n, "constexpr") for n in names}
    src = GluonASTSource(fn, sig, constexprs={(names.index(c),): v for c, v in consts.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": 1, **({"maxnreg": maxnreg} if maxnreg else {})})
    bindir = os.path.dirname(CUOBJ)
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        adv = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([CUOBJ, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([CUOBJ, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    r = {"regs": int(re.search(r"REG:(\d+)", res).group(1)), "smem": ck.metadata.shared, "spills": sass.count("STL"),
         "mma": {op: sass.count(op) for op in ("IGMMA", "HGMMA", "QGMMA") if op == "IGMMA" or op in sass}}
    return r, sorted(set(re.findall(r"\((C75\d\d)\)", adv))), sorted(set(re.findall(r"WARPGROUP.DEPBAR.LE gsb0, (0x\d)", sass)))


def compile_gluon_attention(cfg, d=128):
    """The sm_90 Gluon attention kernel (kernels/_gluon_attention.py) with tile cfg, as _attention._attend_gluon
    launches it -> as compile_gluon."""
    from dvdq_core.kernels import _attention as ka, _gluon_attention as kga
    bn = cfg.BN
    k_lay, v_lay = ka.gluon_tile_layouts(bn, d)
    types = {"q_ptr": "*i8", "qs_ptr": "*fp32", "k_desc": f"tensordesc<i8[{bn}, {d}],{k_lay!r}>", "ks_ptr": "*fp32",
             "v_desc": f"tensordesc<fp8e4nv[{d}, {bn}],{v_lay!r}>", "vs_ptr": "*fp32", "vm_ptr": "*fp32",
             "o_ptr": "*bf16", **{n: "i32" for n in kga._INTS + kga._STRIDES}}
    return compile_gluon(kga._attention_ws_kernel, types, dict(STAGES=cfg.num_stages, CONSUMER_REGS=ka.GLUON_CONSUMER_REGS,
                                                              MAGIC=cfg.magic == 1), cfg.num_warps, ka.GLUON_MAXNREG)


def cases(cc):
    """(label, fn, types, consts, warps, stages, expected MMA opcodes) as ops.py launches them."""
    cap = (cc // 10, cc % 10)
    out = []
    # the LoRA branch's forms (LORA_RP: its up-projection in the GEMM epilogue, its down-projection in pow2's
    # pass 2) on sm_80 (Ampere/Ada's code), sm_90 and sm_120 (mma.sync as sm_80's, under the 99 KB limit) only:
    # sm_86/89 get sm_80's code, sm_100 the SM8X tile with more room (keeps the test's compile time down)
    lora = cc in (80, 90, 120)
    for label, m, a_float, gelu in (("gemm int8", 4096, False, False), ("gemm int8 small M", 16, False, False),
                                    ("gemm int8 + GELU", 4096, False, True), ("gemm 16-bit act", 32760, True, False),
                                    ("gemm int8 W8", 32760, False, False), ("gemm int8 W8 + GELU", 32760, False, True),
                                    *((("gemm int8 + LoRA + GELU", 32760, False, True),) if lora else ())):
        cfg = configs.gemm_config(cap, m, K, K, SB, a_float, False)
        cfg = replace(cfg, BK=ops.layout_group(K, SB, a_float))  # as ops.w4_gemm sets it
        flags = {**cfg.flags(), "W8": configs.use_workspace(cap, m, a_float, False)}
        if "W8" in label and not flags["W8"]:
            continue  # the workspace is sm_90 only
        if a_float:
            flags["SPLIT"] = 1
        types = {"a_ptr": "*bf16" if a_float else "*i8", "w_ptr": "*i8" if flags["W8"] else "*u8", "z_ptr": "*u8",
                 "d_ptr": "*fp32", "l_ptr": "*fp32", "s_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16",
                 "M": "i32", "N": "i32"}
        consts = dict(K=K, SB=SB, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
                      A_FLOAT=a_float, AUTO_SCALE=not a_float, HAS_BIAS=True, SWAP=cfg.SWAP, INTERPRET=False,
                      ASM_UNPACK=flags["ASM_UNPACK"], SPLIT=flags["SPLIT"], GELU=gelu, W8=flags["W8"])
        if "LoRA" in label:  # as ops.w4_gemm launches it for a rank-64 branch (the 8-bit steps' GEMM, or sm_8x's)
            types.update(t_ptr="*bf16", lu_ptr="*bf16", stride_t="i32", RANK="i32")
            consts.update(LORA=True, RP=LORA_RP)
        want = ("HGMMA" if a_float else "IGMMA") if configs.wgmma(cap) else ("HMMA" if a_float else "IMMA")
        out.append((f"{label} {cfg.to_env()}", kt._w4_gemm_kernel, types, consts, cfg.num_warps, cfg.num_stages,
                    want))
    r, c, tg, bm = 128, 128, 128, configs.ACT_ELEMS_PER_TILE // 128
    act = {"x_ptr": "*bf16", "r_ptr": "*bf16", "rscale": "fp32", "rowmax_ptr": "*fp32", "l_ptr": "*fp32",
           "M": "i32", "stride_xm": "i32"}
    base = dict(K=K, C=c, R=r, BM=bm, INTERPRET=False)
    w, s = configs.ACT_NUM_WARPS, configs.ACT_NUM_STAGES
    out.append(("act absmax", kt._absmax_kernel, act, {**base, "NT": K // tg, "SB": SB, "TG": tg, "AUTO_SCALE": True},
                w, s, None))
    out.append(("act quantize", kt._quantize_kernel, {**act, "q_ptr": "*i8", "s_ptr": "*fp32", "qmax": "fp32"},
                {**base, "NT": K // tg, "SB": SB, "TG": tg, "TB": 64, "AUTO_SCALE": True}, w, s, None))
    out.append(("act absmax pow2", kt._absmax_kernel, act,  # its own tile (ops.channel_absmax)
                {**base, "BM": configs.ACT_POW2_PASS1_ELEMS // c, "NT": 1, "SB": SB, "TG": tg, "AUTO_SCALE": True,
                 "POW2": True}, w, s, None))
    out.append(("act quantize pow2", kt._quantize_pow2_kernel,
                {"x_ptr": "*bf16", "r_ptr": "*bf16", "rscale": "fp32", "cmax_ptr": "*fp32", "q_ptr": "*i8",
                 "s_ptr": "*fp32", "M": "i32", "stride_xm": "i32", "qmax": "fp32"},
                {**base, "OCTAVES": 4, "PERSISTENT": True}, w, s, None))  # as ops.quantize_pow2 on a GPU
    if lora:  # with its own launch (configs.act_lora), at the widest padded rank the fused path takes
        elems, warps, stages, _ = configs.act_lora(cap)
        out.append(("act quantize pow2 + LoRA", kt._quantize_pow2_kernel,
                    {**out[-1][2], "a_ptr": "*bf16", "t_ptr": "*bf16", "RANK": "i32"},
                    {**base, "BM": elems // c, "OCTAVES": 4, "PERSISTENT": True, "LORA": True,
                     "RP": ops.LORA_FUSED_MAX_RP}, warps, stages, None))
    out.append(("unpack weights (u8 workspace)", kt._unpack_weights_kernel, {"w_ptr": "*u8", "z_ptr": "*u8",
                "out_ptr": "*i8", "N": "i32"}, dict(K=K, G=128, BR=32, GPP=2), 4, 3, None))  # as ops.unpack_weights
    out.append(("act rotate (16-bit)", kt._rotate_kernel,
                {"x_ptr": "*bf16", "r_ptr": "*bf16", "rscale": "fp32", "y_ptr": "*bf16", "M": "i32", "stride_xm": "i32"},
                base, w, s, None))
    # the Wan block's elementwise kernels at Wan 14B's width (40 heads x 128), as ops launches them
    ww, bc, vec = configs.WAN_OPS_NUM_WARPS, triton.next_power_of_2(K), {"S": "i32", "REP": "i32", "LAST": "i32"}
    out.append(("wan norm_rope", kt._norm_rope_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*bf16", "f_ptr": "*fp32", "y_ptr": "*bf16", "S": "i32", "stride_fb": "i32",
                 "stride_fs": "i32", "eps": "fp32"},
                dict(H=K // 128, HP=triton.next_power_of_2(K // 128), HALF_D=64, NORM=True, INTERPRET=False), ww, 3, None))
    out.append(("wan modulated_norm", kt._modulated_norm_kernel,
                {"x_ptr": "*bf16", "shift_ptr": "*bf16", "scale_ptr": "*bf16", "y_ptr": "*bf16", **vec,
                 "stride_vb": "i32", "stride_vf": "i32", "eps": "fp32"}, dict(C=K, BC=bc, INTERPRET=False), ww, 3, None))
    out.append(("wan gated_residual", kt._gated_residual_kernel,
                {"x_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "out_ptr": "*bf16", **vec, "stride_gb": "i32",
                 "stride_gf": "i32"}, dict(C=K, BC=bc, INTERPRET=False), ww, 3, None))
    # HunyuanVideo's (hunyuan_ops; the q/k norm is tests/test_hunyuan_ops.py's): the same two kernels
    # with the product rounded apart (its gates; its modulation with an I2V guiding frame)
    for label, (fn, types) in (("hunyuan modulated_norm (dims)", out[-2][1:3]), ("hunyuan gated_add", out[-1][1:3])):
        out.append((label, fn, types, dict(C=K, BC=bc, INTERPRET=False, ROUND_PRODUCT=True), ww, 3, None))
    out.extend(attention_cases(cc))
    return out


def attention_cases(cc):
    """The 8-bit attention kernel (kernels/_attention.py) at head dim 128 with the tile configs.attention_config
    picks: 16-bit P.V on every target, FP8 P.V on sm_90 (the form "auto" picks there)."""
    from dvdq_core.kernels import _attention as ka
    cap = (cc // 10, cc % 10)
    out = []
    for fp8 in (True, False) if configs.wgmma(cap) else (False,):
        cfg = configs.attention_config(cap, fp8, env={})
        types = {"q_ptr": "*i8", "qs_ptr": "*fp32", "k_ptr": "*i8", "ks_ptr": "*fp32",
                 "v_ptr": "*fp8e4nv" if fp8 else "*bf16", "vs_ptr": "*fp32", "vm_ptr": "*fp32", "o_ptr": "*bf16",
                 **{n: "i32" for n in ("H", "Lq", "Lk", "LQP", "LKP", "n_full", "svb", "svh", "svl", "svd", "sob",
                                       "soh", "sol", "sod")}}
        consts = dict(D=128, BM=cfg.BM, BN=cfg.BN, FP8=fp8, TAIL=True, N_FULL=0, INTERPRET=False, MAGIC=cfg.magic,
                      ACC_R=cfg.acc_r, TMA=False, WS=cfg.ws)
        out.append((f"attention q8 {'fp8' if fp8 else '16-bit'} P.V {cfg.to_env()}", ka._attention_kernel, types,
                    consts, cfg.num_warps, cfg.num_stages, "IGMMA" if configs.wgmma(cap) else "IMMA"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    p.add_argument("--targets", nargs="+", type=int, default=sorted(SMEM_LIMIT))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels, there is nothing to compile")
    if os.environ.get("TRITON_OVERRIDE_ARCH"):
        sys.exit("unset TRITON_OVERRIDE_ARCH: it makes Triton lower every target for one architecture")
    problems = []
    print(f"{'target':6s} {'kernel':58s} {'regs':>4s} {'spills':>6s} {'smem KB':>7s}  mma")
    for cc in args.targets:
        for label, fn, types, consts, warps, stages, want in cases(cc):
            try:
                r = compile_kernel(fn, types, consts, cc, warps, stages, want if "LoRA" in label else None)
            except Exception as e:  # noqa: BLE001 (reported, and a failure under --check)
                problems.append(f"sm_{cc} {label}: compile failed: {type(e).__name__}: {str(e)[:300]}")
                print(f"sm_{cc:<3d} {label:58s} FAILED")
                continue
            print(f"sm_{cc:<3d} {label:58s} {r['regs']:4d} {r['spills']:6d} {r['smem'] / 1024:7.1f}  {r['mma']}")
            # The fused-GELU Triton GEMM spills in its epilogue only (sm_90, SPLIT 2: both sub-tiles'
            # accumulators are live); measured harmless: the Wan 14B W4A8 step with the GELU fused vs
            # unfused in one call, 5.474 vs 5.481 s (NOTES v9). The LoRA epilogue's 16-bit dot spills there
            # too (sm_90 SPLIT 2: ~340 stores per tile, after the K loop; bench/kernels.py --lora times that
            # GEMM against SPLIT 1, which does not spill). A spill among the main loop's MMAs is always a problem.
            # The 8-bit attention's 16-bit form on sm_80/86/89/120 (mma.sync) spills ~50 stores outside its key
            # loop (prologue / epilogue: once per program, not per key block).
            if r["loop_spills"] or (r["spills"] and "GELU" not in label and "LoRA" not in label
                                    and not label.startswith("attention")):
                problems.append(f"sm_{cc} {label}: {r['spills']} register spill stores ({r['loop_spills']} in the K loop)")
            if r["smem"] > SMEM_LIMIT[cc]:
                problems.append(f"sm_{cc} {label}: {r['smem']} B shared memory > the {SMEM_LIMIT[cc]} B limit")
            if want and not r["mma"].get(want):
                problems.append(f"sm_{cc} {label}: no {want} instruction (got {r['mma']})")
        # with a LoRA branch: the widest padded rank the Gluon epilogue takes (ops.LORA_FUSED_MAX_RP), and GELU
        for kind, gelu, rp in ((("chain", False, 0), ("chain", True, 0), ("u8", False, 0), ("u8", True, 0),
                                ("chain", True, ops.LORA_FUSED_MAX_RP), ("u8", True, ops.LORA_FUSED_MAX_RP))
                               if cc == 90 else ()):
            cfg = configs.CHAIN_SM90 if kind == "chain" else configs.U8_SM90
            label = (f"gemm {kind} (Gluon) " + ",".join(str(v) for v in cfg.values()) + (f" + LoRA RP {rp}" if rp else "")
                     + (" + GELU" if gelu else ""))
            try:
                r, advisories, waits = compile_gluon_gemm(kind, gelu=gelu, lora_rp=rp)
            except Exception as e:  # noqa: BLE001 (reported, and a failure under --check)
                problems.append(f"sm_90 {label}: compile failed: {type(e).__name__}: {str(e)[:300]}")
                print(f"sm_90  {label} FAILED")
                continue
            print(f"sm_90  {label:58s} {r['regs']:4d} {r['spills']:6d} {r['smem'] / 1024:7.1f}  {r['mma']} "
                  f"waits {waits} {advisories or ''}")
            if r["spills"] or r["smem"] > SMEM_LIMIT[90] or not r["mma"]["IGMMA"] or bool(rp) != bool(r["mma"].get("HGMMA")):
                problems.append(f"sm_90 {label}: {r}")
            if advisories or "0x1" not in waits:
                problems.append(f"sm_90 {label}: wgmma serialised (ptxas {advisories}, wait depths {waits})")
        # the Gluon attention kernel (FP8 P.V, sm_90) with each tile bench/attention.py --variants times
        gluon = [c for c in configs.ATTN_SM90_FP8_VARIANTS if c.gluon and cc == 90]
        for cfg, d in [(c, 128) for c in gluon] + [(c, 64) for c in gluon[:1]]:  # (head dim 64 too: gluon_applies takes it)
            label = f"attention q8 fp8 P.V (Gluon) D{d} {cfg.to_env()}"
            try:
                r, advisories, _ = compile_gluon_attention(cfg, d)
            except Exception as e:  # noqa: BLE001 (reported, and a failure under --check)
                problems.append(f"sm_90 {label}: compile failed: {type(e).__name__}: {str(e)[:300]}")
                print(f"sm_90  {label} FAILED")
                continue
            print(f"sm_90  {label:58s} {r['regs']:4d} {r['spills']:6d} {r['smem'] / 1024:7.1f}  {r['mma']} "
                  f"{advisories or ''}")
            if r["spills"] or r["smem"] > SMEM_LIMIT[90] or not (r["mma"]["IGMMA"] and r["mma"].get("QGMMA")) or advisories:
                problems.append(f"sm_90 {label}: {r} {advisories}")
    for line in problems:
        print("PROBLEM:", line)
    if args.check and problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
