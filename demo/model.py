"""A small video diffusion transformer with Wan 2.1's block structure ("mini-Wan").

Same layer layout and module names as ComfyUI's WanModel, so quantization scopes and
per-layer overrides written for Wan (``*blocks.*``, ``blocks.0.*``, ``*.ffn.*``) select the
same kinds of layers here:

- ``patch_embedding``: Conv3d patchify of the pixel clip [B, C, F, H, W] into tokens.
- ``prompt_encoder`` + ``text_embedding``: a token embedding standing in for Wan's T5 encoder
  (prompt = colour, shape and motion words), then Wan's MLP ``text_embedding``.
- ``time_embedding`` (sinusoidal -> MLP) and ``time_projection`` (SiLU -> Linear to 6 vectors):
  AdaLN modulation shared by all blocks, plus a learnt per-block ``modulation`` table.
- ``blocks.N``: self-attention with RMSNorm on q/k and 3D RoPE, cross-attention to the prompt
  tokens, GELU(tanh) FFN (``ffn.0``, ``ffn.2``), exactly Wan's residual/modulation order.
- ``head``: LayerNorm + modulation + ``head.head`` Linear, then unpatchify.

Pure PyTorch (``F.scaled_dot_product_attention``); CPU and CUDA, float32 or bfloat16.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MiniWanConfig:
    patch: tuple = (4, 4, 4)      # (frames, height, width) per token (Wan: 4x8x8 VAE, then 1x2x2)
    in_dim: int = 3               # RGB pixels (no VAE in this small domain)
    out_dim: int = 3
    dim: int = 256
    ffn_dim: int = 1024
    freq_dim: int = 256           # sinusoidal timestep features, as Wan
    text_dim: int = 128           # width of the prompt-token embedding ("T5 output")
    num_heads: int = 4
    num_layers: int = 6
    vocab_size: int = 16          # prompt words (see clips.VOCAB), index 0 = empty prompt
    text_len: int = 3             # colour, shape, motion
    eps: float = 1e-6

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MiniWanConfig":
        data = json.loads(text)
        data["patch"] = tuple(data["patch"])
        return cls(**data)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's sinusoidal timestep features of ``t * 1000`` (t in [0, 1]), float32 [B, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
    angles = (t.double() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_angles(grid: tuple, head_dim: int, device, theta: float = 10000.0) -> torch.Tensor:
    """3D RoPE angles [L, head_dim/2] for a (frames, height, width) token grid.

    Split of the head dimension as Wan: ``d - 4*(d//6)`` for time, ``2*(d//6)`` each for
    height and width."""
    d = head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    per_axis = []
    for n, axis_dim in zip(grid, dims):
        freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, device=device, dtype=torch.float64) / axis_dim)
        per_axis.append(torch.arange(n, device=device, dtype=torch.float64)[:, None] * freqs[None])
    f, h, w = grid
    ang = torch.cat([
        per_axis[0][:, None, None, :].expand(f, h, w, -1),
        per_axis[1][None, :, None, :].expand(f, h, w, -1),
        per_axis[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1)
    return ang.reshape(f * h * w, d // 2).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) as Wan's complex multiply; x [B, L, heads, d]."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x, angles):
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, n, self.num_heads, -1)
        v = self.v(x).view(b, n, self.num_heads, -1)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).flatten(2))


class CrossAttention(SelfAttention):
    """The same layers as SelfAttention (Wan's names); keys and values come from the text."""

    def forward(self, x, context):
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        k = self.norm_k(self.k(context)).view(b, context.shape[1], self.num_heads, -1)
        v = self.v(context).view(b, context.shape[1], self.num_heads, -1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: MiniWanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, context, angles):
        # e: [B, 6, dim] float32; Wan keeps the modulation arithmetic in float32.
        e = (self.modulation.float() + e).chunk(6, dim=1)
        dt = x.dtype
        y = self.self_attn((self.norm1(x).float() * (1 + e[1]) + e[0]).to(dt), angles)
        x = (x.float() + y.float() * e[2]).to(dt)
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn((self.norm2(x).float() * (1 + e[4]) + e[3]).to(dt))
        return (x.float() + y.float() * e[5]).to(dt)


class Head(nn.Module):
    def __init__(self, cfg: MiniWanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        # e: [B, dim] (the time embedding before projection), as Wan's head.
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return self.head((self.norm(x).float() * (1 + scale) + shift).to(x.dtype))


class MiniWan(nn.Module):
    """``model(x, t, prompt_ids) -> velocity`` with x [B, C, F, H, W], t [B] in [0, 1],
    prompt_ids [B, text_len] (long; 0 = empty). The output has x's shape and dtype."""

    def __init__(self, cfg: MiniWanConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MiniWanConfig()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim {cfg.dim} must be a multiple of num_heads {cfg.num_heads}")
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.prompt_encoder = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.normal_(self.prompt_encoder.weight, std=1.0)
        nn.init.zeros_(self.head.head.weight)  # start by predicting zero velocity

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        pf, ph, pw = cfg.patch
        b, c, f, h, w = x.shape
        if c != cfg.in_dim or f % pf or h % ph or w % pw:
            raise ValueError(f"input {tuple(x.shape)} must be [B, {cfg.in_dim}, F, H, W] with F, H, W "
                             f"multiples of the patch {cfg.patch}")
        dt = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dt))
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)                       # [B, L, dim]
        angles = rope_angles(grid, cfg.dim // cfg.num_heads, x.device)

        t = t.expand(b) if t.numel() == 1 else t
        temb = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(dt)).float()
        e0 = self.time_projection(temb.to(dt)).float().unflatten(1, (6, cfg.dim))
        context = self.text_embedding(self.prompt_encoder(prompt_ids).to(dt))

        for block in self.blocks:
            tokens = block(tokens, e0, context, angles)
        out = self.head(tokens, temb)                                     # [B, L, C*pf*ph*pw]
        gf, gh, gw = grid
        out = out.view(b, gf, gh, gw, cfg.out_dim, pf, ph, pw)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, cfg.out_dim, gf * pf, gh * ph, gw * pw)
        return out.to(x.dtype)


def load_mini_wan(path, device="cpu", dtype=torch.float32) -> MiniWan:
    """Build a MiniWan from a safetensors file written by ``save_mini_wan``."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "mini_wan.config" not in meta:
        raise ValueError(f"{path} has no 'mini_wan.config' metadata: not a mini-Wan weights file "
                         "(re-make it with `python -m demo.train`)")
    model = MiniWan(MiniWanConfig.from_json(meta["mini_wan.config"]))
    state = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()


def save_mini_wan(model: MiniWan, path, dtype=torch.float16, extra_meta: dict | None = None):
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"mini_wan.config": model.cfg.to_json(), **{k: str(v) for k, v in (extra_meta or {}).items()}}
    save_file(state, str(path), metadata=meta)
