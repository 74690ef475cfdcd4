"""The Wan block's elementwise steps: the host's PyTorch ops (dvdq_core.wan_ops.*_reference, ComfyUI's
formulas) vs our Triton kernels, per call at the shapes of one CFG step (batch 2, 480p x 81 frames =
32760 tokens), with the memory bandwidth each kernel reaches (its one read of every input and one
write) and the largest difference to the host's ops.

    python bench/wan_ops.py [--warps 4 8 16]
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dvdq_core import kernels as k  # noqa: E402, I001
from dvdq_core import wan_ops  # noqa: E402

SHAPES = {"wan14b": (40, 128), "wan1.3b": (12, 128)}  # heads, head dim (C = heads x head dim)
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
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("model    op                warps  host_ms  fused_ms  speedup  fused_GB/s  max_abs_diff  differing")
    for name, (h, d) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, TOKENS, h * d, device=dev, dtype=torch.bfloat16, generator=g) * 3
        y = torch.randn(2, TOKENS, h * d, device=dev, dtype=torch.bfloat16, generator=g)
        w = (1 + 0.1 * torch.randn(h * d, device=dev, generator=g)).to(torch.bfloat16)
        e = (0.5 * torch.randn(2, 6, h * d, device=dev, generator=g)).to(torch.bfloat16).chunk(6, dim=1)
        f = wan_freqs(TOKENS, d, dev)
        cases = [  # (label, args, reference, kernel, tensors read + written)
            ("norm_rope", (x, w, 1e-6, f, h), wan_ops.norm_rope_reference, k.ops.norm_rope, 2),
            ("rope (no norm)", (x, None, 1e-6, f, h), wan_ops.norm_rope_reference, k.ops.norm_rope, 2),
            ("modulated_norm", (x, e[0], e[1], 1e-6), wan_ops.modulated_norm_reference, k.ops.modulated_norm, 2),
            ("gated_residual", (x, y, e[2]), wan_ops.gated_residual_reference, k.ops.gated_residual, 3),
        ]
        for label, a, reference, kernel, passes in cases:
            host = timed(lambda: reference(*a))
            ref = reference(*a)
            for warps in args.warps or [k.configs.WAN_OPS_NUM_WARPS]:
                k.configs.WAN_OPS_NUM_WARPS = warps
                ours = timed(lambda: kernel(*a))
                out = kernel(*a)
                diff = (out.float() - ref.float()).abs().max().item()
                frac = (out != ref).float().mean().item()
                gbs = passes * x.numel() * x.element_size() / ours / 1e6
                print(f"{name:8s} {label:16s} {warps:6d} {host:8.3f} {ours:9.3f} {host / ours:7.1f}x {gbs:10.0f}  "
                      f"{diff:12.3g}  {frac:9.2e}", flush=True)

if __name__ == "__main__":
    main()
