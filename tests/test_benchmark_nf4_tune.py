"""benchmarks/nf4_tune.py: the table it prints from one run's rows (table_from_rows) and a run taken into a table
(merged_table), on CPU."""

import pytest
import torch
from conftest import load_script


def _row(kernel, M, N, K, best, best_us, default_us, dequant_mm_us):
    return {"kernel": kernel, "M": M, "N": N, "K": K, "best": list(best), "best_us": best_us,
            "default_us": default_us, "dequant_mm_us": dequant_mm_us}


def test_table_from_rows_takes_alternatives_that_beat_the_best_existing_path():
    tune = load_script("benchmarks/nf4_tune.py")
    a, b = (4096, 4096), (14336, 4096)
    rows = [
        # M = 16: swap_early 0.94x the default at a (in), 0.97x at b (out: above the 0.95 threshold)
        _row("swap_early", 16, *a, (64, 4, 8, 4, 1), 9.4, 10.0, 30.0),
        _row("swap", 16, *a, (64, 1, 8, 4, 1), 9.9, 10.1, 30.0),
        _row("swap_early", 16, *b, (64, 2, 8, 4, 1), 38.8, 40.0, 100.0),
        # M = 32: the reference is dequantize + cuBLAS where it is faster than the default; the faster
        # alternative wins (swap at a, swap_early at b)
        _row("swap_early", 32, *a, (64, 2, 8, 4, 1), 18.0, 40.0, 25.0),
        _row("swap", 32, *a, (64, 2, 8, 4, 2), 17.0, 41.0, 26.0),
        _row("swap_early", 32, *b, (128, 4, 8, 4, 1), 44.0, 120.0, 100.0),
        _row("swap", 32, *b, (128, 1, 2, 4, 3), 46.0, 121.0, 100.0),
        # M = 64: no kernel beats dequantize + cuBLAS at b: max_m stops at 32
        _row("swap", 64, *a, (128, 4, 8, 8, 1), 23.0, 110.0, 26.0),
        _row("swap", 64, *b, (128, 2, 2, 4, 1), 101.0, 337.0, 100.0),
    ]
    configs, max_m = tune.table_from_rows(rows)
    assert configs == {
        ("swap_early", 16): {a: (64, 4, 8, 4, 1)},
        ("swap", 32): {a: (64, 2, 8, 4, 2)},
        ("swap_early", 32): {b: (128, 4, 8, 4, 1)},
        ("swap", 64): {a: (128, 4, 8, 8, 1)},
    }
    assert max_m == 32
    # a looser threshold admits b at M = 16; the base search's rows enter as they are
    base = [_row(None, 1, *a, (64, 2, 8, 4, 1), 10.0, 10.5, 30.0), _row(None, 16, *b, (128, 1, 8, 4, 1), 39.0, 40.0,
                                                                       100.0)]
    configs, max_m = tune.table_from_rows(rows + base, threshold=0.98)
    assert configs[("swap_early", 16)] == {a: (64, 4, 8, 4, 1), b: (64, 2, 8, 4, 1)}
    assert configs[("gemv", 1)] == {a: (64, 2, 8, 4, 1)} and configs[("dot", 16)] == {b: (128, 1, 8, 4, 1)}
    assert max_m == 32
    # a base kernel named on the command line (--kernels dot) is a base search too: its entries go in as they are
    named = [_row("dot", 16, *a, (64, 2, 8, 4, 1), 11.0, 10.0, 30.0)]
    assert tune.table_from_rows(named)[0] == {("dot", 16): {a: (64, 2, 8, 4, 1)}}


# the swap_flat runs merged into the H100 table, in order (the coordinate search, then the exhaustive ones: 32 / 64
# rows, 16 rows, the k / v shapes)
H100_FLAT_RUNS = ("nf4_tune_flat_h100_1207.json", "nf4_tune_flat_exh_h100_1207.json", "nf4_tune_flat16_h100_1207.json",
                  "nf4_tune_flat_kv_h100_1207.json")


