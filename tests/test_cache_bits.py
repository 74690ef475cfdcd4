"""The skip / low / high control of bench/cache_bits.py (an experiment: measured, not offered by a node)."""
import importlib.util
import math
import os
import sys

import pytest
import torch

from dvdq_core.bitswitch import BitSwitch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():  # by path: bench/ on sys.path would shadow the kernels package with bench/kernels.py
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    spec = importlib.util.spec_from_file_location("bench_cache_bits", os.path.join(_ROOT, "bench", "cache_bits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cache_bits = _load()
CacheBitSwitch, SKIP = cache_bits.CacheBitSwitch, cache_bits.SKIP


def _run_cached(bs, changes, steps=None):
    """Steps whose model output grows by `changes[i]` per step (relative L1); SKIP steps run no model."""
    n = steps or len(changes) + 1
    x = torch.ones(4, 8)
    outs = [x]
    for c in changes:
        outs.append(outs[-1] * (1 + c))
    bits = []
    for i in range(n):
        b = bs.next_bits(i, last=i == n - 1)
        bits.append(b)
        if b != SKIP:
            bs.observe(outs[i], torch.zeros_like(outs[i])) if hasattr(bs, "cached") else bs.observe(outs[i])
    return bits


def test_cache_bitswitch_without_skip_is_the_delta_rule():
    changes = [0.05, 0.05, 0.02, 0.10, 0.01, 0.3, 0.0]
    want = _run_cached(BitSwitch(delta=0.09), changes)
    assert _run_cached(CacheBitSwitch(delta=0.09, skip_threshold=0.0), changes) == want == [8, 4, 4, 8, 4, 8, 4, 8]


def test_cache_bitswitch_one_accumulator_three_bands():
    """skip below skip_threshold, low up to delta, high above (and the sum resets); a skipped step adds the
    last observed change per step, and the next observation replaces that estimate by the measured gap."""
    bs = CacheBitSwitch(delta=0.09, skip_threshold=0.055)
    bits = _run_cached(bs, [0.03] * 7)
    # 0: high (no history); 1: low (no indicator yet); 2: sum .03 < .055 -> skip (sum .06); 3: low, the gap's
    # measured change .0609 replaces the estimate: sum .0909; 4: high (reset, its own .03); 5: skip; 6: low; 7: high
    assert bits == [8, 4, SKIP, 4, 8, SKIP, 4, 8]
    assert bs.skipped == 2 and bs.average_bits == pytest.approx(36 / 6)
    assert bs.log[3].indicator == pytest.approx(0.0609 / 2, rel=1e-3)  # change per step over the gap


def test_cache_bitswitch_skip_from_call():
    """skip_from 'call': the change since the last computed step, this step's estimate included."""
    bits = _run_cached(CacheBitSwitch(delta=0.2, skip_threshold=0.07, skip_from="call"), [0.03] * 8)
    assert bits == [8, 4, SKIP, SKIP, 4, SKIP, SKIP, 4, 8]


def test_cache_bitswitch_never_skips_the_first_steps_or_the_last():
    bits = _run_cached(CacheBitSwitch(delta=math.inf, skip_threshold=10.0), [0.0] * 5)
    assert bits[:2] == [8, 4] and bits[-1] == 8 and set(bits[2:-1]) == {SKIP}
    bits = _run_cached(CacheBitSwitch(delta=math.inf, skip_threshold=10.0, last_high=False), [0.0] * 5)
    assert bits[-1] == SKIP


def test_cache_bitswitch_serves_the_residual():
    """A skipped step's output: its input plus the last computed output's residual (EasyCache's reuse)."""
    bs = CacheBitSwitch(delta=0.09, skip_threshold=0.05)
    x0, out0 = torch.randn(2, 3), torch.randn(2, 3)
    bs.next_bits(0)
    bs.observe(out0, x0)
    x1 = torch.randn(2, 3)
    assert torch.allclose(bs.cached(x1), x1 + (out0 - x0))


@pytest.mark.parametrize("kwargs,msg", [(dict(skip_threshold=-0.1), "skip_threshold"),
                                        (dict(skip_from="step"), "skip_from")])
def test_cache_bitswitch_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CacheBitSwitch(**kwargs)
