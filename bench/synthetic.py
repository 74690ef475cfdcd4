"""Synthetic test models: random-weight mini-Wans given the statistics that make W4A4 hard.

SYNTHETIC: random weights, edited in place so that the float model shows one statistic that large
trained video DiTs show (docs/test-models.md). They sample noise, not clips; they are for
comparing quantizers against their own full-precision output, nothing else.

A model is named by a spec: ``random`` (demo.run.random_model) or options joined by ``+`` applied
to that random model in the order given, e.g. ``massive``, ``massive+sinks``. Options (STATS):

- ``outliers``: a few moderately large channels (x8-20) in the residual stream, AdaLN scale,
  cross-attention norm and FFN hidden layer (bench/quality.py's original "random+outliers").
- ``massive``: a few residual channels ~300x the median channel's magnitude, written by one FFN
  neuron of block 0 and carried by the residual through every later block; the layers reading
  the stream give those channels 1/300 of their weight (they act as a bias, as in trained models),
  and the head is rescaled so the output keeps the random model's RMS.
- ``sinks``: about 1% of the tokens get a residual norm 10-400x the median token's (one neuron of
  block 0's FFN fires, with a massive hidden activation, on tokens far along one direction and
  writes a large vector).
- ``heavy``: Student-t (3 dof) weight rows in every block Linear, and a few input columns x10.
- ``modshift``: AdaLN shift/scale tables with large per-channel offsets (all channels spread,
  a few much larger), so modulated inputs have large constant per-channel offsets.
- ``constant``: nearly the same input vector for every token: the prompt tokens (cross-attention
  k/v inputs) are one vector plus 1% noise, and the middle block's FFN input is its AdaLN shift
  plus 2% of the normalized stream (the scale pinned near zero, independent of the timestep).

Every option is seeded (``seed``) and deterministic. ``statistics`` measures each property on a
seeded forward pass; tests/test_synthetic.py checks the thresholds STAT_CHECKS states.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo.model import MiniWan, MiniWanConfig  # noqa: E402
from demo.run import random_model  # noqa: E402


def _gen(seed: int, option: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + sum(map(ord, option)))


def inject_outliers(model: MiniWan, seed: int = 0, n_channels: int = 4) -> MiniWan:
    """A few large channels where trained DiTs have them (in place; returns the model)."""
    g = torch.Generator().manual_seed(seed)
    dim = model.cfg.dim
    ch = torch.randperm(dim, generator=g)[:n_channels]
    with torch.no_grad():
        model.patch_embedding.weight[ch] *= 20.0                 # residual stream
        model.patch_embedding.bias[ch] *= 20.0
        for blk in model.blocks:
            blk.modulation[0, 1, ch] += 15.0                     # scale of the self-attention input
            blk.modulation[0, 4, ch] += 15.0                     # scale of the FFN input
            blk.norm3.weight[ch] *= 15.0                         # cross-attention input
            hid = torch.randperm(model.cfg.ffn_dim, generator=g)[:2 * n_channels]
            blk.ffn[0].weight[hid] *= 8.0                        # FFN hidden (input of ffn.2)
            blk.ffn[0].bias[hid] += 2.0
    return model


def _calib_inputs(model: MiniWan, seed: int, batch: int = 2, frames: int = 16, size: int = 32):
    """Seeded noise clips, timesteps and prompt ids for one calibration / statistics pass."""
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x = torch.randn(batch * 3, c.in_dim, frames, size, size, generator=g)
    t = torch.tensor([0.9, 0.5, 0.1]).repeat_interleave(batch)
    ids = torch.randint(0, c.vocab_size, (batch * 3, c.text_len), generator=g)
    ids[batch:] = 0  # some empty prompts, as the CFG half of sampling
    return x, t, ids


@torch.no_grad()
def _capture(model: MiniWan, names, seed: int):
    """{name: input [N, K] of that submodule} on the calibration pass; "blocks.i" gives the block's output."""
    got, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        if n.startswith("blocks.") and n.count(".") == 1:
            hooks.append(mods[n].register_forward_hook(
                lambda m, a, out, n=n: got.__setitem__(n, out.detach().float())))
        else:
            hooks.append(mods[n].register_forward_pre_hook(
                lambda m, a, n=n: got.__setitem__(n, a[0].detach().float().reshape(-1, a[0].shape[-1]))))
    try:
        model(*_calib_inputs(model, seed))
    finally:
        for h in hooks:
            h.remove()
    return got


