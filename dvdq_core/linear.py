"""QuantLinear: packed low-bit weights (rotated offline) and ARQ activations quantized per call."""
import re

import torch
from torch import nn

from . import backends
from .lowrank import LowRank, branch_of
from .spec import LayerSpec
from .weights import QuantizedWeight, quantize_split, unpack_codes

# Sibling projections that read one input tensor one after the other without changing it in place
# (Wan's attention, in ComfyUI and in the reference code; "v" always comes last). Backends may then
# quantize that input once for the group, also under torch.inference_mode(), where tensors carry no
# version counter to prove they did not change.
_SHARED_INPUT = re.compile(r"(^|\.)(self_attn\.[qkv]|cross_attn\.(k|v|k_img|v_img))$")
SHARE_NONE, SHARE_MEMBER, SHARE_LAST = 0, 1, 2


def input_sharing(name: str) -> int:
    """SHARE_LAST for the last projection of a known shared-input group, SHARE_MEMBER for the others."""
    if not _SHARED_INPUT.search(name):
        return SHARE_NONE
    return SHARE_LAST if name.endswith((".v", ".v_img")) else SHARE_MEMBER


class BitState:
    """The activation bit-width of one model's current step, shared by that model's layers."""

    def __init__(self, bits: int = 8):
        self.bits = bits

    def __repr__(self):
        return f"BitState(bits={self.bits})"


def quantize_weight(weight: torch.Tensor, spec: LayerSpec, device=None):
    """Split off the SVD branch (spec.svd_rank > 0), rotate (if the spec says so) and quantize one weight.
    Returns (QuantizedWeight, rel. error of the whole layer weight, branch included)."""
    w = weight.detach().to(device=device or weight.device, dtype=torch.float32)
    block = spec.had_block if spec.rotate else 1
    qw = quantize_split(w, spec.svd_rank, spec.w_bits, spec.method, block)  # rank 0: no branch
    return qw, ((qw.full_weight(block) - w).norm() / w.norm().clamp_min(1e-30)).item()


