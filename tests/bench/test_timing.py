"""measure(): memory accounting of known allocations, timing sanity, validation."""

import time
import tracemalloc

import pytest
import torch

from alignlab.bench import Measurement, format_bytes, measure

N = 1_000_000  # float32 elements: 4 MB


def test_tracemalloc_does_not_see_torch_tensors():
    """Why the CPU path uses the profiler: tracemalloc misses c10 allocations."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        t = torch.ones(N)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < t.nbytes // 10


def test_peak_of_returned_tensor_is_its_size():
    m = measure(lambda: torch.ones(N), device="cpu", warmup=1, rep=2)
    assert m.peak_bytes == 4 * N
    assert m.memory_method == "torch_profiler_cpu"


def test_peak_counts_freed_temporaries_at_their_high_water():
    def fn():
        kept = torch.ones(N)  # 4 MB, returned
        tmp = torch.ones(2 * N)  # 8 MB, freed before the next allocation
        del tmp
        other = torch.ones(N // 2)  # 2 MB, freed at return
        return kept + other[0]  # + 4 MB output

    m = measure(fn, device="cpu", warmup=0, rep=1)
    # high water: kept + tmp = 12 MB; later kept + other + out = 10 MB.
    assert m.peak_bytes == 12 * N


def test_baseline_excludes_inputs():
    x = torch.ones(4 * N)
    m = measure(torch.neg, x, warmup=0, rep=1)
    assert m.peak_bytes == x.nbytes  # only the output, not the 16 MB input


def test_timing_is_bounded_by_a_known_sleep():
    m = measure(time.sleep, 0.002, device="cpu", warmup=1, rep=5, memory=False)
    assert 2.0 <= m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.median_ms < 200  # generous: CI machines stall, but not by 100x
    assert m.memory_method == "skipped" and m.peak_bytes is None


def test_context_fields():
    x = torch.ones(8, dtype=torch.bfloat16)
    m = measure(torch.exp, x, rep=2, warmup=1, name="exp")
    assert m.name == "exp" and m.device == "cpu" and m.dtype == "bfloat16"
    assert m.versions["torch"] == torch.__version__
    assert m.n == 2 and len(m.times_ms) == 2
    assert "exp: median" in str(m)


def test_kwargs_are_forwarded():
    seen = {}

    def fn(x, *, scale):
        seen["scale"] = scale
        return x * scale

    measure(fn, torch.ones(3), scale=5.0, rep=1, warmup=0)
    assert seen["scale"] == 5.0


def test_auto_rep_targets_a_quarter_second():
    m = measure(time.sleep, 0.005, device="cpu", warmup=3, memory=False)
    # int(0.25 s / call time): at most 50 since sleep(5 ms) never returns early;
    # the lower bound allows a slow CI machine.
    assert 15 <= m.n <= 50
    m = measure(time.sleep, 0.05, device="cpu", warmup=1, memory=False)
    assert m.n == 10  # floor
    m = measure(lambda: None, device="cpu", warmup=1, memory=False)
    assert m.n == 2000  # capped


def test_measure_propagates_errors():
    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        measure(boom, device="cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="rep"):
        measure(lambda: None, rep=0)
    with pytest.raises(TypeError, match="callable"):
        measure(3)
    with pytest.raises(ValueError, match="device"):
        measure(lambda: None, device="not-a-device")


def test_roofline_percentages_follow_their_formula():
    m = Measurement(
        name="x", median_ms=2.0, p10_ms=1.0, p90_ms=3.0, mean_ms=2.0, min_ms=1.0, times_ms=[2.0],
        peak_bytes=0, memory_method="skipped", device="cpu", device_name="cpu", dtype=None, versions={},
        copy_bandwidth=1e9, matmul_peak=1e12,
    )
    # 1e6 bytes in 2 ms = 5e8 B/s = 50% of 1e9 B/s; 1e9 flops in 2 ms = 5e11 = 50% of 1e12.
    assert m.pct_copy_bandwidth(1e6) == pytest.approx(50.0)
    assert m.pct_matmul_peak(1e9) == pytest.approx(50.0)
    assert m.pct_copy_bandwidth() is None  # no bytes_moved given


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


@pytest.mark.cuda
def test_cuda_peak_memory_of_known_allocation():
    x = torch.ones(N, device="cuda")

    def fn(x):
        tmp = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB, freed
        del tmp
        return x * 2  # 4 MB output

    m = measure(fn, x, warmup=1, rep=3)
    assert m.memory_method == "cuda_max_memory_allocated"
    assert m.peak_bytes == 64 * 2**20  # the freed temporary is the high water; x is baseline
    assert m.device.startswith("cuda") and m.device_name


@pytest.mark.cuda
def test_cuda_event_times_agree_with_do_bench():
    triton_testing = pytest.importorskip("triton.testing")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    m = measure(torch.matmul, a, a, warmup=5, rep=50)
    ref = triton_testing.do_bench(lambda: torch.matmul(a, a), warmup=25, rep=100, return_mode="median")
    assert m.median_ms == pytest.approx(ref, rel=0.15)


# The RSS tests measure in a fresh interpreter: in a process that ran other tests first (a pytest-xdist worker) the
# allocator may serve the 64 MB from pages it already holds, and RSS then does not grow (seen in CI: peak 0 bytes).
_RSS_CHILD = """
import builtins, json, time
import torch
from alignlab.bench import measure
N = {n}
if {refuse_clear_refs}:
    real_open = builtins.open
    def no_clear_refs(path, *a, **k):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError("refused")
        return real_open(path, *a, **k)
    builtins.open = no_clear_refs
