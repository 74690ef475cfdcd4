"""Query/key RMS norm and rotary embedding in one pass (Wan's self-attention).

Wan normalises q and k over the whole model width (RMSNorm with a weight), then rotates each head's
consecutive channel pairs by the token's rotary angles. Done as the host writes it, the rotation
runs in float32 through several full-size temporaries (about eight reads and writes of the tensor);
the Triton kernel reads the linear's output once and writes the result once.

`norm_rope_reference` is the host's math (the ground truth, and the path on the CPU);
`norm_rope` picks the kernel where it runs (CUDA, bf16/fp16) and says once when it cannot.

Shapes: x [B, S, H * D]; freqs [B or 1, S, 1, D / 2, 2, 2] float32, the 2 x 2 rotation
[[cos, -sin], [sin, cos]] of each pair (ComfyUI's layout); result [B, S, H, D] in x's dtype.
"""
import torch
import torch.nn.functional as F

from . import backends


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, freqs: torch.Tensor,
                        heads: int) -> torch.Tensor:
    """RMS norm over the last dim (skipped when weight is None), then the pairwise rotation in float32."""
    b, s, c = x.shape
    if weight is not None:
        x = F.rms_norm(x, (c,), weight=weight.to(x.dtype), eps=eps)
    pairs = x.view(b, s, heads, c // heads).to(freqs.dtype).reshape(b, s, heads, -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0]
    out.addcmul_(freqs[..., 1], pairs[..., 1])
    return out.reshape(b, s, heads, c // heads).type_as(x)


def kernel_unsupported_reason(x: torch.Tensor, weight, freqs: torch.Tensor, heads: int):
    """None when the Triton kernel handles this call, else a short sentence why not."""
    if x.device.type != "cuda":
        return f"the input is on {x.device.type}, and the Triton kernels run on CUDA GPUs only"
    k = backends.load_kernels()
    if isinstance(k, str):
        return k
    return k.norm_rope_unsupported_reason(x, weight, freqs, heads)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, freqs: torch.Tensor,
              heads: int) -> torch.Tensor:
    """norm_rope_reference's result, by the Triton kernel where it runs."""
    if eps is None:  # as F.rms_norm: the dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    reason = kernel_unsupported_reason(x, weight, freqs, heads)
    if reason is None:
        return backends.load_kernels().norm_rope(x, weight, float(eps), freqs, heads)
    if x.device.type == "cuda":  # on the CPU the reference is the expected path, not a fallback
        backends.warn_once(f"DVD-Quant: q/k norm and rotary embedding run as the host's PyTorch ops "
                           f"(slower) because {reason}.")
    return norm_rope_reference(x, weight, eps, freqs, heads)
