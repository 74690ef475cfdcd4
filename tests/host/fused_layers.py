"""Print (as JSON) what the pack's fusions change in ComfyUI's own Wan and HunyuanVideo classes (run
with ComfyUI on sys.path; test_comfyui_host.py runs it): which QuantLinear layers apply the
feed-forward GELU, and for Wan's blocks and self-attention and HunyuanVideo's double- and
single-stream blocks with their elementwise steps fused (nodes/wan_blocks.py, nodes/hunyuan_blocks.py)
how many modules switch, how often each fused op runs, and whether the model's output stays
identical (on the CPU the fused forwards run the host's own ops, so it must be bit for bit)."""
import contextlib
import importlib
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from make_models import build_module, randomize  # noqa: E402  (sets ComfyUI to CPU first)

# isort: split
import torch  # noqa: E402

import dvdq_core as dq  # noqa: E402


def pack_module(name):
    """nodes/<name>.py of the pack, imported as ComfyUI imports the pack (tests/pack.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import pack
    return pack.sub(name)


CALLS = {}


def counted(module, name):
    real = getattr(module, name)

    def wrapper(*a, **k):
        CALLS[name] = CALLS.get(name, 0) + 1
        if name == "gated_residual":  # how many modulation vectors per sample (frames)
            CALLS["gate_vectors"] = sorted(set(CALLS.get("gate_vectors", [])) | {a[2].shape[1]})
        if name == "norm_rope":  # the q/k norm inside the kernel (with its weight), not the host's before it
            CALLS["norm_rope_weighted"] = CALLS.get("norm_rope_weighted", 0) + (a[1] is not None)
        return real(*a, **k)
    setattr(module, name, wrapper)


wb, hb = pack_module("wan_blocks"), pack_module("hunyuan_blocks")
wan_ops, hunyuan_ops, backends = (importlib.import_module(f"dvdq_core.{m}") for m in ("wan_ops", "hunyuan_ops",
                                                                                      "backends"))
host_fused = wan_ops._fused


def kernel_checked(name, what, reference, *args, reference_args=None):
    """The fused ops' dispatch, also recording where the GPU kernels' shape rule refuses a call (on a GPU
    a fall back to the reference: correct, slower; e.g. a transposed residual the host hands over): such a
    call puts "kernel_refused" into the calls, which the host test compares exactly."""
    rule = backends.get("triton").capabilities[name].shape_rule  # (None where the kernels package failed to import)
    why = rule(*args) if rule is not None else "no shape rule: the kernels package did not load"
    if why:
        CALLS.setdefault("kernel_refused", {})[name] = why
    return host_fused(name, what, reference, *args, reference_args=reference_args)


wan_ops._fused = hunyuan_ops._fused = kernel_checked
for module, names in ((wb, ("norm_rope", "modulated_norm", "gated_residual")),
                      (hb, ("head_norm_rope", "modulated_norm", "gated_add", "gated_add_"))):
    for name in names:
        counted(module, name)


def subclasses_elsewhere(m):
    """Switch m's Wan blocks and self-attentions to subclasses that keep ComfyUI's forwards but live in
    another package's module (as another custom node pack may define them): the fused forwards must
    still find the host's names (optimized_attention, repeat_e, comfy) in ComfyUI's module."""
    from comfy.ldm.wan.model import WanAttentionBlock, WanSelfAttention
    other = types.ModuleType("another_pack")
    sys.modules["another_pack"] = other
    for base in (WanAttentionBlock, WanSelfAttention):
        sub = type("Their" + base.__name__, (base,), {"__module__": "another_pack"})
        setattr(other, sub.__name__, sub)
        for mod in m.modules():
            if type(mod) is base:
                mod.__class__ = sub


@contextlib.contextmanager
def no_linear_input_act_on_ours():
    """comfy.ops.linear_input_act (0.33.0 and later) failing for our layers: the fused forwards must not pass
    them there (its newer forms cast the layer's weight as a float or QuantizedTensor one)."""
    import comfy.ops
    real = getattr(comfy.ops, "linear_input_act", None)

    def refuse(linear, *a, **k):
        if isinstance(linear, dq.QuantLinear):
            raise AssertionError("a DVD-Quant layer reached comfy.ops.linear_input_act")
        return real(linear, *a, **k)
    if real is not None:
        comfy.ops.linear_input_act = refuse
    try:
        yield
    finally:
        if real is not None:
            comfy.ops.linear_input_act = real


def attention_patches():
    """transformer_options with an attn1_patch and an attn2_patch (run by ComfyUI 0.33.0's Wan
    self-attention and block, ignored by older hosts) that change x, so a fused forward that skipped
    them, or ran them where the host does not, would give another output."""
    def attn1(d):
        return d["x"] * 0.5 + d["q"].flatten(2).mean() + d["k"].flatten(2).std()

    def attn2(d):
        return d["x"] - 0.25
    return {"patches": {"attn1_patch": [attn1], "attn2_patch": [attn2]}}


def wan_fused(kind, dtype, quantize, elsewhere=False, cast=False, patches=False):
    """cast: ComfyUI's manual_cast layers (every weight cast at each call: fp8 storage, weight_dtype);
    patches: transformer_options with attention patches (attention_patches)."""
    import comfy.ops
    m = build_module(kind, comfy.ops.manual_cast) if cast else build_module(kind)
    m.load_state_dict(randomize(m.state_dict(), 0))
    if elsewhere:
        subclasses_elsewhere(m)
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
    kw = {"transformer_options": attention_patches()} if patches else {}
    with torch.no_grad():
        before = m(x, t, ctx, clip_fea=clip, **kw)
        host_runs_patches = patches and not torch.equal(before, m(x, t, ctx, clip_fea=clip))
        fold = {n for n, q in dq.quantized_layers(m) if q.act == "gelu_tanh"}  # dvdq_core.fusion's (Sequential)
        fused, off = wb.fuse_wan(m)
        again, _ = wb.fuse_wan(m)
        gelu = sorted(n for n, q in dq.quantized_layers(m) if q.act == "gelu_tanh" and n not in fold)
        CALLS.clear()
        with no_linear_input_act_on_ours():
            after = m(x, t, ctx, clip_fea=clip, **kw)
        calls = dict(CALLS)
        classes = sorted({type(mod).__name__ for mod in m.modules() if "Attention" in type(mod).__name__})
        restored = wb.unfuse_wan(m)
    return {"fused": fused, "off": off, "again": again, "calls": calls, "restored": restored,
            "equal": bool(torch.equal(before, after)),
            "finite": bool(torch.isfinite(after).all()), "classes": classes, "host_runs_patches": host_runs_patches,
            "quantized": quantize, "gelu_by_fused_ffn": gelu,
            "gelu_after_unfuse": sorted(n for n, q in dq.quantized_layers(m) if q.act == "gelu_tanh" and n not in fold)}


def outcome(f):
    """f()'s tensor, or its error as a string."""
    try:
        return f()
    except Exception as e:  # noqa: BLE001 (compared with the host's)
        return f"{type(e).__name__}: {e}"


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b


def hunyuan_patches():
    """transformer_options with an attn1_patch (changes q) and an attn1_output_patch (changes the attention's
    output), which ComfyUI 0.33.0's flux blocks run and older ones ignore: the fused forwards must hand such
    calls to the host's forward."""
    def attn1(q, k, v, pe=None, attn_mask=None, extra_options=None):
        return {"q": q * 0.5}

    def attn1_output(attn, extra_options):
        return attn - 0.25
    return {"patches": {"attn1_patch": [attn1], "attn1_output_patch": [attn1_output]}}


def hunyuan_fused(dtype, quantize, cast=False, patches=False):
    """HunyuanVideo (one double- and one single-stream block) with a text mask, fused vs the host's; then
    with a guiding frame (I2V: two modulation vectors, the first latent frame's tokens on the first,
    modulation_dims), which the fused forwards take too; and a batch of two with a guiding frame,
    which they hand to the host's forward (whatever that does: ComfyUI 0.3.64 fails, its slices
    broadcast the batch of vectors over the tokens; newer hosts run it). cast: ComfyUI's manual_cast
    layers (weights cast at each call, q/k norms too on 0.33.0); patches: every call with hunyuan_patches."""
    import comfy.ops
    m = build_module("hunyuan_video", comfy.ops.manual_cast) if cast else build_module("hunyuan_video")
    m.load_state_dict(randomize(m.state_dict(), 0))
    m.to(dtype)
    if quantize:
        dq.quantize_model(m, dq.QuantConfig(backend="reference"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype)
    ctx = torch.randn(1, 7, 4096, generator=g).to(dtype)
    kw = dict(y=torch.randn(1, 768, generator=g).to(dtype), guidance=torch.tensor([4.0]),
              attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0]]))
    t = torch.tensor([500.0])
    guiding = dict(kw, guiding_frame_index=torch.tensor([0.0], dtype=dtype))
    two = [torch.cat((v, v)) for v in (x, t, ctx)]
    guiding2 = dict(guiding, y=torch.cat((kw["y"], kw["y"])), attention_mask=None)  # (the host's mask is for one)
    with torch.no_grad():
        plain = m(x, t, ctx, **kw) if patches else None
    if patches:
        kw, guiding, guiding2 = [dict(d, transformer_options=hunyuan_patches()) for d in (kw, guiding, guiding2)]
    with torch.no_grad():
        before, before_guided = m(x, t, ctx, **kw), m(x, t, ctx, **guiding)
        host_runs_patches = patches and not torch.equal(before, plain)
        before_two = outcome(lambda: m(*two, **guiding2))
        fused, off = hb.fuse_hunyuan(m)
        again, _ = hb.fuse_hunyuan(m)
        CALLS.clear()
        after = m(x, t, ctx, **kw)
        calls = dict(CALLS)
        CALLS.clear()
        after_guided = m(x, t, ctx, **guiding)
        guided_calls = dict(CALLS)
        CALLS.clear()
        after_two = outcome(lambda: m(*two, **guiding2))
        two_calls = dict(CALLS)
        classes = sorted({type(mod).__name__ for mod in m.modules() if "StreamBlock" in type(mod).__name__})
        restored = hb.unfuse_hunyuan(m)
    return {"fused": fused, "off": off, "again": again, "calls": calls, "restored": restored,
            "equal": bool(torch.equal(before, after)), "finite": bool(torch.isfinite(after).all()), "classes": classes,
            "guided_calls": guided_calls, "guided_equal": bool(torch.equal(before_guided, after_guided)),
            "guided_differs": not torch.equal(before, before_guided), "batch2_calls": two_calls,
            "batch2_same": same(before_two, after_two),
            "batch2_host": before_two if isinstance(before_two, str) else "ran", "host_runs_patches": host_runs_patches}


