"""Charts of the measured results: time and memory of every contestant, relative to the floor.

    python benchmarks/plot.py [--results benchmarks/results] [--out benchmarks/results/plots]

Reads every ``*.json`` in ``--results`` and writes one PNG per file to ``--out`` (atomically).
The files come in two layouts:

* ``alignlab.bench`` comparisons (``save_results`` / ``Comparison.to_dict``): one panel per
  comparison. The *floor* is the contestant whose name starts with "floor" when there is one, else
  the roofline time from ``bytes_moved`` / measured copy bandwidth and ``flops`` / measured matmul
  peak (the larger of the two), else the baseline contestant.
* the scripts' own layouts (``cross_entropy``, ``preference``, ``qlora_step``, ``host_overhead``,
  ``merging``): the floor each script measured (``floor_ms``, the frozen bf16 step, a plain bf16
  ``nn.Linear`` call), or none (merging: absolute wall time).

A file of another layout is skipped with a note on stderr (teach :func:`panels` its layout).

A panel shows time ÷ floor (1.0 = at the floor) and peak memory per contestant. A file with many
panels and no memory (the NF4 kernel sweeps) becomes one dot chart: a row per panel, a marker per
contestant. Needs matplotlib (``pip install 'alignlab[plot]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from alignlab._atomic import write_atomically
from alignlab._checks import user_path

HERE = Path(__file__).resolve().parent
# Above this many panels a file is drawn as one dot chart instead of a stack of bar charts.
MAX_BAR_PANELS = 4


@dataclasses.dataclass
class Row:
    name: str
    seconds: float | None
    peak_bytes: float | None


@dataclasses.dataclass
class Panel:
    title: str
    rows: list[Row]
    floor_s: float | None  # None: no floor known, times are shown as they are
    floor_label: str
    detail: str = ""  # short facts (shapes) told apart panels of the same title


# ------------------------------------------------------------------------------------ reading
def panels(doc: Any, name: str = "") -> list[Panel]:
    """The panels of one results document (a parsed JSON file); ``ValueError`` for an unknown layout."""
    if not isinstance(doc, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(doc).__name__}")
    comps = doc.get("comparisons")
    if comps is None and isinstance(doc.get("results"), list) and all(_is_comparison(c) for c in doc["results"]):
        comps = doc["results"]  # lora.json: a list of comparisons under "results"
    if comps is not None:
        if not comps:  # e.g. nf4.py --sections eager: its rows are in meta["summary"], no comparison to draw
            raise ValueError(f"{name}: no comparisons to plot")
        out = [_comparison_panel(c) for c in comps]
        titles = [p.title for p in out]
        for p in out:  # the NF4 sweeps repeat "dequant", "M=1", ... once per weight shape
            if titles.count(p.title) > 1 and p.detail:
                p.title = f"{p.title} ({p.detail})"
        return out
    if doc.get("benchmark") == "cross_entropy":
        rows = [Row(r["name"], _s(r.get("median_ms")), r.get("extra_peak_bytes")) for r in doc["results"]]
        return [Panel(_shape_title("fused linear cross-entropy", doc.get("shape")), rows, _s(doc["floor_ms"]), "matmul floor")]
    if "settings" in doc and isinstance(doc["settings"], dict):  # preference.json
        out = []
        for setting, entries in doc["settings"].items():
            rows = [Row(e["name"], _s(e.get("median_ms")), _gib(e.get("extra_peak_gib"))) for e in entries]
            floors = {e["floor_ms"] for e in entries if e.get("floor_ms")}
            out.append(Panel(f"preference loss, {setting}", rows, _s(min(floors)) if floors else None, "matmul floor"))
        return out
    if "steps" in doc:  # qlora_step.json
        groups: dict[tuple, list[dict]] = {}
        for step in doc["steps"]:
            groups.setdefault((step.get("batch"), step.get("compiled")), []).append(step)
        out = []
        for (batch, compiled), steps in groups.items():
            rows = [Row(s["name"], _s(s.get("ms")), _gib(s.get("peak_gib"))) for s in steps]
            floor = next((s for s in steps if s["name"].startswith("floor")), None)
            title = f"QLoRA training step, batch {batch}" + (", compiled" if compiled else "")
            out.append(Panel(title, rows, _s(floor["ms"]) if floor else None, floor["name"] if floor else ""))
        return out
    if "host_us" in doc and "shape" in doc:  # host_overhead.json: host time per eager call, no GPU work timed
        rows = [Row(k, v / 1e6, None) for k, v in doc["host_us"].items()]
        floor = next((r for r in rows if r.name == "bf16 nn.Linear"), None)
        title = _shape_title(f"host time per eager call, {doc.get('device', '')}", doc["shape"])
        return [Panel(title, rows, floor.seconds if floor else None, floor.name if floor else "")]
    if doc.get("benchmark") == "merging":
        out = []
        for run in doc["runs"]:
            rows = [Row(who, run[who]["wall_s"], run[who]["peak_rss_mb"] * 2**20) for who in ("ours", "mergekit") if who in run]
            rows[0].name = "alignlab"
            title = f"merge {run['method']}, {doc.get('checkpoint_gb', '?')} GB checkpoints, {doc.get('device', '')}"
            out.append(Panel(title, rows, None, ""))
        return out
    raise ValueError(f"{name}: unknown results layout (keys {sorted(doc)[:8]})")


def _is_comparison(c: Any) -> bool:
    return isinstance(c, dict) and str(c.get("schema", "")).startswith("alignlab.bench.comparison/")


def _comparison_panel(c: dict) -> Panel:
    meta = c.get("meta") or {}
    detail = " ".join(f"{k}={v}" for k, v in meta.items() if isinstance(v, (int, str)) and len(str(v)) <= 12)
    rows = [Row(r["name"], _s(r.get("median_ms")) if not r.get("error") else None, r.get("peak_bytes")) for r in c["results"]]
    by_name = {r.name: r for r in rows}
    named = next((r for r in rows if r.name.lower().startswith("floor") and r.seconds), None)
    if named is not None:
        return Panel(c["name"], rows, named.seconds, named.name, detail)
    roof = c.get("roofline") or {}
    limits = []
    if c.get("bytes_moved") and roof.get("copy_bandwidth_bytes_per_s"):
        limits.append(c["bytes_moved"] / roof["copy_bandwidth_bytes_per_s"])
    if c.get("flops") and roof.get("matmul_flops_per_s"):
        limits.append(c["flops"] / roof["matmul_flops_per_s"])
    if limits:
        return Panel(c["name"], rows, max(limits), "roofline", detail)
    base = by_name.get(c.get("baseline"))
    if base is not None and base.seconds:
        return Panel(c["name"], rows, base.seconds, base.name, detail)
    return Panel(c["name"], rows, None, "", detail)


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def _gib(gib: float | None) -> float | None:
    return None if gib is None else gib * 2**30


def _shape_title(what: str, shape: Any) -> str:
    if isinstance(shape, dict):
        return what + ", " + " ".join(f"{k}={v}" for k, v in shape.items())
    return what


# ------------------------------------------------------------------------------------ drawing
def figure(title: str, ps: list[Panel]):
    """A matplotlib ``Figure`` (not registered with pyplot) for the panels of one file."""
    from matplotlib.figure import Figure

    has_mem = any(r.peak_bytes for p in ps for r in p.rows)
    if len(ps) > MAX_BAR_PANELS:
        return _dot_chart(Figure, title, ps, has_mem)
    heights = [0.8 + 0.28 * len(p.rows) for p in ps]
    fig = Figure(figsize=(11 if has_mem else 6.5, sum(heights) + 0.6))
    axes = fig.subplots(len(ps), 2 if has_mem else 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for p, (ax_t, *ax_m) in zip(ps, axes):
        ok = [r for r in p.rows if r.seconds is not None]
        ys = list(range(len(ok)))[::-1]
        if p.floor_s:
            vals = [r.seconds / p.floor_s for r in ok]
            ax_t.axvline(1.0, color="k", lw=0.8, ls="--")
            ax_t.set_xlabel(f"time ÷ {_floor_name(p.floor_label)} (1.0 = at the floor)")
        else:
            vals = [r.seconds for r in ok]
            ax_t.set_xlabel("time (s)")
        colors = [_color(r.name, p.floor_label) for r in ok]
        bars = ax_t.barh(ys, vals, color=colors)
        ax_t.bar_label(bars, [f"{v:.2f}" for v in vals], fontsize=7, padding=2)
        ax_t.set_yticks(ys, [r.name for r in ok], fontsize=8)
        ax_t.set_title(p.title, fontsize=9, loc="left")
        ax_t.margins(x=0.15)
        if ax_m:
            ax = ax_m[0]
            mem = [(r.peak_bytes or 0) / 2**30 for r in ok]
            bars = ax.barh(ys, mem, color=colors)
            ax.bar_label(bars, [f"{m:.2f}" if r.peak_bytes is not None else "n/a" for m, r in zip(mem, ok)], fontsize=7, padding=2)
            ax.set_yticks(ys, [""] * len(ok))
            ax.set_xlabel("peak memory (GiB)")
            ax.margins(x=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _dot_chart(Figure, title: str, ps: list[Panel], has_mem: bool):
    contestants = list(dict.fromkeys(r.name for p in ps for r in p.rows))
    fig = Figure(figsize=(12 if has_mem else 8, 1.2 + 0.3 * len(ps)))
    axes = fig.subplots(1, 2 if has_mem else 1, squeeze=False, sharey=True)[0]
    ys = list(range(len(ps)))[::-1]
    for i, who in enumerate(contestants):
        style = {"label": who, "marker": "os^Dv<>Px*"[i % 10], "s": 22, "color": f"C{i % 10}", "zorder": 3}
        t_x, t_y, m_x, m_y = [], [], [], []
        for p, y in zip(ps, ys):
            r = next((r for r in p.rows if r.name == who and r.seconds is not None), None)
            if r is None:
                continue
            t_x.append(r.seconds / p.floor_s if p.floor_s else r.seconds)
            t_y.append(y)
            if r.peak_bytes:
                m_x.append(r.peak_bytes / 2**30)
                m_y.append(y)
        axes[0].scatter(t_x, t_y, **style)
        if has_mem:
            axes[1].scatter(m_x, m_y, **style)
    ax = axes[0]
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    floors = sorted({p.floor_label for p in ps if p.floor_s})
    ax.set_xscale("log")
    ax.set_xlabel(f"time ÷ {' / '.join(_floor_name(f) for f in floors) or 'floor'} (1.0 = at the floor, log scale)")
    ax.set_yticks(ys, [_short(p) for p in ps], fontsize=7)
    if has_mem:
        axes[1].set_xscale("log")
        axes[1].set_xlabel("peak memory (GiB, log scale)")
    for a in axes:
        a.grid(axis="x", which="both", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _floor_name(label: str) -> str:
    return label if label.lower().startswith("floor") else f"floor ({label})"


def _short(p: Panel) -> str:
    return p.title if len(p.title) <= 48 else p.title[:45] + "..."


def _color(name: str, floor_label: str) -> str:
    low = name.lower()
    if name == floor_label or low.startswith("floor"):
        return "0.55"
    return "C0" if "alignlab" in low else "C1"


def _save(fig, path: Path) -> Path:
    # savefig creates the file, so it gets the umask's permissions (a replaced PNG keeps its own); mkstemp
    # made it 0600, which a forced 0644 then overrode whatever the umask or the previous file said
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def plot_all(results: Path, out: Path) -> list[Path]:
    """One PNG per ``*.json`` of a known layout in ``results``, written to ``out``; returns the paths written.

    A leading ``~`` in either path is the home folder.

    Raises:
        ValueError: ``results`` is not a folder or holds no ``*.json``.
        TypeError: ``results`` or ``out`` is not a str or ``os.PathLike``.
    """
    results, out = user_path(results, "results"), user_path(out, "out")
    if not results.is_dir():
        raise ValueError(f"results must be a folder, got {results}")
    files = sorted(results.glob("*.json"))
    if not files:
        raise ValueError(f"results holds no *.json file: {results}")
    written = []
    for f in files:
        try:
            ps = panels(json.loads(f.read_text()), f.name)
        except ValueError as exc:  # a new benchmark's own layout: say so, draw the others
            print(f"skipped {exc}", file=sys.stderr)
            continue
        if ps:
            written.append(_save(figure(f.stem, ps), out / f"{f.stem}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results", help="folder of *.json results")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plots", help="folder for the PNGs")
    args = ap.parse_args(argv)
    for path in plot_all(args.results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
