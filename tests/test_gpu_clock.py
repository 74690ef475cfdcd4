"""bench/gpu_clock.py: a throttled benchmark run must be flagged, a clean one not, idle samples ignored."""
import importlib.util
import os

# loaded by path: bench/ on sys.path would shadow the kernels package with bench/kernels.py
_spec = importlib.util.spec_from_file_location(
    "gpu_clock", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_clock.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
ClockMonitor = _mod.ClockMonitor


def monitor(samples):
    m = ClockMonitor()
    m._thread, m.samples = object(), samples  # as if sampled: (SM MHz, max MHz, temperature C, utilisation %)
    return m


def test_throttled_run_is_flagged():
    m = monitor([[540, 1980, 87, 95], [600, 1980, 87, 99], [1980, 1980, 40, 0]])
    assert m.summary()["throttled"] and m.summary()["sm_mhz_median_loaded"] == 570
    assert "THROTTLED" in m.report()


def test_full_clock_run_is_clean_and_idle_samples_do_not_count():
    m = monitor([[1965, 1980, 60, 95], [1980, 1980, 61, 97], [345, 1980, 40, 0]])
    assert not m.summary()["throttled"] and "THROTTLED" not in m.report()


def test_no_load_sample_never_claims_a_clean_run():
    assert "throttled" not in monitor([[345, 1980, 40, 0]]).summary()
    assert "unknown" in ClockMonitor().report()  # never started: no nvidia-smi reading at all