def test_shipped_h100_table_is_the_rule_applied_to_its_recorded_runs():
    """nf4_configs.TABLES["H100"] is what table_from_rows gives from the three recorded tuning runs it cites (the
    k / v shapes lost to dequantize + cuBLAS at M = 64: max_m 32, the five shapes listed there up to 64), with the
    later swap_flat runs taken in by merged_table, one after the other (their entries replace the other
    alternatives' at their shapes)."""
    import json
    from pathlib import Path

    from alignlab.kernels.nf4_configs import TABLES

    tune = load_script("benchmarks/nf4_tune.py")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    rows = [r for name in ("nf4_tune_swap_h100.json", "nf4_tune_swap_early_h100.json", "nf4_tune_swap_kv_h100.json")
            for r in json.loads((results / name).read_text())["rows"]]
    configs, max_m = tune.table_from_rows(rows)
    assert max_m == TABLES["H100"]["max_m"] == 32
    assert max(bucket for _, bucket in configs) == 64
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    merged = {"max_m": max_m, "max_m_listed": 64, "shapes": shapes, "configs": configs}
    for name in H100_FLAT_RUNS:
        flat = json.loads((results / name).read_text())["rows"]
        assert {r["kernel"] for r in flat} == {"swap_flat"}
        merged = tune.merged_table(merged, flat)
    assert merged["configs"] == TABLES["H100"]["configs"] and merged["max_m"] == 32
    assert TABLES["H100"]["max_m_listed"] == merged["max_m_listed"] == 64
    assert sorted(TABLES["H100"]["shapes"]) == sorted(merged["shapes"])


def test_shipped_h200_swap_entries_are_the_rule_applied_to_their_recorded_runs():
    """TABLES["H200"]'s swapped-kernel entries are what table_from_rows gives from the two recorded H200 runs: the
    five benchmark shapes (buckets up to 64: above max_m, 32, they apply at the shapes listed, max_m_listed) and the
    k / v shapes of 2026-12-06 (disjoint shapes); no shape is listed under two alternatives at one bucket (the late
    entries the swap runs beat were dropped), and every shape the table names is in its "shapes"."""
    import json
    from pathlib import Path

    from alignlab.kernels.nf4_configs import ALTERNATIVES, TABLES

    tune = load_script("benchmarks/nf4_tune.py")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    rows = json.loads((results / "nf4_tune_swap_h200.json").read_text())["rows"]
    kv_rows = json.loads((results / "nf4_tune_kv_h200_1206.json").read_text())["rows"]
    configs, max_m = tune.table_from_rows(rows)
    kv_configs, kv_max_m = tune.table_from_rows(kv_rows)
    table = TABLES["H200"]
    assert table["max_m_listed"] == max_m == 64 and table["max_m"] == kv_max_m == 32
    want = {key: dict(entries) for key, entries in configs.items()}
    for key, entries in kv_configs.items():
        assert not set(entries) & set(want.get(key, {}))  # the runs measured other shapes
        want.setdefault(key, {}).update(entries)
    assert {k: v for k, v in table["configs"].items() if k[0].startswith("swap")} == want
    for m in (1, 2, 4, 8, 16, 32, 64):
        listed = [s for alt in ALTERNATIVES for s in table["configs"].get((alt, m), {})]
        assert len(listed) == len(set(listed)), m
    assert {s for entries in table["configs"].values() for s in entries} == set(table["shapes"])


