"""Few-step sampling: what delta-GBS decides and what it costs at 4, 8 and 20 steps, on the trained mini-Wan.

    python bench/few_steps.py [--steps 4 8 20] [--prompts 24] [--cfg 5] [--device cpu]

Distilled models and LoRAs (Wan 2.2's 4-step lightx2v, CFG 1) sample in 4 to 8 steps, where each
step moves the output far more than at 20. For each step count, from the same noise: full
precision, W4A8, W4A4, W4 with delta-GBS at several deltas with the final step at high bits (the
default, `final_step_high`) and without (the paper's rule alone), and the fixed schedule with only
the first and the last step high; the final clip's relative error and PSNR against full precision
at that step count, the detector's task accuracy, the average bits and the bits of each step.
Markdown to stdout. The mini-Wan is trained for 20 steps, not distilled: at 4 steps its
full-precision clips are worse too, so the errors here are quantization's, measured against that run.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dvdq_core  # noqa: E402
from demo import clips  # noqa: E402
from demo.metrics import psnr, rel_error  # noqa: E402
from demo.model import load_mini_wan  # noqa: E402
from demo.run import WEIGHTS  # noqa: E402
from demo.sampling import sample  # noqa: E402


def trained_setup(prompts: int, seed: int, dev):
    """The demo's trained mini-Wan in float32 and a default-quantized copy, with prompts spread evenly over the
    labels, their prompt ids and the noise of `seed`: (base, quantized, labels, ids, noise)."""
    base = load_mini_wan(WEIGHTS, device=dev).float().eval()
    all_l = clips.all_labels()
    labels = all_l[torch.linspace(0, len(all_l) - 1, prompts).round().long()]
    ids = clips.labels_to_prompt_ids(labels).to(dev)
    noise = torch.randn(prompts, base.cfg.in_dim, 16, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dev)
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference backend on the CPU
        dvdq_core.quantize_model(model, dvdq_core.QuantConfig())
    return base, model, labels, ids, noise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 20])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--deltas", type=float, nargs="+", default=[0.09, 0.2, 0.4])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    base, model, labels, ids, noise = trained_setup(a.prompts, a.seed, torch.device(a.device))
    print(f"mini-Wan (trained), {a.prompts} prompts, CFG {a.cfg}, shift {a.shift}, {a.device}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| steps | run | avg A bits | rel. err | PSNR dB | task all | bits per step |")
    print("|---|---|---|---|---|---|---|")
    for n in a.steps:
        t0 = time.time()
        ref = sample(base, noise, ids, steps=n, cfg=a.cfg, shift=a.shift)
        runs = [("W4A8", dvdq_core.BitSwitch(mode="fixed", fixed_bits=8)),
                ("W4A4", dvdq_core.BitSwitch(mode="fixed", fixed_bits=4))]
        for d in a.deltas:
            runs += [(f"delta-GBS, delta {d:g}", dvdq_core.BitSwitch(delta=d)),
                     (f"delta-GBS, delta {d:g}, paper's rule alone", dvdq_core.BitSwitch(delta=d, last_high=False))]
        runs.append(("first and last step high", dvdq_core.BitSwitch(mode="manual", schedule=",".join(
            ["8"] + ["4"] * (n - 2) + ["8"]))))
        task = clips.task_accuracy(ref.video.cpu(), labels)["all"]
        print(f"| {n} | full precision | 16 | 0 | inf | {task:.2f} | |")
        for name, bs in runs:
            res = sample(model, noise, ids, steps=n, cfg=a.cfg, shift=a.shift, bitswitch=bs)
            v = res.video.cpu()
            bits = bs.bits_per_step()
            task = clips.task_accuracy(v, labels)["all"]
            print(f"| {n} | {name} | {sum(bits) / len(bits):.2f} | {rel_error(v, ref.video):.4f} | "
                  f"{psnr(v, ref.video):.2f} | {task:.2f} | {''.join('L' if b == 4 else 'H' for b in bits)} |",
                  flush=True)
        print(f"[{n} steps] {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
