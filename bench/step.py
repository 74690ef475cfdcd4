"""One denoising step of ComfyUI's own WanModel (CFG batch of 2) or HunyuanVideo (batch 1: its
guidance is embedded, ComfyUI's workflows run it at CFG 1) at 480p x 81 frames (32760 video tokens),
random weights: BF16 vs DVD-Quant W4A8 / W4A4 / W4A4 with granularity "pow2" (triton backend), PyTorch SDPA
or SageAttention, or (variant suffix -q8) the pack's 8-bit attention as its node installs it.

ComfyUI's source is not part of this repository: pass --comfy DIR (a ComfyUI checkout; only its
`comfy/` package is imported). Weights are random; the quantized model is made with the core's
quantize_model using min-max weights (BGR for a 14B model takes minutes and gives the same tensors
to the kernels), then every layer is switched to the DVD-Quant layer math (rotation 128,
auto-scale blocks of 128): the timed kernels are exactly the dvdq ones.

Reports per variant: seconds per step (median of --steps timed steps after a warm-up), GPU-time
shares of GEMMs, our activation quantization, attention and everything else (torch.profiler; the
twelve costliest kernels are listed), peak GPU memory during the step, and the bytes of the transformer blocks' weights.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))  # after ROOT: bench/kernels.py must not shadow kernels/

ARCH = {  # ComfyUI's detection of the released checkpoints: Wan 2.1 14B / 1.3B, HunyuanVideo (13B)
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "hunyuan": dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=20, depth_single_blocks=40,
                    axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                    byt5=False, meanflow=False),
}
ARCH["hunyuan-i2v"] = ARCH["hunyuan"]  # the same model called with a guiding frame (I2V "v2 (replace)")
LATENT = (16, 21, 60, 104)  # 480 x 832, 81 frames -> 21 x 30 x 52 = 32760 tokens after 1x2x2 patches


def kernel_class(name: str) -> str:
    n = name.lower()
    if "_absmax_kernel" in n or "_quantize_kernel" in n or "_quantize_pow2_kernel" in n or "_rotate_kernel" in n:
        return "act_quant"
    if "flash" in n or "fmha" in n or "attn" in n or "attention" in n or "sdpa" in n:  # first: FlashAttention's
        return "attention"  # kernel names carry cutlass types
    if "w4_gemm" in n or "gemm" in n or "nvjet" in n or "cutlass" in n or "xmma" in n or "cublas" in n or "s16816" in n:
        return "gemm"
    return "other"


def build(arch, dev):
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    if arch.startswith("hunyuan"):
        from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams
        newer = {"use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}  # 1.5's (0.8.0 on)
        extra = {f.name: newer[f.name] for f in dataclasses.fields(HunyuanVideoParams) if f.name in newer}
        model = HunyuanVideo(device=dev, dtype=torch.bfloat16, operations=ops, **ARCH[arch], **extra)
    else:
        from comfy.ldm.wan.model import WanModel
        model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256, text_dim=4096,
                         out_dim=16, device=dev, dtype=torch.bfloat16, operations=ops, **ARCH[arch])
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
            elif "norm" in name:  # Wan's norm weights, HunyuanVideo's QKNorm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def pack_module(name: str):
    """A module of the repository as ComfyUI imports the pack (tests/pack.py, the one loader: its modules
    import each other relatively; a ComfyUI checkout on sys.path has a top-level `nodes` of its own). The
    core is the same module objects as the top-level `dvdq_core`, so the layers quantized here are the
    class the pack's fused forwards recognise."""
    import importlib
    if os.path.join(ROOT, "tests") not in sys.path:
        sys.path.append(os.path.join(ROOT, "tests"))
    import pack
    pack.load_pack()
    return pack.sub(name[len("nodes."):]) if name.startswith("nodes.") else importlib.import_module(name)


def pack_block_fusion(arch):
    """(fuse, unfuse) of the pack's fused block steps for arch (nodes/wan_blocks.py, nodes/hunyuan_blocks.py)."""
    if arch.startswith("hunyuan"):
        mod = pack_module("nodes.hunyuan_blocks")
        return mod.fuse_hunyuan, mod.unfuse_hunyuan
    mod = pack_module("nodes.wan_blocks")
    return mod.fuse_wan, mod.unfuse_wan