@torch.no_grad()
def _output_rms(model: MiniWan, seed: int) -> float:
    return model(*_calib_inputs(model, seed)).float().pow(2).mean().sqrt().item()


def _gate_constant(model: MiniWan, chunk: int, ch):
    """Remove the timestep's part of AdaLN vector ``chunk`` (0-5) on channels ``ch``: e = modulation there."""
    dim = model.cfg.dim
    rows = chunk * dim + torch.as_tensor(ch)
    model.time_projection[1].weight[rows] = 0.0
    model.time_projection[1].bias[rows] = 0.0


@torch.no_grad()
def add_massive(model: MiniWan, seed: int = 0, n_channels: int = 2, ratio: float = 300.0) -> MiniWan:
    """``n_channels`` residual channels at ``ratio`` x the typical channel magnitude of the residual stream
    (median over channels of the median |x| over tokens: robust to sink tokens),
    from one FFN neuron each in block 0 (a constant hidden unit; its gate made 1 and timestep-free)."""
    g = _gen(seed, "massive")
    dim, blk = model.cfg.dim, model.blocks[0]
    rms = _output_rms(model, seed)
    ch = torch.randperm(dim, generator=g)[:n_channels]
    hid = torch.randperm(model.cfg.ffn_dim, generator=g)[:n_channels]
    out = _capture(model, [f"blocks.{len(model.blocks) - 1}"], seed)[f"blocks.{len(model.blocks) - 1}"]
    med = out.reshape(-1, dim).abs().median(0).values.median().item()
    _gate_constant(model, 5, ch)
    blk.modulation[0, 5, ch] = 1.0
    blk.ffn[0].weight[hid] = 0.0
    blk.ffn[0].bias[hid] = 1.0
    blk.ffn[2].weight[:, hid] = 0.0
    h = torch.nn.functional.gelu(torch.tensor(1.0), approximate="tanh").item()
    blk.ffn[2].weight[ch, hid] = ratio * med / h
    # as in trained models, the layers that read the stream give those channels small weights (they act
    # as a bias): the massive channels set the input's range, not the output
    for later in model.blocks[1:]:
        for lin in (later.self_attn.q, later.self_attn.k, later.self_attn.v, later.cross_attn.q, later.ffn[0]):
            lin.weight[:, ch] /= ratio
    model.head.head.weight[:, ch] /= ratio
    # the normalized stream's other channels are now ~1/ratio of their size: rescale the head so the
    # velocity keeps its RMS (else the clip is mostly the noise and every clip error looks small)
    gain = rms / _output_rms(model, seed)
    model.head.head.weight.mul_(gain)
    model.head.head.bias.mul_(gain)
    return model


@torch.no_grad()
def add_sinks(model: MiniWan, seed: int = 0, fraction: float = 0.01, ratio: float = 100.0,
              sharpness: float = 20.0) -> MiniWan:
    """One FFN neuron of block 0 fires on the tokens whose FFN input lies beyond the (1 - fraction)
    quantile along a random direction (GELU(sharpness (z - theta) / std z): a massive hidden
    activation on those tokens only) and writes a large vector into their residual stream, about
    ``ratio`` x the median token norm for the median firing token."""
    g = _gen(seed, "sinks")
    dim, blk = model.cfg.dim, model.blocks[0]
    u = torch.randn(dim, generator=g)
    u /= u.norm()
    v = torch.randn(dim, generator=g)
    v /= v.norm()
    n = torch.randperm(model.cfg.ffn_dim, generator=g)[0].item()
    got = _capture(model, ["blocks.0.ffn.0", f"blocks.{len(model.blocks) - 1}"], seed)
    z = got["blocks.0.ffn.0"] @ u
    theta = torch.quantile(z, 1 - fraction).item()
    s = sharpness / z.std().item()
    h = torch.nn.functional.gelu(s * (z - theta), approximate="tanh")
    med = got[f"blocks.{len(model.blocks) - 1}"].reshape(-1, dim).norm(dim=1).median().item()
    blk.ffn[0].weight[n] = s * u
    blk.ffn[0].bias[n] = -s * theta
    _gate_constant(model, 5, torch.arange(dim))  # gate of block 0's FFN output: the learnt table only
    blk.modulation[0, 5] = 1.0
    blk.ffn[2].weight[:, n] = ratio * med / h[z > theta].median().item() * v
    return model


