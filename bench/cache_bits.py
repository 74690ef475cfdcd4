"""Skip / low bits / high bits from one indicator, against EasyCache stacked with delta-GBS, at matched cost.

    python bench/cache_bits.py [--steps 20] [--prompts 24] [--w8 1.11 1.15] [--json FILE]
        [--deltas 0.09 inf] [--easycache 0.05 0.1 0.2 0.4 --ec-deltas 0.09 inf]
        [--skips 0.045 0.06 0.1 0.15 --skip-deltas 0.09 0.2] [--call-skips 0.1 0.15 --call-deltas 0.2]
    python bench/cache_bits.py --deltas 0 --easycache 0.1 0.2 0.4 0.8 --ec-deltas 0 --skips 1 \
        --skip-deltas 0.06 0.2 --call-skips --json B.json      # the second sweep
    python bench/cache_bits.py --deltas --easycache 0.3 --ec-deltas 0 --skips 1 --skip-deltas 0.04 0.08 0.12 \
        --call-skips --json C.json                              # the third
    python bench/cache_bits.py --report A.json B.json C.json   # the tables of all sweeps together

The defaults are the first of these sweeps (about 35 minutes on 2 CPU cores at 24 prompts).

On the trained mini-Wan (W4 weights, DVD-Quant defaults), from the same noise and prompts, three families
of runs, each with its own knobs swept:

1. delta-GBS alone (dvdq_core.BitSwitch, final step high): delta 0 is W4A8, delta inf is W4A4 with the
   first and the last step at 8 bits.
2. EasyCache + delta-GBS, as ComfyUI's EasyCache node and the Bit Switch Scheduler run together: EasyCache
   decides from its own indicator whether a step runs (its rule re-implemented below from ComfyUI's
   comfy_extras/nodes_easycache.py, as of 0.33.0: start 15%, end 95%, subsample 8, reuse threshold swept);
   delta-GBS picks the bits of the steps that run and takes a skipped step's decision back.
3. The combined control (CacheBitSwitch below): one accumulated delta-GBS indicator,
   below skip_threshold the step is skipped, up to delta 4 bits, above 8 bits. A skipped step reuses the
   last computed output's residual as EasyCache does, so 2 and 3 differ only in who decides.

Cost of a run: the model calls weighted by their time, a W4A4 call 1.0, a W4A8 call `--w8` (several
values: each gives its own cost column), a skipped call 0 (bench/RESULTS.md, "Whole sampling runs with
EasyCache": skipped calls cost about nothing). The default 1.11 is the measured W4A8 / W4A4 step-time
ratio of Wan 2.1 14B on an H100 (bench/RESULTS.md "One denoising step": W4A8 0.814 of BF16's step, W4A4
0.731, each against its own call's BF16). Quality: the final clip's relative error and PSNR against full
precision, and the detector's task accuracy (demo/clips.py), as bench/few_steps.py. Decisions are made per
batch (all prompts sampled together, as few_steps.py does). After the runs, "matched cost": each run of
families 2 and 3 against the lowest error the other of the two reaches at no more cost (its Pareto front with
family 1's runs, their common limit without skips, linear between the front's points), and the pairs of runs
of 2 and 3 at the same cost compared per prompt. Markdown to stdout; --json: every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dvdq_core  # noqa: E402
from bench.few_steps import trained_setup  # noqa: E402
from bench.quality import spread  # noqa: E402
from demo import clips  # noqa: E402
from demo.metrics import psnr, rel_error  # noqa: E402
from demo.sampling import flow_sigmas, sample, shift_time  # noqa: E402
from dvdq_core.bitswitch import BitSwitch  # noqa: E402

SKIP = 0  # CacheBitSwitch.next_bits(): serve this step from the cache, without a model call
SKIP_FROM = ("high", "call")


class CacheBitSwitch(BitSwitch):
    """delta-GBS with a third band on the same indicator: skip the model call (an experiment).

    The indicator is delta-GBS's, the relative L1 change of the model output per step, accumulated. A step
    runs `high` where the sum since the last high step reaches `delta` (the sum resets), and else `low`,
    unless the change is below `skip_threshold`: then next_bits() returns SKIP and the step is served from
    the cache, `x + (F - x')` (EasyCache's reuse of the last computed output's residual F - x' on this
    step's input x: `observe(output, x)` stores it, `cached(x)` applies it). skip_from "high": the skip test
    reads the same sum as the bit test (one accumulator, two thresholds: skip < skip_threshold <= low <
    delta <= high); "call": the change since the last computed step, this step's included (EasyCache's form).
    A skipped step adds the last observed change per step to the sums (the change it is assumed to make),
    so a run of skips ends; the next observation replaces these estimates by the change measured over the
    gap. No skip before an indicator exists (the first two steps run) or at the final step with last_high.
    skip_threshold 0 gives BitSwitch's delta rule exactly where every step reaches it (no outside cache).
    Measured on the trained mini-Wan (this script): not better at matched cost than ComfyUI's EasyCache
    stacked with delta-GBS (the two error-vs-cost fronts cross, by about as much as runs of equal cost differ
    among themselves), so no node offers it.
    """

    def __init__(self, delta=0.09, skip_threshold=0.0, low=4, high=8, last_high=True, skip_from="high"):
        super().__init__(delta=delta, low=low, high=high, mode="delta", last_high=last_high)
        if not skip_threshold >= 0:
            raise ValueError(f"skip_threshold must be >= 0, got {skip_threshold!r}")
        if skip_from not in SKIP_FROM:
            raise ValueError(f"skip_from must be one of {', '.join(SKIP_FROM)}, got {skip_from!r}")
        self.skip_threshold, self.skip_from = float(skip_threshold), skip_from

    def reset(self):
        super().reset()
        self._rate = None  # the last observed change per step
        self._est = 0.0  # changes assumed for the steps skipped since the last observation
        self._diff = None  # the last computed output minus its input (the cache)

    def _decide(self, i: int, last: bool = False) -> int:
        bits = super()._decide(i, last)
        if bits >= self.high or self._rate is None or self._diff is None or self.skip_threshold <= 0:
            return bits
        change = self._acc if self.skip_from == "high" else self._est + self._rate
        return SKIP if change < self.skip_threshold else bits

    def next_bits(self, step: int | None = None, last: bool = False) -> int:
        bits = super().next_bits(step, last)
        if bits == SKIP:  # the step's assumed change counts, so a run of skips ends
            self._acc += self._rate
            self._est += self._rate
            self._acc_before = None  # nothing to observe for it
        return bits

    @torch.no_grad()
    def observe(self, output: torch.Tensor, x: torch.Tensor | None = None):
        """A computed step's output (after next_bits gave bits, not SKIP); x: its input, for the cache."""
        out = output.detach().float()
        rec = self.log[-1] if self.log else None
        if self._prev is not None and self._prev.shape == out.shape and rec is not None:
            gap = max(rec.step - self._prev_step, 1) if self._prev_step is not None else 1
            change = ((out - self._prev).abs().sum() / self._prev.abs().sum().clamp_min(1e-12)).item()
            self._rate = change / gap
            rec.indicator = self._rate
            # a high step reset the sum: it keeps its own share of the gap; else the gap's measured change
            # replaces the estimates made for its skipped steps
            self._acc = self._rate if rec.bits >= self.high else max(self._acc - self._est + change, 0.0)
        self._est = 0.0
        self._prev, self._prev_step, self._acc_before = out, rec.step if rec else None, None
        if x is not None:
            self._diff = out - x.detach().float()

    def cached(self, x: torch.Tensor) -> torch.Tensor:
        """A skipped step's output: its input plus the last computed step's residual."""
        return (x.detach().float() + self._diff).to(x.dtype)

    @property
    def skipped(self) -> int:
        return sum(r.bits == SKIP for r in self.log)

    @property
    def average_bits(self) -> float:
        """Over the computed steps (skipped steps run no quantized layer)."""
        bits = [r.bits for r in self.log if r.bits != SKIP]
        return sum(bits) / max(len(bits), 1)


