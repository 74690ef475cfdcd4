"""The built-in demo (`make demo` / `python -m demo`).

Quantizes the shipped mini-Wan model (a small video DiT trained here on procedural clips, see
docs/demo.md) with the default settings, samples a few prompts in full precision and quantized
from the same noise, and writes to ``--out`` (default ``out/``):

- ``demo.png``: an animated PNG, one row per prompt: full precision | min-max W4A4 |
  DVD-Quant W4A4 | DVD-Quant W4 with delta-GBS 4/8 bits;
- ``bits_per_step.svg``: the activation bits chosen at each denoising step;
- ``metrics.json``: what it prints: PSNR / SSIM / relative error against full precision, the
  detector's task accuracy, average activation bits, bits per step.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

import torch

from .clips import labels_to_prompt_ids, parse_prompt, prompt_text, task_accuracy
from .media import bits_svg, video_grid, write_apng
from .metrics import psnr, rel_error, ssim
from .model import MiniWan, MiniWanConfig, load_mini_wan
from .sampling import sample

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "mini_wan.safetensors")
DEFAULT_PROMPTS = ("a red circle moving right", "a cyan triangle moving up",
                   "a yellow square moving left", "a magenta circle moving down")
TINY = MiniWanConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, freq_dim=64, text_dim=32)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--weights", default=WEIGHTS, help="mini-Wan safetensors (default: the shipped model)")
    p.add_argument("--prompt", action="append", help="a prompt such as 'a red circle moving left' "
                   "(repeatable; colours red green blue yellow magenta cyan, shapes square circle "
                   "triangle, motions left right up down)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta", type=float, default=None, help="delta-GBS threshold (default: the core's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (auto: bfloat16 on CUDA, where the Triton kernels need it; float32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (for tests)")
    return p.parse_args(argv)


def random_model(cfg: MiniWanConfig, seed: int) -> MiniWan:
    """Random weights with a random head (the training init's zero head would output nothing)."""
    torch.manual_seed(seed)
    model = MiniWan(cfg)
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def load_model(args):
    """(model, description). Random weights, said loudly, when no trained weights exist."""
    if args.tiny:
        return random_model(TINY, args.seed), "a tiny RANDOM-weight mini-Wan (--tiny, for tests)"
    if os.path.exists(args.weights):
        model = load_mini_wan(args.weights)
        return model, f"the trained mini-Wan ({os.path.basename(args.weights)})"
    if args.weights != WEIGHTS:
        raise SystemExit(f"error: weights file {args.weights} does not exist")
    return random_model(MiniWanConfig(), args.seed), (
        "RANDOM weights: the trained model file is missing, so the clips are noise and the "
        "task accuracy means nothing (re-make it with `python -m demo.train`)")


def backend_used(model, dtype) -> str:
    """Which backend the model's quantized layers run on (checked on its first layer)."""
    import dvdq_core
    layers = dvdq_core.quantized_layers(model)
    return dvdq_core.backends.linear_backend(layers[0][1], dtype) if layers else "-"


def run_variant(base, name, config, bitswitch, noise, ids, args):
    import dvdq_core
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    report = dvdq_core.quantize_model(model, config) if config is not None else None
    tq = time.perf_counter() - t0
    if config is not None and bitswitch is None:
        dvdq_core.set_activation_bits(model, config.a_bits)
    t0 = time.perf_counter()
    res = sample(model, noise, ids, steps=args.steps, cfg=args.cfg, shift=args.shift, bitswitch=bitswitch)
    ts = time.perf_counter() - t0
    bits = [b if b is not None else (config.a_bits if config is not None else 16) for b in res.bits]
    indicator = [r.indicator for r in bitswitch.log] if bitswitch is not None else None
    return {"name": name, "video": res.video.cpu(), "latents": res.latents, "bits": bits,
            "indicator": indicator, "quant_seconds": tq, "sample_seconds": ts,
            "backend": backend_used(model, next(base.parameters()).dtype),
            "weight_rel_error": report.mean_rel_error if report is not None else 0.0,
            "bytes": (report.bytes_before, report.bytes_after) if report is not None else None}


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else [])
    import dvdq_core
    try:
        labels = torch.stack([parse_prompt(p) for p in (args.prompt or DEFAULT_PROMPTS)])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    device = torch.device(args.device)
    base, what = load_model(args)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base = base.to(device=device, dtype=dtype).eval()
    print(f"DVD-Quant demo on {what}; device {device}, {str(dtype).replace('torch.', '')}; {len(labels)} prompts, "
          f"{args.steps} Euler steps, "
          f"CFG {args.cfg}, same noise for every variant")
    ids = labels_to_prompt_ids(labels).to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    noise = torch.randn(len(labels), base.cfg.in_dim, 16, 32, 32, generator=g).to(device)

    gbs_kwargs = {} if args.delta is None else {"delta": args.delta}
    variants = [
        ("full precision", None, None),
        ("min-max W4A4", dvdq_core.QuantConfig(method="minmax", a_bits=4), None),
        ("DVD-Quant W4A4", dvdq_core.QuantConfig(a_bits=4), None),
        ("DVD-Quant delta-GBS", dvdq_core.QuantConfig(), dvdq_core.BitSwitch(**gbs_kwargs)),
    ]
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference-backend note, printed once below
        for name, config, bs in variants:
            results.append(run_variant(base, name, config, bs, noise, ids, args))
            r = results[-1]
            print(f"  {name:22s} quantize {r['quant_seconds']:5.1f} s, sample {r['sample_seconds']:6.1f} s"
                  f"  backend: {r['backend']}")

    ref = results[0]
    rows = []
    for r in results:
        acc = task_accuracy(r["video"], labels)
        step_err = [rel_error(a, b) for a, b in zip(r["latents"], ref["latents"])]
        rows.append({"variant": r["name"], "avg_bits": sum(r["bits"]) / len(r["bits"]),
                     "bits_per_step": r["bits"], "psnr_db": psnr(r["video"], ref["video"]),
                     "ssim": ssim(r["video"], ref["video"]), "rel_error": rel_error(r["video"], ref["video"]),
                     "weight_rel_error": r["weight_rel_error"], "task_all": acc["all"],
                     "task_colour": acc["colour"], "task_shape": acc["shape"], "task_motion": acc["motion"],
                     "traj_rmse_px": acc["traj_rmse_px"], "step_rel_error": step_err,
                     "sample_seconds": r["sample_seconds"], "backend": r["backend"]})

    print()
    print(f"{'variant':22s} {'A bits':>6s} {'PSNR dB':>8s} {'SSIM':>6s} {'rel.err':>8s} {'task':>5s} "
          f"{'colour':>6s} {'shape':>6s} {'motion':>6s}")
    for row in rows:
        p = "inf" if row["psnr_db"] == float("inf") else f"{row['psnr_db']:.2f}"
        print(f"{row['variant']:22s} {row['avg_bits']:6.2f} {p:>8s} {row['ssim']:6.3f} {row['rel_error']:8.4f} "
              f"{row['task_all']:5.2f} {row['task_colour']:6.2f} {row['task_shape']:6.2f} {row['task_motion']:6.2f}")
    gbs = results[-1]
    print(f"\ndelta-GBS bits per step: {','.join(str(b) for b in gbs['bits'])} "
          f"(average {rows[-1]['avg_bits']:.2f})")
    print("(PSNR/SSIM/rel.err: against the full-precision clip from the same noise; task: the detector's "
          "colour+shape+motion all right)")

    os.makedirs(args.out, exist_ok=True)
    grid = video_grid([[r["video"][i] for r in results] for i in range(len(labels))],
                      ["FULL PRECISION", "MINMAX W4A4", "DVDQ W4A4", "DVDQ GBS 4/8"],
                      [])
    write_apng(os.path.join(args.out, "demo.png"), grid, fps=6)
    with open(os.path.join(args.out, "bits_per_step.svg"), "w") as f:
        f.write(bits_svg({r["name"]: r["bits"] for r in results[1:]}, gbs["indicator"]))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"model": what, "prompts": [prompt_text(l) for l in labels], "steps": args.steps,
                   "cfg": args.cfg, "seed": args.seed, "device": str(device), "dtype": str(dtype),
                   "variants": rows}, f, indent=1)
    print(f"\nwrote {args.out}/demo.png (rows: {'; '.join(prompt_text(l) for l in labels)}), "
          f"{args.out}/bits_per_step.svg, {args.out}/metrics.json")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