out = {}
host_fn = importlib.import_module("comfy.ldm.flux.layers").apply_mod
pack_fn = importlib.import_module("dvdq_core.hunyuan_ops").modulate  # the pack's version of the host's math


def modulate_same(dtype, dims, add):
    g = torch.Generator().manual_seed(7)
    t = (torch.randn(1, 9, 16, generator=g) * 3).to(dtype)
    m, a = (torch.randn(1, 2, 16, generator=g) + 1).to(dtype), torch.randn(1, 2, 16, generator=g).to(dtype)
    if dims is None:
        m, a = m[:, :1], a[:, :1]
    return torch.equal(host_fn(t.clone(), m, a if add else None, dims), pack_fn(t.clone(), m, a if add else None, dims))


out["modulate_same"] = all(modulate_same(dtype, dims, add) for dtype in (torch.float32, torch.bfloat16, torch.float16)
                           for dims in (None, [(0, 4, 0), (4, None, 1)], [(0, None, 1)]) for add in (True, False))
for kind in ("wan21_t2v", "hunyuan_video"):
    m = build_module(kind)
    m.load_state_dict({k: v.float() for k, v in randomize(m.state_dict(), 0).items()})
    dq.quantize_model(m, dq.QuantConfig(backend="reference"))
    out[kind] = sorted(name for name, q in dq.quantized_layers(m) if q.act == "gelu_tanh")
    # whether the feed-forward is a Sequential running its children (0.33.0's WanFeedForward applies the GELU itself)
    out[kind + "_ffn_sequential"] = [type(f).forward is torch.nn.Sequential.forward
                                     for f in (m.blocks[0].ffn if kind.startswith("wan") else m.double_blocks[0].img_mlp,)]
