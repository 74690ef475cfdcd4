"""8-bit attention (dvdq_core.attention) against PyTorch SDPA on the GPU, at Wan's attention shapes.

    python3 bench/attention.py            # Wan 14B and 1.3B, 480p and 720p x 81 frames (CFG batch 2)
    python3 bench/attention.py --sweep    # also time every tile candidate of kernels/configs.py
    python3 bench/attention.py --variants --shapes "Wan 14B 480p,Wan 1.3B 480p" [--match gluon=1]
                                          # FP8 form: every variant of kernels/configs.py's ATTN_SM90_FP8_VARIANTS,
                                          # with the split quantization / attention kernel

One table: per shape, SDPA (PyTorch's own backend choice), our kernel (quantization included) with FP8
and with 16-bit P.V, FlashAttention-3 and sageattention where importable; time per call, speed-up over
SDPA, and the output's relative L2 error / cosine against SDPA's, on inputs with the statistics of
video-DiT attention (`dit_like_qkv`; the CPU tests use the same generator).
"""
import argparse
import importlib
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (name, batch, heads, tokens, head dim): Wan 2.1 at 81 frames; 480p = 21 x 30 x 52 tokens, 720p = 21 x 45 x 80
SHAPES = (("Wan 14B 480p", 2, 40, 32760, 128), ("Wan 1.3B 480p", 2, 12, 32760, 128),
          ("Wan 14B 720p", 2, 40, 75600, 128), ("Wan 1.3B 720p", 2, 12, 75600, 128))


