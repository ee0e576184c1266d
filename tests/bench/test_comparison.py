"""compare(): ordering, interleaving, errors, tables, JSON schema, plot."""

import importlib.util
import json
import os
import sys
import time

import pytest
import torch

from alignlab.bench import Comparison, compare, save_results


def _sleeper(seconds):
    def fn():
        time.sleep(seconds)

    return fn


def test_results_keep_input_order_and_rank_by_time():
    cmp = compare({"slow": _sleeper(0.010), "fast": _sleeper(0.0005)}, device="cpu", warmup=1, rep=5, memory=False)
    assert list(cmp.results) == ["slow", "fast"]
    slow, fast = cmp["slow"], cmp["fast"]
    # time.sleep never returns early, so the medians are bounded below by the sleep.
    assert slow.median_ms >= 10.0 and fast.median_ms >= 0.5
    assert slow.median_ms > fast.median_ms
    assert cmp.fastest() == "fast"
    assert cmp.baseline == "slow"
    assert cmp.time_ratio("slow") == pytest.approx(1.0)
    assert cmp.time_ratio("fast") == pytest.approx(fast.median_ms / slow.median_ms)
    assert cmp.time_ratio("fast") < 1.0
    for m in (slow, fast):
        assert m.n == 5 and m.p10_ms <= m.median_ms <= m.p90_ms


def test_contestants_are_interleaved_and_rotated():
    log = []

    def make(name):
        def fn():
            log.append(name)

        return fn

    compare({k: make(k) for k in "abc"}, device="cpu", warmup=0, rep=6, memory=False)
    assert len(log) == 18
    rounds = [log[i : i + 3] for i in range(0, 18, 3)]
    for r in rounds:  # every round calls each contestant once
        assert sorted(r) == ["a", "b", "c"]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]  # the leader rotates
    assert all(x != y for x, y in zip(log, log[1:]))  # never the same one twice in a row


def test_time_and_memory_come_from_the_same_run():
    calls = {"x": 0}

    def fn(t):
        calls["x"] += 1
        return t * 2

    t = torch.ones(1000)
    cmp = compare({"x": fn}, t, warmup=2, rep=3)
    # 2 warm-up + 1 memory + 3 timed calls, all inside one compare().
    assert calls["x"] == 6
    # the output, plus a few bytes for the scalar 2 that torch wraps into a 0-d tensor
    assert t.nbytes <= cmp["x"].peak_bytes <= t.nbytes + 64
    assert cmp["x"].memory_method == "torch_profiler_cpu"


def test_erroring_contestant_is_reported_not_raised():
    def boom(x):
        raise RuntimeError("shape mismatch on purpose")

    x = torch.ones(10)
    cmp = compare({"ours": lambda x: x + 1, "broken": boom, "peer": lambda x: x * 2}, x, warmup=1, rep=3)
    assert cmp["broken"].error == "RuntimeError: shape mismatch on purpose"
    assert not cmp["broken"].ok and cmp["broken"].n == 0
    assert cmp["ours"].ok and cmp["peer"].ok and cmp["peer"].n == 3
    table = cmp.table()
    assert "RuntimeError: shape mismatch on purpose" in table
    assert "| broken |" in cmp.markdown()
    assert cmp.time_ratio("broken") is None
    doc = json.loads(cmp.to_json())
    broken = next(r for r in doc["results"] if r["name"] == "broken")
    assert broken["median_ms"] is None and broken["error"].startswith("RuntimeError")


def test_contestant_failing_midway_keeps_nothing_partial():
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] > 3:
            raise ValueError("ran out")

    cmp = compare({"ok": lambda: None, "flaky": flaky}, device="cpu", warmup=1, rep=5, memory=False)
    assert cmp["flaky"].error == "ValueError: ran out" and cmp["flaky"].times_ms == []
    assert cmp["ok"].n == 5


def test_table_columns_and_roofline_percentages():
    a = torch.randn(64, 64)
    cmp = compare(
        {"mm": torch.matmul, "mm2": lambda a, b: (a @ b).clone()},
        a,
        a,
        rep=3,
        warmup=1,
        bytes_moved=3 * a.nbytes,
        flops=2 * 64**3,
        name="matmul 64",
        meta={"shape": (64, 64)},
    )
    header = cmp.table().splitlines()[1]
    for col in ("median ms", "p10 ms", "p90 ms", "time / mm", "peak mem", "mem / mm", "% copy BW", "% matmul"):
        assert col in header
    assert "error" not in header
    m = cmp["mm"]
    expected = 100 * (3 * a.nbytes / (m.median_ms * 1e-3)) / cmp.copy_bandwidth
    assert m.pct_copy_bandwidth() == pytest.approx(expected)
    assert cmp.peak_dtype == "float32"  # roofline in the inputs' dtype
    expected = 100 * (2 * 64**3 / (m.median_ms * 1e-3)) / cmp.matmul_peak
    assert m.pct_matmul_peak() == pytest.approx(expected)
    md = cmp.markdown().splitlines()
    assert md[0].startswith("*matmul 64") and md[2].startswith("| name |") and md[3].startswith("|---|")


