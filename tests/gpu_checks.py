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


def triton_reason(op, *args):
    """Why the triton backend cannot take op(*args) wherever it runs (the call's own checks in the registry,
    dvdq_core.backends.call_reason: bits, dtypes, shapes), or None; on a GPU also the machine's checks."""
    from dvdq_core import backends
    if backends.input_of(op, args).is_cuda:
        return backends.unsupported_reason("triton", op, *args)
    return backends.call_reason("triton", op, *args)


def machine_reason(op, *args):
    """The registry's full answer: the machine's checks (device, GPU, install), then the call's."""
    from dvdq_core import backends
    return backends.unsupported_reason("triton", op, *args)


def linear_reason(layer, a_bits, x2d):
    return triton_reason("linear", layer, x2d, a_bits)


# what the triton backend says of a CPU input (dvdq_core.backends.unsupported_reason)
ON_CPU = "the input is on cpu, and the Triton kernels run on CUDA GPUs only"
