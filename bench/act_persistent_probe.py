"""Pass 2 of granularity "pow2" with a persistent grid (act_cfg's 4th entry: programs per SM; 0 = one
program per row block) against the shipped launch: ms, TB/s over the bytes it must move (X twice,
the codes once) and whether the codes and scales are bit-identical to the shipped ones. GPU only.

usage: python bench/act_persistent_probe.py [--m 65520]
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dvdq_core.kernels import ops  # noqa: E402

CONFIGS = [(8192, 4, 3, 0), (2048, 4, 3, 1), (2048, 4, 4, 1), (2048, 8, 4, 1), (2048, 4, 3, 2), (4096, 4, 3, 1),
           (4096, 8, 4, 1), (4096, 4, 3, 2), (8192, 4, 3, 1), (8192, 4, 3, 2), (8192, 4, 4, 2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=65520)
    m = ap.parse_args().m
    for k in (1536, 5120, 13824):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[:, :: max(1, k // 7)] *= 20  # a few massive channels, as in video DiTs
        cmax = ops.channel_absmax(x, 128, 128)
        want = ops.quantize_pow2(x, 128, 128, 4, cmax)
        for cfg in CONFIGS:
            try:
                got = ops.quantize_pow2(x, 128, 128, 4, cmax, act_cfg=cfg)
                exact = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                t = do_bench(lambda: ops.quantize_pow2(x, 128, 128, 4, cmax, act_cfg=cfg), warmup=25, rep=100,
                             return_mode="median")
                print(f"K={k} pass 2 {cfg}: {t:.3f} ms {(2 * m * k * 2 + m * k) / t / 1e9:.2f} TB/s exact={exact}",
                      flush=True)
            except Exception as e:  # a study: report and go on
                print(f"K={k} pass 2 {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        del x


if __name__ == "__main__":
    main()
