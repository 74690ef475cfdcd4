"""Layer-level checks of LoRAs after quantization (nodes/lora.py) against ComfyUI's own merge, in a host's
Python without a server: each patch form a branch runs gives, beside an 8-bit layer with float activations,
the output of the float layer with ComfyUI's comfy.lora.calculate_weight applied (alpha / rank scaling,
strengths, slices of the weight by offset along either dimension, bias differences, stacks); the forms it
cannot run are refused naming them. Exit status 0 when every check passed.

usage: python tests/host/lora_checks.py COMFY_DIR
"""
import importlib.util
import os
import sys

COMFY = os.path.abspath(sys.argv[1])
PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [COMFY, PACK]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.lora  # noqa: E402
import comfy.weight_adapter as wa  # noqa: E402

import dvdq_core as dq  # noqa: E402

_spec = importlib.util.spec_from_file_location("dvdq_tests_pack", os.path.join(PACK, "tests", "pack.py"))
pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack)
host, lora = pack.sub("host"), pack.sub("lora")
FAILED = []
G = torch.Generator().manual_seed(0)


def check(ok, what):
    print(("  ok   " if ok else "  FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


def randn(*shape):
    return torch.randn(*shape, generator=G)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


N, K, KEY = 48, 64, "diffusion_model.blocks.0.ffn.0"
lin = torch.nn.Linear(K, N)
spec = dq.LayerSpec(w_bits=8, a_bits=16, method="dvdq", had_block=64, scale_block=64, rotate=True, auto_scale=True,
                    granularity="block")
layer, _ = host.layer_class().from_linear(lin, spec, dq.BitState(16), backend="reference")
x = randn(9, K)
base = F.linear(x, lin.weight, lin.bias)


def adapter(n, k, r, alpha=None, **extra):
    weights = (randn(n, r) / 3, randn(r, k) / 3, None if alpha is None else torch.tensor(float(alpha)),
               extra.get("mid"), extra.get("dora_scale"), None)
    return wa.LoRAAdapter(set(), weights)


def run(weight_patches, bias_patches=(), act=None):
    """(the quantized layer with these patches as its branch, the float layer with ComfyUI's merge)."""
    layer.act = act
    layer.lora_patches = {KEY + ".weight": list(weight_patches)}
    if bias_patches:
        layer.lora_patches[KEY + ".bias"] = list(bias_patches)
    lora.refresh(layer, torch.device("cpu"), torch.float32)
    got = layer(x)
    w = comfy.lora.calculate_weight(list(weight_patches), lin.weight.detach().clone(), KEY + ".weight")
    b = lin.bias.detach().clone()
    if bias_patches:
        b = comfy.lora.calculate_weight(list(bias_patches), b, KEY + ".bias")
    want = F.linear(x, w, b)
    return got, (F.gelu(want, approximate="tanh") if act else want)


def patch(v, strength=1.0, offset=None):
    return (strength, v, 1.0, offset, None)


print(f"ComfyUI {COMFY}: a {N} x {K} layer at W8A16, branches against comfy.lora.calculate_weight")
cases = {
    "LoRA with alpha (alpha / rank scaling), strength 0.7": ([patch(adapter(N, K, 8, alpha=4), 0.7)], ()),
    "LoRA without alpha, negative strength": ([patch(adapter(N, K, 4), -1.3)], ()),
    "two stacked LoRAs": ([patch(adapter(N, K, 4, alpha=2), 0.5), patch(adapter(N, K, 6, alpha=6), 1.0)], ()),
    "LoRA on output rows 8..23 (offset along dim 0)": ([patch(adapter(16, K, 4, alpha=4), 1.0, (0, 8, 16))], ()),
    "LoRA on input columns 32..63 (offset along dim 1)": ([patch(adapter(N, 32, 4, alpha=4), 1.0, (1, 32, 32))], ()),
    "LoRA and a bias difference (diff_b)": ([patch(adapter(N, K, 4))], [patch(("diff", (randn(N) / 2,)), 0.8)]),
}
for what, (wp, bp) in cases.items():
    for act in (None, "gelu_tanh"):
        got, want = run(wp, bp, act)
        effect = rel(base if act is None else F.gelu(base, approximate="tanh"), want)
        err = rel(got, want)
        check(err < 0.01 and effect > 0.05, f"{what}{', fused GELU' if act else ''}: rel. error {err:.4f} "
                                            f"(the patch's own effect {effect:.3f})")

refused = {
    "LoHa": wa.LoHaAdapter(set(), (randn(N, 2), randn(2, K), None, randn(N, 2), randn(2, K), None, None, None)),
    "DoRA": adapter(N, K, 4, dora_scale=torch.ones(N, 1)),
    "full-weight difference": ("diff", (randn(N, K),)),
}
for form, v in refused.items():
    layer.lora_patches = {KEY + ".weight": [patch(v)]}
    try:
        lora.refresh(layer, torch.device("cpu"), torch.float32)
        check(False, f"{form}: refused")
    except Exception as e:
        check(form in str(e) and "before 'DVD-Quant Apply'" in str(e), f"{form}: refused ({str(e)[:90]}...)")
layer.lora_patches = {KEY + ".weight": [(1.0, adapter(N, K, 4), 0.5, None, None)]}
try:
    lora.refresh(layer, torch.device("cpu"), torch.float32)
    check(False, "a patch that scales the base weight (strength_model): refused")
except Exception as e:
    check("strength_model" in str(e), "a patch that scales the base weight (strength_model): refused")
layer.lora_patches = {}
lora.refresh(layer, torch.device("cpu"), torch.float32)
check(layer.lowrank is None, "no patches: no branch")

print("RESULT:", "all checks passed" if not FAILED else f"{len(FAILED)} failed: " + "; ".join(FAILED))
sys.exit(1 if FAILED else 0)