out["wan"] = {f"{kind}/{str(dtype)[6:]}/{'quantized' if quantize else 'float'}": wan_fused(kind, dtype, quantize)
               for kind, dtype, quantize in [("wan21_t2v", torch.float32, False), ("wan21_t2v", torch.bfloat16, False),
                                             ("wan21_t2v", torch.bfloat16, True), ("wan21_i2v", torch.float32, False),
                                             ("wan22_5b", torch.bfloat16, False)]}
out["wan"]["wan21_t2v/bfloat16/subclasses in another pack"] = wan_fused("wan21_t2v", torch.bfloat16, False,
                                                                        elsewhere=True)
out["wan"]["wan21_t2v/bfloat16/manual_cast layers"] = wan_fused("wan21_t2v", torch.bfloat16, True, cast=True)
out["wan"]["wan21_t2v/float32/attention patches"] = wan_fused("wan21_t2v", torch.float32, False, patches=True)
out["hunyuan"] = {f"{str(dtype)[6:]}/{'quantized' if quantize else 'float'}": hunyuan_fused(dtype, quantize)
                  for dtype, quantize in [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                          (torch.bfloat16, True)]}
out["hunyuan"]["bfloat16/manual_cast layers"] = hunyuan_fused(torch.bfloat16, False, cast=True)
out["hunyuan"]["float32/attention patches"] = hunyuan_fused(torch.float32, False, patches=True)
print(json.dumps(out))