def fn():
    t = torch.ones(16 * N)  # 64 MB, every page written
    time.sleep(0.02)  # long enough for the 1 ms sampler
    return t
m = measure(fn, device="cpu", warmup=0, rep=1, memory="rss")
print(json.dumps([m.memory_method, m.peak_bytes]))
"""


def _rss_in_fresh_process(refuse_clear_refs: bool) -> tuple[str, int]:
    import json
    import subprocess
    import sys

    code = _RSS_CHILD.format(n=N, refuse_clear_refs=refuse_clear_refs)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    method, peak = json.loads(out.strip().splitlines()[-1])
    return method, peak


def test_rss_mode_sees_a_touched_allocation():
    method, peak = _rss_in_fresh_process(refuse_clear_refs=False)
    assert method in ("rss_hwm", "rss_sampled")
    # RSS counts whole pages and whatever else the process touched meanwhile.
    assert 64 * N * 0.98 <= peak <= 64 * N + (16 << 20)


def test_rss_fallback_sampler():
    pytest.importorskip("psutil")
    method, peak = _rss_in_fresh_process(refuse_clear_refs=True)  # no /proc/self/clear_refs: the sampler
    assert method == "rss_sampled"
    assert 64 * N * 0.98 <= peak <= 64 * N + (16 << 20)


def test_bad_memory_mode():
    with pytest.raises(ValueError, match="memory"):
        measure(lambda: None, memory="allocator")


def test_times_are_read_only_after_a_sync(monkeypatch):
    """Stands in for CUDA events: a time read before ``sync`` would be garbage there."""
    import alignlab.bench.timing as timing

    class StrictTimer:
        def __init__(self):
            self.calls = self.synced = self.syncs = 0

        def time(self, fn, args, kwargs):
            fn(*args, **kwargs)
            self.calls += 1
            index = self.calls

            def read():
                assert index <= self.synced, "time read before the GPU was synchronised"
                return 1.0

            return read

        def sync(self):
            self.synced = self.calls
            self.syncs += 1

    timer = StrictTimer()
    monkeypatch.setattr(timing, "_CpuTimer", lambda: timer)
    m = measure(lambda: None, device="cpu", warmup=2, rep=None, memory=False)
    assert m.n == 250 and m.median_ms == 1.0  # 0.25 s of 1 ms calls
    # timed calls in batches of _SYNC_EVERY, plus the warm-up sync and the final one.
    assert timer.syncs == 2 + 250 // timing._SYNC_EVERY


def test_roofline_inputs_are_checked_as_in_compare():
    # measure took a negative or NaN count silently and printed a negative / NaN percentage
    for label in ("bytes_moved", "flops"):
        for bad in (-1, 0, float("nan"), float("inf"), "8", True):
            with pytest.raises(ValueError, match=label):
                measure(lambda: None, rep=1, warmup=0, memory=False, **{label: bad})


def test_numpy_counts_are_numbers():
    # flops=2 * np.prod(shape) is a NumPy integer; it is a count like any other and stays JSON-ready
    np = pytest.importorskip("numpy")
    m = measure(lambda: None, rep=1, warmup=0, memory=False, flops=np.int64(2) * np.prod((4, 4)),
                bytes_moved=np.float32(64.0))
    assert m.flops == 32 and m.bytes_moved == 64
    assert type(m.flops) is int and type(m.bytes_moved) is float  # plain Python numbers, as JSON wants


def test_fn_name_and_flush_cache_are_checked_by_name():
    # measure(3) said "contestant 'int' must be callable"; flush_cache="no" switched the flush on
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        measure(3)
    with pytest.raises(TypeError, match="name must be a str"):
        measure(lambda: None, name=5, rep=1, warmup=0, memory=False)
    with pytest.raises(TypeError, match="flush_cache must be a bool, got 'no'"):
        measure(lambda: None, flush_cache="no", rep=1, warmup=0, memory=False)


def test_a_device_no_timer_can_time_is_refused():
    # meta tensors "ran" in no time: a measured copy of 64 MiB at ~10^14 bytes/s
    with pytest.raises(ValueError, match="device must be a CPU or CUDA device, got 'meta'"):
        measure(torch.add, torch.ones(4, device="meta"), 1, rep=1, warmup=0, memory=False)
    with pytest.raises(ValueError, match="'meta'"):
        measure(lambda: None, device="meta", rep=1, warmup=0, memory=False)


def test_explicit_roofline_counts_of_a_measurement_are_checked():
    m = Measurement(
        name="x", median_ms=2.0, p10_ms=1.0, p90_ms=3.0, mean_ms=2.0, min_ms=1.0, times_ms=[2.0],
        peak_bytes=0, memory_method="skipped", device="cpu", device_name="cpu", dtype=None, versions={},
        copy_bandwidth=1e9, matmul_peak=1e12,
    )
    # pct_copy_bandwidth(-1) printed a negative percentage, achieved_bandwidth("8") a TypeError about '/'
    for bad in (-1, 0, float("nan"), "8"):
        with pytest.raises(ValueError, match="bytes_moved"):
            m.pct_copy_bandwidth(bad)
        with pytest.raises(ValueError, match="bytes_moved"):
            m.achieved_bandwidth(bad)
        with pytest.raises(ValueError, match="flops"):
            m.pct_matmul_peak(bad)
    assert m.achieved_bandwidth(4e6) == pytest.approx(4e6 / 2e-3)  # bytes over the median time in seconds
    assert m.achieved_flops(8e9) == pytest.approx(8e9 / 2e-3)


def test_rss_mode_propagates_an_oserror_of_the_callable():
    """An OSError raised by fn in the RSS call was taken for "no /proc": swallowed, fn called again under the sampler,
    and a measurement came back as if nothing had failed."""
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 2:  # the memory call, after one warm-up call
            raise FileNotFoundError("shard-00002.safetensors")

    with pytest.raises(FileNotFoundError, match="shard-00002"):
        measure(fn, device="cpu", warmup=1, rep=1, memory="rss")
    assert len(calls) == 2