class EasyCacheRule:
    """ComfyUI's EasyCache decision and reuse for one diffusion-model call per step (CFG batched).

    Follows easycache_forward_wrapper / EasyCacheHolder of ComfyUI 0.33.0: no caching at or below the end
    sigma (the model runs, the state is left alone) or above the start sigma (the model runs, the state is
    updated); inside, the input change |x - x_prev| (mean abs, first cond's half, H and W subsampled by 8)
    times the last measured output/input change ratio k, over the last output's mean abs, accumulates; while
    the sum stays below the threshold the step is served as x + (last output - its input), else the sum
    resets and the model runs. The first cond of ComfyUI's batch is the uncond half (its batch is [uncond,
    cond]): here the second half of [cond, uncond]."""

    def __init__(self, threshold, sigma_start, sigma_end, subsample=8):
        self.threshold, self.start_t, self.end_t, self.sub = threshold, sigma_start, sigma_end, subsample
        self.k = None  # relative_transformation_rate
        self.cumulative = 0.0
        self.x_prev = self.out_prev = self.out_prev_norm = self.diff = None
        self.skipped = False

    def _subsample(self, t):
        half = t.shape[0] // 2
        return t[half:, ..., ::self.sub, ::self.sub]

    def __call__(self, x, sigma, run):
        self.skipped = False
        # is_past_end_timestep; a sigma equal to the end sigma up to float32 rounding counts as equal (at 20 steps
        # the last step's sigma is the end sigma: ComfyUI then runs the model)
        if not sigma > self.end_t * (1 + 1e-6):
            return run()
        input_change = None
        if sigma <= self.start_t * (1 + 1e-6):  # should_do_easycache
            if self.x_prev is not None:
                input_change = (self._subsample(x) - self.x_prev).abs().mean()
            if self.out_prev_norm is not None and self.k is not None:
                self.cumulative += float(self.k * input_change / self.out_prev_norm)
                if self.cumulative < self.threshold and self.diff is not None:
                    self.skipped = True
                    return x + self.diff
                self.cumulative = 0.0
        out = run()
        if self.out_prev_norm is not None:
            output_change = (self._subsample(out) - self.out_prev).abs().mean()
            if input_change is not None:
                self.k = output_change / input_change
        self.diff = out - x
        self.x_prev, self.out_prev = self._subsample(x).clone(), self._subsample(out).clone()
        self.out_prev_norm = out.abs().mean()
        return out


