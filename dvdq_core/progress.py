"""A dependency-free terminal progress bar (stderr)."""
import sys
import time


class ProgressBar:
    def __init__(self, total: int, label: str = "", stream=None, width: int = 30):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int | None = None, name: str = ""):
        total = total or self.total
        frac = done / max(total, 1)
        bar = "#" * int(frac * self.width)
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        line = f"\r{self.label} [{bar:<{self.width}}] {done}/{total} {el:5.0f}s eta {eta:4.0f}s {name[:40]:<40}"
        self.stream.write(line)
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
