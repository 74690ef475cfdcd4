"""BGR speed and weight-error reduction at real layer shapes (random weights).

    python bench/bgr.py [--device cuda] [--model wan14b|wan1.3b|hunyuan] [--svd-rank 32]

Times BGR and min-max on one transformer block's Linear shapes and extrapolates to the whole
model; prints the squared-error ratio BGR / min-max per layer type. --svd-rank R also times the whole
weight path with the rank-R SVD branch: the plain split (one SVD, one BGR) and the shipped split with the
branch refitted to the codes (dvdq_core.weights.quantize_split). Random normal weights stand in
for trained ones (trained weights are heavier-tailed, where BGR gains more).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dvdq_core import bgr_quantize, minmax_quantize  # noqa: E402
from dvdq_core.hadamard import rotate  # noqa: E402
from dvdq_core.weights import quantize_split, svd_split  # noqa: E402

# (name, out_features, in_features, count per block), and the number of blocks
MODELS = {
    "wan14b": (40, [("self_attn.qkvo", 5120, 5120, 4), ("cross_attn.qkvo", 5120, 5120, 4),
                    ("ffn.0", 13824, 5120, 1), ("ffn.2", 5120, 13824, 1)]),
    "wan1.3b": (30, [("self_attn.qkvo", 1536, 1536, 4), ("cross_attn.qkvo", 1536, 1536, 4),
                     ("ffn.0", 8960, 1536, 1), ("ffn.2", 1536, 8960, 1)]),
    "hunyuan": (60, [("double.qkv", 9216, 3072, 2), ("double.proj", 3072, 3072, 2), ("double.mlp.0", 12288, 3072, 2),
                     ("double.mlp.2", 3072, 12288, 2)]),  # a rough average over double/single blocks
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="wan14b", choices=MODELS)
    ap.add_argument("--student-t", action="store_true", help="heavy-tailed rows (Student-t, 3 dof) instead of normal")
    ap.add_argument("--svd-rank", type=int, default=0, help="also time the weight path with a rank-R SVD branch")
    a = ap.parse_args()
    blocks, layers = MODELS[a.model]
    g = torch.Generator(device=a.device).manual_seed(0)
    print(f"BGR on {a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'CPU'}), "
          f"model {a.model}, {'Student-t' if a.student_t else 'normal'} weights")
    svd = (" split+BGR s | refit split s |", "---|---|") if a.svd_rank else ("", "")
    print("| layer | shape | BGR s | min-max s | BGR/min-max squared error |" + svd[0])
    print("|---|---|---|---|---|" + svd[1])
    total_bgr, total_split, total_refit = 0.0, 0.0, 0.0
    for name, n, k, count in layers:
        w = torch.randn(n, k, generator=g, device=a.device)
        if a.student_t:
            chi2 = sum(torch.randn(n, k, generator=g, device=a.device) ** 2 for _ in range(3))
            w = w / (chi2 / 3).sqrt()
        w = rotate(w, 128)
        bgr_quantize(w[:64], 4)  # warm-up
        sync(a.device)
        t0 = time.perf_counter()
        qb = bgr_quantize(w, 4)
        sync(a.device)
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        qm = minmax_quantize(w, 4)
        sync(a.device)
        tm = time.perf_counter() - t0
        ratio = ((qb.dequantize() - w) ** 2).sum() / ((qm.dequantize() - w) ** 2).sum()
        total_bgr += tb * count * blocks
        row = f"| {name} | {n}x{k} | {tb:.2f} | {tm:.3f} | {ratio.item():.3f} |"
        if a.svd_rank:  # (w is rotated here: the split's timing does not depend on it)
            t0 = time.perf_counter()
            res = svd_split(w, a.svd_rank)[2]
            bgr_quantize(rotate(res, 128), 4)
            sync(a.device)
            ts = time.perf_counter() - t0
            t0 = time.perf_counter()
            quantize_split(w, a.svd_rank, 4, "dvdq", 128)
            sync(a.device)
            tr = time.perf_counter() - t0
            total_split += ts * count * blocks
            total_refit += tr * count * blocks
            row += f" {ts:.2f} | {tr:.2f} |"
        print(row)
        del w, qb, qm
    print(f"\nextrapolated BGR time for all {blocks} blocks: {total_bgr:.0f} s")
    if a.svd_rank:
        print(f"with the rank-{a.svd_rank} branch: plain split + BGR {total_split:.0f} s, "
              f"refitted split {total_refit:.0f} s")


if __name__ == "__main__":
    main()