def dit_like_qkv(b, h, l, d, *, dtype=torch.bfloat16, device="cpu", seed=0, logit_std=1.0, sinks=4):
    """q, k, v [B, H, L, D] with what makes video-DiT attention hard to quantize:
    - heavy tails: 1/16 of the channels carry log-normal magnitudes (a few values many times the rest);
    - per-channel offsets in K (and smaller ones in Q) along a few channels, several times the spread;
    - attention sinks: `sinks` tokens whose keys point along the queries' mean direction;
    - V as video tokens: neighbouring tokens alike (runs of 16), a per-channel offset, heavy-tailed channels.
    logit_std sets the spread of the scores q.k / sqrt(D) (before the tails and offsets)."""
    g = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    def tails(x, n):
        ch = torch.randperm(d, generator=g, device=device)[:n]
        x[..., ch] *= torch.exp(0.6 * randn(*x.shape[:-1], n))
        return x

    c = math.sqrt(logit_std)
    q = tails(randn(b, h, l, d), d // 16) * c
    k = tails(randn(b, h, l, d), d // 16) * c
    off = torch.zeros(h, 1, d, device=device)
    idx = torch.randperm(d, generator=g, device=device)[: d // 8]
    off[..., idx] = randn(h, 1, d // 8) * 3 * c
    k += off
    q += 0.3 * off
    u = q.mean(2, keepdim=True)
    pos = torch.randperm(l, generator=g, device=device)[:sinks]
    k[:, :, pos] += 2 * c * math.sqrt(d) * u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    base = randn(b, h, -(-l // 16), d).repeat_interleave(16, 2)[:, :, :l]
    v = tails(base + 0.5 * randn(b, h, l, d), d // 16) + randn(h, 1, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel_l2_cos(out, ref):
    o, r = out.float().flatten(), ref.float().flatten()
    return ((o - r).norm() / r.norm()).item(), torch.nn.functional.cosine_similarity(o, r, dim=0).item()


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _optional():
    """Peers that may be installed: {name: fn(q, k, v) -> [B, H, L, D]}, and notes on the missing ones."""
    peers, notes = {}, []
    fa3, fa3_errors = None, []
    for module in ("flash_attn_interface", "fa3_fwd_interface"):  # FlashAttention-3: its own build, or `fa3-fwd`
        try:
            fa3 = importlib.import_module(module).flash_attn_func
            break
        except Exception as e:
            fa3_errors.append(f"FlashAttention-3 ({module}) not importable: {type(e).__name__}: {e}"[:200])
    if fa3 is None:
        notes += fa3_errors
    else:
        def fa3_as(dtype):
            def run(q, k, v):  # FA3 takes [B, L, H, D]; FP8 with unit scales (the inputs fit e4m3's range)
                out = fa3(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)))
                return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
            return run
        peers["FA3 bf16"] = fa3_as(torch.bfloat16)
        peers["FA3 fp8"] = fa3_as(torch.float8_e4m3fn)
    try:
        from sageattention import sageattn
        peers["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except Exception as e:
        notes.append(f"sageattention not importable: {type(e).__name__}")
    return peers, notes


def bench_shape(name, b, h, l, d, args, peers, cap):
    """The table's lines for one shape (its tensors are freed on return)."""
    from dvdq_core.attention import attention_q8
    from dvdq_core.kernels import configs
    q, k, v = dit_like_qkv(b, h, l, d, device="cuda")
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    ref = sdpa()
    t_ref = timed(sdpa, args.iters)
    print(f"{name:15} {'SDPA':22} {t_ref:8.2f} {1.0:8.2f} {0.0:8.4f} {1.0:9.6f}")
    methods = {f"ours {pv} P.V": (lambda pv=pv: attention_q8(q, k, v, pv=pv, backend="triton"))
               for pv in ("fp8", "fp16")}
    methods.update({n: (lambda f=f: f(q, k, v)) for n, f in peers.items()})
    for label, fn in methods.items():
        try:
            err, cos = rel_l2_cos(fn(), ref)
            t = timed(fn, args.iters)
        except Exception as e:  # a peer's failure is a line, not the end of the table
            print(f"{name:15} {label:22} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        print(f"{name:15} {label:22} {t:8.2f} {t_ref / t:8.2f} {err:8.4f} {cos:9.6f}")
    if args.sweep:
        for pv in ("fp8", "fp16"):
            for cfg in configs.attention_candidates(cap, pv == "fp8"):
                os.environ["DVDQ_ATTN_CONFIG"] = cfg.to_env()
                try:
                    fn = lambda pv=pv: attention_q8(q, k, v, pv=pv, backend="triton")  # noqa: E731
                    err, _ = rel_l2_cos(fn(), ref)
                    t = timed(fn, args.iters)
                    print(f"{name:15} {pv + ' ' + os.environ['DVDQ_ATTN_CONFIG']:22} {t:8.2f} {t_ref / t:8.2f} "
                          f"{err:8.4f}")
                except Exception as e:
                    print(f"{name:15} {pv} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    del os.environ["DVDQ_ATTN_CONFIG"]


def sweep_variants(name, b, h, l, d, args, cap):
    """Per FP8 variant (configs.ATTN_SM90_FP8_VARIANTS on sm_90): the whole op, its quantization (steps 1-2) and
    its attention kernel (step 3) alone, the speed-up over SDPA and the error against SDPA. A variant that fails
    to compile prints its error; the sweep goes on."""
    from dvdq_core.kernels import _attention, configs
    q, k, v = dit_like_qkv(b, h, l, d, device="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    t_ref = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.iters)
    print(f"{name:15} {'SDPA':44} {t_ref:8.2f}")
    variants = configs.ATTN_SM90_FP8_VARIANTS if configs.wgmma(cap) else configs.attention_candidates(cap, True)
    if args.match:  # the default (the baseline) and the variants whose options contain the text
        variants = [v for i, v in enumerate(variants) if i == 0 or args.match in v.to_env()]
    scale = d ** -0.5
    best = None
    for cfg in variants:
        label = cfg.to_env()
        try:
            run = lambda cfg=cfg: _attention.attention(q, k, v, scale, True, False, cfg)  # noqa: E731
            err, cos = rel_l2_cos(run(), ref)
            t = timed(run, args.iters)
            prep = _attention.quantize(q, k, v, scale, True, cfg)
            if cfg.gluon and not prep["gluon"]:
                label += " (ran the Triton kernel)"
            t_q = timed(lambda cfg=cfg: _attention.quantize(q, k, v, scale, True, cfg), args.iters)
            t_k = timed(lambda prep=prep: _attention.attend(prep, False), args.iters)
            del prep
        except Exception as e:  # noqa: BLE001 (a failing variant is a line of the table)
            print(f"{name:15} {label:44} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        ok = "" if err <= 0.02 and cos >= 0.9998 else "  (misses rel L2 <= 0.02 / cosine >= 0.9998 vs SDPA)"
        print(f"{name:15} {label:44} {t:8.2f} {t_q:8.2f} {t_k:8.2f} {t_ref / t:8.2f} {err:8.4f} {cos:9.6f}{ok}",
              flush=True)
        if not ok and (best is None or t < best[0]):
            best = (t, label)
    if best:
        print(f"{name:15} fastest within the thresholds: {best[1]} ({best[0]:.2f} ms, {t_ref / best[0]:.2f}x SDPA)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="all", help="comma-separated prefixes of the shape names, or all")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="time every tile candidate (kernels/configs.py)")
    ap.add_argument("--variants", action="store_true",
                    help="only the FP8 kernel variants (configs.ATTN_SM90_FP8_VARIANTS), split into quantization "
                         "and attention kernel")
    ap.add_argument("--match", default="", help="with --variants: only the default and the variants whose "
                    "DVDQ_ATTN_CONFIG text contains this (e.g. gluon=1)")
    args = ap.parse_args(argv)
    if args.match and not args.variants:
        ap.error("--match selects among --variants")
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    cap = torch.cuda.get_device_capability()
    print(f"# {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, "
          f"SDPA backend: PyTorch's default choice; times in ms per call, quantization included")
    shapes = [s for s in SHAPES if args.shapes == "all" or any(s[0].startswith(p) for p in args.shapes.split(","))]
    if args.variants:
        print(f"{'shape':15} {'variant (DVDQ_ATTN_CONFIG)':44} {'ms':>8} {'quant':>8} {'kernel':>8} {'vs SDPA':>8} "
              f"{'rel L2':>8} {'cosine':>9}")
        for shape in shapes:
            sweep_variants(*shape, args, cap)
            torch.cuda.empty_cache()
        return
    peers, notes = _optional()
    for n in notes:
        print(f"# skipped: {n}")
    print(f"{'shape':15} {'method':22} {'ms':>8} {'vs SDPA':>8} {'rel L2':>8} {'cosine':>9}")
    for shape in shapes:
        bench_shape(*shape, args, peers, cap)
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
