"""Rectified-flow (Wan's flow matching) Euler sampler with classifier-free guidance.

Convention as Wan: ``x_t = (1 - t) * x0 + t * noise``, the model predicts the velocity
``noise - x0``, sampling integrates from t = 1 to t = 0 over a shifted schedule
``t' = shift * t / (1 + (shift - 1) * t)``.

Each step calls the model once on the batch [conditional; unconditional]. When a
``dvdq_core.BitSwitch`` is given, every step does, as the host integration does::

    bits = bitswitch.next_bits(i, last=i == steps - 1); dvdq_core.set_activation_bits(model, bits)
    out = model(...); bitswitch.observe(out)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def flow_sigmas(steps: int, shift: float = 3.0, device="cpu") -> torch.Tensor:
    """The ``steps + 1`` times from 1 to 0 of the shifted schedule (float32)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float().to(device)


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class SampleResult:
    video: torch.Tensor                                   # final x0 estimate, [B, C, F, H, W]
    velocities: list = field(default_factory=list)        # guided velocity per step (float32, CPU)
    latents: list = field(default_factory=list)           # x after each step (float32, CPU)
    bits: list = field(default_factory=list)              # activation bits per step (None: not set)
    outputs: list = field(default_factory=list)           # raw model output per step (what BitSwitch sees)


@torch.no_grad()
def sample(model, noise: torch.Tensor, prompt_ids: torch.Tensor, steps: int = 20, cfg: float = 5.0,
           shift: float = 3.0, bitswitch=None, record: bool = True,
           record_outputs: bool = False) -> SampleResult:
    """Sample clips from ``noise`` [B, C, F, H, W] for ``prompt_ids`` [B, text_len].

    Deterministic: the same model, noise and prompts give the same result."""
    if noise.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"noise batch {noise.shape[0]} != prompt batch {prompt_ids.shape[0]}")
    device = noise.device
    sigmas = flow_sigmas(steps, shift, device)
    x = noise.float()
    b = x.shape[0]
    use_cfg = cfg != 1.0
    prompts = torch.cat([prompt_ids, torch.zeros_like(prompt_ids)]) if use_cfg else prompt_ids
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    result = SampleResult(video=x)
    if bitswitch is not None:
        import dvdq_core
        bitswitch.reset()
    for i in range(steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        bits = None
        if bitswitch is not None:
            bits = bitswitch.next_bits(i, last=i == steps - 1)
            dvdq_core.set_activation_bits(model, bits)
        xin = torch.cat([x, x]) if use_cfg else x
        out = model(xin.to(dtype), t.expand(xin.shape[0]), prompts).float()
        if bitswitch is not None:
            bitswitch.observe(out)
        if use_cfg:
            v_cond, v_uncond = out[:b], out[b:]
            v = v_uncond + cfg * (v_cond - v_uncond)
        else:
            v = out
        x = x + (t_next - t) * v
        if record:
            result.velocities.append(v.cpu())
            result.latents.append(x.cpu())
        if record_outputs:
            result.outputs.append(out.cpu())
        result.bits.append(bits)
    result.video = x
    return result
