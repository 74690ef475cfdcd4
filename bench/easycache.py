"""Whole sampling runs of ComfyUI's Wan 2.1 (random weights) with ComfyUI's EasyCache: BF16 alone, BF16 +
EasyCache, DVD-Quant W4A4 + EasyCache, W4A4 alone, and the pack's default δ-GBS (4/8 bits) + EasyCache.

Everything runs in one process through the host's own code, as a workflow would run it: ComfyUI's loader
(`comfy.sd.load_diffusion_model_state_dict`), its sampler (`comfy.sample.sample`: uni_pc, simple, CFG 6,
as the Wan 2.1 text-to-video template), its EasyCache node (defaults: threshold 0.2, from 15% to 95% of
the schedule; applied after the Bit Switch Scheduler, the documented order) and the pack's nodes
(DVD-Quant Apply, Bit Switch Scheduler). The model patcher is the host's plain class (as
--disable-dynamic-vram; this script does not enable comfy-aimdo).

Weights are random (ComfyUI's WanModel at the released sizes, as bench/step.py builds it), so which steps
EasyCache skips is not what a trained model gets (at its default threshold it may skip none): the table says
how many model calls each run made, and the speed-up of a cached run is only meaningful beside that count;
--threshold takes several values, so a run can also show a threshold at which the random model skips about
as many steps as a trained one. Pass --comfy DIR (a ComfyUI checkout).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import step  # noqa: E402  (the models' sizes, build() and the pack loader)

ARCH = dict(step.ARCH, tiny=dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2))  # tiny: a CPU smoke run
LATENT = {"tiny": (16, 3, 8, 8)}
VARIANTS = ("bf16", "bf16-ec", "w4a4-ec", "w4a4", "dgbs-ec")


def random_state_dict(arch, dev):
    """The checkpoint-format state dict of a random WanModel (step.build's initialisation)."""
    saved = step.ARCH.get(arch)
    step.ARCH[arch] = ARCH[arch]
    try:
        model = step.build(arch, dev)
    finally:
        if saved is None:
            del step.ARCH[arch]
    sd = {k: v for k, v in model.state_dict().items()}
    del model
    return sd


def easycache(model, threshold):
    from comfy_extras.nodes_easycache import EasyCacheNode
    out = EasyCacheNode.execute(model, reuse_threshold=threshold, start_percent=0.15, end_percent=0.95, verbose=False)
    return out.result[0] if hasattr(out, "result") else out[0]


def sample(model, latent, context, steps, seed=0):
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = [[context, {}]], [[torch.zeros_like(context), {}]]
    return comfy.sample.sample(model, noise, steps, 6.0, "uni_pc", "simple", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def timed_run(model, latent, context, steps):
    """(seconds, model calls that ran the blocks, result) of one sampling run, after a 2-step warm-up run
    (kernel compilation, loading the weights to the GPU)."""
    dm = model.model.diffusion_model
    calls = [0]
    hook = dm.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with torch.inference_mode():
            sample(model, latent, context, 2)
            calls[0] = 0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = sample(model, latent, context, steps)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - t0, calls[0], out
    finally:
        hook.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, help="folder holding ComfyUI's comfy/ package")
    ap.add_argument("--arch", nargs="+", default=["1.3b"], choices=sorted(k for k in ARCH if not k.startswith("hun")))
    ap.add_argument("--steps", type=int, default=30, help="sampling steps of the timed run (the template's 30)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--method", default="dvdq", help="DVD-Quant Apply's method (minmax: the same kernels, "
                                                     "weights quantized in seconds instead of BGR's minute at 14B)")
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.2],
                    help="EasyCache's reuse_threshold (its default 0.2); each cached variant runs at each")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfy))
    from comfy.cli_args import args as comfy_args
    if not torch.cuda.is_available():
        comfy_args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    dev = mm.get_torch_device()
    defs = step.pack_module("nodes.definitions")
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps}
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    results = []
    for arch in args.arch:
        sd = random_state_dict(arch, dev)
        base = comfy.sd.load_diffusion_model_state_dict(sd)
        del sd
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        latent = torch.zeros(1, *LATENT.get(arch, step.LATENT))
        g = torch.Generator().manual_seed(1)
        context = torch.randn(1, 512, 4096, generator=g)
        quantized = None
        runs = [(v, t) for v in args.variants for t in (args.threshold if v.endswith("-ec") else [None])]
        for variant, threshold in runs:
            kind, *flags = variant.split("-")
            if kind == "bf16":
                model = base
            else:
                if quantized is None:
                    t0 = time.perf_counter()
                    quantized = defs.DVDQuantApply().apply(base, 4, 4, 8, args.method)[0]
                    print(f"[{arch}] DVD-Quant Apply ({args.method}) in {time.perf_counter() - t0:.0f} s", flush=True)
                mode = dict(mode="delta", fixed_bits=8) if kind == "dgbs" else dict(mode="fixed", fixed_bits=4)
                model = defs.DVDQuantBitSwitch().schedule(quantized, delta=0.09, low=4, high=8, schedule="", **mode)[0]
            if "ec" in flags:
                model = easycache(model, threshold)
                variant = f"{variant}{threshold:g}"
            mm.unload_all_models()
            seconds, calls, out = timed_run(model, latent, context, args.steps)
            r = {"arch": arch, "variant": variant, "seconds": seconds, "calls": calls,
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
                 "finite": bool(torch.isfinite(out).all())}
            results.append(r)
            print(f"[{arch}] {variant:11s} {seconds:8.1f} s  {calls:3d} model calls  finite={r['finite']}", flush=True)
        del base, quantized
        mm.unload_all_models()
        mm.soft_empty_cache()
    print(f"\n{args.steps} steps, uni_pc/simple, CFG 6 (a call is one batch of cond + uncond where memory allows)")
    print("arch  variant       seconds  model_calls  vs_bf16  peak_GiB")
    for r in results:
        b = next((x for x in results if x["arch"] == r["arch"] and x["variant"] == "bf16"), None)
        vs = f"{b['seconds'] / r['seconds']:6.2f}x" if b else "   n/a "
        peak = f"{r['peak_gib']:8.1f}" if r["peak_gib"] is not None else "     n/a"
        print(f"{r['arch']:5s} {r['variant']:11s} {r['seconds']:8.1f} {r['calls']:12d} {vs} {peak}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
