"""Block-diagonal Hadamard rotation along the last (input-channel) dimension."""
import math
from functools import lru_cache

import torch


def effective_block(block: int, k: int) -> int:
    """The rotation / scale block a layer of width k actually uses: gcd(block, k).

    `block` is a power of two, so the result is one too; every width of Wan and HunyuanVideo is a
    multiple of 64, where this is simply `block`.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"block size must be a power of two, got {block}")
    return math.gcd(block, k)


def sylvester(n: int) -> torch.Tensor:
    """The +-1 Sylvester Hadamard pattern of size n (a power of two), float64 on the CPU; the kernels
    build their rotation from it and scale by 1/sqrt(n) themselves."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=16)
def _hadamard_cpu(n: int) -> torch.Tensor:
    return (sylvester(n) / math.sqrt(n)).to(torch.float32)


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthogonal, symmetric Sylvester Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block) along the last dim (which must be a multiple of block)."""
    if block == 1:
        return x
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"last dim {k} is not a multiple of the Hadamard block {block}")
    h = hadamard_matrix(block, x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)
