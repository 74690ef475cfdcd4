"""Build tiny random-weight checkpoints from ComfyUI's own model classes (run with ComfyUI on sys.path).

usage: python make_models.py OUT_DIR
Writes diffusion_models/*.safetensors, loras/*.safetensors and a not-a-DiT file, each checked
by ComfyUI's model detection so the host tests load exactly what a user's file would give.
"""
import math
import os
import sys

import torch
from comfy.cli_args import args
from safetensors.torch import save_file

args.cpu = True  # before comfy.model_management is imported: this script never needs a GPU
import comfy.model_detection  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402
from comfy.ldm.hunyuan_video.model import HunyuanVideo  # noqa: E402
from comfy.ldm.wan.model import WanModel  # noqa: E402

OPS = comfy.ops.disable_weight_init
WAN = dict(patch_size=(1, 2, 2), text_len=512, dim=256, ffn_dim=512, freq_dim=256, text_dim=4096, num_heads=2,
           num_layers=2, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def randomize(sd: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in sd.items():
        if t.ndim >= 2:
            fan_in = math.prod(t.shape[1:])
            v = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
        elif "norm" in k or k.endswith(".scale"):
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            v = 0.05 * torch.randn(t.shape, generator=g)
        out[k] = v.to(torch.float16).contiguous()
    return out


def newer_fields(params_cls, values: dict) -> dict:
    """Required fields that newer ComfyUI added to a model's params dataclass, at what its detection sets
    for the original model; none on hosts without them."""
    import dataclasses
    return {f.name: values[f.name] for f in dataclasses.fields(params_cls) if f.name in values}


def hunyuan_extras() -> dict:  # HunyuanVideo 1.5's fields (0.8.0 on), as for a 1.0 file
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
    return newer_fields(HunyuanVideoParams, {"use_cond_type_embedding": False, "vision_in_dim": None,
                                             "meanflow_sum": False})


def flux_extras() -> dict:  # Flux 2's field (0.8.0 on), as for a Flux 1 file
    from comfy.ldm.flux.model import FluxParams
    return newer_fields(FluxParams, {"txt_ids_dims": []})


def build_module(kind: str, ops=OPS) -> torch.nn.Module:
    """One of ComfyUI's own model classes at tiny size (weights not initialised: see build); ops: the
    layer classes (ComfyUI's manual_cast ones cast every weight at each call, as for fp8 storage)."""
    if kind == "wan21_t2v":
        m = WanModel(model_type="t2v", in_dim=16, out_dim=16, operations=ops, **WAN)
    elif kind == "wan21_i2v":
        m = WanModel(model_type="i2v", in_dim=36, out_dim=16, operations=ops, **WAN)
    elif kind == "wan22_5b":
        m = WanModel(model_type="t2v", in_dim=48, out_dim=48, operations=ops, **WAN)
    elif kind == "hunyuan_video":
        m = HunyuanVideo(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=768,
                         context_in_dim=4096, hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1,
                         depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                         qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, operations=ops,
                         **hunyuan_extras())
    elif kind == "flux":  # an image DiT ComfyUI knows: the Loader must refuse it before loading
        m = Flux(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=256, mlp_ratio=4.0,
                 num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=False, operations=ops, **flux_extras())
    else:
        raise ValueError(kind)
    return m


def build(kind: str, seed: int) -> dict:
    sd = randomize(build_module(kind).state_dict(), seed)
    if comfy.model_detection.model_config_from_unet(sd, "") is None:
        raise RuntimeError(f"ComfyUI does not detect the tiny {kind} model")
    return sd


MODELS = {  # file name -> (kind, seed)
    "tiny_wan2.1_t2v.safetensors": ("wan21_t2v", 1),
    "tiny_wan2.1_i2v.safetensors": ("wan21_i2v", 2),
    "tiny_wan2.2_ti2v_5B.safetensors": ("wan22_5b", 3),
    "tiny_wan2.2_t2v_high_noise.safetensors": ("wan21_t2v", 4),
    "tiny_wan2.2_t2v_low_noise.safetensors": ("wan21_t2v", 5),
    "tiny_hunyuan_video_t2v.safetensors": ("hunyuan_video", 6),
    "tiny_flux_image.safetensors": ("flux", 8),
}


def scaled_fp8(sd: dict) -> dict:
    """ComfyUI's "fp8_scaled" checkpoint form (the Wan files it distributes): each Linear's weight (the 2-D
    ones; the embeddings and head too, which stay unquantized) as float8_e4m3fn divided by a per-tensor
    `scale_weight`, its bias in fp8 (what ComfyUI's scaled ops hold it as), and the `scaled_fp8` marker."""
    out = dict(sd)
    for k, t in sd.items():
        if k.endswith(".weight") and t.ndim == 2:
            scale = t.float().abs().amax() / 448.0
            out[k] = (t.float() / scale).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
            bias = k[:-len("weight")] + "bias"
            if bias in sd:
                out[bias] = sd[bias].to(torch.float8_e4m3fn)
    out["scaled_fp8"] = torch.zeros(1, dtype=torch.float8_e4m3fn)
    return out


COMFY_QUANT = {"float8_e4m3fn": (torch.float8_e4m3fn, 448.0), "int8_tensorwise": (torch.int8, 127.0)}


def comfy_quant_formats() -> list:
    """The layouts of COMFY_QUANT this host loads as QuantizedTensor (ComfyUI 0.8.0 and later)."""
    try:
        from comfy.quant_ops import QUANT_ALGOS
    except ImportError:
        return []
    return [f for f in COMFY_QUANT if f in QUANT_ALGOS]


def comfy_quant(sd: dict, fmt: str) -> dict:
    """Newer ComfyUI's quantized checkpoint form: each block Linear's weight stored in `fmt` divided by a
    per-tensor `weight_scale`, with a `comfy_quant` JSON entry naming the layout (comfy/ops.py reads it)."""
    import json
    dtype, top = COMFY_QUANT[fmt]
    out = dict(sd)
    for k, t in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and t.ndim == 2:
            stem = k[:-len("weight")]
            scale = t.float().abs().amax() / top
            q = t.float() / scale
            out[k] = (q.round().clamp(-top, top) if dtype == torch.int8 else q).to(dtype)
            out[stem + "weight_scale"] = scale.reshape(())
            out[stem + "comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    return out


def lora_for_wan(seed: int, rank: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(WAN["num_layers"]):
        for p in ("q", "k", "v", "o"):
            stem = f"diffusion_model.blocks.{b}.self_attn.{p}"
            out[stem + ".lora_A.weight"] = (torch.randn(rank, WAN["dim"], generator=g) / 4).to(torch.float16)
            out[stem + ".lora_B.weight"] = (torch.randn(WAN["dim"], rank, generator=g) / 4).to(torch.float16)
    return out


def lora_for_wan_kohya(seed: int, rank: int = 8, alpha: float = 4.0) -> dict:
    """kohya naming with alpha, on the feed-forward (ffn.0 carries the folded GELU: the branch must join
    before it), a cross-attention projection, a bias difference (diff_b) on ffn.2, and the float text
    embedding (no alpha: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = {"ffn_0": (WAN["ffn_dim"], WAN["dim"]), "ffn_2": (WAN["dim"], WAN["ffn_dim"]),
              "cross_attn_q": (WAN["dim"], WAN["dim"])}
    for b in range(WAN["num_layers"]):
        for name, (n, k) in shapes.items():
            stem = f"lora_unet_blocks_{b}_{name}"
            out[stem + ".lora_down.weight"] = (torch.randn(rank, k, generator=g) / 3).to(torch.bfloat16)
            out[stem + ".lora_up.weight"] = (torch.randn(n, rank, generator=g) / 3).to(torch.bfloat16)
            out[stem + ".alpha"] = torch.tensor(alpha)
        out[f"lora_unet_blocks_{b}_ffn_2.diff_b"] = torch.randn(WAN["dim"], generator=g) / 4
    # and a float layer (outside the blocks: not quantized), which ComfyUI patches in place
    out["lora_unet_text_embedding_0.lora_down.weight"] = (torch.randn(rank, WAN["text_dim"], generator=g) / 3).to(torch.bfloat16)
    out["lora_unet_text_embedding_0.lora_up.weight"] = (torch.randn(WAN["dim"], rank, generator=g) / 3).to(torch.bfloat16)
    return out


def lora_for_hunyuan(seed: int, rank: int = 4) -> dict:
    """On the tiny HunyuanVideo's double block (attention qkv, and the MLP's first layer, whose GELU the quantized
    layer applies) and single block (both linears)."""
    g = torch.Generator().manual_seed(seed)
    d, mlp = 256, 1024
    shapes = {"double_blocks.0.img_attn.qkv": (3 * d, d), "double_blocks.0.img_mlp.0": (mlp, d),
              "single_blocks.0.linear1": (3 * d + mlp, d), "single_blocks.0.linear2": (d, d + mlp)}
    out = {}
    for name, (n, k) in shapes.items():
        out[f"diffusion_model.{name}.lora_A.weight"] = (torch.randn(rank, k, generator=g) / 4).to(torch.float16)
        out[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(n, rank, generator=g) / 4).to(torch.float16)
    return out


def loha_for_wan(seed: int, rank: int = 4) -> dict:
    """A LoHa (Hadamard product of two low-rank pairs): no low-rank branch can run it."""
    g = torch.Generator().manual_seed(seed)
    d = WAN["dim"]
    stem = "lora_unet_blocks_0_self_attn_q"
    def r(*shape):
        return torch.randn(*shape, generator=g) / 4
    return {stem + ".hada_w1_a": r(d, rank), stem + ".hada_w1_b": r(rank, d), stem + ".hada_w2_a": r(d, rank),
            stem + ".hada_w2_b": r(rank, d), stem + ".alpha": torch.tensor(float(rank))}


def main(out_dir):
    dm = os.path.join(out_dir, "diffusion_models")
    os.makedirs(dm, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "loras"), exist_ok=True)
    for name, (kind, seed) in MODELS.items():
        save_file(build(kind, seed), os.path.join(dm, name))
    save_file(scaled_fp8(build("wan21_t2v", 1)), os.path.join(dm, "tiny_wan2.1_t2v_fp8_scaled.safetensors"))
    for fmt in comfy_quant_formats():
        save_file(comfy_quant(build("wan21_t2v", 1), fmt), os.path.join(dm, f"tiny_wan2.1_t2v_{fmt}.safetensors"))
    save_file(lora_for_wan(7), os.path.join(out_dir, "loras", "tiny_wan_lora.safetensors"))
    save_file(lora_for_wan_kohya(8), os.path.join(out_dir, "loras", "tiny_wan_lora_kohya.safetensors"))
    save_file(loha_for_wan(9), os.path.join(out_dir, "loras", "tiny_wan_loha.safetensors"))
    save_file(lora_for_hunyuan(11), os.path.join(out_dir, "loras", "tiny_hunyuan_lora.safetensors"))
    # a LoRA made for a model of another width (its factors are 2 x 128 where the layers are 256 wide)
    save_file({k: v[:, :128].contiguous() if k.endswith("lora_A.weight") else v for k, v in lora_for_wan(10, rank=2).items()},
              os.path.join(out_dir, "loras", "tiny_wan_lora_other_size.safetensors"))
    save_file({"encoder.layer.weight": torch.randn(8, 8)}, os.path.join(dm, "not_a_dit.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