_RESULT_KEYS = {
    "name": str, "median_ms": float, "p10_ms": float, "p90_ms": float, "mean_ms": float, "min_ms": float,
    "times_ms": list, "n": int, "peak_bytes": int, "memory_method": str, "device": str, "device_name": str,
    "dtype": str, "versions": dict, "bytes_moved": int, "flops": type(None), "copy_bandwidth": float,
    "matmul_peak": type(None), "pct_copy_bandwidth": float, "pct_matmul_peak": type(None),
    "time_ratio": float, "memory_ratio": float, "error": type(None),
}


def test_json_schema_and_atomic_save(tmp_path):
    x = torch.ones(256)
    cmp = compare({"a": lambda x: x + 1, "b": lambda x: x.clone() * 3}, x, rep=3, warmup=1, bytes_moved=2 * x.nbytes,
                  meta={"shape": torch.Size([256]), "dtype": torch.float32})
    path = cmp.save_json(tmp_path / "sub" / "r.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temp file left
    doc = json.loads(path.read_text())
    assert doc["schema"] == "alignlab.bench.comparison/1"
    assert set(doc) == {"schema", "name", "created", "device", "device_name", "dtype", "versions", "baseline",
                        "bytes_moved", "flops", "roofline", "meta", "fastest", "results"}
    assert doc["meta"] == {"shape": [256], "dtype": "torch.float32"}
    assert doc["device"] == "cpu" and doc["dtype"] == "float32" and doc["baseline"] == "a"
    assert {"torch", "python", "alignlab"} <= set(doc["versions"])
    assert doc["roofline"]["copy_bandwidth_bytes_per_s"] > 0 and doc["roofline"]["matmul_flops_per_s"] is None
    assert [r["name"] for r in doc["results"]] == ["a", "b"]
    for r in doc["results"]:
        for key, typ in _RESULT_KEYS.items():
            assert isinstance(r[key], typ), (key, r[key])
        assert len(r["times_ms"]) == r["n"] == 3

    out = save_results(tmp_path / "all.json", [cmp, cmp], meta={"script": "test"})
    all_doc = json.loads(out.read_text())
    assert all_doc["schema"] == "alignlab.bench.results/1" and len(all_doc["comparisons"]) == 2
    with pytest.raises(TypeError, match=r"comparisons\[0\]"):
        save_results(tmp_path / "bad.json", [doc])


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    path = cmp.save_json(tmp_path / "r.json")
    before = path.read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("alignlab.bench.comparison.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        cmp.save_json(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_umask_permissions(tmp_path, umask):
    """JSON and plot files are readable as the umask allows, like any file the user writes (not 0600)."""
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    old = os.umask(umask)
    try:
        paths = [cmp.save_json(tmp_path / "r.json"), save_results(tmp_path / "all.json", [cmp])]
        if importlib.util.find_spec("matplotlib") is not None:
            paths.append(cmp.plot(tmp_path / "p.png"))
    finally:
        os.umask(old)
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp file left


def test_bad_arguments():
    with pytest.raises(TypeError, match="contestants"):
        compare([lambda: None])
    with pytest.raises(TypeError, match="contestants"):
        compare({})
    with pytest.raises(TypeError, match="'f' must be callable"):
        compare({"f": 3}, device="cpu")
    with pytest.raises(ValueError, match="baseline"):
        compare({"f": lambda: None}, baseline="g")
    with pytest.raises(ValueError, match="bytes_moved"):
        compare({"f": lambda: None}, bytes_moved=-1)
    with pytest.raises(ValueError, match="flops"):
        compare({"f": lambda: None}, flops=float("nan"))


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    cmp = compare({"a": lambda: None, "b": _sleeper(0.0005)}, device="cpu", rep=3, warmup=0, memory=False)
    path = cmp.plot(tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"alignlab\[plot\]"):
        cmp.plot(tmp_path / "p.png")


def test_comparison_is_constructible_from_measurements():
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    again = Comparison(results=cmp.results, baseline="a")
    assert again.table().splitlines()[2:] == cmp.table().splitlines()[2:]


@pytest.mark.cuda
def test_cuda_oom_contestant_is_reported_and_others_run():
    x = torch.ones(1 << 20, device="cuda")

    def huge(x):
        return torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB

    cmp = compare({"ok": lambda x: x * 2, "huge": huge}, x, warmup=2, rep=10, bytes_moved=2 * x.nbytes)
    assert cmp["huge"].error.startswith("OutOfMemoryError")
    ok = cmp["ok"]
    assert ok.n == 10 and ok.peak_bytes == x.nbytes and ok.memory_method == "cuda_max_memory_allocated"
    assert 0 < ok.pct_copy_bandwidth() < 110


def test_numpy_counts_are_accepted_and_written_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    x = torch.randn(16, 16)
    cmp = compare({"mm": torch.matmul}, x, x, rep=2, warmup=0, memory=False,
                  flops=2 * np.prod(x.shape) * 16, bytes_moved=np.int64(3 * x.nbytes))
    assert cmp.flops == 2 * 16**3 and cmp.bytes_moved == 3 * x.nbytes
    data = json.loads(cmp.to_json())
    assert data["flops"] == 2 * 16**3 and data["results"][0]["bytes_moved"] == 3 * x.nbytes


def _fails_after(calls):
    state = {"n": 0}

    def fn():
        state["n"] += 1
        if state["n"] > calls:
            raise ValueError("first line\nsecond line")
        return torch.ones(1000)

    return fn


def test_multi_line_errors_stay_on_their_row():
    # the newline of the message split the row: a table line and a Markdown row with no leading "|"
    cmp = compare({"ok": lambda: None, "bad": _fails_after(0)}, device="cpu", warmup=1, rep=2, memory=False)
    assert cmp["bad"].error == "ValueError: first line\nsecond line"  # kept whole in the result and the JSON
    table = cmp.table().splitlines()
    assert len(table) == 3 + 2 and table[-1].startswith("bad") and table[-1].endswith("first line second line")
    md = cmp.markdown().splitlines()
    assert len(md) == 4 + 2 and all(line.startswith("|") for line in md[2:])
    assert md[-1].startswith("| bad |") and md[-1].endswith("| ValueError: first line second line |")


def test_a_contestant_failing_after_its_memory_run_has_no_memory_either():
    # warm-up and the memory call pass, the timed calls fail: its peak stayed, and the others'
    # memory ratios were taken against a failed baseline ("mem / bad 0.01x" beside "time / bad -")
    cmp = compare({"bad": _fails_after(2), "ok": lambda: torch.ones(10)}, device="cpu", warmup=1, rep=3)
    bad, ok = cmp["bad"], cmp["ok"]
    assert not bad.ok and bad.peak_bytes is None and bad.n == 0
    assert ok.ok and ok.peak_bytes == 40
    assert cmp.memory_ratio("ok") is None and cmp.memory_ratio("bad") is None and cmp.time_ratio("ok") is None
    doc = json.loads(cmp.to_json())["results"]
    assert doc[0]["peak_bytes"] is None and doc[0]["memory_ratio"] is None


def test_save_results_takes_any_iterable_and_refuses_one_comparison(tmp_path):
    cmps = [compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False, name=f"n={n}")
            for n in (1, 2)]
    # a generator was consumed by the type check and an empty "comparisons" list was written
    out = save_results(tmp_path / "gen.json", (c for c in cmps))
    assert [c["name"] for c in json.loads(out.read_text())["comparisons"]] == ["n=1", "n=2"]
    with pytest.raises(TypeError, match=r"one Comparison \(pass \[cmp\]\)"):  # was KeyError: 0
        save_results(tmp_path / "one.json", cmps[0])
    for bad in (None, "abc", {"a": cmps[0]}):
        with pytest.raises(TypeError, match="comparisons must be an iterable of Comparison"):
            save_results(tmp_path / "bad.json", bad)
    with pytest.raises(TypeError, match="meta must be a mapping"):
        save_results(tmp_path / "bad.json", cmps, meta=[("a", 1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.json"]


def test_numpy_and_tensor_scalars_in_meta_are_numbers():
    np = pytest.importorskip("numpy")
    meta = {"tokens": np.int64(8192), "scale": np.float32(0.5), "flag": np.bool_(True), "loss": torch.tensor(2.5),
            "rows": torch.tensor([3]), "shape": torch.Size([2, 3]), "dtype": torch.bfloat16, "big": torch.ones(2)}
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False, meta=meta)
    doc = json.loads(cmp.to_json())["meta"]
    assert doc == {"tokens": 8192, "scale": 0.5, "flag": True, "loss": 2.5, "rows": 3, "shape": [2, 3],
                   "dtype": "torch.bfloat16", "big": str(torch.ones(2))}
    assert type(doc["tokens"]) is int and type(doc["flag"]) is bool


def test_peak_dtype_name_and_meta_are_checked_before_anything_runs():
    calls = []
    f = {"f": lambda: calls.append(1)}
    with pytest.raises(TypeError, match="peak_dtype must be a floating-point torch.dtype or None, got 'bf16'"):
        compare(f, device="cpu", rep=2, warmup=0, memory=False, flops=10, peak_dtype="bf16")
    with pytest.raises(TypeError, match="peak_dtype"):
        compare(f, device="cpu", rep=2, warmup=0, memory=False, flops=10, peak_dtype=torch.int8)
    with pytest.raises(TypeError, match="name must be a str"):
        compare(f, device="cpu", rep=2, warmup=0, memory=False, name=3)
    with pytest.raises(TypeError, match="meta must be a mapping"):
        compare(f, device="cpu", rep=2, warmup=0, memory=False, meta="shape=4")
    assert calls == []  # refused before the first call (was: after every contestant had been timed)


@pytest.mark.parametrize("stem", ["r" * 250, "结果" * 41])  # 255 and 251 bytes with ".json": valid names
def test_results_with_long_file_names_are_saved(tmp_path, stem):
    # the temp file's name was the target's plus 18 characters, past the 255 bytes a name may have
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    name = stem + ".json"
    path = cmp.save_json(tmp_path / name)
    assert json.loads(path.read_text())["schema"] == "alignlab.bench.comparison/1"
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_write_json_is_atomic_readable_and_strict(tmp_path, umask):
    # the benchmarks wrote their own reports through mkstemp: 0600 files, and the temp file left behind on error
    np = pytest.importorskip("numpy")
    from alignlab.bench import write_json

    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "sub" / "report.json", {"ms": float("nan"), "n": np.int64(3),
                                                            "dtype": torch.bfloat16, "shape": (2, 3)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads(path.read_text()) == {"ms": None, "n": 3, "dtype": "torch.bfloat16", "shape": [2, 3]}
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        write_json(None, {})

    class Unwritable:
        def __str__(self):
            raise RuntimeError("cannot describe myself")

    before = path.read_text()
    with pytest.raises(RuntimeError, match="cannot describe"):
        write_json(path, {"x": Unwritable()})
    assert path.read_text() == before and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_comparison_built_by_hand_is_checked():
    # Comparison(results, baseline="b") with no contestant "b" failed only at table(), with KeyError: 'b'
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    with pytest.raises(ValueError, match=r"baseline must be one of \['a'\], got 'b'"):
        Comparison(results=cmp.results, baseline="b")
    with pytest.raises(TypeError, match="results must be a non-empty mapping"):
        Comparison(results={}, baseline="a")
    with pytest.raises(TypeError, match=r"results\['a'\] must be a Measurement, got dict"):
        Comparison(results={"a": cmp["a"].to_dict()}, baseline="a")


def test_saves_expand_the_home_folder_and_keep_a_replaced_files_mode(tmp_path, monkeypatch):
    """``save_json("~/r.json")`` wrote ``./~/r.json``; replacing a private 0600 file made it the umask's 0644;
    ``save_json(None)`` failed inside pathlib without naming the argument."""
    from alignlab.bench import write_json

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    home = tmp_path / "home"
    saves = [lambda: cmp.save_json("~/r.json"), lambda: save_results("~/all.json", [cmp]),
             lambda: write_json("~/w.json", {"a": 1})]
    if importlib.util.find_spec("matplotlib") is not None:
        saves.append(lambda: cmp.plot("~/p.png"))
    old = os.umask(0o022)
    try:
        paths = [save() for save in saves]
        assert paths[:3] == [home / "r.json", home / "all.json", home / "w.json"]
        for path in paths:
            os.chmod(path, 0o600)
        assert [save() for save in saves] == paths
    finally:
        os.umask(old)
    assert not (tmp_path / "~").exists()
    assert {p.name: p.stat().st_mode & 0o777 for p in home.iterdir()} == {p.name: 0o600 for p in paths}
    for save in (cmp.save_json, lambda p: save_results(p, [cmp]), cmp.plot):
        with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
            save(3)
