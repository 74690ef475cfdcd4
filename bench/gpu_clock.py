"""SM clock and temperature while a benchmark runs, so throttled runs are seen, not recorded.

A lent H100 once ran a whole benchmark at 540 MHz median (of 1980) at 87 C: every time doubled,
ratios erratic (a throttled call's log, clocks_s4call8_throttled.log, in git history). `ClockMonitor` samples nvidia-smi every
few seconds in a thread; `summary()` gives the median SM clock under load (utilisation >= 50%),
the maximum clock and temperature, and `throttled` when the median is below 70% of the maximum.
(Under sustained tensor-core load an H100 SXM runs power-capped at about 1500-1900 MHz of 1980,
normal for every run recorded here: a Wan 14B step median 1575 MHz at 64 C; the bad run above
was far lower.)
Without nvidia-smi it reports that and never claims a run was clean.
"""
import shutil
import statistics
import subprocess
import threading

QUERY = "clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu"


class ClockMonitor:
    query = QUERY  # nvidia-smi fields of one sample (summary() reads these four)

    def __init__(self, period_s: float = 2.0, gpu: int = 0):
        self.period_s, self.gpu, self.samples = period_s, gpu, []
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        out = subprocess.run(["nvidia-smi", "-i", str(self.gpu), f"--query-gpu={self.query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [float(v) for v in out.strip().split(",")]

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period_s)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        if self._thread is None:
            return {"clock": "unknown (no nvidia-smi)"}
        loaded = [s for s in self.samples if s[3] >= 50]
        if not loaded:
            return {"clock": f"unknown (no sample under load of {len(self.samples)})"}
        med = statistics.median(s[0] for s in loaded)
        top = max(s[1] for s in loaded)
        return {"sm_mhz_median_loaded": med, "sm_mhz_max": top, "temp_c_max": max(s[2] for s in loaded),
                "samples_loaded": len(loaded), "throttled": med < 0.7 * top}

    def report(self) -> str:
        s = self.summary()
        if "throttled" not in s:
            return f"GPU clock: {s['clock']}"
        line = (f"GPU clock under load: median {s['sm_mhz_median_loaded']:.0f} of {s['sm_mhz_max']:.0f} MHz, "
                f"max {s['temp_c_max']:.0f} C ({s['samples_loaded']} samples)")
        if s["throttled"]:
            line += "\nWARNING: the GPU was THROTTLED during this run: the timings are not comparable with other runs"
        return line