def svd_buffers(spec: LayerSpec, in_features: int, out_features: int, weight_dtype) -> dict:
    """The SVD branch's buffers of a layer: name -> (dtype, shape), empty without a branch. Their dtype is the
    float weight's, bfloat16 for 8-bit (fp8) checkpoints (as ComfyUI's loader keeps such models)."""
    rank = min(spec.svd_rank, in_features, out_features)
    if not rank:
        return {}
    dtype = torch.bfloat16 if weight_dtype.itemsize == 1 else weight_dtype
    return {"svd_down": (dtype, (rank, in_features)), "svd_up": (dtype, (out_features, rank))}


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear; see docs/design.md for the buffers and the math."""

    def __init__(self, in_features, out_features, spec: LayerSpec, *, bias=True, bias_dtype=torch.float32,
                 weight_dtype=torch.float32, state: BitState | None = None, backend="auto", device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.state = state if state is not None else BitState()
        self.backend = backend
        self.shares_input = SHARE_NONE  # set by whoever knows the layer's name (input_sharing)
        self.act = None  # "gelu_tanh": the GELU after this layer is applied here (dvdq_core.fusion)
        self.lowrank = None  # a dvdq_core.lowrank.LowRank beside the packed weights (LoRAs after quantization)
        packed_k = (in_features + 1) // 2 if spec.w_bits <= 4 else in_features
        # The packed codes are the layer's `weight`, as a host expects of a Linear: code that reads, moves,
        # measures or offloads `weight` sees the real (packed) bytes; the math needs w_scale and w_zero too.
        self.register_buffer("weight", torch.zeros(out_features, packed_k, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("w_zero", torch.zeros(out_features, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        if spec.method == "smoothquant":  # the baseline re-quantizes W * s every call
            self.register_buffer("float_weight", torch.zeros(out_features, in_features, dtype=weight_dtype, device=device))
        # the weight's own 16-bit SVD branch (weights.quantize_split); the codes hold the residual
        for name, (dtype, shape) in svd_buffers(spec, in_features, out_features, weight_dtype).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    # attributes the backends read (design.md)
    w_bits = property(lambda self: self.spec.w_bits)
    a_bits = property(lambda self: self.spec.a_bits)
    method = property(lambda self: self.spec.method)
    had_block = property(lambda self: self.spec.had_block)
    scale_block = property(lambda self: self.spec.scale_block)
    rotate = property(lambda self: self.spec.rotate)
    auto_scale = property(lambda self: self.spec.auto_scale)
    granularity = property(lambda self: self.spec.granularity)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, state: BitState, backend="auto", device=None):
        """Quantize an nn.Linear (on `device` if given); the result lives on the linear's device."""
        home = linear.weight.device
        bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        if bias_dtype.itemsize == 1:  # an fp8 checkpoint's bias: its values, in a type every backend adds
            bias_dtype = torch.float32
        m = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None,
                bias_dtype=bias_dtype,
                weight_dtype=linear.weight.dtype, state=state, backend=backend, device=home)
        qw, rel = quantize_weight(linear.weight, spec, device)
        m.load_quantized_weight(qw)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        if spec.method == "smoothquant":
            m.float_weight.copy_(linear.weight.detach())
        return m, rel

    @torch.no_grad()
    def load_quantized_weight(self, qw: QuantizedWeight):
        self.weight.copy_(qw.codes)
        self.w_scale.copy_(qw.scale)
        self.w_zero.copy_(qw.zero)
        if hasattr(self, "svd_up") != (qw.svd_up is not None):
            raise ValueError("the quantized weight and the layer disagree on the SVD branch (spec.svd_rank)")
        if qw.svd_up is not None:
            self.svd_up.copy_(qw.svd_up)
            self.svd_down.copy_(qw.svd_down)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight, self.w_scale.float(), self.w_zero, self.spec.w_bits,
                               (self.out_features, self.in_features), getattr(self, "svd_up", None),
                               getattr(self, "svd_down", None))

    def svd_branch(self) -> LowRank | None:
        """The weight's own SVD branch as a LowRank (None without one). `lowrank`, when set (LoRAs after
        quantization), is the whole branch: nodes/lora.py stacks this one's factors with the LoRAs'."""
        up = getattr(self, "svd_up", None)
        return None if up is None else LowRank(self.svd_down, up, None)

    def dequantized_weight(self) -> torch.Tensor:
        """D * (u - z): the rotated weight this layer multiplies with (float32); with an SVD branch, the
        rotated residual (the whole weight is this rotated back plus svd_up @ svd_down)."""
        u = unpack_codes(self.weight, self.spec.w_bits, self.in_features).float()
        return self.w_scale.float().unsqueeze(1) * (u - self.w_zero.float().unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.spec.a_bits if self.spec.a_bits is not None else self.state.bits
        lowrank = branch_of(self)
        x2d = x.reshape(-1, self.in_features)
        convert = lowrank is not None and (lowrank.down.device != x.device or lowrank.down.dtype != x.dtype)
        if not convert and self.weight.device == x.device:
            layer = self  # the backends read the branch with branch_of, as above
        else:  # offloaded weights (buffers copied for the call) or a branch converted for it (built for other calls)
            layer = _View(self, x.device, self.act, lowrank.to(x.device, x.dtype) if convert else lowrank)
        # the backend applies the branch too, before the fused activation (docs/design.md, "Backends")
        y = backends.select("linear", (layer, x2d, bits), self.backend, "the quantized linear layers")(layer, x2d, bits)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        a = self.spec.a_bits if self.spec.a_bits is not None else "switched"
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.spec.method}, "
                f"w_bits={self.spec.w_bits}, a_bits={a}, had_block={self.spec.had_block}"
                + (f", act={self.act}" if self.act else ""))


class _View:
    """A QuantLinear as the backends read it, for one call: its buffers on `device` (copied where the layer's
    weights are offloaded elsewhere), the fused activation `act` it applies and its low-rank branch for the call
    (branch_of(layer) on the call's device and in its dtype; None: none)."""

    def __init__(self, layer: QuantLinear, device, act, lowrank):
        self.__dict__.update({k: getattr(layer, k) for k in ("in_features", "out_features", "spec", "state",
                                                              "shares_input")})
        self.act = act
        self.lowrank = lowrank
        # buffers, and any the host turned into parameters (ComfyUI's set_attr_param when it force-loads a layer);
        # not the SVD factors: the branch above holds them, for the call
        for name, t in [*layer.named_buffers(recurse=False), *layer.named_parameters(recurse=False)]:
            if name in ("svd_down", "svd_up"):
                continue
            setattr(self, name, t.detach() if t.device == device else t.detach().to(device, non_blocking=True))
        if "bias" not in self.__dict__:
            self.bias = None

    w_bits, a_bits, method, had_block, scale_block, rotate, auto_scale, granularity = (
        QuantLinear.w_bits, QuantLinear.a_bits, QuantLinear.method, QuantLinear.had_block,
        QuantLinear.scale_block, QuantLinear.rotate, QuantLinear.auto_scale, QuantLinear.granularity)
    dequantized_weight = QuantLinear.dequantized_weight
