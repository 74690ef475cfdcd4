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
    """

    def __init__(self, delta=0.09, low=4, high=8, mode="delta", schedule=None, fixed_bits=None):
        if mode not in MODES:
            raise ValueError(f"unknown bit switch mode {mode!r}: choose one of {', '.join(MODES)}")
        self.low, self.high = check_act_bits(low), check_act_bits(high)
        if low > high:
            raise ValueError(f"low bits ({low}) must not exceed high bits ({high})")
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        self.delta, self.mode = float(delta), mode
        self.fixed_bits = check_act_bits(fixed_bits if fixed_bits is not None else high)
        self.schedule, self.repeat_last = parse_schedule(schedule) if mode == "manual" else ([], False)
        self.reset()

    def reset(self):
        self.log: list[StepRecord] = []
        self._acc = 0.0
        self._prev = None

    @property
    def step(self) -> int:
        """Index of the next step to decide."""
        return len(self.log)

    def _decide(self, i: int) -> int:
        if self.mode == "fixed":
            return self.fixed_bits
        if self.mode == "manual":
            if i < len(self.schedule):
                return self.schedule[i]
            if self.repeat_last:
                return self.schedule[-1]
            raise ValueError(f"the manual bit schedule has {len(self.schedule)} entries but step {i + 1} was reached; "
                             "add entries or end it with '...' to repeat the last value")
        if i == 0 or self._acc >= self.delta:
            return self.high
        return self.low

    def next_bits(self) -> int:
        i = self.step
        bits = self._decide(i)
        self.log.append(StepRecord(i, bits, None, self._acc))
        if bits >= self.high:
            self._acc = 0.0  # a high-precision step resets the accumulated change
        return bits

    @torch.no_grad()
    def observe(self, output: torch.Tensor):
        """Record this step's model output (call once per step, after next_bits)."""
        out = output.detach().float()
        if self._prev is not None and self._prev.shape == out.shape:
            ind = ((out - self._prev).abs().sum() / self._prev.abs().sum().clamp_min(1e-12)).item()
            self._acc += ind
            if self.log:
                self.log[-1].indicator = ind
        self._prev = out

    @property
    def average_bits(self) -> float:
        return sum(r.bits for r in self.log) / max(len(self.log), 1)

    def bits_per_step(self) -> list[int]:
        return [r.bits for r in self.log]