def test_merged_table_takes_a_run_at_new_shapes_into_a_table(monkeypatch):
    """merged_table: the H100 table as it was before the k / v run (its five shapes, max_m 64), merged with that
    run's rows, is the shipped table (max_m down to the run's 32, the five shapes still listed up to 64); into the
    H200 table, the run's swap entries replace the late ones of the same shape and bucket, and the result
    registers and dispatches to them."""
    import json
    from pathlib import Path

    from alignlab.kernels import nf4_configs
    from alignlab.kernels.nf4_configs import TABLES

    tune = load_script("benchmarks/nf4_tune.py")
    kv = [(1024, 4096), (1024, 8192)]
    rows = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "nf4_tune_swap_kv_h100.json")
                      .read_text())["rows"]
    shipped = TABLES["H100"]
    before = {"max_m": 64, "shapes": [s for s in shipped["shapes"] if s not in kv],
              "configs": {k: {s: c for s, c in v.items() if s not in kv} for k, v in shipped["configs"].items()}}
    before["configs"] = {k: v for k, v in before["configs"].items() if v}
    # the swap_flat run at the k / v shapes, taken in after the swap run (as the shipped table took it)
    flat_kv = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / H100_FLAT_RUNS[-1])
                         .read_text())["rows"]
    assert {(r["N"], r["K"]) for r in flat_kv} == set(kv)
    assert tune.merged_table(tune.merged_table(before, rows), flat_kv) == shipped
    assert before["max_m"] == 64 and "max_m_listed" not in before
    unlisted = {k: v for k, v in before.items() if k != "shapes"}  # a table without "shapes": its entries' shapes
    assert sorted(tune.merged_table(unlisted, rows)["shapes"]) == sorted(shipped["shapes"])
    lost_at_once = [r for r in rows if r["M"] == 64]  # lost to dequantize + cuBLAS at its only row count
    assert tune.merged_table(before, lost_at_once)["max_m"] == 64
    # a run that lost nowhere (here its 16-row rows alone) says nothing of the buckets above its largest M
    won_at_16 = [r for r in rows if r["M"] == 16]
    assert all(min(r["best_us"], r["default_us"]) < r["dequant_mm_us"] for r in won_at_16)
    assert tune.merged_table(before, won_at_16)["max_m"] == 64
    assert tune.merged_table(before, [r for r in rows if r["M"] <= 32])["max_m"] == 64

    h200 = tune.merged_table(TABLES["H200"], rows)
    assert h200["configs"][("swap", 8)][(1024, 4096)] == (32, 4, 8, 2, 3)
    assert (1024, 4096) not in h200["configs"][("late", 8)]
    assert (1024, 8192) not in h200["configs"].get(("late", 32), {})
    assert h200["configs"][("late", 8)] == {(14336, 4096): (128, 2, 8, 4, 1)}  # other shapes keep theirs
    assert h200["max_m"] == 32 and h200["max_m_listed"] == 64 and h200["shapes"] == TABLES["H200"]["shapes"]
    # the input is not changed: its own entries where the merge replaced or dropped them
    assert TABLES["H200"]["configs"][("swap", 8)][(1024, 4096)] == (32, 1, 16, 2, 3)
    assert (1024, 8192) in TABLES["H200"]["configs"][("late", 32)]
    monkeypatch.setattr(nf4_configs, "TABLES", dict(TABLES))
    nf4_configs.register_table("H200", h200)
    assert nf4_configs.TABLES["H200"] == h200
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: "H200")
    assert nf4_configs.small_choice(8, 1024, 4096, 64, torch.bfloat16, torch.device("cuda", 0)) == \
        ("swap", (32, 4, 8, 2, 3))


def test_nf4_generate_tune_rows_registers_the_merged_table(monkeypatch, capsys):
    """nf4_generate.py --tune-rows: the runs' entries join this GPU's table for the run."""
    from pathlib import Path

    from alignlab.kernels import nf4_configs

    gen = load_script("benchmarks/nf4_generate.py")
    monkeypatch.setattr(nf4_configs, "TABLES", dict(nf4_configs.TABLES))
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: "H200")
    run = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "nf4_tune_swap_kv_h100.json"
    gen.register_tuned([run], "cuda")
    assert nf4_configs.TABLES["H200"]["configs"][("swap", 32)][(1024, 8192)] == (32, 4, 8, 4, 3)
    assert "TABLES['H200'] with the entries of" in capsys.readouterr().out
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: None)
    with pytest.raises(SystemExit, match="no launch table"):
        gen.register_tuned([run], "cpu")


