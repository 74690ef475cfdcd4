"""delta-GBS: pick each denoising step's activation bit-width from the model output's change."""
import re
from dataclasses import dataclass

import torch

from .activations import check_act_bits

MODES = ("delta", "fixed", "manual")


@dataclass
class StepRecord:
    step: int
    bits: int
    indicator: float | None  # L1(t) observed after this step (None before the first comparison)
    accumulated: float  # sum of indicators since the last high step, as seen when deciding


def parse_schedule(text: str) -> tuple[list[int], bool]:
    """"8,8,8,4,4,..." -> ([8, 8, 8, 4, 4], repeat_last=True)."""
    parts = [p.strip() for p in re.split(r"[,\s]+", text or "") if p.strip()]
    repeat = bool(parts) and parts[-1] in ("...", "…")
    if repeat:
        parts = parts[:-1]
    if not parts:
        raise ValueError("the manual bit schedule is empty: give comma-separated bits such as '8,8,8,4,4,...'")
    try:
        bits = [check_act_bits(int(p)) for p in parts]
    except ValueError:
        raise ValueError(f"bad manual bit schedule {text!r}: use comma-separated activation bits (4..8 or 16), "
                         "optionally ending with '...' to repeat the last value") from None
    return bits, repeat


class BitSwitch:
    """Per-step activation bits. Call next_bits() once per step, then observe(output) once.

    mode "delta": the first step runs `high`; afterwards a step runs `low` while the accumulated
    relative L1 change of the model output since the last `high` step stays below `delta`, else
    `high` (and the sum resets). "fixed": always `fixed_bits`. "manual": the schedule string.
    last_high (mode "delta", the default): the schedule's final step (`next_bits(last=True)`) runs `high`
    too: the final output is that step's, and at 4 to 20 steps a 4-bit final step cost more than all
    the other 4-bit steps together (bench/RESULTS.md, few steps).

    Steps a cache served without running the model (ComfyUI's EasyCache, LazyCache): `undo()` takes
    back a decision made for such a step; the next observation then spans several steps, and with the
    step indices given its indicator is the change per step over the gap (docs/nodes.md).
    """

    def __init__(self, delta=0.09, low=4, high=8, mode="delta", schedule=None, fixed_bits=None, last_high=True):
        if mode not in MODES:
            raise ValueError(f"unknown bit switch mode {mode!r}: choose one of {', '.join(MODES)}")
        self.low, self.high = check_act_bits(low), check_act_bits(high)
        if low > high:
            raise ValueError(f"low bits ({low}) must not exceed high bits ({high})")
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        self.delta, self.mode = float(delta), mode
        self.last_high = bool(last_high)  # mode "delta": the schedule's last step runs `high` (next_bits(last=True))
        self.fixed_bits = check_act_bits(fixed_bits if fixed_bits is not None else high)
        self.schedule, self.repeat_last = parse_schedule(schedule) if mode == "manual" else ([], False)
        self.reset()

    def reset(self):
        self.log: list[StepRecord] = []
        self._acc = 0.0
        self._prev = None
        self._prev_step = None  # the step index of _prev, where next_bits was given one
        self._acc_before = None  # _acc before the last decision, until that step is observed (undo)

    @property
    def step(self) -> int:
        """Steps decided so far (the index of the next one where no step index is given)."""
        return len(self.log)

    def _decide(self, i: int, last: bool = False) -> int:
        if self.mode == "fixed":
            return self.fixed_bits
        if self.mode == "manual":
            if i < len(self.schedule):
                return self.schedule[i]
            if self.repeat_last:
                return self.schedule[-1]
            raise ValueError(f"the manual bit schedule has {len(self.schedule)} entries but step {i + 1} was reached; "
                             "add entries or end it with '...' to repeat the last value")
        if i == 0 or self._acc >= self.delta or (last and self.last_high):
            return self.high
        return self.low

    def next_bits(self, step: int | None = None, last: bool = False) -> int:
        """The bits of the next step: `step` is its index in the whole schedule where steps may be
        skipped (a manual schedule is indexed by it), else the count of steps decided so far; `last`:
        it is the schedule's final step."""
        i = self.step if step is None else int(step)
        bits = self._decide(i, last)
        self._acc_before = self._acc
        self.log.append(StepRecord(i, bits, None, self._acc))
        if bits >= self.high:
            self._acc = 0.0  # a high-precision step resets the accumulated change
        return bits

    def undo(self):
        """Take back the last decision, not yet observed: its step did not run the model (a cache served it)."""
        if self._acc_before is not None:
            self.log.pop()
            self._acc, self._acc_before = self._acc_before, None

    @torch.no_grad()
    def observe(self, output: torch.Tensor):
        """Record this step's model output (call once per step, after next_bits). After skipped steps the
        indicator is the relative change per step since the last observed one, so a run of skips does
        not make it jump."""
        out = output.detach().float()
        step = self.log[-1].step if self.log else None
        if self._prev is not None and self._prev.shape == out.shape:
            gap = step - self._prev_step if step is not None and self._prev_step is not None else 1
            ind = ((out - self._prev).abs().sum() / self._prev.abs().sum().clamp_min(1e-12)).item() / max(gap, 1)
            self._acc += ind
            if self.log:
                self.log[-1].indicator = ind
        self._prev, self._prev_step, self._acc_before = out, step, None

    @property
    def average_bits(self) -> float:
        return sum(r.bits for r in self.log) / max(len(self.log), 1)

    def bits_per_step(self) -> list[int]:
        return [r.bits for r in self.log]
