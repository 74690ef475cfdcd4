import math

import pytest
import torch

from dvdq_core import BitSwitch


def _run(bs, outputs):
    bits = []
    for out in outputs:
        bits.append(bs.next_bits())
        bs.observe(out)
    return bits


def _outputs(changes, seed=0):
    """Model outputs whose consecutive relative L1 change is exactly `changes[i]` (all-positive tensors)."""
    x = torch.ones(4, 8)
    outs = [x]
    for c in changes:
        x = x * (1 + c)
        outs.append(x)
    return outs


def test_rule_accumulates_and_resets():
    # indicators after steps 1..: 0.05, 0.05, 0.02, 0.10, 0.01
    bs = BitSwitch(delta=0.09, low=4, high=8)
    bits = _run(bs, _outputs([0.05, 0.05, 0.02, 0.10, 0.01]))
    # step0 high (no history); step1 acc=0 -> low; step2 acc=.05 -> low; step3 acc=.10 -> high, reset;
    # step4 acc=.02 -> low; step5 acc=.12 -> high
    assert bits == [8, 4, 4, 8, 4, 8]
    assert [r.step for r in bs.log] == list(range(6))
    assert bs.log[1].indicator == pytest.approx(0.05, rel=1e-5) and bs.log[0].indicator is None
    assert bs.log[3].accumulated == pytest.approx(0.10, rel=1e-5)
    assert bs.average_bits == pytest.approx(36 / 6)


def test_skipped_steps_undo_and_gap():
    """A step a cache served: undo() takes its decision back (bits and the accumulated change as before);
    the next observation over a gap of k steps counts the change per step."""
    bs = BitSwitch(delta=0.09, low=4, high=8)
    x = torch.ones(4, 8)
    assert bs.next_bits(0) == 8
    bs.observe(x)
    assert bs.next_bits(1) == 4
    bs.observe(x * 1.04)  # acc 0.04
    bs.next_bits(2)
    bs.undo()  # step 2 served from the cache
    assert [r.step for r in bs.log] == [0, 1] and bs._acc == pytest.approx(0.04, rel=1e-5)
    bs.undo()  # nothing left to take back: an observed step stays
    assert len(bs.log) == 2
    assert bs.next_bits(4) == 4
    bs.observe(x * 1.04 * 1.12)  # 0.12 over steps 1 -> 4: 0.04 per step
    assert bs.log[-1].indicator == pytest.approx(0.04, rel=1e-4) and bs._acc == pytest.approx(0.08, rel=1e-4)
    assert bs.next_bits(5) == 4
    # taking back a high decision restores the accumulated change it had reset
    bs.observe(x * 1.04 * 1.12 * 1.06)  # acc 0.08 + 0.06 >= 0.09: the next step is high
    assert bs.next_bits(6) == 8 and bs._acc == 0.0
    bs.undo()
    assert bs._acc == pytest.approx(0.14, rel=1e-3) and bs.next_bits(6) == 8


def test_final_step_runs_high_in_delta_mode_only():
    outs = _outputs([0.0] * 4)

    def run(bs):
        bits = []
        for i, out in enumerate(outs):
            bits.append(bs.next_bits(i, last=i == len(outs) - 1))
            bs.observe(out)
        return bits
    assert run(BitSwitch(delta=math.inf)) == [8, 4, 4, 4, 8]
    assert run(BitSwitch(delta=math.inf, last_high=False)) == [8, 4, 4, 4, 4]  # the paper's rule alone
    assert run(BitSwitch(mode="fixed", fixed_bits=4)) == [4] * 5
    assert run(BitSwitch(mode="manual", schedule="8,4,...")) == [8, 4, 4, 4, 4]


def test_delta_limits():
    outs = _outputs([0.3, 0.01, 0.2, 0.0, 0.5, 0.05, 0.1])
    assert _run(BitSwitch(delta=0.0), outs) == [8] * 8  # delta -> 0: W4A8
    assert _run(BitSwitch(delta=math.inf), outs) == [8] + [4] * 7  # delta -> inf: W4A4 after the first step


def test_reset_between_runs():
    bs = BitSwitch(delta=0.09)
    first = _run(bs, _outputs([0.05, 0.05, 0.02, 0.10, 0.01]))
    bs.reset()
    assert bs.log == [] and bs.step == 0
    assert _run(bs, _outputs([0.05, 0.05, 0.02, 0.10, 0.01])) == first


def test_fixed_and_manual():
    outs = _outputs([0.1] * 5)
    assert _run(BitSwitch(mode="fixed", fixed_bits=6), outs) == [6] * 6
    assert _run(BitSwitch(mode="manual", schedule="8,8,4,..."), outs) == [8, 8, 4, 4, 4, 4]
    bs = BitSwitch(mode="manual", schedule="8, 4")
    _run(bs, outs[:2])
    with pytest.raises(ValueError, match="2 entries but step 3"):
        bs.next_bits()


@pytest.mark.parametrize("kwargs,msg", [
    (dict(low=3), "activation bits"), (dict(high=9), "activation bits"), (dict(low=8, high=4), "must not exceed"),
    (dict(mode="random"), "unknown bit switch mode"), (dict(delta=-1), "delta"),
    (dict(mode="manual", schedule=""), "empty"), (dict(mode="manual", schedule="8,x"), "bad manual bit schedule"),
])
def test_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        BitSwitch(**kwargs)
