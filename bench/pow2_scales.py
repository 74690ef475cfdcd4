"""Would power-of-two ARQ block auto-scales cost quality? (A question from bench/NOTES-kernels.md.)

A W4A4 GEMM could run as one chained fp8 tensor-core accumulation (Triton pipelines that; the
per-K-block scaling it does today is not pipelined) if each block scale l_b were a power of two:
l_b * code is then exact in e4m3 and can be folded into the activation codes. This measures, on
the mini-Wan models of bench/quality.py, DVD-Quant W4A4 (BGR weights, rotation, block auto-scale)
with the block scales as they are and rounded UP to a power of two (so the scaled block maximum
lies in (0.5, 1] of the ideal one), and the same for the per-channel (paper) form: a power-of-two
per-channel scale could be folded into fp8 activation codes exactly too. Reference backend,
the same noise and prompts for every run, relative error and PSNR of the final clip against full
precision (and SSIM / task accuracy on the trained model). It does not model the fp8 accumulator's
own rounding (about 3e-3 relative, bench/RESULTS.md).

The "delta-GBS" rows run the product's default instead of fixed W4A4: W4 with delta-GBS 4/8 (the
default BitSwitch: delta 0.09, first step 8-bit), with QuantConfig granularity "block" and "pow2"
(the 4-octave form at the 4-bit steps, "block" at the 8-bit ones); the fixed W4A4 "granularity
pow2" row is the same product path at 4 bits only. Every row names its granularity (the rows do not
depend on QuantConfig's default). Where a block row and its pow2 row both ran, a paired per-prompt
comparison (pow2 minus block) follows the table.

The "a8" rows ask whether the 8-bit steps need ARQ's auto-scale at all (rotation + per-token 8-bit
codes only, which a plain int8 GEMM could run): "fixed W4A8, granularity pow2 (= block at 8 bits)"
against "fixed W4A8, no auto-scale at 8 bits", and "delta-GBS 4/8, granularity pow2" against
"delta-GBS 4/8, pow2 at 4 bits, no auto-scale at 8 bits". The no-auto-scale rows patch the backend
(no_auto_scale_at): at 8-bit steps the reference takes the auto_scale=False path (scale None, the
same arithmetic as l = 1); other steps are untouched. Paired comparisons: each no-auto-scale row
minus its auto-scaled row.

The "a8pow2" rows ask whether the 8-bit steps could take power-of-two BLOCK scales (each l_b
rounded up to a power of two), which a GEMM could apply once per scale exponent instead of once
per K block (bench/NOTES-kernels.md, next steps 0b): each against its block-scaled row.

usage: python bench/pow2_scales.py [--models trained,outliers,random] [--prompts 24] [--rows shipped,int8]
       [--device cpu]
       --rows gbs: only the two delta-GBS rows (block, pow2); --rows a8: the four 8-bit auto-scale
       rows above; --rows a8pow2: the power-of-two block scales at 8 bits and their block rows;
       --rows fast: the opt-in granularity pow2-fast against the patched no-auto-scale rows it
       ships (equal numbers expected); --rows "shipped,granularity": block vs pow2 (and pow2-fast),
       fixed W4A4 and delta-GBS. A token naming a set in ROW_SETS (gbs, a8, a8pow2, fast) selects
       that set's rows; any other token matches substrings of the row names, case-insensitively
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quality as q  # noqa: E402  (bench/quality.py: models, sampler and metrics)

import dvdq_core  # noqa: E402
from dvdq_core import activations, backends  # noqa: E402
from dvdq_core.demo import clips  # noqa: E402
from dvdq_core.demo.metrics import rel_error, ssim  # noqa: E402
from dvdq_core.demo.model import MiniWanConfig, load_mini_wan  # noqa: E402
from dvdq_core.demo.run import WEIGHTS, random_model  # noqa: E402


def pow2_up(auto_scale):
    def scaled(xr, granularity, block):
        l = auto_scale(xr, granularity, block)
        return torch.exp2(torch.ceil(torch.log2(l)))
    return scaled


def pow2_window(auto_scale, octaves):
    """Power-of-two per-channel scales, none more than 2**octaves below the largest of the layer: a
    4-bit code (|q| <= 7) times 2**(e_j - e_min) then fits int8 for octaves <= 4, so the scales fold
    into int8 codes and the GEMM needs one int32 accumulation over all of K (no per-block promotion)."""
    up = pow2_up(auto_scale)

    def scaled(xr, granularity, block):
        l = up(xr, granularity, block)
        return torch.maximum(l, l.amax() * 2.0 ** -octaves)
    return scaled


def pow2_window_groups(auto_scale, octaves, group):
    """pow2_window over blocks of `group` channels (one scale per group): the kernels' pass 1 could
    then keep a per-(row, group) maximum and pass 2 read X once, as the block form does."""
    up = pow2_window(auto_scale, octaves)

    def scaled(xr, granularity, block):
        return up(xr, "block", group)
    return scaled


def no_auto_scale_at(bits):
    """Backend patches (for backends.scale_granularity and backends.auto_scale) under which a step at
    `bits` activation bits has no auto-scale: scale_granularity says so, and auto_scale then returns
    None, the scale reference_forward has with auto_scale=False. Other bit-widths are unchanged."""
    real_gran, real_scale = backends.scale_granularity, backends.auto_scale
    off = object()  # the granularity auto_scale is told at those steps

    def granularity(g, b):
        return off if b == bits else real_gran(g, b)

    def scale(xr, g, block):
        return None if g is off else real_scale(xr, g, block)
    return {"scale_granularity": granularity, "auto_scale": scale}


# --rows tokens that name a set of rows (exactly those rows)
ROW_SETS = {
    "gbs": ("delta-GBS 4/8, granularity block", "delta-GBS 4/8, granularity pow2"),
    "a8": ("fixed W4A8, granularity pow2 (= block at 8 bits)", "fixed W4A8, no auto-scale at 8 bits",
           "delta-GBS 4/8, granularity pow2", "delta-GBS 4/8, pow2 at 4 bits, no auto-scale at 8 bits"),
    "fast": ("delta-GBS 4/8, pow2 at 4 bits, no auto-scale at 8 bits", "delta-GBS 4/8, granularity pow2-fast",
             "fixed W4A8, no auto-scale at 8 bits", "fixed W4A8, granularity pow2-fast"),
    "a8pow2": ("fixed W4A8, granularity pow2 (= block at 8 bits)", "fixed W4A8, power-of-two block scales at 8 bits",
               "delta-GBS 4/8, granularity pow2", "delta-GBS 4/8, pow2 at 4 bits, power-of-two block scales at 8 bits"),
}
# paired comparisons printed after each table: (row a, row b, name of b, name of a), b minus a
PAIRS = (("block auto-scale (shipped)", "granularity pow2 (the 4-octave row through QuantConfig)", "pow2", "block"),
         ("delta-GBS 4/8, granularity block", "delta-GBS 4/8, granularity pow2", "pow2", "block"),
         ("fixed W4A8, granularity pow2 (= block at 8 bits)", "fixed W4A8, no auto-scale at 8 bits",
          "no-scale", "scaled"),
         ("delta-GBS 4/8, granularity pow2", "delta-GBS 4/8, pow2 at 4 bits, no auto-scale at 8 bits",
          "no-scale", "scaled"),
         ("fixed W4A8, granularity pow2 (= block at 8 bits)", "fixed W4A8, power-of-two block scales at 8 bits",
          "pow2-block", "block"),
         ("delta-GBS 4/8, granularity pow2", "delta-GBS 4/8, pow2 at 4 bits, power-of-two block scales at 8 bits",
          "pow2-block", "block"))


def selected(name, rows):
    """Whether --rows (comma-separated tokens; empty: every row) selects the row `name`."""
    if not rows:
        return True
    return any(name in ROW_SETS[t] if t in ROW_SETS else t.lower() in name.lower() for t in rows.split(","))


def per_prompt(res, ref, labels, trained):
    """Per-prompt rel. err (and SSIM, task hit on the trained model), for the paired comparison."""
    v = res.video.cpu()
    out = {"pp_rel_error": [rel_error(v[i], ref.video[i]) for i in range(len(v))]}
    if trained:
        out["pp_ssim"] = [ssim(v[i:i + 1], ref.video[i:i + 1]) for i in range(len(v))]
        out["pp_task"] = (clips.detect(v)["labels"] == labels.cpu()).all(1).tolist()
    return out


def paired(a, b, trained, nb="pow2", na="block"):
    """Row b (nb, e.g. pow2) minus row a (na, e.g. block), per prompt: mean difference, its
    standard error, wins."""
    def stat(key, better):
        d = torch.tensor(b[key]) - torch.tensor(a[key])
        se = d.std() / len(d) ** 0.5
        return (f"{key[3:]} {d.mean():+.4f} +- {se:.4f} (s.e.), {nb} better on {int(better(d).sum())}/{len(d)}, "
                f"per-prompt spread of {na} {torch.tensor(a[key]).std():.4f}")
    s = [stat("pp_rel_error", lambda d: d < 0)]
    if trained:
        s.append(stat("pp_ssim", lambda d: d > 0))
        ta, tb = torch.tensor(a["pp_task"]), torch.tensor(b["pp_task"])
        s.append(f"task: right with {nb} only {int((tb & ~ta).sum())}, with {na} only {int((ta & ~tb).sum())}")
    return f"- {b['run']} vs {a['run']}: " + "; ".join(s)


def run(label, base, args, trained):
    device = torch.device(args.device)
    base = base.to(device).float().eval()
    all_l = clips.all_labels()
    labels = all_l[torch.linspace(0, len(all_l) - 1, args.prompts).round().long()]
    ids = clips.labels_to_prompt_ids(labels).to(device)
    noise = torch.randn(args.prompts, base.cfg.in_dim, 16, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    ref = q.run_sampler(base, noise, ids, args)
    rows = []
    real = backends.auto_scale
    real_gran = backends.scale_granularity
    for name, cfg, patch in (
            ("block auto-scale (shipped)", dvdq_core.QuantConfig(granularity="block", backend="reference"), None),
            ("block auto-scale, powers of two", dvdq_core.QuantConfig(granularity="block", backend="reference"),
             pow2_up(real)),
            ("per-channel auto-scale (paper form)", dvdq_core.QuantConfig(granularity="channel", backend="reference"),
             None),
            ("per-channel auto-scale, powers of two",
             dvdq_core.QuantConfig(granularity="channel", backend="reference"), pow2_up(real)),
            ("per-channel auto-scale, powers of two within 4 octaves (int8-foldable)",
             dvdq_core.QuantConfig(granularity="channel", backend="reference"), pow2_window(real, 4)),
            ("16-channel blocks, powers of two within 4 octaves (int8-foldable)",
             dvdq_core.QuantConfig(granularity="channel", backend="reference"), pow2_window_groups(real, 4, 16)),
            ("8-channel blocks, powers of two within 4 octaves (int8-foldable)",
             dvdq_core.QuantConfig(granularity="channel", backend="reference"), pow2_window_groups(real, 4, 8)),
            ("no auto-scale (rotation only)", dvdq_core.QuantConfig(auto_scale=False, backend="reference"), None),
            ("granularity pow2 (the 4-octave row through QuantConfig)",
             dvdq_core.QuantConfig(granularity="pow2", backend="reference"), None),
            ("delta-GBS 4/8, granularity block", dvdq_core.QuantConfig(granularity="block", backend="reference"), None),
            ("delta-GBS 4/8, granularity pow2", dvdq_core.QuantConfig(granularity="pow2", backend="reference"), None),
            ("delta-GBS 4/8, pow2 at 4 bits, no auto-scale at 8 bits",
             dvdq_core.QuantConfig(granularity="pow2", backend="reference"), no_auto_scale_at(8)),
            ("fixed W4A8, granularity pow2 (= block at 8 bits)",
             dvdq_core.QuantConfig(granularity="pow2", backend="reference"), None),
            ("fixed W4A8, no auto-scale at 8 bits",
             dvdq_core.QuantConfig(granularity="pow2", backend="reference"), no_auto_scale_at(8)),
            # the shipped opt-in form of the two no-auto-scale rows above (must give their numbers)
            ("delta-GBS 4/8, granularity pow2-fast",
             dvdq_core.QuantConfig(granularity="pow2-fast", backend="reference"), None),
            ("fixed W4A8, granularity pow2-fast",
             dvdq_core.QuantConfig(granularity="pow2-fast", backend="reference"), None),
            # pow2_up leaves the 4-bit steps' scales (already powers of two) as they are
            ("fixed W4A8, power-of-two block scales at 8 bits",
             dvdq_core.QuantConfig(granularity="pow2", backend="reference"), pow2_up(real)),
            ("delta-GBS 4/8, pow2 at 4 bits, power-of-two block scales at 8 bits",
             dvdq_core.QuantConfig(granularity="pow2", backend="reference"), pow2_up(real))):
        if not selected(name, args.rows):
            continue
        model = q.quantized_copy(base, cfg)
        # patch: a replacement for backends.auto_scale, or a dict of backends attributes to replace
        patch = patch if isinstance(patch, dict) else {"auto_scale": patch} if patch else {}
        backends.auto_scale = patch.get("auto_scale", real)
        backends.scale_granularity = patch.get("scale_granularity", real_gran)
        bs = (dvdq_core.BitSwitch() if name.startswith("delta-GBS")
              else dvdq_core.BitSwitch(mode="fixed", fixed_bits=8 if name.startswith("fixed W4A8") else 4))
        try:
            res = q.run_sampler(model, noise, ids, args, bitswitch=bs)
        finally:
            backends.auto_scale, backends.scale_granularity = real, real_gran
        rows.append(q.evaluate(name, res, ref, labels, trained, per_prompt(res, ref, labels, trained)))
        del model
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="trained,outliers,random")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--rows", default="", help="comma-separated substrings, or set names of ROW_SETS (gbs, a8, a8pow2, fast): run only the rows "
                                           "selected")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    # the patch points are the ones the reference uses
    assert activations.auto_scale is backends.auto_scale
    assert activations.scale_granularity is backends.scale_granularity
    print(f"DVD-Quant W4A4 (delta-GBS rows: W4, 4/8; fixed W4A8 rows: W4A8) (BGR weights, rotation 128, reference backend), "
          f"{args.prompts} prompts, {args.steps} steps, device {args.device}\n")
    for which in args.models.split(","):
        t0 = time.time()
        if which == "trained":
            base, label, trained = load_mini_wan(WEIGHTS), "trained mini-Wan", True
        else:
            base, label, trained = random_model(MiniWanConfig(), 0), "random weights", False
            if which == "outliers":
                base, label = q.inject_outliers(base, 0), "random weights + injected outlier channels"
        rows = run(label, base, args, trained)
        print(f"### {label} ({time.time() - t0:.0f} s)\n")
        head = "| auto-scale | avg A bits | rel. err | PSNR dB |" + (" SSIM | task all |" if trained else "")
        print(head + "\n|" + "---|" * (head.count("|") - 1))
        for r in rows:
            extra = f" {r['ssim']:.3f} | {r['task_all']:.2f} |" if trained else ""
            print(f"| {r['run']} | {r['avg_bits']:.2f} | {r['rel_error']:.4f} | {r['psnr_db']:.2f} |" + extra)
        print()
        by = {r["run"]: r for r in rows}
        for r in rows:
            if r["run"].startswith("delta-GBS"):
                print(f"- {r['run']}: schedule {''.join('L' if b == 4 else 'H' for b in r['bits'])}")
        for a, b, nb, na in PAIRS:
            if a in by and b in by:
                print(paired(by[a], by[b], trained, nb, na))
        print(flush=True)


if __name__ == "__main__":
    main()
