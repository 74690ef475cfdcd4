"""Wan's q/k RMS norm + rotary embedding: the host's PyTorch ops (dvdq_core.rope.norm_rope_reference,
the formula of ComfyUI's apply_rope1 after its RMSNorm) vs the fused Triton kernel, per call at the
shapes of one CFG step (batch 2, 480p x 81 frames = 32760 tokens), with the memory bandwidth the
kernel reaches (one read and one write of the tensor) and the largest difference to the host's ops.

    python bench/rope.py [--warps 4 8 16]
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dvdq_core.backends import load_kernels  # noqa: E402
from dvdq_core.rope import norm_rope_reference  # noqa: E402

SHAPES = {"wan14b": (40, 128), "wan1.3b": (12, 128)}  # heads, head dim
TOKENS = 32760


def wan_freqs(s: int, d: int, device) -> torch.Tensor:
    """[1, S, 1, D/2, 2, 2] rotations of S positions (the layout ComfyUI's EmbedND returns)."""
    pos = torch.arange(s, device=device, dtype=torch.float32)
    omega = 1.0 / 10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)
    a = pos[:, None] * omega.float()[None]
    f = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1)
    return f.view(1, s, 1, d // 2, 2, 2)


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", type=int, nargs="+", default=None, help="sweep the kernel's warps per program")
    args = ap.parse_args()
    k = load_kernels()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("model    norm  warps  host_ms  fused_ms  speedup  fused_GB/s  max_abs_diff  differing")
    for name, (h, d) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, TOKENS, h * d, device=dev, dtype=torch.bfloat16, generator=g) * 3
        w = (1 + 0.1 * torch.randn(h * d, device=dev, generator=g)).to(torch.bfloat16)
        f = wan_freqs(TOKENS, d, dev)
        for weight in (w, None):
            host = timed(lambda: norm_rope_reference(x, weight, 1e-6, f, h))
            ref = norm_rope_reference(x, weight, 1e-6, f, h)
            for warps in args.warps or [k.configs.ROPE_NUM_WARPS]:
                k.configs.ROPE_NUM_WARPS = warps
                ours = timed(lambda: k.ops.norm_rope(x, weight, 1e-6, f, h))
                y = k.ops.norm_rope(x, weight, 1e-6, f, h)
                diff = (y.float() - ref.float()).abs().max().item()
                frac = (y != ref).float().mean().item()
                gbs = 2 * x.numel() * x.element_size() / ours / 1e6
                print(f"{name:8s} {'yes' if weight is not None else 'no':4s} {warps:6d} {host:8.3f} {ours:9.3f} "
                      f"{host / ours:7.1f}x {gbs:10.0f}  {diff:12.3g}  {frac:9.2e}", flush=True)


if __name__ == "__main__":
    main()