def _generate_quick(tmp_path, *args: str) -> tuple[str, dict]:
    """``nf4_generate.py --quick --device cpu *args`` in a subprocess: its stdout and the JSON it wrote."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gen.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "nf4_generate.py"), "--quick", "--device", "cpu",
                          *args, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, json.loads(out.read_text())


def test_nf4_generate_host_profile_in_the_graphs_mode_alone(tmp_path):
    """nf4_generate.py --host-profile with --only-graphs profiles the static-cache mode at the last batch (it profiled
    nothing without the eager mode): the JSON holds each contestant's per-step profile (tiny model, CPU)."""
    stdout, result = _generate_quick(tmp_path, "--only-graphs", "--host-profile", "--which", "bf16", "--new-tokens", "4")
    assert "host profile bf16 (graphs, batch 4)" in stdout
    prof = result["host_profiles"]["bf16"]
    assert prof["calls_per_step"] > 0 and prof["top"] and prof["wall_ms_per_step"] > 0


def test_nf4_generate_interleaved_rounds_time_every_contestant(tmp_path):
    """nf4_generate.py --interleave: every contestant (the '-L' one left out) gets a row per mode and batch, from the
    given number of rounds (tiny model, CPU)."""
    _, result = _generate_quick(tmp_path, "--graphs", "--interleave", "2", "--batches", "2", "--new-tokens", "3")
    rows = result["results"]
    assert sorted((r["name"], r["mode"]) for r in rows) == [("alignlab NF4", "eager"), ("alignlab NF4", "graphs"),
                                                            ("bf16", "eager"), ("bf16", "graphs")]
    for r in rows:
        assert r["rounds"] == 2 and r["batch"] == 2 and r["tokens_per_s"] > 0 and r["s_min"] <= r["s"] <= r["s_max"]


def test_nf4_generate_kernel_profile_lists_the_largest_kernels(tmp_path):
    """nf4_generate.py --kernel-profile: per contestant, the ops (kernels on a GPU) with the most own time of one more
    generate, largest first, with launch counts (tiny model, CPU: the matmuls are there)."""
    _, result = _generate_quick(tmp_path, "--only-graphs", "--kernel-profile", "--which", "bf16", "--new-tokens", "3")
    prof = result["kernel_profiles"]["bf16"]
    own = [r["own_ms"] for r in prof["top"]]
    assert own == sorted(own, reverse=True) and prof["total_ms"] >= sum(own) * (1 - 1e-9)
    assert any(r["name"] == "aten::mm" and r["calls"] > 0 for r in prof["top"])


@pytest.mark.parametrize("args, message", [(["--interleave", "-1"], "number of rounds"),
                                           (["--interleave", "2", "--kernel-profile"], "only times")])
def test_nf4_generate_refuses_interleave_arguments_it_cannot_honour(args, message, capsys):
    """A negative round count failed later with a KeyError; profiles asked for with --interleave were silently not
    made. Both are argument errors now (exit status 2, the reason printed)."""
    gen = load_script("benchmarks/nf4_generate.py")
    with pytest.raises(SystemExit) as exc:
        gen.main(["--quick", "--device", "cpu", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("item", ["warps=4", "block_n=", "split=2,x"])
def test_nf4_tune_space_arguments_are_checked(item, capsys):
    """--space NAME=V1,V2 names a launch parameter and integers; anything else stops at argument parsing (before
    any GPU is looked for)."""
    tune = load_script("benchmarks/nf4_tune.py")
    with pytest.raises(SystemExit) as e:
        tune.main(["--space", item])
    assert e.value.code == 2 and "--space" in capsys.readouterr().err


def test_nf4_tune_space_restricts_the_exhaustive_search(monkeypatch):
    """--space replaces a parameter's searched values; --exhaustive then times every configuration of the space."""
    tune = load_script("benchmarks/nf4_tune.py")
    monkeypatch.setattr(tune, "SPACE", dict(tune.SPACE))
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        tune.main(["--space", "block_n=64,128", "num_stages=1", "--exhaustive"])
    assert tune.SPACE["block_n"] == (64, 128) and tune.SPACE["num_stages"] == (1,) and tune.EXHAUSTIVE
