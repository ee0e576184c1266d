"""benchmarks/plot.py (charts of benchmarks/results/*.json) and ``Comparison.plot()``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from alignlab.bench import Comparison, Measurement, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot_mod():
    spec = importlib.util.spec_from_file_location("benchmarks_plot", ROOT / "benchmarks" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _m(name: str, ms: float, peak: int | None = None, error: str | None = None) -> Measurement:
    return Measurement(
        name=name, median_ms=ms, p10_ms=0.9 * ms, p90_ms=1.1 * ms, mean_ms=ms, min_ms=0.8 * ms, times_ms=[ms] * 3,
        peak_bytes=peak, memory_method="test", device="cpu", device_name="test", dtype="float32",
        versions={"torch": "x"}, error=error,
    )


def _comparison(**kw) -> Comparison:
    results = {m.name: m for m in (_m("ours", 2.0, 3 << 20), _m("peer", 5.0, 8 << 20), _m("broken", float("nan"), error="E: x"))}
    return Comparison(results=results, baseline="peer", name="op", **kw)


def test_plots_every_committed_result_into_a_temp_dir(plot_mod, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'alignlab[plot]')")
    written = plot_mod.plot_all(RESULTS, tmp_path)
    known = []
    for f in sorted(RESULTS.glob("*.json")):
        try:
            plot_mod.panels(json.loads(f.read_text()), f.name)
            known.append(f.stem)
        except ValueError:  # a layout plot.py does not know yet: skipped with a note, not an error
            pass
    assert len(known) >= 14 and sorted(p.stem for p in written) == known
    for p in written:
        assert p.parent == tmp_path and p.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_committed_results_have_a_floor_or_a_reason(plot_mod):
    for f in RESULTS.glob("*.json"):
        doc = json.loads(f.read_text())
        try:
            panels = plot_mod.panels(doc, f.name)
        except ValueError:
            continue
        assert panels, f.name
        for p in panels:
            assert any(r.seconds for r in p.rows), f"{f.name}: {p.title} has no timed contestant"
            # only the merging runs (two whole programs, no roofline) come without a floor
            assert p.floor_s or doc.get("benchmark") == "merging", f"{f.name}: {p.title} has no floor"


def test_unknown_layout_is_skipped_with_a_note(plot_mod, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'alignlab[plot]')")
    (tmp_path / "new.json").write_text(json.dumps({"something": 1}))
    # a comparisons document with none to draw (nf4.py --sections eager keeps its rows in meta["summary"])
    (tmp_path / "eager.json").write_text(json.dumps({"comparisons": [], "meta": {"summary": []}}))
    (tmp_path / "lora.json").write_text((RESULTS / "lora.json").read_text())
    written = plot_mod.plot_all(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["lora.png"]
    err = capsys.readouterr().err
    assert "new.json: unknown results layout" in err and "eager.json" in err


def test_floor_is_the_roofline_when_bytes_or_flops_are_known(plot_mod):
    cmp = _comparison(bytes_moved=4e9, copy_bandwidth=2e12, flops=3e9, matmul_peak=1e12)
    (panel,) = plot_mod.panels({"comparisons": [cmp.to_dict()]})
    assert panel.floor_s == pytest.approx(max(4e9 / 2e12, 3e9 / 1e12))
    assert panel.floor_label == "roofline"
    ours = next(r for r in panel.rows if r.name == "ours")
    assert ours.seconds == pytest.approx(2e-3) and ours.peak_bytes == 3 << 20
    assert next(r for r in panel.rows if r.name == "broken").seconds is None


def test_floor_is_a_contestant_named_floor_else_the_baseline(plot_mod):
    (panel,) = plot_mod.panels({"comparisons": [_comparison().to_dict()]})
    assert (panel.floor_s, panel.floor_label) == (pytest.approx(5e-3), "peer")
    results = {"floor (frozen)": _m("floor (frozen)", 1.5), "ours": _m("ours", 2.0)}
    named = Comparison(results=results, baseline="ours", name="op", flops=1e9, matmul_peak=1e15)
    (panel,) = plot_mod.panels({"results": [named.to_dict()]})  # lora.json's layout
    assert (panel.floor_s, panel.floor_label) == (pytest.approx(1.5e-3), "floor (frozen)")


def test_bad_input_is_refused(plot_mod, tmp_path):
    with pytest.raises(ValueError, match="unknown results layout"):
        plot_mod.panels({"something": 1}, "x.json")
    with pytest.raises(ValueError, match="results"):
        plot_mod.plot_all(tmp_path / "missing", tmp_path)
    with pytest.raises(ValueError, match="no \\*.json"):
        plot_mod.plot_all(tmp_path, tmp_path / "out")


def test_results_md_shows_every_plot():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    shown = set(re.findall(r"\(results/plots/([\w.-]+\.png)\)", text))
    committed = {p.name for p in (RESULTS / "plots").glob("*.png")}
    assert len(committed) >= 14, "benchmarks/results/plots/ is missing its PNGs: run python benchmarks/plot.py"
    assert committed == shown, f"RESULTS.md and results/plots/ disagree: {sorted(committed ^ shown)}"
    stale = committed - {f"{p.stem}.png" for p in RESULTS.glob("*.json")}
    assert not stale, f"plots without a result file: {sorted(stale)}"


def test_comparison_plot_returns_a_pyplot_figure_for_notebooks():
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'alignlab[plot]')")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    fig = _comparison().plot()
    try:
        _check_figure(fig, Figure, plt)
    finally:
        plt.close("all")


def _check_figure(fig, Figure, plt):
    assert isinstance(fig, Figure) and plt.fignum_exists(fig.number)  # pyplot owns it: Jupyter shows it
    time_ax, mem_ax = fig.axes  # memory was measured: a second panel
    assert [t.get_text() for t in time_ax.get_xticklabels()] == ["ours", "peer"]  # the failed one is left out
    heights = [b.get_height() for b in mem_ax.patches]
    assert heights == pytest.approx([3.0, 8.0])  # MiB
    no_mem = Comparison(results={"a": _m("a", 1.0)}, baseline="a")
    assert len(no_mem.plot().axes) == 1


def test_comparison_plot_to_a_file_and_errors(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'alignlab[plot]')")
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    path = _comparison().plot(tmp_path / "sub" / "c.png")
    assert plt.get_fignums() == before, "a figure saved to a file must not stay open in pyplot"
    assert path == tmp_path / "sub" / "c.png" and path.read_bytes()[:8] == PNG
    failed = Comparison(results={"x": _m("x", float("nan"), error="E: y")}, baseline="x")
    with pytest.raises(ValueError, match="every contestant failed"):
        failed.plot()


def test_plots_follow_the_umask_keep_a_replaced_files_mode_and_expand_home(plot_mod, tmp_path, monkeypatch):
    """The PNGs were made with mkstemp and then forced to 0644, whatever the umask or the file they replaced;
    and ``--out ~/plots`` (quoted, or from a config) made a folder named ``~`` in the current one."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'alignlab[plot]')")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    save_results(tmp_path / "res" / "op.json", [_comparison()])
    old = os.umask(0o027)
    try:
        (png,) = plot_mod.plot_all("~/res", "~/plots")
        assert png == tmp_path / "plots" / "op.png" and png.stat().st_mode & 0o777 == 0o640
        os.chmod(png, 0o600)
        plot_mod.plot_all("~/res", "~/plots")
    finally:
        os.umask(old)
    assert png.stat().st_mode & 0o777 == 0o600 and png.read_bytes()[:8] == PNG
    assert not (tmp_path / "~").exists() and sorted(p.name for p in png.parent.iterdir()) == ["op.png"]
