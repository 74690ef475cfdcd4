"""Command line: `python -m dvdq_core {quantize, inspect}` (the demo: `python -m demo`)."""
import argparse
import json
import os
import sys

from .config import GRANULARITIES, METHODS, QuantConfig


def _config_from_args(a) -> QuantConfig:
    return QuantConfig(method=a.method, w_bits=a.w_bits, a_bits=a.a_high, a_low=a.a_low, a_high=a.a_high,
                       rotate=not a.no_rotate, had_block=a.had_block, auto_scale=not a.no_auto_scale,
                       granularity=a.granularity, scale_block=a.scale_block, svd_rank=a.svd_rank,
                       include=tuple(a.include), overrides="\n".join(a.override))


def cmd_quantize(a):
    import torch

    from .progress import ProgressBar
    from .statedict import quantize_file

    if os.path.exists(a.output) and not a.overwrite:
        raise ValueError(f"{a.output} exists; pass --overwrite to replace it")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        print("note: no CUDA GPU, running BGR on the CPU (a 14B model takes a long time; --method minmax is fast)",
              file=sys.stderr)
    s = quantize_file(a.input, a.output, _config_from_args(a), device=device,
                      progress=ProgressBar(0, "quantizing"), allow_unknown_arch=a.any_arch)
    print(f"{s['arch']}: {s['layers']} layers quantized, {s['bytes_in'] / 2**30:.2f} GiB -> {s['bytes_out'] / 2**30:.2f} GiB, "
          f"mean rel. weight error {s['mean_rel_error']:.4f}, {s['seconds']:.0f} s -> {a.output}")


def cmd_inspect(a):
    from .serialization import read_header, read_metadata

    meta = read_metadata(a.file)
    n_tensors = len(read_header(a.file)[1])
    layers = meta["layers"]
    cfg = meta["config"]
    print(f"{a.file}: DVD-Quant format {meta['format_version']}, arch {meta['arch'] or 'unknown'}, "
          f"{n_tensors} tensors, {len(layers)} quantized layers, {os.path.getsize(a.file) / 2**20:.1f} MiB")
    print("config:", json.dumps(json.loads(cfg.to_json()), sort_keys=True))
    counts = {}
    for e in layers.values():
        key = (e["method"], e["w_bits"], e["a_bits"], e["had_block"])
        counts[key] = counts.get(key, 0) + 1
    for (method, w, a_bits, hb), n in sorted(counts.items(), key=str):
        print(f"  {n:4d} layers: method {method}, W{w}, A{'switched' if a_bits is None else a_bits}, Hadamard block {hb}")
    if a.layers:
        for name, e in layers.items():
            print(f"  {name}: {e['out']}x{e['in']} W{e['w_bits']} A{e['a_bits'] or 'sw'}")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m dvdq_core", description="DVD-Quant: data-free video DiT quantization")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="quantize a Wan 2.1/2.2 or HunyuanVideo diffusion-model safetensors file")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--method", default="dvdq", choices=METHODS)
    q.add_argument("--w-bits", type=int, default=4)
    q.add_argument("--a-low", type=int, default=4, help="delta-GBS low activation bits")
    q.add_argument("--a-high", type=int, default=8, help="delta-GBS high activation bits (also the default fixed bits)")
    q.add_argument("--had-block", type=int, default=128)
    q.add_argument("--no-rotate", action="store_true")
    q.add_argument("--no-auto-scale", action="store_true")
    q.add_argument("--granularity", default="pow2", choices=GRANULARITIES)
    q.add_argument("--scale-block", type=int, default=128)
    q.add_argument("--svd-rank", type=int, default=QuantConfig().svd_rank,
                   help="rank of each 4-bit weight's 16-bit SVD branch (method dvdq; 0: none)")
    q.add_argument("--include", action="append", default=None, help="glob of layers to quantize (default '*blocks.*')")
    q.add_argument("--override", action="append", default=[], help="per-layer precision, e.g. 'blocks.0.*=8' or 'head.*=skip'")
    q.add_argument("--device", default="auto", help="where BGR runs: auto, cuda, cpu")
    q.add_argument("--any-arch", action="store_true", help="accept files that are not Wan or HunyuanVideo")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(fn=cmd_quantize)
    i = sub.add_parser("inspect", help="print what a DVD-Quant file holds")
    i.add_argument("file")
    i.add_argument("--layers", action="store_true", help="list every layer")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(argv)
    if getattr(a, "include", None) is None and a.cmd == "quantize":
        a.include = ["*blocks.*"]
    return user_errors(a.fn, a)


def user_errors(fn, arg):
    """fn(arg), with the user's mistakes (bad values, missing files) as one line and exit status 2."""
    try:
        return fn(arg) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
