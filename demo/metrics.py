"""Clip comparison metrics: relative error, PSNR and SSIM against a reference clip."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole tensor."""
    x, ref = x.float().cpu(), ref.float().cpu()
    return ((x - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of clips in [-1, 1] (clamped), over all clips at once."""
    x, ref = x.float().cpu().clamp(-1, 1), ref.float().cpu().clamp(-1, 1)
    mse = (x - ref).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range ** 2 / mse)).item()


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, per channel, per frame) of clips
    [B, C, F, H, W] in [-1, 1], computed on [0, 1] images."""
    a = ((x.float().cpu().clamp(-1, 1) + 1) / 2)
    b = ((ref.float().cpu().clamp(-1, 1) + 1) / 2)
    bsz, c, f, h, w = a.shape
    a = a.permute(0, 2, 1, 3, 4).reshape(bsz * f * c, 1, h, w)
    b = b.permute(0, 2, 1, 3, 4).reshape(bsz * f * c, 1, h, w)
    g = torch.exp(-(torch.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    saa = F.conv2d(a * a, k) - mu_a ** 2
    sbb = F.conv2d(b * b, k) - mu_b ** 2
    sab = F.conv2d(a * b, k) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean().item()
