"""Quality harness: full precision vs each quantization method on the mini-Wan video DiT.

    python bench/quality.py [--device cuda] [--models random,outliers,trained] [--steps 20]
    python bench/quality.py --models massive,sinks,heavy,modshift,constant --prompts 2 --steps 6 \
        --skip-ablations --layer-split          # the synthetic family, quick, with per-layer errors
    python bench/quality.py --models trained --dtype bfloat16 --prompts 16 \
        --attention sdpa,sdpa-fp32,q8,q8-fp16,q8-lowbit   # 8-bit attention at model level (below)

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

--attention FORMS: instead of the method table, the model's attention in each form (comma list) at each of
BF16 (no quantization), DVD-Quant W4A4 and W4 + delta-GBS, against the unquantized model with its own
attention: `sdpa` the model's 16-bit attention; `sdpa-fp32` (unquantized weights only) attention in float32
(what the 16-bit attention's own rounding costs, for scale); `q8` / `q8-fp16` the pack's 8-bit attention with
FP8 / 16-bit P.V; `q8-lowbit` (delta-GBS only) 8-bit attention at the low-bit steps only. The 8-bit calls go
through the DVD-Quant 8-bit Attention node's own override (nodes/attention.py: its routing, so calls with
fewer than 128 keys, the mini-Wan's text cross-attention, stay on the 16-bit attention as in ComfyUI), with
dvdq_core.attention's reference, which computes what the GPU kernel computes, in place of the kernel. Per
run: the final-clip error per prompt, its mean and spread over the prompts, and for 8-bit rows the paired
difference to the same weights with 16-bit attention (mean and 95% CI). Needs --dtype bfloat16 or float16
(the 8-bit attention takes 16-bit tensors).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dvdq_core  # noqa: E402
from bench import layer_error, synthetic  # noqa: E402
from demo import clips, model as demo_model  # noqa: E402
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


def prompts_and_noise(base, args, trained):
    """(prompt count, labels, prompt ids, noise): prompts spread over all labels, seeded noise."""
    device = torch.device(args.device)
    n_prompts = args.prompts if args.prompts else (clips.NUM_PROMPTS if trained else 8)
    all_l = clips.all_labels()
    labels = all_l[torch.linspace(0, len(all_l) - 1, n_prompts).round().long()]
    ids = clips.labels_to_prompt_ids(labels).to(device)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n_prompts, base.cfg.in_dim, 16, 32, 32, generator=g).to(device)
    return n_prompts, labels, ids, noise


def run_variant(label, base, args, trained):
    device = torch.device(args.device)
    base = base.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    if args.attention:
        return run_attention_variant(label, base, args, trained)
    n_prompts, labels, ids, noise = prompts_and_noise(base, args, trained)
    t0 = time.time()
    ref = run_sampler(base, noise, ids, args)
    rows = [fp_row(ref, labels, trained)]
    gbs_bits = None
    qmodels = {}
    for method, fields in METHODS:
        if args.methods and method not in args.methods.split(","):
            continue
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


# ---------------------------------------------------------------- 8-bit attention at model level (--attention)

ATTENTION_FORMS = ("sdpa", "sdpa-fp32", "q8", "q8-fp16", "q8-lowbit")
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
         12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09, 22: 2.07,
         24: 2.06, 26: 2.06, 28: 2.05, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def t975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95% CI), from the table's nearest df at or below."""
    keys = [k for k in _T975 if k <= df]
    return _T975[max(keys)] if keys else float("nan")


def spread(values) -> dict:
    """Mean, sample standard deviation and the mean's 95% CI half-width (Student's t) of a list."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "ci95": t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")}


class _Functional:
    """torch.nn.functional with scaled_dot_product_attention replaced (the demo model's attention calls)."""

    def __init__(self, attend):
        self.scaled_dot_product_attention = attend

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)


def _sdpa_host(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               **kwargs):
    """The host attention the override hands calls back to: the demo model's own ([B, H, L, D] in and out)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("scale"))


@contextlib.contextmanager
def attention_form(form: str, bit_state=None):
    """The demo model's attention in `form` (ATTENTION_FORMS) while inside. The 8-bit forms go through the
    DVD-Quant 8-bit Attention node's override (its routing: calls under 128 keys stay on the 16-bit attention)
    with the kernel's shape rules (`shape_reason`: no GPU needed) and the reference in place of the kernel.
    Yields the override's AttentionStats (None for sdpa)."""
    if form not in ATTENTION_FORMS:
        raise SystemExit(f"unknown attention form {form!r}: use {', '.join(ATTENTION_FORMS)}")
    if form in ("sdpa", "sdpa-fp32"):
        if form == "sdpa":
            yield None
            return

        def fp32(q, k, v, attn_mask=None, scale=None):  # the 16-bit attention's own rounding, for scale
            return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                                    scale=scale).to(q.dtype)
        saved = demo_model.F
        demo_model.F = _Functional(fp32)
        try:
            yield None
        finally:
            demo_model.F = saved
        return
    from bench.step import pack_module
    node = pack_module("nodes.attention")
    mode = node.LOW_BIT_STEPS if form == "q8-lowbit" else node.ALWAYS
    pv = "fp16" if form == "q8-fp16" else "fp8"

    def reference(q, k, v, *, scale, pv, backend, out_layout):  # what the kernel computes
        return node.core.attention_q8(q, k, v, scale=scale, pv=pv, backend="reference", out_layout=out_layout)

    stats = node.AttentionStats(mode=mode, pv=pv)
    override = node.make_override(mode, pv, bit_state, run=reference, check=node.core.shape_reason, stats=stats)

    def attend(q, k, v, attn_mask=None, scale=None):
        kw = {} if scale is None else {"scale": scale}
        return override(_sdpa_host, q, k, v, q.shape[1], mask=attn_mask, skip_reshape=True,
                        skip_output_reshape=True, **kw)

    saved = demo_model.F
    demo_model.F = _Functional(attend)
    try:
        yield stats
    finally:
        demo_model.F = saved


