"""The Bit Switch Scheduler's per-step bookkeeping, free of ComfyUI so CI can test it.

ComfyUI calls the diffusion model once or more per denoising step: heun and other 2nd-order
samplers add calls at the next step's sigma or at intermediate sigmas, and CFG may run cond and
uncond in one batched call or in separate calls. The step a call belongs to is found by locating
its sigma in this sampling run's schedule (`transformer_options["sample_sigmas"]`):

- a call at schedule entry i (i < number of steps) belongs to step i; the first such call starts
  the step: one `BitSwitch.next_bits()` and, with that call's whole output, one `observe()`;
- any other call (an intermediate sigma, or the final entry of the schedule) belongs to the step
  in progress and runs with its bits, without a new decision or observation.

Wan 2.2's two-expert workflows split one schedule over two samplers (KSamplerAdvanced steps 0-10
on the high-noise model, 10-20 on the low-noise one). Each sampler only sees its own slice, so a
run that starts exactly where the previous completed run stopped (same latent shape, first sigma
equal to the previous run's last, non-zero sigma) continues it: step indices and the delta-GBS
state carry over, also from one Bit Switch Scheduler node to another. Anything else starts over;
an interrupted run is never continued.

Steps a cache serves without running the model (ComfyUI's EasyCache and LazyCache) are "skipped":
no decision, no observation, an event that marks them. A cache outside the scheduler's wrapper
(LazyCache; EasyCache applied before the scheduler) never calls it for such a step: the next call
comes at a later step. A cache inside it (EasyCache applied after the scheduler) returns its
synthetic output through it: the wrapper tells from the cache's state (`after_call(skipped=True)`)
and the step's decision is taken back. The next observed step's indicator is then the change per
step over the gap (BitSwitch.observe), so a run of skips does not make it jump.
"""
import math
import threading
from dataclasses import dataclass, field

import torch

from ..dvdq_core import BitSwitch


def sigmas_close(a: float, b: float, rel: float = 1e-4, abs_tol: float = 1e-7) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


