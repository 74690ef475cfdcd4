"""The low-rank branch beside a quantized layer (LoRAs after quantization): dvdq_core/lowrank.py and
QuantLinear.forward's use of it, against the LoRA merged into the float weight."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import dvdq_core as dq
from dvdq_core.lowrank import LowRankTerm, stack

ON_GPU = torch.cuda.is_available()
GEN = torch.Generator().manual_seed(0)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def quantized(lin, w_bits=8, a_bits=16, backend="reference"):
    spec = dq.LayerSpec(w_bits=w_bits, a_bits=a_bits, method="dvdq", had_block=64, scale_block=64, rotate=True,
                        auto_scale=True, granularity="block")
    q, _ = dq.QuantLinear.from_linear(lin, spec, dq.BitState(a_bits), backend=backend)
    return q


def test_stack_is_the_merged_difference():
    """Stacked terms (one on a row slice, one on a column slice, one at strength 0) and bias differences:
    x·Aᵀ·Bᵀ + Δb equals x·ΔWᵀ + Δb with ΔW merged as ComfyUI's calculate_weight would."""
    n, k = 48, 32
    t1 = LowRankTerm(randn(n, 4), randn(4, k), -0.7)
    t2 = LowRankTerm(randn(16, 2), randn(2, k), 0.5, rows=(8, 16))
    t3 = LowRankTerm(randn(n, 3), randn(3, 8), 1.5, cols=(24, 8))
    zero = LowRankTerm(randn(n, 5), randn(5, k), 0.0)
    db = randn(n)
    lr = stack([t1, t2, zero, t3], [(0.25, db)], n, k, "cpu", torch.float64)
    dw = -0.7 * t1.up @ t1.down
    dw[8:24] += 0.5 * t2.up @ t2.down
    dw[:, 24:32] += 1.5 * t3.up @ t3.down
    x = randn(7, k).double()
    got = lr.add_to(torch.zeros(7, n, dtype=torch.float64), x)
    torch.testing.assert_close(got, x @ dw.double().t() + 0.25 * db.double(), rtol=1e-5, atol=1e-5)  # float32 factors
    assert lr.down.shape == (4 + 2 + 3, k), "a term at strength 0 adds no rank"
    assert stack([zero], [(0.0, db)], n, k, "cpu", torch.float32) is None


def test_stack_refuses_factors_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit: it is 10 x 32, the layer 48 x 32"):
        stack([LowRankTerm(randn(10, 2), randn(2, 32), 1.0)], [], 48, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match="at rows 40"):  # a slice past the layer's end
        stack([LowRankTerm(randn(16, 2), randn(2, 32), 1.0, rows=(40, 16))], [], 48, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        stack([LowRankTerm(randn(48, 3), randn(2, 32), 1.0)], [], 48, 32, "cpu", torch.float32)


@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_quantized_layer_with_branch_is_the_merged_layer(act):
    """W8A16: the only error is the 8-bit weights'; the branch joins before the fused GELU."""
    lin = torch.nn.Linear(128, 96)
    up, down = randn(96, 8) / 3, randn(8, 128) / 3
    q = quantized(lin)
    q.act = act
    x = randn(2, 5, 128)
    merged = F.linear(x, lin.weight - 0.5 * up @ down, lin.bias)
    if act:
        merged = F.gelu(merged, approximate="tanh")
    q.lowrank = stack([LowRankTerm(up, down, -0.5)], [], 96, 128, x.device, x.dtype)
    y = q(x)
    assert y.shape == (2, 5, 96)
    assert rel(y, merged) < 0.01
    q.lowrank = None
    assert rel(q(x), merged) > 0.2, "without the branch the layer must be the base layer again"


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernels run on CUDA GPUs")
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_gpu_kernels_with_branch(act):
    """The kernels' output plus the branch, bf16, against the reference backend plus the branch."""
    dev = torch.device("cuda")
    lin = torch.nn.Linear(256, 512).to(dev)
    up, down = randn(512, 16).to(dev) / 4, randn(16, 256).to(dev) / 4
    x = randn(300, 256).to(dev, torch.bfloat16)
    got, want = [], []
    for backend, out in (("triton", got), ("reference", want)):
        q = quantized(lin, w_bits=4, a_bits=8, backend=backend)
        q.act = act
        q.lowrank = stack([LowRankTerm(up, down, 0.8)], [], 512, 256, dev, torch.bfloat16)
        out.append(q(x))
    assert got[0].dtype == torch.bfloat16
    assert rel(got[0], want[0]) < 0.02


def test_torch_compile_traces_the_branch():
    """The branch path compiles without a graph break (CPU, fullgraph)."""
    lin = torch.nn.Linear(64, 64)
    q = quantized(lin)
    x = randn(4, 64)
    q.lowrank = stack([LowRankTerm(randn(64, 4), randn(4, 64), 0.3)], [], 64, 64, x.device, x.dtype)
    with warnings.catch_warnings():  # on a GPU machine: the one-time fallback warning, outside the compiled region
        warnings.simplefilter("ignore", RuntimeWarning)
        want = q(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(q, fullgraph=True, backend="eager")(x), want)


def test_branch_in_another_dtype_reaches_the_backend_converted():
    """A branch built for other calls (float32 factors, bf16 input) is converted for the call and handed to the
    backend with the layer's fused GELU (linear._View): the same output as factors made in the input's dtype,
    the branch joined before the GELU."""
    lin = torch.nn.Linear(64, 48)
    q = quantized(lin)
    q.act = "gelu_tanh"
    up, down = randn(48, 4) / 3, randn(4, 64) / 3
    x = randn(3, 64).to(torch.bfloat16)
    q.lowrank = stack([LowRankTerm(up, down, 0.7)], [(0.5, randn(48))], 48, 64, "cpu", torch.float32)
    y = q(x)
    q.lowrank = q.lowrank.to("cpu", torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, q(x))
    q.act = None
    assert rel(y, F.gelu(q(x).float(), approximate="tanh")) < 0.01