@torch.no_grad()
def add_heavy(model: MiniWan, seed: int = 0, dof: int = 3, n_columns: int = 4, column_scale: float = 10.0) -> MiniWan:
    """Every Linear in the blocks: Student-t(dof) entries with the original standard deviation, and
    ``n_columns`` input columns x ``column_scale``."""
    g = _gen(seed, "heavy")
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            w = m.weight
            chi2 = torch.randn(*w.shape, dof, generator=g).pow(2).sum(-1) / dof
            t = torch.randn(*w.shape, generator=g) / chi2.sqrt()
            t *= w.std() / (dof / (dof - 2)) ** 0.5
            cols = torch.randperm(w.shape[1], generator=g)[:n_columns]
            t[:, cols] *= column_scale
            w.copy_(t)
    return model


@torch.no_grad()
def add_modshift(model: MiniWan, seed: int = 0, spread: float = 2.0, n_big: int = 4, big: float = 20.0) -> MiniWan:
    """AdaLN shift (chunks 0, 3) and scale (chunks 1, 4) of every block: N(0, spread) per channel,
    plus ``n_big`` channels at +-``big`` (shift) or +``big`` / 2 (scale)."""
    g = _gen(seed, "modshift")
    dim = model.cfg.dim
    for blk in model.blocks:
        for chunk in (0, 1, 3, 4):
            off = spread * torch.randn(dim, generator=g)
            ch = torch.randperm(dim, generator=g)[:n_big]
            if chunk in (0, 3):
                off[ch] = big * torch.sign(torch.randn(n_big, generator=g))
            else:
                off[ch] = big / 2
            blk.modulation[0, chunk] += off
    return model