def to_floats(values) -> list:
    """A schedule (tensor, list, tuple) as a list of Python floats."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().reshape(-1).tolist()
    return [float(v) for v in values]


def locate_step(sigma: float, schedule: list, start: int = 0):
    """Index i of `schedule` with schedule[i] == sigma (within float tolerance) that can start a
    step, i.e. i < len(schedule) - 1, searching from `start` on; None if there is none."""
    for i in range(max(start, 0), len(schedule) - 1):
        if sigmas_close(sigma, schedule[i]):
            return i
    return None


class StepTracker:
    """Maps each model call of one sampling run to a (global) step and says when a step starts."""

    def __init__(self):
        self.begin([], 0)

    def begin(self, schedule, offset: int = 0):
        self.schedule = to_floats(schedule)
        self.offset = offset  # steps done by earlier runs this one continues
        self.local = -1  # index of the step in progress within this run's schedule

    @property
    def steps(self) -> int:
        """Steps of this run."""
        return max(len(self.schedule) - 1, 0)

    @property
    def total(self):
        """Total steps of the whole schedule if known (the run ends at sigma 0), else None."""
        if self.schedule and self.schedule[-1] == 0.0:
            return self.offset + self.steps
        return None


    def on_call(self, sigma: float):
        """Returns (global step, True if this call starts that step)."""
        i = locate_step(sigma, self.schedule, self.local if self.local >= 0 else 0)
        if i is not None and i > self.local:
            self.local = i
            return self.offset + i, True
        if self.local < 0:  # first call of a run at a sigma outside the schedule: it is step 0
            self.local = 0
            return self.offset, True
        return self.offset + self.local, False


@dataclass
class RunEnd:
    """What a completed sampling run leaves for a run that continues its schedule."""
    node: str
    end_sigma: float
    shape: tuple
    steps: int  # global steps done so far
    log: list = field(default_factory=list)
    acc: float = 0.0
    prev: object = None  # the last observed model output
    prev_step: int | None = None  # its step
    last: int | None = None  # the last step decided or skipped


_LAST_RUN: list = [None]  # the most recent completed run in this process (one slot)


def record_run_end(run: RunEnd | None):
    _LAST_RUN[0] = run


def find_continuation(first_sigma: float, shape: tuple):
    """The completed run that this run (starting at first_sigma) continues, or None."""
    last = _LAST_RUN[0]
    if last is None or last.end_sigma <= 0.0 or tuple(last.shape) != tuple(shape):
        return None
    return last if sigmas_close(first_sigma, last.end_sigma) else None


class BitScheduleHook:
    """One Bit Switch Scheduler's state across sampling runs.

    The host calls begin_run() at the start of every sampling run, bits_for_call(sigma) before
    and after_call(output) after each diffusion-model call, end_run(completed) at the end.
    `emit(event, data)` sends the server events of docs/nodes.md.
    """

    def __init__(self, node_id: str, mode="delta", delta=0.09, low=4, high=8, fixed_bits=8, schedule="", emit=None,
                 final_step_high=True):
        self.node = str(node_id)
        self.mode = mode
        self.bs = BitSwitch(delta=delta, low=low, high=high, mode=mode, schedule=schedule or None,
                            fixed_bits=fixed_bits, last_high=final_step_high)
        self.tracker = StepTracker()
        self.emit = emit or (lambda event, data: None)
        self.running = False
        self.bits = high
        self._parts = None  # the step's observed outputs by cond_or_uncond part, until observed (None: done)
        self._step = (0, None)  # (global step, sigma of its first call)
        self._lock = threading.Lock()  # ComfyUI's MultiGPU CFG split calls the model from worker threads
        self._shape = ()
        self._last = None  # the last step decided (or marked skipped) in this schedule
        self.attention = None  # the calls' 8-bit attention counts (nodes/attention.py AttentionStats), if any
        self._attn_mark = None  # its counts when the step in progress began

    def begin_run(self, schedule, shape):
        sched = to_floats(schedule)
        self.bs.reset()
        cont = find_continuation(sched[0], shape) if sched else None
        record_run_end(None)  # a run in progress invalidates the slot until it completes
        if cont is not None:
            self.bs.log = list(cont.log)
            self.bs._acc = cont.acc
            self.bs._prev, self.bs._prev_step = cont.prev, cont.prev_step
            self.tracker.begin(sched, cont.steps)
            self._last = cont.last
        else:
            self.tracker.begin(sched, 0)
            self._last = None
        if cont is None or cont.node != self.node:
            self.emit("dvdq.bits_reset", {"node": self.node})
        self._shape = tuple(shape)
        self._parts = None
        self._cache = False  # a cache's state was seen in this run's calls: steps with no call were its
        self.running = True

    def bits_for_call(self, sigma: float, cache: bool = False, attention=None) -> int:
        """cache: the call's transformer_options hold a cache's state (EasyCache, LazyCache); only then
        are steps that got no call marked as skipped (samplers such as dpm_adaptive call the model off
        the schedule's sigmas, and those steps just get no event). attention: the AttentionStats of the
        model's DVD-Quant 8-bit Attention (None without one): each step's event then says how many of its
        attention calls ran in 8 bits."""
        with self._lock:
            self._cache = self._cache or cache
            self.attention = attention
            if not self.running:  # a model call outside a sampler run: keep the last bits
                return self.bits
            step, new = self.tracker.on_call(float(sigma))
            if new:
                self._observe()  # the previous step, if it still waits for a part (a CFG-1 step has only one)
                self._skipped_until(step)  # steps a cache outside this wrapper served
                total = self.tracker.total  # known where this run ends the schedule (at sigma 0)
                self.bits = self.bs.next_bits(step, last=total is not None and step == total - 1)
                self._parts, self._step, self._last = {}, (step, float(sigma)), step
                self._attn_mark = attention.counts() if attention is not None else None
            return self.bits

    def _skipped_until(self, step: int):
        first = self.tracker.offset if self._last is None else self._last + 1
        for s in range(first, step) if self._cache else ():
            self._emit_skipped(s)
        self._last = max(step - 1, self._last if self._last is not None else -1)

    def _emit_skipped(self, step: int):
        self.emit("dvdq.bits", {"node": self.node, "step": step, "total": self.tracker.total, "bits": None,
                                "skipped": True, "indicator": None, "accumulated": None, "mode": self.mode})

    def after_call(self, output, parts=None, sigma=None, skipped=False):
        """Observe a step's output once, from its first sigma's calls. parts: the call's cond_or_uncond. One
        batched CFG call holds both parts; ComfyUI's MultiGPU CFG split sends the cond and the uncond half
        as separate, concurrent calls: the step is then observed when both have come (or at the next step),
        from the halves in a fixed order, which gives the batched call's relative change."""
        with self._lock:
            if not self.running or self._parts is None:
                return
            if sigma is not None and not sigmas_close(float(sigma), self._step[1]):
                return  # a multistage sampler's call at an intermediate sigma
            if skipped:  # a cache inside the wrapper served this call: its output is not the model's
                if not self._parts:
                    self.bs.undo()
                    self._emit_skipped(self._step[0])
                else:  # the step's other part ran the model: keep its decision, observe nothing (half an output)
                    self._emit_step(None)
                self._parts = None
                return
            key = tuple(parts) if parts else ()
            if key in self._parts:
                return
            self._parts[key] = output
            if not key or {0, 1} <= {p for k in self._parts for p in k}:
                self._observe()

    def _observe(self):
        if not self._parts:
            self._parts = None
            return
        halves = [self._parts[k] for k in sorted(self._parts, key=lambda k: min(k, default=-1))]
        self._parts = None
        if len(halves) > 1:  # (on one device: each GPU's half comes from its own)
            halves = [torch.cat([h.detach().float().to(halves[0].device) for h in halves])]
        self.bs.observe(halves[0])
        self._emit_step(self.bs.log[-1].indicator)

    def _emit_step(self, indicator):
        rec = self.bs.log[-1]
        ev = {"node": self.node, "step": self._step[0], "total": self.tracker.total, "bits": int(rec.bits),
              "indicator": None if indicator is None else float(indicator), "accumulated": float(rec.accumulated),
              "mode": self.mode}
        if self.attention is not None and self._attn_mark is not None:  # the step's calls so far
            q8, host = self.attention.counts()
            ev["attention"] = {"q8": max(0, q8 - self._attn_mark[0]), "host": max(0, host - self._attn_mark[1])}
        self.emit("dvdq.bits", ev)

    def end_run(self, completed: bool):
        with self._lock:
            self._observe()  # a last step still waiting for a part
            if completed and self.tracker.schedule:
                self._skipped_until(self.tracker.offset + self.tracker.steps)  # the run's last steps, cached
        self.running = False
        if completed and self.tracker.schedule:
            record_run_end(RunEnd(self.node, self.tracker.schedule[-1], self._shape,
                                  self.tracker.offset + self.tracker.steps, list(self.bs.log),
                                  self.bs._acc, self.bs._prev, self.bs._prev_step, self._last))
        else:
            record_run_end(None)

    def bits_per_step(self) -> list:
        return self.bs.bits_per_step()
