"""Print (as JSON) what the pack's fusions change in ComfyUI's own Wan and HunyuanVideo classes (run
with ComfyUI on sys.path; test_comfyui_host.py runs it): which QuantLinear layers apply the
feed-forward GELU, and for Wan's blocks and self-attention with their elementwise steps fused
(nodes/wan_blocks.py) how many modules switch, how often each fused op runs, and whether the
model's output stays identical (on the CPU the fused forwards run the host's own ops, so it must be
bit for bit)."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from make_models import build_module, randomize  # noqa: E402  (sets ComfyUI to CPU first)

import torch  # noqa: E402

import dvdq_core as dq  # noqa: E402


def pack_module(name):
    """nodes/<name>.py of the pack (ComfyUI has a top-level `nodes` module of its own)."""
    spec = importlib.util.spec_from_file_location("dvdq_" + name, os.path.join(ROOT, "nodes", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def counted(module, name, calls):
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls[name] = calls.get(name, 0) + 1
        if name == "gated_residual":  # how many modulation vectors per sample (frames)
            calls["gate_vectors"] = sorted(set(calls.get("gate_vectors", [])) | {a[2].shape[1]})
        return real(*a, **k)
    setattr(module, name, wrapper)


def wan_fused(kind, dtype, quantize):
    wb = pack_module("wan_blocks")
    calls = {}
    for name in ("norm_rope", "modulated_norm", "gated_residual"):
        counted(wb, name, calls)
    m = build_module(kind)
    m.load_state_dict(randomize(m.state_dict(), 0))
    m.to(dtype).patch_embedding.float()  # ComfyUI runs it in float32 (WanModel.forward_orig casts its input)
    if quantize:
        dq.quantize_model(m, dq.QuantConfig(backend="reference"))
    g = torch.Generator().manual_seed(3)
    in_dim = m.patch_embedding.in_channels
    x = torch.randn(1, in_dim, 2, 8, 8, generator=g).to(dtype)
    ctx = torch.randn(1, 8, 4096, generator=g).to(dtype)
    # Wan 2.2 with an image latent runs per-frame timesteps (model_base.WAN22.process_timestep): the
    # blocks then get one modulation vector per latent frame
    t = torch.tensor([[500.0, 300.0]]) if kind == "wan22_5b" else torch.tensor([500.0])
    clip = torch.randn(1, 257, 1280, generator=g).to(dtype) if kind == "wan21_i2v" else None
    with torch.no_grad():
        before = m(x, t, ctx, clip_fea=clip)
        fused, off = wb.fuse_wan(m)
        again, _ = wb.fuse_wan(m)
        after = m(x, t, ctx, clip_fea=clip)
        classes = sorted({type(mod).__name__ for mod in m.modules() if "Attention" in type(mod).__name__})
        restored = wb.unfuse_wan(m)
    return {"fused": fused, "off": off, "again": again, "calls": calls, "restored": restored, "equal": bool(torch.equal(before, after)),
            "finite": bool(torch.isfinite(after).all()), "classes": classes}


out = {}
for kind in ("wan21_t2v", "hunyuan_video"):
    m = build_module(kind)
    m.load_state_dict({k: v.float() for k, v in randomize(m.state_dict(), 0).items()})
    dq.quantize_model(m, dq.QuantConfig(backend="reference"))
    out[kind] = sorted(name for name, q in dq.quantized_layers(m) if q.act == "gelu_tanh")
out["wan"] = {f"{kind}/{str(dtype)[6:]}/{'quantized' if quantize else 'float'}": wan_fused(kind, dtype, quantize)
               for kind, dtype, quantize in [("wan21_t2v", torch.float32, False), ("wan21_t2v", torch.bfloat16, False),
                                             ("wan21_t2v", torch.bfloat16, True), ("wan21_i2v", torch.float32, False),
                                             ("wan22_5b", torch.bfloat16, False)]}
print(json.dumps(out))
