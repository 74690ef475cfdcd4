"""Per-layer output error of a quantized layer, split into its weight and activation parts.

For one quantized layer (a QuantLinear of any method) and a batch of its real inputs X (captured
from the float model while it samples), with Y = X W^T + b the float output:

- "W":    quantized weights, float activations (in the method's basis: rotated for quarot/dvdq,
          smoothed for smoothquant; a layer's SVD branch, 16-bit, reads the float input in every part),
- "A":    float weights (in that basis), quantized activations (the method's per-call math:
          rotation, auto-scale, per-token quantizer at ``a_bits``),
- "both": the layer as it runs (the reference backend's math, without a fused activation),

each as ||Y_q - Y||_F / ||Y||_F, accumulated over the captured calls (sums of squares). The
pre-activation output is compared (ffn.0's fused GELU is not applied).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dvdq_core.activations import EPS  # noqa: E402
from dvdq_core.backends import quantized_input  # noqa: E402
from dvdq_core.hadamard import rotate  # noqa: E402
from dvdq_core.weights import minmax_quantize  # noqa: E402

PARTS = ("W", "A", "both")


@torch.no_grad()
def split_outputs(layer, weight: torch.Tensor, x2d: torch.Tensor, a_bits: int) -> dict:
    """{"ref": Y, "W": ..., "A": ..., "both": ...} for one call of ``layer`` on x2d [M, K];
    ``weight`` is the layer's float weight [N, K] (in the plain basis)."""
    x = x2d.float()
    w = weight.float()
    b = layer.bias.float() if layer.bias is not None else torch.zeros(w.shape[0], device=w.device)
    ref = x @ w.t() + b
    if layer.method == "smoothquant":
        s = x.abs().amax(0).clamp_min(EPS).sqrt() / w.abs().amax(0).clamp_min(EPS).sqrt()
        xb, wf = x / s, w * s
        wq = minmax_quantize(wf, layer.w_bits).dequantize()
    else:
        xb = rotate(x, layer.had_block) if layer.rotate else x
        wf = rotate(w, layer.had_block) if layer.rotate else w
        wq = layer.dequantized_weight()
    xq = quantized_input(layer, xb, a_bits)
    branch = layer.svd_branch() if hasattr(layer, "svd_branch") else None
    if branch is not None:  # the SVD branch (16-bit, plain basis) is exact here: it joins the weight part
        b = b + (x @ branch.down.float().t()) @ branch.up.float().t()
        wf = wf - (rotate(branch.up.float() @ branch.down.float(), layer.had_block) if layer.rotate
                   else branch.up.float() @ branch.down.float())
    return {"ref": ref, "W": xb @ wq.t() + b, "A": xq @ wf.t() + b, "both": xq @ wq.t() + b}


class SplitRecorder:
    """Forward pre-hooks on the float model's layers that, at the chosen calls (0-based model calls,
    one per sampling step), run every method's split on the layer's real input and accumulate it."""

    def __init__(self, base, qmodels: dict, a_bits: int, at_calls):
        self.a_bits, self.at_calls = a_bits, set(at_calls)
        self.qlayers = {m: dict(_quantized(q)) for m, q in qmodels.items()}
        names = set.intersection(*(set(d) for d in self.qlayers.values()))
        self.sums = {}  # (method, layer) -> {"ref": ||Y||^2, part: ||Y_part - Y||^2}
        self.calls = {}
        self.hooks = [base.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in sorted(names)]

    def _hook(self, name):
        def hook(mod, args):
            k = self.calls.get(name, 0)
            self.calls[name] = k + 1
            if k not in self.at_calls:
                return
            x2d = args[0].detach().reshape(-1, args[0].shape[-1])
            for method, layers in self.qlayers.items():
                out = split_outputs(layers[name], mod.weight, x2d, self.a_bits)
                acc = self.sums.setdefault((method, name), dict.fromkeys(("ref",) + PARTS, 0.0))
                acc["ref"] += out["ref"].pow(2).sum().item()
                for p in PARTS:
                    acc[p] += (out[p] - out["ref"]).pow(2).sum().item()
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()

    def result(self) -> dict:
        """{method: {layer: {"W": rel, "A": rel, "both": rel}}}"""
        out = {}
        for (method, name), acc in self.sums.items():
            den = max(acc["ref"], 1e-30) ** 0.5
            out.setdefault(method, {})[name] = {p: acc[p] ** 0.5 / den for p in PARTS}
        return out


def _quantized(model):
    from dvdq_core import quantized_layers
    return quantized_layers(model)


def layer_kind(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else name


def summary(split: dict, worst: int = 5) -> dict:
    """Per method: mean over layers of each kind, and the ``worst`` layers by "both"."""
    out = {}
    for method, layers in split.items():
        kinds = {}
        for name, e in layers.items():
            kinds.setdefault(layer_kind(name), []).append(e)
        means = {k: {p: sum(e[p] for e in v) / len(v) for p in PARTS} for k, v in kinds.items()}
        means["all"] = {p: sum(e[p] for e in layers.values()) / len(layers) for p in PARTS}
        top = sorted(layers.items(), key=lambda kv: -kv[1]["both"])[:worst]
        out[method] = {"kind_means": means, "worst": [{"layer": n, **e} for n, e in top]}
    return out


def markdown(summ: dict, a_bits: int, calls) -> str:
    """Compact tables: per-kind means (W / A / both per method) and the worst layers."""
    methods = list(summ)
    kinds = list(next(iter(summ.values()))["kind_means"])
    kinds = sorted(k for k in kinds if k != "all") + ["all"]
    out = [f"Per-layer output error ||Y_q - Y|| / ||Y||, W4A{a_bits}, split into W only / A only / both "
           f"(mean over blocks; real inputs from the float model's calls {sorted(calls)}):", "",
           "| layer kind | " + " | ".join(f"{m} W / A / both" for m in methods) + " |",
           "|---|" + "---|" * len(methods)]
    for k in kinds:
        out.append(f"| {k} | " + " | ".join(
            " / ".join(f"{summ[m]['kind_means'][k][p]:.3f}" for p in PARTS) for m in methods) + " |")
    out += ["", "Worst layers (by both):", "", "| method | layer | W only | A only | both |", "|---|---|---|---|---|"]
    for m in methods:
        for e in summ[m]["worst"][:3]:
            out.append(f"| {m} | {e['layer']} | {e['W']:.3f} | {e['A']:.3f} | {e['both']:.3f} |")
    return "\n".join(out)
