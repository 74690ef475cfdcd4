"""Quantized linear layers at the real layer shapes of Wan 2.1 (1.3B, 14B) and HunyuanVideo.

Times, per shape and token count M (CUDA events, median of do_bench):
  bf16       F.linear (cuBLAS)
  fp8        torch._scaled_mm, e4m3 operands, row-wise scales (GEMM alone: inputs pre-quantized)
  ours       kernels.linear_forward at W4A8 / W4A4: activation kernels + GEMM (the whole layer)
  gemm       our GEMM alone on ready int8 codes, and act: our activation kernels alone
  *_p4       the same three at W4A4 with granularity "pow2" (scales folded into the codes, the GEMM
             without per-K-block promotion)
  ck_int8    comfy-kitchen TensorWiseINT8Layout (per-channel, ConvRot), F.linear incl. its quantizer
  ck_w4a8    comfy-kitchen AsymW4A8Int8Layout, F.linear incl. its quantizer
and a sweep of our GEMM tile configurations. Prints a table; --json writes all numbers.

With --lora R, per shape also the W4A4 pow2 layer with a rank-R LoRA branch beside it (dvdq_core/lowrank.py)
in every way ops.LORA_IMPLS runs it (unfused: cuBLAS x·Aᵀ and addmm; epilogue: cuBLAS x·Aᵀ, the up-projection
in the Gluon GEMM's epilogue on sm_90; fused: down-projection in the activation pass, up-projection in the
Gluon epilogue; fused-triton: the same with the Triton GEMM's epilogue), each
with the branch's cost in % of the layer without it, the fused pieces alone, and the fused outputs checked
against the unfused one. The feed-forward's first layer (ffn1, mlp1) runs with its fused GELU there.

usage: python bench/kernels.py [--m 32760 75600] [--models wan1.3b wan14b hunyuan] [--sweep] [--ck] [--lora R]
       python bench/kernels.py --lora 64 --lora-only [--m 32760] [--models wan14b wan1.3b]   (BF16, W4A4 pow2
       and the LoRA variants only)
       python bench/kernels.py --act-sweep [--m 32760]   (activation-kernel launch settings only)
       python bench/kernels.py --act-sweep-pow2 [--m 32760]   (the two passes of granularity pow2)
       python bench/kernels.py --chain-sweep [--m 32760] [--models wan14b]   (tiles of the sm_90 GEMM without
       per-block scales, on pow2 codes)
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Every timed call must quantize its activations: without this the one-entry reuse cache (meant for
# q/k/v sharing one input) turns repeated calls on the same x into GEMM-only timings.
os.environ["DVDQ_REUSE_ACTIVATIONS"] = "0"

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from dvdq_core import kernels  # noqa: E402
from dvdq_core.kernels import configs, ops  # noqa: E402

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # last: this file must not shadow kernels/
from gpu_clock import ClockMonitor  # noqa: E402

# (name, N, K) of the token-side linear layers of one transformer block.
SHAPES = {
    "wan1.3b": [("qkvo", 1536, 1536), ("ffn1", 8960, 1536), ("ffn2", 1536, 8960)],
    "wan14b": [("qkvo", 5120, 5120), ("ffn1", 13824, 5120), ("ffn2", 5120, 13824)],
    "hunyuan": [("qkv", 9216, 3072), ("proj", 3072, 3072), ("mlp1", 12288, 3072), ("mlp2", 3072, 12288),
                ("single1", 21504, 3072), ("single2", 3072, 15360)],
}
PEAK_INT8 = 1979e12  # dense int8/fp8 on H100 SXM (datasheet); measured copy bandwidth below
COPY_BW = 3.0e12


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def make_layer(n, k, dev, had_block=128, scale_block=128):
    from types import SimpleNamespace
    return SimpleNamespace(
        weight=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev),
        w_scale=torch.rand(n, device=dev) * 0.01 + 1e-3,
        w_zero=torch.randint(0, 16, (n,), dtype=torch.uint8, device=dev),
        bias=torch.randn(n, device=dev, dtype=torch.bfloat16), in_features=k, out_features=n, w_bits=4,
        had_block=had_block, scale_block=scale_block, rotate=True, auto_scale=True, granularity="block",
        method="dvdq", act=None)


def fp8_operands(x, w):
    xa = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
    wa = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
    xq = (x.float() / xa).to(torch.float8_e4m3fn)
    wq = (w.float() / wa).to(torch.float8_e4m3fn)
    return xq, wq, xa, wa.t().contiguous()


def try_ck():
    try:
        import comfy_kitchen as ck  # noqa: F401
        from comfy_kitchen.tensor import QuantizedTensor
        return QuantizedTensor, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


LORA_VARIANTS = (("unfused", "unfused", "x·Aᵀ and addmm by cuBLAS, GELU by torch"),
                 ("epilogue", "epilogue", "x·Aᵀ by cuBLAS + Gluon epilogue on sm_90"),
                 ("fused", "fused", "pass 2 + Gluon epilogue on sm_90"),
                 ("fused_triton", "triton", "pass 2 + Triton GEMM epilogue"))
GELU_LAYERS = ("ffn1", "mlp1")  # followed by the tanh GELU (dvdq_core.fusion fuses it into the GEMM)


def lora_cases(model, name, n, k, m, dev, args, x, layer, row):
    """The W4A4 pow2 layer with and without a rank-R branch, every LORA_IMPLS way, and the fused pieces alone."""
    from dvdq_core.lowrank import LowRankTerm, stack
    hb, sb = ops.effective_blocks(layer, k)
    gelu = name in GELU_LAYERS
    r = args.lora
    term = LowRankTerm(torch.randn(n, r, device=dev) / 64, torch.randn(r, k, device=dev) / k ** 0.5, 1.0)
    lr = stack([term], [], n, k, dev, torch.bfloat16)

    def layer_call(impl=None, branch=True, bits=4):
        kw = dict(lora_down=lr.down, lora_up=lr.up, lora_impl=impl) if branch else {}
        return ops.w4_linear_impl(x, layer.weight, layer.w_scale, layer.w_zero, layer.bias, bits, hb, sb, True,
                                  pow2=bits == 4, gelu=gelu, **kw)
    out = {"gelu": gelu, "rank": r}
    out["base"] = bench(lambda: layer_call(branch=False))
    want = layer_call("unfused").float()
    for key, impl, _ in LORA_VARIANTS:
        try:
            got = layer_call(impl).float()
            out[key + "_maxdiff"] = ((got - want).abs().max() / want.abs().max()).item()
            out[key] = bench(lambda: layer_call(impl))
        except Exception as e:
            out[key + "_err"] = f"{type(e).__name__}: {str(e)[:300]}"
        got = None
    # the 8-bit steps (block scales, the Triton GEMM with per-block promotion): unfused vs fused
    out["a8_base"] = bench(lambda: layer_call(branch=False, bits=8))
    for impl in ("unfused", "epilogue", "fused"):
        out[f"a8_{impl}"] = bench(lambda: layer_call(impl, bits=8))
    shipped = configs.ACT_LORA_SM90, configs.ACT_LORA
    out["a8_fused_cfgs"] = {}
    try:  # the block form's pass 2 with T, each candidate launch (it takes no programs-per-SM entry)
        for c in dict.fromkeys(c[:3] for c in configs.ACT_LORA_CANDIDATES):
            configs.ACT_LORA_SM90 = configs.ACT_LORA = (*c, 1)
            out["a8_fused_cfgs"][str(c)] = bench(lambda: layer_call("fused", bits=8))
    finally:
        configs.ACT_LORA_SM90, configs.ACT_LORA = shipped
    # the fused pieces alone: the pow2 passes with T (each candidate launch of configs.ACT_LORA_CANDIDATES),
    # the GEMM with the epilogue (on the same codes)
    t = torch.empty((m, r), device=dev, dtype=torch.bfloat16)
    out["down_mm"] = bench(lambda: torch.mm(x, lr.down.t(), out=t))  # the epilogue way's T (cuBLAS)
    out["act"] = bench(lambda: ops.quantize_activations(x, hb, sb, 4, True, pow2=True))
    out["act_lora"] = bench(lambda: ops.quantize_activations(x, hb, sb, 4, True, pow2=True, down=lr.down, t=t))
    cmax = ops.channel_absmax(x, hb, sb)
    out["act_lora_cfgs"] = {str(c): bench(lambda: ops.quantize_pow2(x, hb, sb, 4, cmax, act_cfg=c, down=lr.down, t=t))
                            for c in configs.ACT_LORA_CANDIDATES}
    out["act_pass2"] = bench(lambda: ops.quantize_pow2(x, hb, sb, 4, cmax))
    q, s, _ = ops.quantize_activations(x, hb, sb, 4, True, pow2=True, down=lr.down, t=t)
    gemm_args = (q, layer.weight, layer.w_zero, layer.w_scale, None, s, layer.bias, torch.bfloat16, sb, False)
    out["gemm"] = bench(lambda: ops.w4_gemm(*gemm_args, gelu=gelu))
    out["gemm_lora"] = bench(lambda: ops.w4_gemm(*gemm_args, gelu=gelu, lora=(t, lr.up)))
    out["gemm_lora_triton"] = bench(lambda: ops.w4_gemm(*gemm_args, gelu=gelu, lora=(t, lr.up), lora_gluon=False))
    w8 = configs.use_workspace(ops._capability(dev), m, False, False)  # what the Triton GEMM takes by default
    out["gemm_triton"] = bench(lambda: ops.w4_gemm(*gemm_args, gelu=gelu, W8=w8))
    out["gemm_lora_triton_split1"] = bench(lambda: ops.w4_gemm(*gemm_args, gelu=gelu, lora=(t, lr.up), W8=w8, SPLIT=1))
    q = s = t = lr = cmax = None  # free the GPU memory (the timed lambdas read them)
    row["lora"] = out
    print("  " + lora_line(row), flush=True)


def pct(a, b):
    return f"{a / b - 1:+6.1%}"


def lora_line(r):
    """One shape's LoRA timings: ms, and the branch's cost against the W4A4 pow2 layer without it."""
    o = r["lora"]
    base = o["base"]
    parts = [f"lora{o['rank']} {r['model']:7s} {r['layer']:5s} M={r['M']}{' +GELU' if o['gelu'] else ''}: "
             f"BF16 {r['bf16'] * 1e3:.3f} | W4A4 pow2 {base * 1e3:.3f}"]
    for key, _, _ in LORA_VARIANTS:
        if key in o:
            parts.append(f"{key} {o[key] * 1e3:.3f} ({pct(o[key], base)}, maxdiff {o[key + '_maxdiff']:.1e})")
        else:
            parts.append(f"{key} FAILED {o.get(key + '_err')}")
    parts.append(f"pieces: x·Aᵀ by cuBLAS {o['down_mm'] * 1e3:.3f}, "
                 f"act {o['act'] * 1e3:.3f}->{o['act_lora'] * 1e3:.3f} ({pct(o['act_lora'], o['act'])}), "
                 f"gemm {o['gemm'] * 1e3:.3f}->{o['gemm_lora'] * 1e3:.3f} ({pct(o['gemm_lora'], o['gemm'])}), "
                 f"triton gemm {o['gemm_triton'] * 1e3:.3f}->{o['gemm_lora_triton'] * 1e3:.3f} "
                 f"({pct(o['gemm_lora_triton'], o['gemm_triton'])}; SPLIT 1: {o['gemm_lora_triton_split1'] * 1e3:.3f})")
    parts.append(f"pow2 pass 2 {o['act_pass2'] * 1e3:.3f}, with T per launch (elems, warps, stages, per SM): "
                 + ", ".join(f"{c} {v * 1e3:.3f}" for c, v in o["act_lora_cfgs"].items()))
    parts.append(f"W4A8 block {o['a8_base'] * 1e3:.3f}: unfused {o['a8_unfused'] * 1e3:.3f} "
                 f"({pct(o['a8_unfused'], o['a8_base'])}), epilogue {o['a8_epilogue'] * 1e3:.3f} "
                 f"({pct(o['a8_epilogue'], o['a8_base'])}), fused {o['a8_fused'] * 1e3:.3f} "
                 f"({pct(o['a8_fused'], o['a8_base'])}); "
                 "fused per launch: " + ", ".join(f"{c} {v * 1e3:.3f}" for c, v in o["a8_fused_cfgs"].items()))
    return "\n    ".join([" | ".join(parts[:len(LORA_VARIANTS) + 1])] + parts[len(LORA_VARIANTS) + 1:])


def lora_table(rows):
    """The LoRA results of every shape as one table (ms; % = the branch's cost over W4A4 pow2 alone)."""
    rows = [r for r in rows if "lora" in r]
    if not rows:
        return
    print(f"\nLoRA branch beside the W4A4 pow2 layer (rank {rows[0]['lora']['rank']}; ms, % over the layer without "
          "the branch; " + "; ".join(f"{k}: {d}" for k, _, d in LORA_VARIANTS) + ")")
    head = f"{'model':8s} {'layer':6s} {'M':>6s} {'N':>6s} {'K':>6s} {'bf16':>8s} {'w4a4':>8s}"
    for key, _, _ in LORA_VARIANTS:
        head += f" {key:>13s} {'%':>7s}"
    print(head + f" {'x·Aᵀ ms':>8s} {'act+T %':>8s} {'gemm+U %':>8s} {'a8 unf %':>8s} {'a8 epi %':>8s} {'a8 fus %':>8s}")
    for r in rows:
        o = r["lora"]
        line = (f"{r['model']:8s} {r['layer'] + ('*' if o['gelu'] else ''):6s} {r['M']:6d} {r['N']:6d} {r['K']:6d} "
                f"{r['bf16'] * 1e3:8.3f} {o['base'] * 1e3:8.3f}")
        for key, _, _ in LORA_VARIANTS:
            line += (f" {o[key] * 1e3:13.3f} {pct(o[key], o['base']):>7s}" if key in o else f" {'failed':>13s} {'':7s}")
        print(line + f" {o['down_mm'] * 1e3:8.3f} {pct(o['act_lora'], o['act']):>8s} {pct(o['gemm_lora'], o['gemm']):>8s}"
              f" {pct(o['a8_unfused'], o['a8_base']):>8s} {pct(o['a8_epilogue'], o['a8_base']):>8s}"
              f" {pct(o['a8_fused'], o['a8_base']):>8s}")
    print("(* with the fused GELU; x·Aᵀ: the epilogue way's cuBLAS GEMM alone; act+T: pow2 activation passes with"
          " the down-projection over without; gemm+U: the default GEMM with the up-projection epilogue over without;"
          " a8: the W4A8 (block) layer with the branch unfused / epilogue / fused into the Triton kernels, over"
          " without)")


def run_shape(model, name, n, k, m, dev, args, ck_qt, rows):
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    x[:, :: max(1, k // 7)] *= 20
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    flops = 2.0 * m * n * k
    row = {"model": model, "layer": name, "M": m, "N": n, "K": k}
    row["bf16"] = bench(lambda: F.linear(x, w, b))
    if args.lora_only:
        layer = make_layer(n, k, dev)
        layer.granularity = "pow2"
        row["ours_p4"] = bench(lambda: kernels.linear_forward(layer, x, 4))
        lora_cases(model, name, n, k, m, dev, args, x, layer, row)
        rows.append(row)
        x = w = b = layer = None
        torch.cuda.empty_cache()
        return row
    try:
        xq, wq, xs, ws = fp8_operands(x, w)
        row["fp8"] = bench(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=torch.bfloat16))
        xq = wq = None  # free the GPU memory (the timed lambdas read them)
    except Exception as e:
        row["fp8_err"] = repr(e)[:200]
    layer = make_layer(n, k, dev)
    hb, sb = ops.effective_blocks(layer, k)
    for bits in (8, 4):
        row[f"ours_a{bits}"] = bench(lambda: kernels.linear_forward(layer, x, bits))
    q, s, l = ops.quantize_activations(x, hb, sb, 8, True)
    row["act"] = bench(lambda: ops.quantize_activations(x, hb, sb, 8, True))
    row["gemm"] = bench(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s, layer.bias,
                                            torch.bfloat16, sb, True))
    row["ours_a16"] = bench(lambda: kernels.linear_forward(layer, x, 16))
    # granularity "pow2" (4-bit: per-channel power-of-two scales folded into the codes, no promotion)
    layer.granularity = "pow2"
    row["ours_p4"] = bench(lambda: kernels.linear_forward(layer, x, 4))
    if args.lora:  # a rank-R LoRA after quantization beside the W4A4 pow2 layer (dvdq_core/lowrank.py)
        lora_cases(model, name, n, k, m, dev, args, x, layer, row)
    layer.granularity = "block"
    row["act_p4"] = bench(lambda: ops.quantize_activations(x, hb, sb, 4, True, pow2=True))
    qp, sp_, _ = ops.quantize_activations(x, hb, sb, 4, True, pow2=True)
    row["gemm_p4"] = bench(lambda: ops.w4_gemm(qp, layer.weight, layer.w_zero, layer.w_scale, None, sp_, layer.bias,
                                               torch.bfloat16, sb, False))
    qp = sp_ = None  # free the GPU memory (the timed lambdas read them)
    if args.sweep and model in args.sweep_models:
        sweep = {}
        for cfg in sweep_candidates(args, dev):
            try:
                sweep[str(cfg)] = bench(lambda: ops.w4_gemm(q, layer.weight, layer.w_zero, layer.w_scale, l, s,
                                                            layer.bias, torch.bfloat16, sb, True, cfg))
            except Exception as e:
                sweep[str(cfg)] = f"{type(e).__name__}: {str(e)[:150]}"
        row["sweep"] = sweep
    q = s = l = None  # free the GPU memory (the timed lambdas read them)
    if ck_qt is not None and args.ck and model in args.ck_models:
        for key, layout, kw in (("ck_int8", "TensorWiseINT8Layout", {"per_channel": True, "convrot": True}),
                                ("ck_w4a8", "AsymW4A8Int8Layout", {})):
            try:
                qt = ck_qt.from_float(w, layout, **kw)
                y = F.linear(x, qt, b)
                ref = F.linear(x, w, b).float()
                row[key + "_relerr"] = ((y.float() - ref).norm() / ref.norm()).item()
                row[key] = bench(lambda: F.linear(x, qt, b))
                qt = y = ref = None  # free the GPU memory (the timed lambdas read them)
            except Exception as e:
                row[key + "_err"] = f"{type(e).__name__}: {str(e)[:300]}"
    # two-number floors of our full layer: int8 MMA at peak, and the bytes it must move
    bytes_min = 2 * m * k * 2 + 2 * m * k + n * k // 2 + m * n * 2  # X twice, q written+read, W, Y
    row["floor"] = max(flops / PEAK_INT8, bytes_min / COPY_BW)
    row["gemm_tops"] = flops / row["gemm"] / 1e12
    rows.append(row)
    x = w = b = None  # free the GPU memory (the timed lambdas read them)
    torch.cuda.empty_cache()
    return row


def sweep_candidates(args, dev):
    """The compiled architecture's tiles (configs.gemm_candidates), then those of --configs."""
    return list(configs.gemm_candidates(ops._capability(dev))) + [configs.GemmConfig.parse(c) for c in args.configs]


def gemm_variants(m, n, k, dev):
    """GEMM tiles with and without the inline-PTX unpack, cuBLAS int8 (_int_mm) and activation-kernel
    tiles. What the loop-structure study found (plain int8
    GEMM, promotion, unpack layouts): docs/kernel-notes.md."""
    layer = make_layer(n, k, dev)
    hb, sb = ops.effective_blocks(layer, k)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    q, s, l = ops.quantize_activations(x, hb, sb, 8, True)
    w8 = torch.randint(-15, 16, (n, k), device=dev, dtype=torch.int8)
    flops = 2.0 * m * n * k
    out = {}
    cfgs = configs.SM90_CANDIDATES
    flag_sets = {"plain_unpack": {"ASM_UNPACK": False}, "asm": {"ASM_UNPACK": True}}
    for cfg in cfgs:
        for name, flags in flag_sets.items():
            w = layer.weight
            key = f"{name:15s} {cfg}"
            try:
                t = bench(lambda: ops.w4_gemm(q, w, layer.w_zero, layer.w_scale, l, s, layer.bias, torch.bfloat16,
                                              sb, True, cfg, **flags))
                out[key] = (t, flops / t / 1e12)
            except Exception as e:
                out[key] = f"{type(e).__name__}: {str(e)[:120]}"
    try:
        wt = w8.t()
        t = bench(lambda: torch._int_mm(q, wt))
        out["cublas _int_mm"] = (t, flops / t / 1e12)
    except Exception as e:
        out["cublas _int_mm"] = f"{type(e).__name__}: {str(e)[:120]}"
    for act_cfg in [(2048, 4, 2), (4096, 4, 2), (4096, 4, 3), (4096, 8, 2), (8192, 8, 2), (8192, 8, 3), (8192, 4, 2)]:
        try:
            t = bench(lambda: ops.quantize_activations(x, hb, sb, 8, True, act_cfg=act_cfg))
            out[f"act {act_cfg}"] = (t, (2 * m * k * 2 + m * k) / t / 1e12)  # TB/s over the minimal bytes
        except Exception as e:
            out[f"act {act_cfg}"] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


ACT_SWEEP = [(4096, 4, 3), (8192, 4, 3), (8192, 4, 4), (8192, 4, 5), (8192, 8, 3), (8192, 8, 4), (16384, 4, 3),
             (16384, 4, 4), (16384, 8, 3), (16384, 8, 4), (4096, 4, 5), (4096, 2, 4)]


def act_sweep(m, dev, pow2=False):
    """Activation-kernel launch settings (elements per tile, warps, stages) at the model widths: ms and
    TB/s over the bytes each kernel must move. Block granularity (W4A8): both kernels together (X read
    twice, int8 codes written). pow2 (W4A4): pass 1 (X read once) and pass 2 (X read twice, codes
    written) timed separately, as they may take different settings."""
    out = {}
    for k in (1536, 5120, 8960, 13824):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        x[:, :: max(1, k // 7)] *= 20  # a few massive channels, as in video DiTs
        cmax = ops.channel_absmax(x, 128, 128)
        for act_cfg in ACT_SWEEP:
            runs = ([("pass 1", lambda: ops.channel_absmax(x, 128, 128, act_cfg), m * k * 2),
                     ("pass 2", lambda: ops.quantize_pow2(x, 128, 128, 4, cmax, act_cfg=act_cfg), 2 * m * k * 2 + m * k)]
                    if pow2 else
                    [("act", lambda: ops.quantize_activations(x, 128, 128, 8, True, act_cfg=act_cfg), 2 * m * k * 2 + m * k)])
            for name, fn, nbytes in runs:
                key = f"K={k} {'pow2 ' if pow2 else ''}{name} {act_cfg}"
                try:
                    t = bench(fn)
                    out[key] = (t, nbytes / t / 1e12)
                except Exception as e:
                    out[key] = f"{type(e).__name__}: {str(e)[:120]}"
                v = out[key]
                print(key + ": " + (f"{v[0] * 1e3:.3f} ms {v[1]:.2f} TB/s" if isinstance(v, tuple) else v), flush=True)
        x = None  # free the GPU memory (the timed lambdas read them)
    return out


CHAIN_CANDIDATES = [dict(BM=bm, BN=bn, num_warps=w, stages=st, group_m=g) for bm, bn, w, st, g in (
    (128, 128, 8, 3, 16), (128, 128, 8, 4, 16), (128, 128, 8, 3, 8), (128, 128, 4, 3, 16), (256, 128, 8, 2, 16),
    (256, 128, 8, 3, 16), (256, 128, 8, 4, 16), (128, 256, 8, 2, 16), (128, 256, 8, 3, 16))]


def chain_sweep(m, models, dev):
    """Tiles of the sm_90 Gluon GEMM (no per-K-block scales) on granularity-pow2 codes: ms and TOP/s,
    each output checked equal to the shipped tile's (configs.CHAIN_SM90) bit for bit."""
    out = {}
    for model in models:
        for name, n, k in SHAPES[model]:
            layer = make_layer(n, k, dev)
            hb, sb = ops.effective_blocks(layer, k)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            x[:, :: max(1, k // 7)] *= 20
            q, s, _ = ops.quantize_activations(x, hb, sb, 4, True, pow2=True)
            args = (q, layer.weight, layer.w_zero, layer.w_scale, s, layer.bias, torch.bfloat16, sb)
            ref = ops.w4_gemm_chain(*args)
            for cfg in CHAIN_CANDIDATES:
                key = f"{model} {name} " + ",".join(f"{v}" for v in cfg.values())
                try:
                    same = torch.equal(ops.w4_gemm_chain(*args, chain_cfg=cfg), ref)
                    t = bench(lambda: ops.w4_gemm_chain(*args, chain_cfg=cfg))
                    out[key] = (t, 2.0 * m * n * k / t / 1e12, same)
                    print(f"{key}: {t * 1e3:.3f} ms {out[key][1]:.0f} TOP/s equal={same}", flush=True)
                except Exception as e:
                    out[key] = f"{type(e).__name__}: {str(e)[:150]}"
                    print(f"{key}: {out[key]}", flush=True)
            x = q = s = ref = None  # free the GPU memory (the timed lambdas read them)
            torch.cuda.empty_cache()
    return out


def fmt_row(r):
    def ms(key):
        v = r.get(key)
        return f"{v * 1e3:7.3f}" if isinstance(v, float) else "    n/a"
    def sp(key):
        return f"{r['bf16'] / r[key]:5.2f}x" if isinstance(r.get(key), float) else "   n/a"
    return (f"{r['model']:8s} {r['layer']:8s} {r['M']:6d} {r['N']:6d} {r['K']:6d} | {ms('bf16')} {ms('fp8')} "
            f"{ms('ours_a8')} {ms('ours_a4')} {ms('gemm')} {ms('act')} {ms('ours_p4')} {ms('gemm_p4')} {ms('act_p4')} "
            f"{ms('ours_a16')} {ms('ck_int8')} {ms('ck_w4a8')} |"
            f" {sp('fp8')} {sp('ours_a8')} {sp('ours_p4')} {r['gemm_tops']:6.0f} {ms('floor')}")


HEADER = ("model    layer         M      N      K |    bf16     fp8 ours_a8 ours_a4    gemm     act ours_p4 gemm_p4  act_p4"
          " ours_16 ck_int8 ck_w4a8 |   fp8x   ourx    p4x  TOP/s   floor   (ms; x = speed-up over bf16; _p4: W4A4 with"
          " granularity pow2)")


def finish(args, info, clock, **payload):
    """Print the GPU clock report (a throttled run says so) and write --json with it."""
    info["clock"] = clock.summary()
    print(clock.report())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, **payload}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[32760, 75600])
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="time every GEMM tile configuration")
    ap.add_argument("--sweep-models", nargs="+", default=["wan14b"])
    ap.add_argument("--configs", nargs="*", default=[], metavar="BM,BN,BK,GROUP_M,SWAP,warps,stages[,ASM,SPLIT]",
                    help="more GEMM tiles for --sweep (DVDQ_GEMM_CONFIG's format)")
    ap.add_argument("--ck", action="store_true", help="time comfy-kitchen's INT8 and W4A8 linears")
    ap.add_argument("--ck-models", nargs="+", default=["wan14b"])
    ap.add_argument("--variants", action="store_true", help="GEMM/activation-kernel variant study only (Wan 14B)")
    ap.add_argument("--act-sweep", action="store_true", help="activation-kernel launch settings only")
    ap.add_argument("--act-sweep-pow2", action="store_true", help="settings of granularity pow2's two passes")
    ap.add_argument("--chain-sweep", action="store_true",
                    help="tiles of the sm_90 GEMM without per-block scales (BM,BN,warps,stages,GROUP_M) only")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="also time the W4A4 pow2 layer with a rank-R LoRA branch beside it (every way it runs)")
    ap.add_argument("--lora-only", action="store_true", help="with --lora: skip the other variants of each shape")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with ClockMonitor() as clock:
        run(args, clock)


def run(args, clock):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "compiled_for": ops._capability(dev),
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ck_qt, ck_err = try_ck() if args.ck else (None, "not requested")
    info["comfy_kitchen"] = ck_err or "imported"
    print(json.dumps(info))
    rows = []
    if args.chain_sweep:
        res = chain_sweep(args.m[0], args.models, dev)
        finish(args, info, clock, chain_sweep=res)
        return
    if args.act_sweep or args.act_sweep_pow2:
        res = act_sweep(args.m[0], dev, pow2=args.act_sweep_pow2)
        finish(args, info, clock, act_sweep=res)
        return
    if args.variants:
        study = {}
        for name, n, k in SHAPES["wan14b"][:2] + SHAPES["wan14b"][2:]:
            res = gemm_variants(args.m[0], n, k, dev)
            study[name] = res
            for key, v in res.items():
                unit = "TB/s" if key.startswith("act") else "TOP/s"
                text = f"{v[0] * 1e3:.3f} ms {v[1]:.0f} {unit}" if isinstance(v, tuple) else v
                print(f"{name:5s} {key}: {text}", flush=True)
        finish(args, info, clock, variants=study)
        return
    if args.lora_only and not args.lora:
        raise SystemExit("--lora-only needs --lora R")
    print(HEADER)
    for model in args.models:
        for m in args.m:
            for name, n, k in SHAPES[model]:
                try:
                    r = run_shape(model, name, n, k, m, dev, args, ck_qt, rows)
                    if not args.lora_only:
                        print(fmt_row(r), flush=True)
                    for key in ("fp8_err", "ck_int8_err", "ck_w4a8_err"):
                        if key in r:
                            print(f"   {key}: {r[key]}")
                    if "sweep" in r:
                        for c, t in sorted(r["sweep"].items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 9):
                            text = f"{t * 1e3:.3f} ms {2 * m * n * k / t / 1e12:.0f} TOP/s" if isinstance(t, float) else t
                            print(f"   sweep {c}: {text}")
                except Exception:
                    traceback.print_exc()
                    torch.cuda.empty_cache()
    if not args.lora_only:
        print(HEADER)
        for r in rows:
            print(fmt_row(r))
    lora_table(rows)
    swept = [r for r in rows if "sweep" in r]
    if swept:  # the tile with the lowest total time over the swept shapes
        totals = {}
        for r in swept:
            for c, t in r["sweep"].items():
                totals[c] = totals.get(c, 0.0) + (t if isinstance(t, float) else float("inf"))
        best = min(totals, key=totals.get)
        cfg = next(c for c in sweep_candidates(args, dev) if str(c) == best)
        print(f"BEST_GEMM_CONFIG={cfg.to_env()}  ({best}, {totals[best] * 1e3:.3f} ms over {len(swept)} shapes)")
    finish(args, info, clock, rows=rows)


if __name__ == "__main__":
    main()
