"""Quality harness: full precision vs each quantization method on the mini-Wan video DiT.

    python bench/quality.py [--device cuda] [--models random,outliers,trained] [--steps 20]
    python bench/quality.py --models massive,sinks,heavy,modshift,constant --prompts 2 --steps 6 \
        --skip-ablations --layer-split          # the synthetic family, quick, with per-layer errors

For each model variant:
  (a) "random": random weights (no trained activation structure),
  (b) "outliers": the same random model with a few outlier channels injected in the
      residual stream (patch embedding), the AdaLN modulation (scale of the attention and FFN
      inputs), the cross-attention input norm and the FFN hidden layer,
  (c) "trained": the shipped trained mini-Wan (demo/weights),
  (d) the synthetic family of bench/synthetic.py (docs/test-models.md): random weights with
      "massive", "sinks", "heavy", "modshift", "constant" (or several joined by "+"),
it samples the same prompts from the same noise in full precision and with each method
(minmax, smoothquant, quarot, dvdq without its SVD branch, dvdq) at W4A8, W4A4 and W4 with delta-GBS 4/8, and reports per run:
relative error and PSNR of the final clip against full precision, the per-step error curve of the
latent x_t, the average activation bits; on trained weights also SSIM, the detector's task
accuracy (colour/shape/motion) and temporal consistency (centroid-track straightness, area
variation). Ablations (on each variant): BGR only / ARQ only / both at W4A4, delta-GBS against
fixed schedules with the same number of 4-bit steps, and BGR's weight-error reduction per layer
type (--skip-ablations: the method table only). --layer-split: for every quantized layer and
method, the output error at W4A4 (--split-bits) on real inputs split into its weight and activation parts
(bench/layer_error.py). Markdown to stdout; all numbers (curves included) to --json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dvdq_core  # noqa: E402
from bench import layer_error, synthetic  # noqa: E402
from demo import clips  # noqa: E402
from demo.metrics import psnr, rel_error, ssim  # noqa: E402
from demo.model import MiniWanConfig, load_mini_wan  # noqa: E402
from demo.run import TINY, WEIGHTS  # noqa: E402
from demo.sampling import sample  # noqa: E402
from dvdq_core.hadamard import effective_block, rotate  # noqa: E402
from dvdq_core.linear import quantize_weight  # noqa: E402

# (label, QuantConfig fields): the baselines, DVD-Quant without its SVD branch (the default before it), and
# DVD-Quant as it ships (docs/method.md)
METHODS = (("minmax", {"method": "minmax"}), ("smoothquant", {"method": "smoothquant"}),
           ("quarot", {"method": "quarot"}), ("dvdq-nosvd", {"method": "dvdq", "svd_rank": 0}),
           ("dvdq", {"method": "dvdq"}))


def run_sampler(model, noise, ids, args, bitswitch=None):
    return sample(model, noise, ids, steps=args.steps, cfg=args.cfg, shift=args.shift,
                  bitswitch=bitswitch, record_outputs=bitswitch is None)


def quantized_copy(base, config, weights_from=None):
    """Quantize a copy of ``base``; ``weights_from="minmax"`` replaces the weights by min-max ones
    in the same (rotated) basis, for the "ARQ only" ablation."""
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dvdq_core.quantize_model(model, config)
    if weights_from == "minmax":
        for name, layer in dvdq_core.quantized_layers(model):
            spec = dataclasses.replace(layer.spec, method="minmax")
            qw, _ = quantize_weight(base.get_submodule(name).weight, spec)
            layer.load_quantized_weight(qw)
    return model


def evaluate(name, res, ref, labels, trained, extra=None):
    v = res.video.cpu()
    row = {"run": name, "bits": [b if b is not None else 16 for b in res.bits],
           "rel_error": rel_error(v, ref.video), "psnr_db": psnr(v, ref.video),
           "step_rel_error": [rel_error(a, b) for a, b in zip(res.latents, ref.latents)]}
    row["avg_bits"] = sum(row["bits"]) / len(row["bits"])
    if trained:
        row["ssim"] = ssim(v, ref.video)
        row.update({f"task_{k}": val for k, val in clips.task_accuracy(v, labels).items()})
    row.update(extra or {})
    return row


def fp_row(ref, labels, trained):
    row = {"run": "full precision", "bits": [16] * len(ref.latents), "avg_bits": 16.0, "rel_error": 0.0,
           "psnr_db": float("inf"), "step_rel_error": [0.0] * len(ref.latents)}
    if trained:
        row["ssim"] = 1.0
        row.update({f"task_{k}": val for k, val in clips.task_accuracy(ref.video.cpu(), labels).items()})
    return row


def simulate_gbs(outputs, delta, low=4, high=8):
    """The delta-GBS schedule a BitSwitch would pick on a fixed sequence of model outputs."""
    bs = dvdq_core.BitSwitch(delta=delta, low=low, high=high)
    bits = []
    for i, out in enumerate(outputs):
        bits.append(bs.next_bits(i, last=i == len(outputs) - 1))  # as demo.sampling.sample asks
        bs.observe(out)
    return bits


def fixed_schedules(n, n_low, seed=0):
    lo, hi = 4, 8
    alt = [hi] * n
    if n_low:
        for i in range(n_low):  # spread the low steps evenly
            alt[min(n - 1, int(round((i + 0.5) * n / n_low - 0.5)))] = lo
    rnd = [lo] * n_low + [hi] * (n - n_low)
    random.Random(seed).shuffle(rnd)
    return {"low-first": [lo] * n_low + [hi] * (n - n_low), "high-first": [hi] * (n - n_low) + [lo] * n_low,
            "alternate": alt, "random": rnd}


def layer_type(name):
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else name


def bgr_weight_table(base):
    """Per layer type: mean squared-error reduction of BGR over min-max at 4 bits, in the plain
    basis and in the Hadamard-rotated basis DVD-Quant quantizes in."""
    acc = {}
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            w = m.weight.detach().float()
            for basis, ww in (("plain", w), ("rotated", rotate(w, effective_block(128, w.shape[1])))):
                e_mm = (dvdq_core.minmax_quantize(ww, 4).dequantize() - ww).pow(2).sum().item()
                e_bgr = (dvdq_core.bgr_quantize(ww, 4).dequantize() - ww).pow(2).sum().item()
                acc.setdefault((layer_type(name), basis), []).append(1 - e_bgr / e_mm)
    return {f"{t}|{b}": sum(v) / len(v) for (t, b), v in acc.items()}


def run_variant(label, base, args, trained):
    device = torch.device(args.device)
    base = base.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    n_prompts = args.prompts if args.prompts else (clips.NUM_PROMPTS if trained else 8)
    all_l = clips.all_labels()
    labels = all_l[torch.linspace(0, len(all_l) - 1, n_prompts).round().long()]
    ids = clips.labels_to_prompt_ids(labels).to(device)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n_prompts, base.cfg.in_dim, 16, 32, 32, generator=g).to(device)
    t0 = time.time()
    ref = run_sampler(base, noise, ids, args)
    rows = [fp_row(ref, labels, trained)]
    gbs_bits = None
    qmodels = {}
    for method, fields in METHODS:
        cfg = dvdq_core.QuantConfig(backend=args.backend, **fields)
        model = quantized_copy(base, cfg)
        if args.layer_split:
            qmodels[method] = model
        for setting in ("W4A8", "W4A4", "W4 dGBS"):
            bs = None
            if setting == "W4 dGBS":
                bs = dvdq_core.BitSwitch(delta=args.delta)
            else:
                bs = dvdq_core.BitSwitch(mode="fixed", fixed_bits=int(setting[-1]))
            res = run_sampler(model, noise, ids, args, bitswitch=bs)
            rows.append(evaluate(f"{method} {setting}", res, ref, labels, trained))
            if method == "dvdq" and setting == "W4 dGBS":
                gbs_bits = rows[-1]["bits"]
        del model
    split = None
    if args.layer_split:
        calls = sorted({0, args.steps // 2, args.steps - 1})
        rec = layer_error.SplitRecorder(base, qmodels, args.split_bits, calls)
        try:
            run_sampler(base, noise, ids, args)
        finally:
            rec.remove()
        split = {"a_bits": args.split_bits, "calls": calls, "layers": rec.result()}
        split["summary"] = layer_error.summary(split["layers"])
        del qmodels
    if args.skip_ablations:
        print(f"[{label}] {time.time() - t0:.0f} s", file=sys.stderr)
        return {"variant": label, "prompts": n_prompts, "runs": rows, "layer_split": split}
    # Ablations at W4A4: neither = minmax; BGR only; ARQ only (min-max weights); both = dvdq.
    abl = []
    for name, cfg, wf in (
            ("BGR only (no rotation, no auto-scale)",
             dvdq_core.QuantConfig(rotate=False, auto_scale=False, backend=args.backend), None),
            ("ARQ only (rotation + auto-scale, min-max weights)", dvdq_core.QuantConfig(backend=args.backend), "minmax"),
            ("rotation only (QuaRot, min-max weights)", dvdq_core.QuantConfig(method="quarot", backend=args.backend), None),
            ("BGR + rotation, no auto-scale", dvdq_core.QuantConfig(auto_scale=False, backend=args.backend), None),
            ("ARQ only, per-channel auto-scale (paper form), min-max weights",
             dvdq_core.QuantConfig(granularity="channel", backend="reference"), "minmax"),
            ("BGR + ARQ, per-channel auto-scale (paper form)",
             dvdq_core.QuantConfig(granularity="channel", backend="reference"), None)):
        model = quantized_copy(base, cfg, weights_from=wf)
        bs = dvdq_core.BitSwitch(mode="fixed", fixed_bits=4)
        abl.append(evaluate(name, run_sampler(model, noise, ids, args, bs), ref, labels, trained))
        del model
    # delta-GBS vs fixed schedules with the same number of 4-bit steps. Two deltas: the default,
    # and one picked on the full-precision trajectory to give about half the steps at 4 bits.
    deltas = [("default", args.delta, gbs_bits)]
    cands = [d / 1000 for d in range(1, 2000)]
    half = min(cands, key=lambda d: abs(simulate_gbs(ref.outputs, d).count(4) - args.steps // 2))
    deltas.append(("~half low", half, None))
    sched_rows = []
    model = quantized_copy(base, dvdq_core.QuantConfig(backend=args.backend))
    for tag, delta, bits in deltas:
        if bits is None:
            res = run_sampler(model, noise, ids, args, bitswitch=dvdq_core.BitSwitch(delta=delta))
            row = evaluate(f"delta-GBS ({tag}, delta={delta:g})", res, ref, labels, trained)
            bits = row["bits"]
        else:
            row = dict(next(r for r in rows if r["run"] == "dvdq W4 dGBS"))
            row["run"] = f"delta-GBS ({tag}, delta={delta:g})"
        sched_rows.append(row)
        n_low = bits.count(4)
        for sname, sched in fixed_schedules(args.steps, n_low).items():
            bs = dvdq_core.BitSwitch(mode="manual", schedule=",".join(map(str, sched)))
            sched_rows.append(evaluate(f"  {sname} ({n_low} x 4-bit)", run_sampler(model, noise, ids, args, bs),
                                       ref, labels, trained))
    del model
    bgr = bgr_weight_table(copy.deepcopy(base).float().cpu())
    print(f"[{label}] {time.time() - t0:.0f} s", file=sys.stderr)
    return {"variant": label, "prompts": n_prompts, "runs": rows, "ablations": abl, "schedules": sched_rows,
            "bgr_weight_error_reduction": bgr, "layer_split": split}


def fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf"
    return format(v, spec)


def markdown(result, trained):
    out = [f"### {result['variant']} ({result['prompts']} prompts)", ""]
    head = "| run | avg A bits | rel. err | PSNR dB | err@25% | err@50% | err@75% | err@100% |"
    sep = "|---|---|---|---|---|---|---|---|"
    if trained:
        head += " SSIM | task all | colour | shape | motion | track RMSE px | area CV |"
        sep += "---|---|---|---|---|---|---|"

    def line(r):
        c = r["step_rel_error"]
        n = len(c)
        pts = [c[max(0, int(round(f * n)) - 1)] for f in (0.25, 0.5, 0.75, 1.0)]
        s = (f"| {r['run']} | {r['avg_bits']:.2f} | {fmt(r['rel_error'], '.4f')} | {fmt(r['psnr_db'], '.2f')} | "
             + " | ".join(fmt(p, ".4f") for p in pts) + " |")
        if trained:
            s += (f" {fmt(r['ssim'])} | {fmt(r['task_all'], '.2f')} | {fmt(r['task_colour'], '.2f')} | "
                  f"{fmt(r['task_shape'], '.2f')} | {fmt(r['task_motion'], '.2f')} | "
                  f"{fmt(r['task_traj_rmse_px'], '.2f')} | {fmt(r['task_area_cv'], '.3f')} |")
        return s
    out += [head, sep] + [line(r) for r in result["runs"]]
    split = result.get("layer_split")
    if split:
        out += ["", layer_error.markdown(split["summary"], split["a_bits"], split["calls"])]
    if "ablations" not in result:
        return "\n".join(out)
    out += ["", "Ablations at W4A4:", "", head, sep] + [line(r) for r in result["ablations"]]
    out += ["", "delta-GBS against fixed schedules with the same number of 4-bit steps (same weights):", "",
            head + " schedule |", sep + "---|"]
    out += [line(r) + " " + "".join("L" if b == 4 else "H" for b in r["bits"]) + " |" for r in result["schedules"]]
    out += ["", "BGR squared weight-error reduction vs min-max, W4, mean over blocks:", "",
            "| layer type | plain basis | Hadamard-rotated basis |", "|---|---|---|"]
    bgr = result["bgr_weight_error_reduction"]
    for t in sorted({k.split("|")[0] for k in bgr}):
        out.append(f"| {t} | {100 * bgr[t + '|plain']:.1f}% | {100 * bgr[t + '|rotated']:.1f}% |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="random,outliers,trained")
    p.add_argument("--weights", default=WEIGHTS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=0.09)
    p.add_argument("--prompts", type=int, default=0, help="prompts per variant (0: 72 trained, 8 random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (the Triton kernels take bfloat16/float16 only)")
    p.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test)")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--skip-ablations", action="store_true",
                   help="the method table only (no ablations, schedules or BGR table): quick runs")
    p.add_argument("--layer-split", action="store_true",
                   help="per-layer output error split into weight / activation parts, every method")
    p.add_argument("--split-bits", type=int, default=4, choices=(4, 5, 6, 7, 8),
                   help="activation bits of the split (default 4)")
    args = p.parse_args(argv)
    results = []
    for which in args.models.split(","):
        if which == "trained":
            if args.tiny or not os.path.exists(args.weights):
                print(f"(skipping the trained model: {args.weights} not found)", file=sys.stderr)
                continue
            base, label, trained = load_mini_wan(args.weights), "trained mini-Wan", True
        else:
            try:
                base, label = synthetic.build(which, TINY if args.tiny else MiniWanConfig(), args.seed)
            except ValueError as e:
                raise SystemExit(f"unknown model variant {which!r}: use trained, or {e}") from None
            trained = False
        results.append((run_variant(label, base, args, trained), trained))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"## Quality (mini-Wan, {args.steps} Euler steps, CFG {args.cfg}, shift {args.shift}, "
          f"delta {args.delta}, device {dev})\n")
    for r, trained in results:
        print(markdown(r, trained) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for r, _ in results], f)


if __name__ == "__main__":
    main()
