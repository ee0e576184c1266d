"""Side-by-side comparison of several callables on the same inputs.

``compare({"ours": f, "peer": g}, x, w, bytes_moved=..., flops=...)`` runs the
contestants interleaved in one process (time and peak memory from the same
run, see :mod:`alignlab.bench.timing`) and returns a :class:`Comparison`
that renders as a plain-text or Markdown table, serialises to JSON for
``benchmarks/results/`` and optionally draws a bar chart. A contestant that
raises is reported with its error instead of aborting the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignlab._atomic import write_atomically
from alignlab._checks import user_path
from alignlab.bench.timing import Measurement, format_bytes, library_versions, roofline_count, run_contestants

SCHEMA = "alignlab.bench.comparison/1"
RESULTS_SCHEMA = "alignlab.bench.results/1"


@dataclasses.dataclass
class Comparison:
    """Measurements of several contestants of one run, in the order they were given.

    Ratios are relative to ``baseline``: ``time_ratio(name) = median(name) /
    median(baseline)`` (below 1 means faster than the baseline) and likewise
    ``memory_ratio`` for peak memory.
    """

    results: dict[str, Measurement]
    baseline: str
    name: str | None = None
    bytes_moved: float | None = None
    flops: float | None = None
    copy_bandwidth: float | None = None  # bytes/s
    matmul_peak: float | None = None  # FLOP/s
    peak_dtype: str | None = None  # dtype of the matmul roofline
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    def __post_init__(self) -> None:
        # checked here, not at the first table(): a baseline that is no contestant was a KeyError there
        if not isinstance(self.results, Mapping) or not self.results:
            raise TypeError(f"results must be a non-empty mapping of name -> Measurement, got {self.results!r}")
        for key, m in self.results.items():
            if not isinstance(m, Measurement):
                raise TypeError(f"results[{key!r}] must be a Measurement, got {type(m).__name__}")
        if self.baseline not in self.results:
            raise ValueError(f"baseline must be one of {list(self.results)}, got {self.baseline!r}")

    def __getitem__(self, name: str) -> Measurement:
        return self.results[name]

    def time_ratio(self, name: str) -> float | None:
        base, m = self.results[self.baseline], self.results[name]
        if not (m.ok and base.ok) or not base.median_ms > 0:
            return None
        return m.median_ms / base.median_ms

    def memory_ratio(self, name: str) -> float | None:
        base, m = self.results[self.baseline], self.results[name]
        if not (m.ok and base.ok) or m.peak_bytes is None or not base.peak_bytes:
            return None
        return m.peak_bytes / base.peak_bytes

    def fastest(self) -> str | None:
        """Name of the contestant with the lowest median time (``None`` if all failed)."""
        ok = [m for m in self.results.values() if m.ok]
        return min(ok, key=lambda m: m.median_ms).name if ok else None

    # ---------------------------------------------------------------- rendering
    def _rows(self) -> tuple[list[str], list[list[str]]]:
        base = self.baseline
        header = ["name", "median ms", "p10 ms", "p90 ms", f"time / {base}", "peak mem", f"mem / {base}"]
        if self.bytes_moved is not None:
            header.append("% copy BW")
        if self.flops is not None:
            header.append("% matmul")
        header.append("error")
        rows = []
        for name, m in self.results.items():
            if not m.ok:
                rows.append([name] + ["-"] * (len(header) - 2) + [m.error or ""])
                continue
            row = [
                name,
                f"{m.median_ms:.4g}",
                f"{m.p10_ms:.4g}",
                f"{m.p90_ms:.4g}",
                _fmt_ratio(self.time_ratio(name)),
                "n/a" if m.peak_bytes is None else format_bytes(m.peak_bytes),
                _fmt_ratio(self.memory_ratio(name)),
            ]
            if self.bytes_moved is not None:
                row.append(_fmt_pct(m.pct_copy_bandwidth()))
            if self.flops is not None:
                row.append(_fmt_pct(m.pct_matmul_peak()))
            row.append("")
            rows.append(row)
        if all(not r[-1] for r in rows):  # no errors: drop the empty column
            header.pop()
            rows = [r[:-1] for r in rows]
        # one line per row: a multi-line error message (or name) broke the table and the Markdown row in two
        return [_one_line(h) for h in header], [[_one_line(c) for c in r] for r in rows]

    def _caption(self) -> str:
        first = next(iter(self.results.values()))
        parts = [self.name or "comparison", f"{first.device} ({first.device_name})"]
        if first.dtype:
            parts.append(first.dtype)
        parts.append(f"torch {first.versions.get('torch', '?')}")
        if self.copy_bandwidth:
            parts.append(f"copy BW {self.copy_bandwidth / 1e9:.4g} GB/s")
        if self.matmul_peak:
            parts.append(f"matmul {self.matmul_peak / 1e12:.4g} TFLOP/s ({self.peak_dtype})")
        if self.meta:
            parts.append(", ".join(f"{k}={v}" for k, v in self.meta.items()))
        return _one_line(" | ".join(parts))

    def table(self) -> str:
        """A plain-text table with a one-line caption."""
        header, rows = self._rows()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [self._caption()]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
        return "\n".join(lines)

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table preceded by an italic caption."""
        header, rows = self._rows()
        esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
        lines = [f"*{self._caption()}*", ""]
        lines.append("| " + " | ".join(esc[0]) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in esc[1:])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (schema ``alignlab.bench.comparison/1``)."""
        results = []
        for name, m in self.results.items():
            d = m.to_dict()
            d["time_ratio"] = self.time_ratio(name)
            d["memory_ratio"] = self.memory_ratio(name)
            results.append(d)
        first = next(iter(self.results.values()))
        return _json_safe(
            {
                "schema": SCHEMA,
                "name": self.name,
                "created": self.created,
                "device": first.device,
                "device_name": first.device_name,
                "dtype": first.dtype,
                "versions": first.versions,
                "baseline": self.baseline,
                "bytes_moved": self.bytes_moved,
                "flops": self.flops,
                "roofline": {
                    "copy_bandwidth_bytes_per_s": self.copy_bandwidth,
                    "matmul_flops_per_s": self.matmul_peak,
                    "matmul_dtype": self.peak_dtype,
                },
                "meta": self.meta,
                "fastest": self.fastest(),
                "results": results,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temp file + rename); creates parent folders.

        ``TypeError`` if ``path`` is not a str or ``os.PathLike``, ``ValueError`` if it is a folder; a leading ``~``
        is the home folder."""
        return _atomic_write_text(user_path(path, "path"), self.to_json() + "\n")

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Bar charts of the contestants: median time with p10--p90 whiskers, and peak memory.

        The baseline's bars are drawn in another colour, and each bar is labelled with its
        ratio to the baseline (as in :meth:`table`). The memory panel is drawn when at least one
        contestant's peak memory was measured. Failed contestants are left out.

        Args:
            path: where to save a PNG (written atomically, parent folders created, a leading ``~`` is the
                home folder; the figure is not kept by ``pyplot``). ``None`` (for notebooks): the figure is
                made with ``pyplot``, so Jupyter shows it inline, and returned for further styling.

        Returns:
            ``path`` as a :class:`~pathlib.Path` when given, else the ``matplotlib.figure.Figure``.

        Raises:
            ImportError: matplotlib is not installed (``pip install alignlab[plot]``).
            ValueError: no contestant succeeded (nothing to draw), or ``path`` is a folder.
            TypeError: ``path`` is neither None, a str nor an ``os.PathLike``.
        """
        if path is not None:
            path = user_path(path, "path")
        try:
            import matplotlib  # noqa: F401  (first: a missing matplotlib fails here, not mid-import)
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("Comparison.plot needs matplotlib: pip install 'alignlab[plot]'") from exc
        ok = [m for m in self.results.values() if m.ok]
        if not ok:
            raise ValueError("plot: every contestant failed, there is nothing to draw")
        with_memory = any(m.peak_bytes is not None for m in ok)
        width = max(3.0, 1.2 * len(ok) + 1.5)
        size = (2 * width if with_memory else width, 3.2)
        if path is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=size)
        else:
            fig = Figure(figsize=size)
        axes = fig.subplots(1, 2 if with_memory else 1, squeeze=False)[0]
        names = [m.name for m in ok]
        colors = ["C0" if m.name == self.baseline else "C1" for m in ok]
        xs = list(range(len(ok)))
        ax = axes[0]
        err = [[m.median_ms - m.p10_ms for m in ok], [m.p90_ms - m.median_ms for m in ok]]
        bars = ax.bar(xs, [m.median_ms for m in ok], yerr=err, capsize=4, color=colors)
        ax.bar_label(bars, [_fmt_ratio(self.time_ratio(n)) for n in names], fontsize=8, padding=2)
        ax.set_ylabel("median time (ms)")
        if with_memory:
            ax = axes[1]
            mem = [0.0 if m.peak_bytes is None else m.peak_bytes / 2**20 for m in ok]
            bars = ax.bar(xs, mem, color=colors)
            ax.bar_label(bars, [_fmt_ratio(self.memory_ratio(n)) for n in names], fontsize=8, padding=2)
            ax.set_ylabel("peak memory (MiB)")
        for ax in axes:
            ax.set_xticks(xs, names, rotation=15 if len(ok) > 3 else 0)
            ax.margins(y=0.15)
        fig.suptitle(self.name or "comparison", fontsize=10)
        fig.tight_layout()
        if path is None:
            return fig
        fmt = path.suffix.lstrip(".") or "png"
        return write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt))


def compare(
    contestants: Mapping[str, Callable[..., Any]],
    *args: Any,
    warmup: int = 5,
    rep: int | None = None,
    device: str | torch.device | None = None,
    bytes_moved: float | None = None,
    flops: float | None = None,
    baseline: str | None = None,
    flush_cache: bool = True,
    memory: bool | str = True,
    peak_dtype: torch.dtype | None = None,
    name: str | None = None,
    meta: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Comparison:
    """Measure every contestant on ``(*args, **kwargs)``, interleaved, and compare.

    Args:
        contestants: ``{name: callable}``; the table keeps this order. Each is
            called as ``fn(*args, **kwargs)``; give closures when contestants
            need different inputs (e.g. a peer's own weight format).
        warmup, rep, device, flush_cache, memory: as in :func:`~alignlab.bench.measure`;
            ``rep`` counts interleaved rounds (one timed call of each contestant).
        bytes_moved: the fewest bytes one call must read plus write; adds a
            "% of copy bandwidth" column (:func:`~alignlab.bench.copy_bandwidth`).
        flops: floating-point operations of one call; adds a "% of matmul
            peak" column (:func:`~alignlab.bench.matmul_tflops` in ``peak_dtype``:
            by default the dtype of the first floating-point input, bf16 when there is none).
        baseline: the contestant ratios are taken against (default: the first).
        peak_dtype: a floating-point ``torch.dtype`` for the matmul roofline (see ``flops``).
        name, meta: a title and JSON-ready facts (shapes, ...) stored with the result.

    Returns:
        a :class:`Comparison`. A contestant that raises keeps its row, with
        ``error`` set to ``"Type: message"``; the others run on.

    Raises:
        TypeError: ``contestants`` is not a non-empty mapping of names to callables, ``peak_dtype`` not a
            floating-point ``torch.dtype``, ``name`` not a str or ``meta`` not a mapping.
        ValueError: ``baseline`` is not a contestant, bad ``warmup``/``rep``/``device``,
            or ``bytes_moved``/``flops`` not positive.
    """
    if not isinstance(contestants, Mapping) or not contestants:
        raise TypeError(f"contestants must be a non-empty mapping of name -> callable, got {type(contestants).__name__}")
    if baseline is None:
        baseline = next(iter(contestants))
    if baseline not in contestants:
        raise ValueError(f"baseline must be one of {list(contestants)}, got {baseline!r}")
    bytes_moved, flops = roofline_count(bytes_moved, "bytes_moved"), roofline_count(flops, "flops")
    # checked before the contestants run: a bad one was found only after the whole measurement
    if peak_dtype is not None and (not isinstance(peak_dtype, torch.dtype) or not peak_dtype.is_floating_point):
        raise TypeError(f"peak_dtype must be a floating-point torch.dtype or None, got {peak_dtype!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping of JSON-ready facts or None, got {type(meta).__name__}")

    results = run_contestants(
        contestants,
        args,
        kwargs,
        warmup=warmup,
        rep=rep,
        device=device,
        flush_cache=flush_cache,
        memory=memory,
        catch=True,
    )
    dev = next(iter(results.values())).device
    copy_bw = peak = None
    if bytes_moved is not None:
        from alignlab.bench.roofline import copy_bandwidth

        copy_bw = copy_bandwidth(dev)
    if flops is not None:
        from alignlab.bench.roofline import matmul_tflops

        if peak_dtype is None:
            inferred = next(iter(results.values())).dtype
            peak_dtype = getattr(torch, inferred) if inferred else torch.bfloat16
            if not peak_dtype.is_floating_point:
                peak_dtype = torch.bfloat16
        peak = matmul_tflops(dev, peak_dtype) * 1e12
    for m in results.values():
        m.bytes_moved, m.flops, m.copy_bandwidth, m.matmul_peak = bytes_moved, flops, copy_bw, peak
    return Comparison(
        results=results,
        baseline=baseline,
        name=name,
        bytes_moved=bytes_moved,
        flops=flops,
        copy_bandwidth=copy_bw,
        matmul_peak=peak,
        peak_dtype=None if peak is None else str(peak_dtype).removeprefix("torch."),
        meta=dict(meta or {}),
    )


def save_results(
    path: str | os.PathLike, comparisons: Iterable[Comparison], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write several comparisons (e.g. one per shape) to one JSON file, atomically.

    Schema ``alignlab.bench.results/1``: ``{"schema", "created", "versions",
    "meta", "comparisons": [Comparison.to_dict(), ...]}``. ``comparisons`` may be any iterable
    (a list, a generator over shapes).

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike`` (a leading ``~`` is the home folder);
            ``comparisons`` is a single :class:`Comparison` (put it in a list) or not iterable,
            an item of it is not a :class:`Comparison`, or ``meta`` is not a mapping.
        ValueError: ``path`` is a folder.
    """
    path = user_path(path, "path")
    if isinstance(comparisons, Comparison):  # iterable through __getitem__: it failed with KeyError: 0
        raise TypeError("comparisons must be an iterable of Comparison, got one Comparison (pass [cmp])")
    if isinstance(comparisons, (str, bytes, Mapping)) or not isinstance(comparisons, Iterable):
        raise TypeError(f"comparisons must be an iterable of Comparison, got {type(comparisons).__name__}")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping of JSON-ready facts or None, got {type(meta).__name__}")
    comparisons = list(comparisons)  # read once: a generator checked here was empty when written
    for i, c in enumerate(comparisons):
        if not isinstance(c, Comparison):
            raise TypeError(f"comparisons[{i}] must be a Comparison, got {type(c).__name__}")
    doc = _json_safe(
        {
            "schema": RESULTS_SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "meta": dict(meta or {}),
            "comparisons": [c.to_dict() for c in comparisons],
        }
    )
    return _atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_json(path: str | os.PathLike, doc: Any) -> Path:
    """Write ``doc`` to ``path`` as indented JSON, atomically (temp file, fsync, rename; parent folders created).

    For a script's own results beside :func:`save_results`: values are converted as in a :class:`Comparison`'s
    JSON (non-finite floats to ``null``, NumPy scalars to numbers, dtypes and other objects to strings). A new
    file gets the umask's permissions (the benchmarks' ``mkstemp`` made theirs 0600 and left the temp file
    behind when the write failed), a replaced one keeps its own. A leading ``~`` in ``path`` is the home folder.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        ValueError: ``path`` is a folder.
    """
    path = user_path(path, "path")
    return _atomic_write_text(path, json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")


def _atomic_write_text(path: Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)

    return write_atomically(path, write)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> None, tuples -> lists, NumPy scalars and one-element tensors -> numbers,
    dtypes/devices/paths -> str."""
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":  # np.int64(8192) was written as "8192"
        obj = obj.item()
    elif isinstance(obj, torch.Tensor) and obj.numel() == 1 and not obj.is_complex():
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Size):
        return list(obj)
    return str(obj)


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _fmt_pct(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}%"