def run_attention_variant(label, base, args, trained):
    """Rows (weights x attention form) against the unquantized model with its own attention (module doc)."""
    forms = [f.strip() for f in args.attention.split(",") if f.strip()]
    for f in forms:
        if f not in ATTENTION_FORMS:
            raise SystemExit(f"unknown attention form {f!r}: use {', '.join(ATTENTION_FORMS)}")
    if args.dtype == "float32":
        raise SystemExit("--attention needs --dtype bfloat16 or float16 (the 8-bit attention takes 16-bit tensors)")
    n_prompts, labels, ids, noise = prompts_and_noise(base, args, trained)
    t0 = time.time()
    ref = run_sampler(base, noise, ids, args)
    rows = []
    settings = ((args.dtype.replace("bfloat16", "BF16").replace("float16", "FP16"), None),
                ("dvdq W4A4", 4), ("dvdq W4 dGBS", "delta"))
    for wname, setting in settings:
        model = base if setting is None else quantized_copy(base, dvdq_core.QuantConfig(backend=args.backend))
        for form in forms:
            if (form == "q8-lowbit" and setting != "delta") or (form == "sdpa-fp32" and setting is not None):
                continue  # 8-bit attention at low-bit steps: where the steps' bits differ; fp32: the BF16 rows' scale
            bs = None
            if setting == "delta":
                bs = dvdq_core.BitSwitch(delta=args.delta)
            elif setting is not None:
                bs = dvdq_core.BitSwitch(mode="fixed", fixed_bits=setting)
            state = dvdq_core.get_bit_state(model) if form == "q8-lowbit" else None
            t1 = time.time()
            with attention_form(form, state) as stats:
                res = run_sampler(model, noise, ids, args, bitswitch=bs)
            row = evaluate(f"{wname}, {form}", res, ref, labels, trained)
            row.update(weights=wname, attention=form, seconds=time.time() - t1,
                       prompt_rel_error=[rel_error(a, b) for a, b in zip(res.video.cpu(), ref.video.cpu())])
            row["prompt_spread"] = spread(row["prompt_rel_error"])
            if stats is not None:
                row["attention_calls"] = {"q8": stats.q8, "host": stats.host, "reasons": dict(stats.reasons)}
            rows.append(row)
            print(f"[{label}] {row['run']}: {row['rel_error']:.4f} ({row['seconds']:.0f} s)", file=sys.stderr,
                  flush=True)
        del model
    for r in rows:
        same = next((b for b in rows if b["weights"] == r["weights"] and b["attention"] == "sdpa"), None)
        if r["attention"] != "sdpa" and same is not None:
            r["paired_diff"] = spread([a - b for a, b in zip(r["prompt_rel_error"], same["prompt_rel_error"])])
    print(f"[{label}] {time.time() - t0:.0f} s", file=sys.stderr)
    return {"variant": label, "prompts": n_prompts, "attention_runs": rows}


def attention_markdown(result, trained):
    n = result["prompts"]
    out = [f"### {result['variant']} ({n} prompts), attention forms", "",
           "| weights | attention | avg A bits | 8-bit calls / all | rel. err | per prompt: mean ± sd | "
           "minus 16-bit attention, per prompt: mean [95% CI] | PSNR dB |" + (" task all |" if trained else "")
           + " A bits per step |",
           "|---|---|---|---|---|---|---|---|" + ("---|" if trained else "") + "---|"]
    for r in result["attention_runs"]:
        c = r.get("attention_calls")
        calls = f"{c['q8']} / {c['q8'] + c['host']}" if c else "-"
        p = r["prompt_spread"]
        d = r.get("paired_diff")
        diff = f"{d['mean']:+.4f} [{d['mean'] - d['ci95']:+.4f}, {d['mean'] + d['ci95']:+.4f}]" if d else "-"
        bits = "".join("L" if b < 8 else ("H" if b < 16 else "F") for b in r["bits"])
        out.append(f"| {r['weights']} | {r['attention']} | {r['avg_bits']:.2f} | {calls} | {r['rel_error']:.4f} | "
                   f"{p['mean']:.4f} ± {p['sd']:.4f} | {diff} | {fmt(r['psnr_db'], '.2f')} |"
                   + (f" {fmt(r['task_all'], '.2f')} |" if trained else "") + f" {bits} |")
    return "\n".join(out)


def fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf"
    return format(v, spec)


def markdown(result, trained):
    if "attention_runs" in result:
        return attention_markdown(result, trained)
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
    p.add_argument("--methods", default="",
                   help=f"comma list of methods to run ({', '.join(m for m, _ in METHODS)}; default all): quicker runs")
    p.add_argument("--layer-split", action="store_true",
                   help="per-layer output error split into weight / activation parts, every method")
    p.add_argument("--split-bits", type=int, default=4, choices=(4, 5, 6, 7, 8),
                   help="activation bits of the split (default 4)")
    p.add_argument("--attention", default="",
                   help=f"comma list of attention forms ({', '.join(ATTENTION_FORMS)}): the 8-bit attention table "
                        "instead of the method table (see above)")
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
