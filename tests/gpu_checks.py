"""Checks shared by the GPU tests of the kernels."""
import torch


def allocations_without_host_sync(fn) -> int:
    """Call fn once (compiling its kernels), then again under CUDA's sync debug mode "error" (any call
    that makes the host wait for the GPU raises); returns the allocations the second call made."""
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before