def set_lowrank(model, rank: int, dev):
    """A random rank-`rank` LoRA branch (dvdq_core/lowrank.py) on every quantized layer of the transformer
    blocks, as a LoRA after the DVD-Quant Loader runs (rank 0: none)."""
    lowrank = pack_module("dvdq_core.lowrank")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, m in model.named_modules():
        if type(m).__name__ != "QuantLinear":
            continue
        m.lowrank = None
        if rank and "blocks." in name:
            up = torch.randn(m.out_features, rank, device=dev, generator=g) / 64
            down = torch.randn(rank, m.in_features, device=dev, generator=g) / math.sqrt(m.in_features)
            m.lowrank = lowrank.stack([lowrank.LowRankTerm(up, down, 1.0)], [], m.out_features, m.in_features, dev,
                                      torch.bfloat16)


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if n.split(".")[0].endswith("blocks"))  # Wan's blocks, HunyuanVideo's double_/single_blocks


def make_inputs(arch, dev):
    """(args, kwargs) of one step: the CFG pair for Wan; HunyuanVideo's text (256 tokens of its LLM's 4096-wide
    states, no padding mask), pooled CLIP vector and embedded guidance for one sample; hunyuan-i2v adds
    a guiding frame (latent frame 0: its tokens get their own modulation vectors, `modulation_dims`)."""
    g = torch.Generator(device=dev).manual_seed(1)
    hy = arch.startswith("hunyuan")
    b = 1 if hy else 2
    x = torch.randn(b, *LATENT, device=dev, dtype=torch.bfloat16, generator=g)
    t = torch.full((b,), 0.7 if hy else 700.0, device=dev)
    if hy:
        ctx = torch.randn(b, 256, 4096, device=dev, dtype=torch.bfloat16, generator=g)
        y = torch.randn(b, 768, device=dev, dtype=torch.bfloat16, generator=g)
        kw = {"y": y, "guidance": torch.full((b,), 6.0, device=dev)}
        if arch == "hunyuan-i2v":
            kw["guiding_frame_index"] = torch.zeros(b, device=dev, dtype=torch.bfloat16)
        return (x, t, ctx), kw
    return (x, t, torch.randn(b, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g)), {}


def q8_attention(host, counts):
    """`host` (an optimized_attention) behind the pack's 8-bit attention override, as the DVD-Quant 8-bit
    Attention node installs it (nodes/attention.py, mode always, pv auto); counts[0] / counts[1]: calls that ran
    the 8-bit kernel / that went back to the host's attention (masks, short key sequences, ...)."""
    node = pack_module("nodes.attention")

    def run(*a, **kw):
        counts[0] += 1
        return node.core.attention_q8(*a, **kw)

    def host_counted(*a, **kw):
        counts[1] += 1
        return host(*a, **kw)

    override = node.make_override(node.ALWAYS, "auto", run=run)
    return lambda *a, **kw: override(host_counted, *a, **kw)