@torch.no_grad()
def add_constant(model: MiniWan, seed: int = 0, noise: float = 0.01, ffn_scale: float = 0.02) -> MiniWan:
    """Prompt embeddings = one vector + ``noise`` relative noise (cross-attention k/v see the same
    token everywhere); the middle block's FFN input = its AdaLN shift + ``ffn_scale`` x the stream."""
    g = _gen(seed, "constant")
    emb = model.prompt_encoder.weight
    c = torch.randn(emb.shape[1], generator=g)
    emb.copy_(c + noise * torch.randn(emb.shape, generator=g))
    dim = model.cfg.dim
    blk = model.blocks[len(model.blocks) // 2]
    _gate_constant(model, 3, torch.arange(dim))
    _gate_constant(model, 4, torch.arange(dim))
    blk.modulation[0, 4] = -1.0 + ffn_scale * torch.sign(torch.randn(dim, generator=g))
    blk.modulation[0, 3] = torch.randn(dim, generator=g)
    return model


STATS = {"outliers": inject_outliers, "massive": add_massive, "sinks": add_sinks, "heavy": add_heavy,
         "modshift": add_modshift, "constant": add_constant}
LABELS = {"outliers": "injected outlier channels", "massive": "massive residual channels",
          "sinks": "sink tokens", "heavy": "heavy-tailed weights", "modshift": "AdaLN modulation shifts",
          "constant": "near-constant layer inputs"}


def parse_spec(spec: str) -> list:
    opts = [s for s in spec.split("+") if s and s != "random"]
    bad = [o for o in opts if o not in STATS]
    if bad:
        raise ValueError(f"unknown synthetic model option(s) {bad}: use random or {', '.join(STATS)} joined by '+'")
    return opts


def build(spec: str, cfg: MiniWanConfig | None = None, seed: int = 0):
    """(model, label) for a spec such as ``random``, ``massive`` or ``massive+sinks`` (SYNTHETIC)."""
    opts = parse_spec(spec)
    model = random_model(cfg or MiniWanConfig(), seed).eval()
    for o in opts:
        STATS[o](model, seed)
    label = "random weights" + "".join(f" + {LABELS[o]}" for o in opts) + (" (synthetic)" if opts else "")
    return model, label


def _spread(x: torch.Tensor) -> float:
    """Mean over tokens of ||x_i - mean_x|| / ||mean_x||: ~0 when every token is the same vector."""
    mean = x.mean(0)
    return ((x - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def statistics(model: MiniWan, seed: int = 1) -> dict:
    """The statistic each option is about, measured on a seeded pass (3 timesteps, half empty prompts)."""
    n = len(model.blocks)
    mid = n // 2
    names = [f"blocks.{i}" for i in range(n)] + [f"blocks.{i}.{layer}" for i in range(n) for layer in
                                               ("self_attn.q", "ffn.0", "cross_attn.k")]
    got = _capture(model, names, seed)
    res = [got[f"blocks.{i}"].reshape(-1, model.cfg.dim) for i in range(n)]
    ch_mag = [r.abs().median(0).values for r in res]  # per channel, median over tokens: robust to sinks
    tok = [r.norm(dim=1) for r in res]
    s = {"residual_channel_magnitude_max_over_median": min((c.max() / c.median()).item() for c in ch_mag),
         "token_norm_max_over_median": min((t.max() / t.median()).item() for t in tok),
         "token_fraction_over_10x_median": max(((t > 10 * t.median()).float().mean()).item() for t in tok)}
    ws = [m.weight.detach().float() for nm, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and nm.startswith("blocks.")]
    kurt = [((w - w.mean()).pow(4).mean() / (w - w.mean()).pow(2).mean().pow(2) - 3).item() for w in ws]
    colr = [(w.norm(dim=0).max() / w.norm(dim=0).median()).item() for w in ws]
    s["weight_excess_kurtosis_mean"] = sum(kurt) / len(kurt)
    s["weight_column_norm_max_over_median_mean"] = sum(colr) / len(colr)
    offs = []
    for i in range(n):
        for layer in ("self_attn.q", "ffn.0"):
            x = got[f"blocks.{i}.{layer}"]
            offs.append((x.mean(0).abs().max() / x.std(0).median()).item())
    s["modulated_input_channel_offset_over_std_median"] = sorted(offs)[len(offs) // 2]
    s["cross_attn_kv_input_spread"] = max(_spread(got[f"blocks.{i}.cross_attn.k"]) for i in range(n))
    s[f"blocks.{mid}.ffn.0_input_spread"] = _spread(got[f"blocks.{mid}.ffn.0"])
    return s


# What each option promises (checked by tests/test_synthetic.py, printed by `python bench/synthetic.py`):
# (statistic, comparison, threshold).
STAT_CHECKS = {
    "massive": ("residual_channel_magnitude_max_over_median", ">=", 100.0),
    "sinks": ("token_norm_max_over_median", ">=", 30.0),
    "heavy": ("weight_excess_kurtosis_mean", ">=", 5.0),
    "modshift": ("modulated_input_channel_offset_over_std_median", ">=", 5.0),
    "constant": ("cross_attn_kv_input_spread", "<=", 0.05),
}


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Print the measured statistics of synthetic test models.")
    p.add_argument("--models", default="random,outliers,massive,sinks,heavy,modshift,constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    from demo.run import TINY
    rows = {}
    for spec in args.models.split(","):
        model, _ = build(spec, TINY if args.tiny else MiniWanConfig(), args.seed)
        rows[spec] = statistics(model)
    keys = list(next(iter(rows.values())))
    print("| statistic | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{rows[m][k]:.3g}" for m in rows) + " |")


if __name__ == "__main__":
    main()
