"""Timing and peak-memory measurement of one or several callables.

The core loop is shared by :func:`measure` (one callable) and
:func:`alignlab.bench.compare` (several): every contestant is warmed up, run
once more for its peak memory, then timed over ``rep`` rounds in which the
contestants take turns (rotating who goes first), so slow drifts of the
machine -- clocks, thermals, a noisy neighbour -- hit all of them alike.

Time
    *CUDA*: a pair of CUDA events around each call, after zeroing a buffer
    twice the size of the L2 cache so that no call profits from data the
    previous one left in cache. The times are GPU times between the events.
    *CPU*: ``time.perf_counter`` around each call.

Peak memory above the baseline
    *CUDA*: ``torch.cuda.reset_peak_memory_stats`` then
    ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` taken
    around one call; the output the callable returns counts (it was allocated
    during the call).
    *CPU*: ``tracemalloc`` does **not** see torch tensors (their storage comes
    from c10's allocator, not Python's), and process RSS hides re-used heap
    pages, so one call runs under ``torch.profiler`` with
    ``profile_memory=True`` and the peak of the running sum of its
    allocation events is taken. It counts memory allocated through torch's CPU
    allocator only (not NumPy arrays or Python objects).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_positive_int, check_positive_number, is_int

logger = logging.getLogger(__name__)

# Auto-chosen repetitions aim at this much timed work per contestant.
_TARGET_SECONDS = 0.25
_MIN_REP, _MAX_REP = 10, 2000
# Timed calls queued on the GPU between two host synchronisations.
_SYNC_EVERY = 64


@dataclasses.dataclass
class Measurement:
    """What one callable cost: time distribution, peak memory and context.

    Times are in milliseconds; ``peak_bytes`` is the peak of memory allocated
    above what was allocated just before the call (``None`` when it could not
    be measured, see ``memory_method``). ``error`` holds ``"Type: message"``
    when the callable raised; the numbers are then ``nan``/``None``.
    """

    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    times_ms: list[float]
    peak_bytes: int | None
    memory_method: str
    device: str
    device_name: str
    dtype: str | None
    versions: dict[str, str]
    bytes_moved: float | None = None
    flops: float | None = None
    copy_bandwidth: float | None = None  # bytes/s of the device-to-device copy roofline
    matmul_peak: float | None = None  # FLOP/s of the dense matmul roofline
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def n(self) -> int:
        return len(self.times_ms)

    def achieved_bandwidth(self, bytes_moved: float | None = None) -> float | None:
        """Bytes per second at the median time, for ``bytes_moved`` (read + written) per call.

        Raises ``ValueError`` when ``bytes_moved`` is given and is not a positive number."""
        bytes_moved = self.bytes_moved if bytes_moved is None else roofline_count(bytes_moved, "bytes_moved")
        if bytes_moved is None or not self.ok or not self.median_ms > 0:
            return None
        return bytes_moved / (self.median_ms * 1e-3)

    def achieved_flops(self, flops: float | None = None) -> float | None:
        """Floating-point operations per second at the median time.

        Raises ``ValueError`` when ``flops`` is given and is not a positive number."""
        flops = self.flops if flops is None else roofline_count(flops, "flops")
        if flops is None or not self.ok or not self.median_ms > 0:
            return None
        return flops / (self.median_ms * 1e-3)

    def pct_copy_bandwidth(self, bytes_moved: float | None = None) -> float | None:
        """``100 * (bytes_moved / median_time) / copy_bandwidth``.

        ``bytes_moved`` counts bytes read plus bytes written by one call (the
        fewest the operation needs), the same way :func:`copy_bandwidth`
        counts a copy. Measures the roofline on first use when not set.
        """
        achieved = self.achieved_bandwidth(bytes_moved)
        if achieved is None:
            return None
        if self.copy_bandwidth is None:
            from alignlab.bench.roofline import copy_bandwidth

            self.copy_bandwidth = copy_bandwidth(self.device)
        return 100.0 * achieved / self.copy_bandwidth

    def pct_matmul_peak(self, flops: float | None = None) -> float | None:
        """``100 * (flops / median_time) / matmul_peak`` (bf16 dense matmul unless set otherwise)."""
        achieved = self.achieved_flops(flops)
        if achieved is None:
            return None
        if self.matmul_peak is None:
            from alignlab.bench.roofline import matmul_tflops

            self.matmul_peak = matmul_tflops(self.device) * 1e12
        return 100.0 * achieved / self.matmul_peak

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``nan`` becomes ``None``)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        out["n"] = self.n
        out["pct_copy_bandwidth"] = self.pct_copy_bandwidth() if self.copy_bandwidth else None
        out["pct_matmul_peak"] = self.pct_matmul_peak() if self.matmul_peak else None
        return out

    def __str__(self) -> str:
        if not self.ok:
            return f"{self.name}: error {self.error}"
        mem = "n/a" if self.peak_bytes is None else format_bytes(self.peak_bytes)
        return (
            f"{self.name}: median {self.median_ms:.4g} ms (p10 {self.p10_ms:.4g}, p90 {self.p90_ms:.4g},"
            f" n={self.n}), peak memory {mem} on {self.device}"
        )


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def measure(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 5,
    rep: int | None = None,
    device: str | torch.device | None = None,
    bytes_moved: float | None = None,
    flops: float | None = None,
    flush_cache: bool = True,
    memory: bool | str = True,
    name: str | None = None,
    **kwargs: Any,
) -> Measurement:
    """Time ``fn(*args, **kwargs)`` and take its peak memory.

    Args:
        fn: the callable; its return value is dropped after each call.
        *args, **kwargs: passed to ``fn`` unchanged on every call (keyword
            arguments named like the options below cannot be passed; wrap
            ``fn`` in a lambda then).
        warmup: untimed calls first (compilation, autotuning, caches); with
            ``warmup=0`` and ``rep=None`` one call still runs to size ``rep``.
        rep: timed calls; ``None`` picks enough for about 0.25 s of work,
            between 10 and 2000.
        device: where ``fn`` runs; inferred from the first tensor in ``args``
            / ``kwargs``, else CUDA when available, else CPU.
        bytes_moved: bytes one call must read plus write, for
            :meth:`Measurement.pct_copy_bandwidth`.
        flops: floating-point operations of one call, for
            :meth:`Measurement.pct_matmul_peak`.
        flush_cache: on CUDA, clear the L2 cache before each timed call.
        memory: ``True`` takes peak memory from the allocator of ``device``
            (one extra call; on CPU under the profiler); ``"rss"`` takes the
            peak resident set size of the whole process instead (Linux; counts
            NumPy, mmapped files and other threads too); ``False`` skips it.
        name: label of the result (default ``fn.__name__``).

    Returns:
        a :class:`Measurement`. Unlike :func:`~alignlab.bench.compare`, an
        exception raised by ``fn`` propagates.

    Raises:
        ValueError: ``warmup < 0``, ``rep < 1``, ``bytes_moved``/``flops`` not a positive number, ``memory`` a
            string other than ``"rss"``, or ``device`` (given or inferred) neither CPU nor CUDA (``meta`` tensors take
            no time to time).
        TypeError: ``fn`` is not callable, ``name`` not a str, or ``flush_cache`` not a bool; ``warmup``/``rep`` not
            ints, ``bytes_moved``/``flops`` not real numbers, or ``memory`` neither a bool nor a str (an int such as
            ``1`` included) (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    bytes_moved, flops = roofline_count(bytes_moved, "bytes_moved"), roofline_count(flops, "flops")
    label = name or getattr(fn, "__name__", None) or type(fn).__name__
    results = run_contestants(
        {label: fn},
        args,
        kwargs,
        warmup=warmup,
        rep=rep,
        device=device,
        flush_cache=flush_cache,
        memory=memory,
        catch=False,
    )
    m = results[label]
    m.bytes_moved, m.flops = bytes_moved, flops
    return m


def roofline_count(value: Any, label: str) -> int | float | None:
    """``bytes_moved`` / ``flops`` as a Python ``int`` or ``float`` (``None`` stays ``None``).

    Any positive finite real number counts, NumPy scalars included (``2 * np.prod(shape)``
    is an ``np.int64``); a bool, a string, zero, a negative, NaN or infinity is a
    ``ValueError`` naming ``label``: it would print a meaningless percentage.
    """
    if value is None:
        return None
    return check_positive_number(value, label)


def _memory_mode(memory: Any) -> bool | str:
    """``memory`` as ``True``, ``False`` or ``"rss"``: a bool (NumPy bools too, from a sweep) or that string.

    :class:`~alignlab.ArgumentTypeError` naming ``memory`` for anything else that is not a str (``1`` equals ``True``
    and passed for it, ``0`` for ``False``), ``ValueError`` for another string (``"RSS"``, ``"allocator"``); both
    list what is accepted.
    """
    if isinstance(memory, (bool, np.bool_)):
        return as_bool(memory, "memory")
    if isinstance(memory, str) and memory == "rss":
        return memory
    kind = ValueError if isinstance(memory, str) else ArgumentTypeError
    raise kind(f"memory must be True, False (a bool or NumPy bool) or the string 'rss', got {memory!r}")


def run_contestants(
    contestants: Mapping[str, Callable[..., Any]],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    warmup: int,
    rep: int | None,
    device: str | torch.device | None,
    flush_cache: bool,
    memory: bool | str,
    catch: bool,
) -> dict[str, Measurement]:
    """Warm up, take peak memory, then time all contestants in interleaved rounds.

    With ``catch=True`` a contestant that raises is dropped from the rest of the
    run and reported with its error; otherwise the exception propagates.
    """
    if not isinstance(contestants, Mapping) or not contestants:
        raise TypeError("contestants must be a non-empty mapping of name -> callable")
    for key, fn in contestants.items():
        if not isinstance(key, str):
            raise TypeError(f"contestant names must be str, got {type(key).__name__}")
        if not callable(fn):
            raise TypeError(f"contestant {key!r} must be callable, got {type(fn).__name__}")
    if not is_int(warmup) or warmup < 0:
        kind = ValueError if is_int(warmup) else ArgumentTypeError
        raise kind(f"warmup must be an int >= 0, got {warmup!r}")
    warmup, rep = int(warmup), check_positive_int(rep, "rep", allow_none=True)
    flush_cache = as_bool(flush_cache, "flush_cache")

    memory = _memory_mode(memory)
    dev = _resolve_device(device, args, kwargs)
    timer = _CudaTimer(dev, flush_cache) if dev.type == "cuda" else _CpuTimer()
    errors: dict[str, str] = {}
    live = list(contestants)

    def call(key: str) -> Callable[[], float] | None:
        """One timed call; returns a reader of its time, or ``None`` when it raised."""
        try:
            return timer.time(contestants[key], args, kwargs)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            if not catch:
                raise
            errors[key] = f"{type(exc).__name__}: {exc}"
            logger.warning("benchmark contestant %r raised %s", key, errors[key])
            live.remove(key)
            _release(dev)
            return None

    # Warm-up, interleaved like the timed rounds; it also estimates the cost
    # of one call for the automatic choice of ``rep``.
    estimates: dict[str, list[Callable[[], float]]] = {key: [] for key in live}
    for _ in range(warmup if warmup or rep is not None else 1):
        for key in list(live):
            handle = call(key)
            if handle is not None:
                estimates[key].append(handle)
    timer.sync()

    peaks: dict[str, tuple[int | None, str]] = {}
    for key in list(live) if memory else []:
        try:
            if memory == "rss":
                peaks[key] = _rss_peak(contestants[key], args, kwargs)
            else:
                peaks[key] = _peak_memory(contestants[key], args, kwargs, dev)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            if not catch:
                raise
            errors[key] = f"{type(exc).__name__}: {exc}"
            live.remove(key)
            _release(dev)

    if rep is None:
        per_round = sum(float(np.median([h() for h in estimates[k][-3:]])) for k in live if estimates[k]) * 1e-3
        rep = _MAX_REP if per_round <= 0 else int(_TARGET_SECONDS * len(live) / per_round)
        rep = min(max(rep, _MIN_REP), _MAX_REP)

    handles: dict[str, list[Callable[[], float]]] = {key: [] for key in contestants}
    queued = 0
    for r in range(rep):
        if not live:
            break
        # Rotate who goes first so no contestant always follows the same one.
        shift = r % len(live)
        for key in live[shift:] + live[:shift]:
            if key in live:
                handle = call(key)
                if handle is not None:
                    handles[key].append(handle)
                    queued += 1
        # Sync only every few dozen calls: the GPU never idles between calls
        # (no launch gaps, steady clocks), yet the host never runs far ahead.
        if queued >= _SYNC_EVERY:
            timer.sync()
            queued = 0
    timer.sync()

    dtype = _infer_dtype(args, kwargs)
    versions = library_versions()
    device_name = _device_name(dev)
    out: dict[str, Measurement] = {}
    for key in contestants:
        ts = [h() for h in handles[key]] if key not in errors else []
        if ts:
            p10, p50, p90 = (float(v) for v in np.percentile(ts, [10, 50, 90]))
            mean, low = float(np.mean(ts)), float(np.min(ts))
        else:
            p10 = p50 = p90 = mean = low = float("nan")
        peak, method = peaks.get(key, (None, "unavailable" if memory else "skipped"))
        if key in errors:  # a contestant that failed while timed has no numbers, its memory neither
            peak = None
        out[key] = Measurement(
            name=key,
            median_ms=p50,
            p10_ms=p10,
            p90_ms=p90,
            mean_ms=mean,
            min_ms=low,
            times_ms=[float(t) for t in ts],
            peak_bytes=peak,
            memory_method=method,
            device=str(dev),
            device_name=device_name,
            dtype=dtype,
            versions=versions,
            error=errors.get(key),
        )
    return out


class _CpuTimer:
    def time(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Callable[[], float]:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        elapsed = (time.perf_counter() - start) * 1e3
        del out
        return lambda: elapsed

    def sync(self) -> None:
        """CPU times are final when taken."""


class _CudaTimer:
    """Event-pair timing; the events are read only after ``sync``."""

    def __init__(self, device: torch.device, flush_cache: bool):
        self.device = device
        self.flush = None
        if flush_cache:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.flush = torch.empty(2 * l2, dtype=torch.int8, device=device)

    def time(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Callable[[], float]:
        with torch.cuda.device(self.device):
            if self.flush is not None:
                self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            del out
        return lambda: start.elapsed_time(end)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


def _peak_memory(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], device: torch.device
) -> tuple[int | None, str]:
    """Peak bytes allocated above the baseline during one call, and how it was taken."""
    gc.collect()
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del out
        return int(peak), "cuda_max_memory_allocated"
    if device.type == "cpu":
        return _cpu_peak_memory(fn, args, kwargs)
    out = fn(*args, **kwargs)
    del out
    return None, "unavailable"


def _cpu_peak_memory(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[int | None, str]:
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # Some torch versions warn about profiler cycles on every use; irrelevant to one call.
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*", category=UserWarning)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*args, **kwargs)
            del out
    try:
        # The event tree carries every allocation/free with its timestamp;
        # the public ``prof.events()`` folds allocations into their ops and
        # loses the order needed for a peak.
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except Exception as exc:  # noqa: BLE001 - private API, degrade gracefully
        warnings.warn(f"CPU peak memory unavailable ({exc}); reporting None", RuntimeWarning, stacklevel=3)
        return None, "unavailable"
    events: list[tuple[int, int]] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        extra = node.extra_fields
        size = getattr(extra, "alloc_size", None)
        if size is not None and str(getattr(extra, "device", "cpu")).startswith("cpu"):
            events.append((node.start_time_ns, int(size)))
    events.sort()
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak, "torch_profiler_cpu"


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _rss_peak(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int | None, str]:
    """Peak RSS above the RSS before the call.

    Linux keeps the high-water mark ``VmHWM`` and resets it to the current
    RSS when "5" is written to ``/proc/self/clear_refs``: exact, no sampling.
    Where that is refused, a thread samples RSS every millisecond (psutil),
    which can miss peaks shorter than that.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        base = _read_status_kib("VmRSS")
    except OSError:
        base = None
    if base is not None:
        # fn outside the try: an OSError of its own (a missing file) was taken for "no /proc", swallowed, and fn
        # called again under the sampler
        out = fn(*args, **kwargs)
        peak = _read_status_kib("VmHWM")
        del out
        return max(peak - base, 0) * 1024, "rss_hwm"
    try:
        import psutil
    except ImportError:
        warnings.warn("memory='rss' needs Linux /proc or psutil; reporting None", RuntimeWarning, stacklevel=3)
        out = fn(*args, **kwargs)
        del out
        return None, "unavailable"
    import threading

    proc = psutil.Process()
    base = proc.memory_info().rss
    high = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            high[0] = max(high[0], proc.memory_info().rss)
            done.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn(*args, **kwargs)
        high[0] = max(high[0], proc.memory_info().rss)
        del out
    finally:
        done.set()
        thread.join()
    return max(high[0] - base, 0), "rss_sampled"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()


def _resolve_device(
    device: str | torch.device | None, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> torch.device:
    if device is None:
        first = next(_tensors((args, kwargs)), None)
        if first is not None:
            dev = first.device
        else:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        # no timer knows when work on such a device ends: "meta" ops take no time at all (a copy
        # "ran" at 10^14 bytes/s), others run asynchronously behind perf_counter
        raise ValueError(f"device must be a CPU or CUDA device, got {str(dev)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is CUDA but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _infer_dtype(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    tensors = list(_tensors((args, kwargs)))
    for t in tensors:
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return str(tensors[0].dtype).removeprefix("torch.") if tensors else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=1)
def _static_versions() -> tuple[tuple[str, str], ...]:
    import alignlab

    # alignlab's own version from the import, so a source checkout on PYTHONPATH reports it too.
    found = {"python": platform.python_version(), "torch": torch.__version__, "alignlab": alignlab.__version__}
    for dist in ("triton", "transformers", "peft", "bitsandbytes", "trl", "liger-kernel"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return tuple(found.items())


def library_versions() -> dict[str, str]:
    """Versions of Python, torch, CUDA, alignlab and the peer libraries that are installed.

    Read from package metadata, so measuring never imports a peer library.
    """
    return dict(_static_versions())