def run_variant(model, inputs, steps, profile):
    args, kwargs = inputs

    def step():
        return model(*args, **kwargs)
    torch.cuda.synchronize()
    with torch.inference_mode():  # as ComfyUI samples (the kernels' q/k/v reuse must work there)
        t0 = time.perf_counter()
        step()  # warm-up: compiles the kernels of every shape (and torch.compile's graph: -compiled)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        peak = torch.cuda.max_memory_allocated()
        finite = bool(torch.isfinite(out).all())
        shares = {}
        if profile:
            from torch.profiler import ProfilerActivity, profile as prof
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                step()
                torch.cuda.synchronize()
            tot, per_kernel = {}, []
            for ev in p.key_averages():
                us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if ev.device_type == torch.autograd.DeviceType.CUDA and us:
                    tot[kernel_class(ev.key)] = tot.get(kernel_class(ev.key), 0) + us
                    per_kernel.append((us, kernel_class(ev.key), ev.key))
            all_us = sum(tot.values()) or 1
            shares = {k: v / all_us for k, v in tot.items()}
            shares["gpu_s"] = all_us / 1e6
            shares["top_kernels"] = [(round(us / 1e3, 2), c, name[:200]) for us, c, name in sorted(per_kernel)[::-1][:12]]
    times.sort()
    return {"step_s": times[len(times) // 2], "all_s": times, "peak_gib": peak / 2**30, "finite": finite, "shares": shares,
            "warmup_s": warmup_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, help="folder holding ComfyUI's comfy/ package")
    ap.add_argument("--arch", nargs="+", default=["14b", "1.3b"])
    ap.add_argument("--variants", nargs="+", default=["bf16", "w4a8", "w4a4", "w4a4p"],
                    help="w4a4p: W4A4 with granularity pow2; w4a8n: W4A8 without auto-scale (rotation only); "
                         "w4a8f / w4a4f: granularity pow2-fast (the opt-in: w4a8f should time as w4a8n); "
                         "suffix -unfused: the feed-forward GELU as its own kernel (dvdq_core.fusion off); "
                         "quantized variants run the blocks' elementwise steps fused as the loader installs them "
                         "(nodes/wan_blocks.py, nodes/hunyuan_blocks.py), suffix -hostops: ComfyUI's own; "
                         "bf16-fused: BF16 with the fused ones (the split of the gain); suffix -compiled: the whole "
                         "model under torch.compile (inductor, defaults), as ComfyUI's TorchCompileModel node does; "
                         "suffix -loraR (quantized): a rank-R LoRA after quantization on every block linear "
                         "(ComfyUI's BF16 + LoRA merges it into the weights: its step is the bf16 step); "
                         "suffix -q8: the model's attention through the pack's 8-bit attention (nodes/attention.py's "
                         "override, mode always, pv auto), e.g. bf16-q8, w4a4p-q8")
    ap.add_argument("--sage", action="store_true", help="also run every variant with SageAttention")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfy))
    dev = torch.device("cuda")
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.hunyuan_video.model as hunyuan
    import comfy.ldm.modules.attention as attn
    import comfy.ldm.wan.model as wan
    attention_users = {"hunyuan": (flux_math, hunyuan), "hunyuan-i2v": (flux_math, hunyuan)}  # modules whose
    # optimized_attention the step calls
    core = pack_module("dvdq_core")
    QuantConfig, quantize_model, set_activation_bits = core.QuantConfig, core.quantize_model, core.set_activation_bits
    # the registry imports the kernels, as the pack's loader does (nodes.host.check_gpu_bits): never first
    # inside a compiled forward
    info_backends = pack_module("dvdq_core.backends").list_backends()
    fuse_gelu, unfuse_gelu = pack_module("dvdq_core.fusion").fuse_gelu, pack_module("dvdq_core.fusion").unfuse_gelu
    effective_block = pack_module("dvdq_core.hadamard").effective_block

    sage_calls = [0]
    attn_impls = {"sdpa": attn.attention_pytorch}
    if args.sage:
        try:
            import sageattention  # noqa: F401  (present, or the host's attention_sage cannot run)
            real = attn.sageattn

            def counted(*a, **k):
                sage_calls[0] += 1
                return real(*a, **k)
            attn.sageattn = counted
            attn_impls["sage"] = attn.attention_sage
        except Exception as e:
            print(f"sageattention unavailable: {type(e).__name__}: {e}")

    from gpu_clock import ClockMonitor
    clock = ClockMonitor().__enter__()  # sampled until the end: a throttled run says so
    results = []
    ops = pack_module("dvdq_core.kernels.ops")
    info = {"device": torch.cuda.get_device_name(), "compiled_for": ops._capability(dev), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "dvdq_backends": {k: v["reason"] or "available" for k, v in info_backends.items()}}
    try:  # newer ComfyUI runs some of its own steps (rotary, norms) through comfy-kitchen: which backends ran
        import comfy_kitchen
        info["comfy_kitchen"] = {k: v["available"] for k, v in comfy_kitchen.list_backends().items()}
    except ImportError:
        pass
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    for arch in args.arch:
        model = build(arch, dev)
        fuse_blocks, unfuse_blocks = pack_block_fusion(arch)
        inputs = make_inputs(arch, dev)
        for variant in args.variants:
            kind, *flags = variant.split("-")
            if kind != "bf16" and not any(type(m).__name__ == "QuantLinear" for m in model.modules()):
                t0 = time.perf_counter()
                report = quantize_model(model, QuantConfig(method="minmax", backend="triton"))
                torch.cuda.synchronize()
                for m in model.modules():
                    if type(m).__name__ == "QuantLinear":  # same kernels as method dvdq: rotate + auto-scale
                        m.spec = dataclasses.replace(m.spec, method="dvdq", rotate=True, auto_scale=True,
                                                     had_block=effective_block(128, m.in_features),
                                                     scale_block=effective_block(128, m.in_features))
                torch.cuda.empty_cache()
                print(f"[{arch}] quantized {len(report.layers)} layers in {time.perf_counter() - t0:.1f} s", flush=True)
            if kind != "bf16":  # w4a8, w4a4, w4a4p ("pow2"), w4a8f ("pow2-fast"), w4a8n (no auto-scale); -unfused
                for m in model.modules():
                    if type(m).__name__ == "QuantLinear":
                        gran = {"p": "pow2", "f": "pow2-fast"}.get(kind[-1], "block")
                        m.spec = dataclasses.replace(m.spec, granularity=gran, auto_scale=not kind.endswith("n"))
                set_activation_bits(model, int(kind[3]))
                if "unfused" in flags:
                    unfuse_gelu(model)
                else:
                    fuse_gelu(model)
            rank = next((int(f[4:]) for f in flags if f.startswith("lora")), 0)
            set_lowrank(model, rank, dev)
            if ("fused" in flags) if kind == "bf16" else ("hostops" not in flags):
                fused = fuse_blocks(model)[0]
            else:
                fused = -unfuse_blocks(model)
            print(f"[{arch}] {variant}: fused elementwise steps in {max(fused, 0)} modules", flush=True)
            for impl_name, impl in attn_impls.items():
                q8_calls = [0, 0]
                if "q8" in flags:  # the 8-bit attention node's override, around this attention
                    impl_name, impl = "q8", q8_attention(impl, q8_calls)
                for mod in attention_users.get(arch, (wan,)):
                    mod.optimized_attention = impl
                sage_calls[0] = 0
                torch.cuda.empty_cache()
                runner = torch.compile(model) if "compiled" in flags else model
                r = run_variant(runner, inputs, args.steps, not args.no_profile)
                r.update(arch=arch, variant=variant, attention=impl_name, weight_gib=weight_bytes(model) / 2**30)
                if impl_name == "sage":
                    r["sage_calls"] = sage_calls[0]
                if impl_name == "q8":  # calls per step that ran the 8-bit kernel / went back to the host's
                    r["q8_calls"] = {"kernel": q8_calls[0] // (args.steps + 1 + (not args.no_profile)),
                                     "host": q8_calls[1] // (args.steps + 1 + (not args.no_profile))}
                results.append(r)
                sh = r["shares"]
                print(f"[{arch}] {variant:13s} {impl_name:5s} warm-up {r['warmup_s']:.0f} s  step {r['step_s']:.3f} s  "
                      f"peak {r['peak_gib']:.1f} GiB  "
                      f"block weights {r['weight_gib']:.2f} GiB  finite={r['finite']}  shares " +
                      " ".join(f"{k} {v:.0%}" for k, v in sh.items() if k not in ("gpu_s", "top_kernels")) +
                      (f"  8-bit attention calls per step: {r['q8_calls']}" if "q8_calls" in r else ""), flush=True)
                for ms, cls, name in sh.get("top_kernels", []):
                    print(f"    {ms:9.2f} ms  {cls:9s} {name}")
        del model
        torch.cuda.empty_cache()
    print("\narch  variant       attn    step_s  speedup  peak_GiB  weights_GiB  gemm  act_q  attn  other")
    for r in results:
        base = next((b for b in results if b["arch"] == r["arch"] and b["variant"] == "bf16" and b["attention"] == "sdpa"),
                    None)
        sh = r["shares"]
        speedup = f"{base['step_s'] / r['step_s']:7.2f}x" if base else "    n/a "  # no bf16 variant in this run
        print(f"{r['arch']:5s} {r['variant']:13s} {r['attention']:5s} {r['step_s']:7.3f} {speedup} "
              f"{r['peak_gib']:9.1f} {r['weight_gib']:11.2f}  {sh.get('gemm', 0):4.0%} {sh.get('act_quant', 0):5.0%} "
              f"{sh.get('attention', 0):5.0%} {sh.get('other', 0):5.0%}")
    clock.__exit__(None, None, None)
    info["clock"] = clock.summary()
    print(clock.report())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