# ------------------------------------------------------------------ the three families as per-step policies

def gbs_policy(bs):
    def step(i, last, x, sigma, call):
        bits = bs.next_bits(i, last=last)
        out = call(bits)
        bs.observe(out)
        return out, "H" if bits >= bs.high else "L"
    return step


def easycache_gbs_policy(ec, bs):
    def step(i, last, x, sigma, call):
        bits = bs.next_bits(i, last=last)  # the scheduler's wrapper decides first ...
        out = ec(x, sigma, lambda: call(bits))
        if ec.skipped:  # ... and takes the decision back when EasyCache served the step
            bs.undo()
            return out, "S"
        bs.observe(out)
        return out, "H" if bits >= bs.high else "L"
    return step


def combined_policy(cbs):
    def step(i, last, x, sigma, call):
        bits = cbs.next_bits(i, last=last)
        if bits == SKIP:
            return cbs.cached(x), "S"
        out = call(bits)
        cbs.observe(out, x)
        return out, "H" if bits >= cbs.high else "L"
    return step


@torch.no_grad()
def sample_policy(model, noise, ids, steps, cfg, shift, policy):
    """demo.sampling.sample's Euler / CFG loop with a policy per step (decide, run or reuse)."""
    sigmas = flow_sigmas(steps, shift, noise.device)
    x, b = noise.float(), noise.shape[0]
    prompts = torch.cat([ids, torch.zeros_like(ids)])
    tags = []
    for i in range(steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        xin = torch.cat([x, x])

        def call(bits, xin=xin, t=t):
            dvdq_core.set_activation_bits(model, bits)
            return model(xin, t.expand(xin.shape[0]), prompts).float()
        out, tag = policy(i, i == steps - 1, xin, float(t), call)
        v = out[b:] + cfg * (out[:b] - out[b:])
        x = x + (t_next - t) * v
        tags.append(tag)
    return x, "".join(tags)


def cost(tags, w8):
    return tags.count("L") + w8 * tags.count("H")


def pareto(points):
    """(cost, error) points -> the front: increasing cost, strictly decreasing error."""
    front = []
    for c, e in sorted(points):
        if not front or e < front[-1][1]:
            front.append((c, e))
    return front


def best_at(front, c):
    """The lowest error a family reaches at cost <= c, linear between its front's points (None below it)."""
    if not front or c < front[0][0] - 1e-9:
        return None
    for (c0, e0), (c1, e1) in zip(front, front[1:]):
        if c0 <= c <= c1:
            return e0 + (e1 - e0) * (c - c0) / (c1 - c0)
    return front[-1][1]


def fmt_num(v):
    return "inf" if v == math.inf else f"{v:g}"


FAMILIES = ("1 delta-GBS", "2 EasyCache + delta-GBS", "3 combined")


def report(rows, a, s_start, s_end):
    """Markdown: every run, then each run of families 2 and 3 against the others' fronts at its cost."""
    out = [f"mini-Wan (trained), {a['prompts']} prompts, {a['steps']} Euler steps, CFG {a['cfg']}, shift {a['shift']}, "
           f"{a['device']}; EasyCache window {a['ec_start']:g}-{a['ec_end']:g} (sigma {s_start:.3f} to {s_end:.3f}). "
           "Cost: W4A4 call 1, W4A8 call " + " or ".join(f"{w:g}" for w in a["w8"])
           + ", skipped call 0. H = W4A8, L = W4A4, S = skipped.", ""]
    costs = [f"cost@{w:g}" for w in a["w8"]]
    out += ["| family | run | " + " | ".join(f"cost (W4A8 = {w:g})" for w in a["w8"])
            + " | calls | skipped | rel. err | PSNR dB | task all | steps |",
            "|---|---|" + "---|" * len(costs) + "---|---|---|---|---|---|"]
    order = {f: n for n, f in enumerate(("full precision",) + FAMILIES)}
    rows = sorted(rows, key=lambda r: (order.get(r["family"], 9), -r.get(costs[0], 99)))
    for r in rows:
        t = r["tags"]
        c = " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in costs)
        out.append(f"| {r['family']} | {r['run']} | {c} | {len(t) - t.count('S') if t else a['steps']} | "
                   f"{t.count('S')} | {r['rel_error']:.4f} | "
                   f"{'inf' if r['psnr_db'] == math.inf else format(r['psnr_db'], '.2f')} | {r['task_all']:.2f} | {t} |")
    for k in costs:
        # family 1 is both others' limit (EasyCache threshold 0, skip_threshold 0): in both fronts
        fronts = {f: pareto([(r[k], r["rel_error"]) for r in rows if r["family"] in (f, FAMILIES[0])])
                  for f in FAMILIES[1:]}
        out += ["", f"Matched cost ({k}): each run of families 2 and 3 against the lowest error the other family "
                "reaches at no more cost, linear between the points of its Pareto front, family 1 included in both "
                "(their limit without skips; \"-\": none that cheap); difference < 0: this run is better.", "",
                "| run | cost | rel. err | other family at this cost | difference |", "|---|---|---|---|---|"]
        for r in rows:
            if r["family"] not in FAMILIES[1:]:
                continue
            other = FAMILIES[2] if r["family"] == FAMILIES[1] else FAMILIES[1]
            e = best_at(fronts[other], r[k])
            out.append(f"| {r['family'][0]}: {r['run']} | {r[k]:.2f} | {r['rel_error']:.4f} | "
                       f"{'-' if e is None else format(e, '.4f')} | "
                       f"{'-' if e is None else format(r['rel_error'] - e, '+.4f')} |")
    k = costs[0]
    pairs = [(r2, r3) for r2 in rows if r2["family"] == FAMILIES[1] for r3 in rows if r3["family"] == FAMILIES[2]
             if abs(r2[k] - r3[k]) <= 0.25 and r2["tags"] != r3["tags"] and "prompt_rel_error" in r2]
    if pairs:
        out += ["", f"Runs of families 2 and 3 at the same cost ({k} within 0.25), per prompt: the combined run's error "
                "minus the stacked run's, mean and 95% CI over the prompts (< 0: the combined control is better).", "",
                "| EasyCache + delta-GBS | combined | cost | rel. err (2 / 3) | per prompt, 3 minus 2: mean [95% CI] |",
                "|---|---|---|---|---|"]
        for r2, r3 in sorted(pairs, key=lambda p: p[0][k]):
            d = spread([b - a for a, b in zip(r2["prompt_rel_error"], r3["prompt_rel_error"])])
            out.append(f"| {r2['run']} | {r3['run']} | {r2[k]:.2f} / {r3[k]:.2f} | {r2['rel_error']:.4f} / "
                       f"{r3['rel_error']:.4f} | {d['mean']:+.4f} [{d['mean'] - d['ci95']:+.4f}, "
                       f"{d['mean'] + d['ci95']:+.4f}] |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w8", type=float, nargs="+", default=[1.11, 1.15], help="cost of a W4A8 call (W4A4 = 1)")
    p.add_argument("--deltas", type=float, nargs="*", default=[0.09, math.inf])
    p.add_argument("--easycache", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4], help="reuse thresholds")
    p.add_argument("--ec-deltas", type=float, nargs="*", default=[0.09, math.inf])
    p.add_argument("--ec-start", type=float, default=0.15)
    p.add_argument("--ec-end", type=float, default=0.95)
    p.add_argument("--skips", type=float, nargs="*", default=[0.045, 0.06, 0.1, 0.15])
    p.add_argument("--skip-deltas", type=float, nargs="*", default=[0.09, 0.2])
    p.add_argument("--skip-from", nargs="+", default=["high"], choices=("high", "call"))
    p.add_argument("--call-skips", type=float, nargs="*", default=[0.1, 0.15], help="extra runs with skip_from 'call'")
    p.add_argument("--call-deltas", type=float, nargs="*", default=[0.2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--report", nargs="+", default=None,
                   help="print the tables of --json files (of sweeps with the same prompts, steps and costs) and exit")
    a = p.parse_args(argv)
    if a.report:
        rows, seen = [], set()
        for path in a.report:
            with open(path) as fh:
                saved = json.load(fh)
            sa = saved["args"]
            for r in saved["rows"]:
                if (r["family"], r["run"]) not in seen:
                    seen.add((r["family"], r["run"]))
                    rows.append(r)
        win = [float(shift_time(torch.tensor(1.0 - sa[k], dtype=torch.float64), sa["shift"]))
               for k in ("ec_start", "ec_end")]
        print(report(rows, sa, *win))
        return 0
    base, model, labels, ids, noise = trained_setup(a.prompts, a.seed, torch.device(a.device))
    t0 = time.time()
    print(f"## Skip / low / high from one indicator (bench/cache_bits.py), {time.strftime('%Y-%m-%d')}\n")
    ref = sample(base, noise, ids, steps=a.steps, cfg=a.cfg, shift=a.shift, record=False).video.cpu()
    rows = [{"family": "full precision", "run": "full precision", "tags": "", "rel_error": 0.0, "psnr_db": math.inf,
             "task_all": clips.task_accuracy(ref, labels)["all"]}]
    # EasyCache's window in sigmas: ModelSamplingDiscreteFlow.percent_to_sigma = time_snr_shift(shift, 1 - p)
    s_start = float(shift_time(torch.tensor(1.0 - a.ec_start, dtype=torch.float64), a.shift))
    s_end = float(shift_time(torch.tensor(1.0 - a.ec_end, dtype=torch.float64), a.shift))
    runs = [("2 EasyCache + delta-GBS", f"EasyCache {t:g}, delta {fmt_num(d)}",
              lambda t=t, d=d: easycache_gbs_policy(EasyCacheRule(t, s_start, s_end), dvdq_core.BitSwitch(delta=d)))
             for d in a.ec_deltas for t in a.easycache]
    runs += [("3 combined", f"skip {s:g}, delta {fmt_num(d)}" + ("" if sf == "high" else ", from call"),
              lambda s=s, d=d, sf=sf: combined_policy(CacheBitSwitch(delta=d, skip_threshold=s, skip_from=sf)))
             for sf in a.skip_from for d in a.skip_deltas for s in a.skips]
    runs += [("3 combined", f"skip {s:g}, delta {fmt_num(d)}, from call",
              lambda s=s, d=d: combined_policy(CacheBitSwitch(delta=d, skip_threshold=s, skip_from="call")))
             for d in a.call_deltas for s in a.call_skips]
    runs += [("1 delta-GBS", f"delta {fmt_num(d)}", lambda d=d: gbs_policy(dvdq_core.BitSwitch(delta=d)))
             for d in a.deltas]
    for family, name, make in runs:
        t1 = time.time()
        v, tags = sample_policy(model, noise, ids, a.steps, a.cfg, a.shift, make())
        v = v.cpu()
        row = {"family": family, "run": name, "tags": tags, "rel_error": rel_error(v, ref), "psnr_db": psnr(v, ref),
               "task_all": clips.task_accuracy(v, labels)["all"], "seconds": time.time() - t1,
               "prompt_rel_error": [rel_error(x, r) for x, r in zip(v, ref)]}
        row.update({f"cost@{w:g}": cost(tags, w) for w in a.w8})
        rows.append(row)
        print(f"[{family}] {name}: {tags} err {row['rel_error']:.4f} ({row['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
        if a.json:  # after every run, so a cut-off sweep keeps what it measured
            with open(a.json, "w") as fh:
                json.dump({"args": vars(a), "rows": rows}, fh)
    print(f"\n[{time.time() - t0:.0f} s]", file=sys.stderr)
    print(report(rows, vars(a), s_start, s_end))
    return 0


if __name__ == "__main__":
    sys.exit(main())
