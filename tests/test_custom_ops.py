"""The pack's torch custom ops (dvdq::*) keep torch.compile's contract: their fake implementations give
the shapes AND strides the real kernels return, also for strided inputs (Wan's first block gets the
transposed patch embedding). A fake that said otherwise made inductor's size/stride assertion fail
when ComfyUI's TorchCompileModel compiled a quantized Wan model. Interpreter on the CPU, compiled on
a GPU."""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels module is first imported

from dvdq_core import kernels  # noqa: E402,F401  (registers the ops)

DEV = "cuda" if ON_GPU else "cpu"
GEN = torch.Generator().manual_seed(5)
B, L, C, HEADS = 2, 6, 64, 4


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=GEN).to(dtype).to(DEV)


def strided(b, l, c):
    """[b, l, c] with unit token stride (a transposed [b, c, l] tensor), as Wan's patch embedding."""
    return rand(b, c, l).transpose(1, 2)


def rotations(*lead, d):
    a = torch.rand(*lead, d // 2, generator=GEN) * 6.28
    return torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).view(*lead, d // 2, 2, 2).to(DEV)


def cases():
    d = C // HEADS
    x = strided(B, L, C)
    vec = rand(B, 1, C)
    two = rand(B, 2, C)
    yield "modulated_norm", (x, vec, vec.clone(), 1e-6)
    yield "gated_residual", (x, rand(B, L, C), vec)
    yield "norm_rope", (x, rand(C), 1e-6, rotations(1, L, 1, d=d), HEADS)
    yield "modulated_norm_dims", (x, two, two.clone(), 1e-6, 2)
    yield "gated_add", (x, strided(B, L, C), vec, 0)
    yield "gated_add_inplace", (rand(B, L, C), strided(B, L, C), vec, 0)  # (its x must be contiguous)
    yield "head_norm_rope", (x, rand(d), 1e-6, rotations(1, 1, L + 3, d=d), HEADS, strided(B, 3, C), rand(d))
    k, n = 128, 16
    yield "w4_linear", (rand(k, 5).t(), torch.randint(0, 256, (n, k // 2), generator=GEN, dtype=torch.uint8).to(DEV),
                        torch.rand(n, generator=GEN).to(DEV) * 0.01, torch.randint(0, 16, (n,), generator=GEN,
                                                                                        dtype=torch.uint8).to(DEV),
                        rand(n), 4, 128, 128, True, 0, True, False)


@pytest.mark.parametrize("name,args", list(cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_fake_matches_the_kernel_for_strided_inputs(name, args):
    op = getattr(torch.ops.dvdq, name)
    torch.library.opcheck(op, args, test_utils="test_faketensor")
    real = op(*args)
    assert real is None or real.is_contiguous()  # what every fake promises (the in-place op returns None)


def test_fake_of_the_linear_with_a_lora_branch():
    """The LoRA branch's factors are optional tensor arguments of dvdq::w4_linear (down [R, K], up [N, R], a
    bias difference [N]): the fake gives the kernel's shape and strides with them too."""
    k, n, r = 128, 16, 5
    args = (rand(k, 5).t(), torch.randint(0, 256, (n, k // 2), generator=GEN, dtype=torch.uint8).to(DEV),
            torch.rand(n, generator=GEN).to(DEV) * 0.01, torch.randint(0, 16, (n,), generator=GEN, dtype=torch.uint8).to(DEV),
            rand(n), 4, 128, 128, True, 0, True, True, rand(r, k), rand(n, r), rand(n))
    torch.library.opcheck(torch.ops.dvdq.w4_linear, args, test_utils="test_faketensor")
    assert torch.ops.dvdq.w4_linear(*args).is_contiguous()
