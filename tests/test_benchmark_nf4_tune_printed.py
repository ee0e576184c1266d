"""benchmarks/nf4_tune.py: the table ``main()`` prints "to paste into nf4_configs.TABLES" dispatches as the shipped one.

The H100's recorded runs (``results/nf4_tune_swap_early_h100.json``, ``nf4_tune_swap_h100.json``) are replayed
through ``main()`` on CPU (the GPU work stubbed; the search's results and timings are the recorded ones), the
printed ``TABLES[...]`` literal is put in place of the shipped H100 table, and ``small_choice`` must then pick
the same kernel and configuration at every benchmark shape and row count. The later ``swap_flat`` runs
(``nf4_tune_flat_h100_1207.json``, then the exhaustive ``nf4_tune_flat_exh_h100_1207.json``,
``nf4_tune_flat16_h100_1207.json`` and ``nf4_tune_flat_kv_h100_1207.json``) are taken in by ``merged_table``, as the
shipped table took them.
"""

import ast
import json
import types
from pathlib import Path

import pytest
import torch
from conftest import load_script

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RUNS = ("nf4_tune_swap_early_h100.json", "nf4_tune_swap_h100.json", "nf4_tune_swap_kv_h100.json")
SHAPES = "4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,1024x4096,1024x8192"  # the runs' shapes


def _replay(tune, monkeypatch, tmp_path, capsys) -> str:
    """What ``nf4_tune.py --kernels swap_early swap --ms 2 ... 64`` printed, from the recorded rows."""
    rows = {(r["kernel"], r["N"], r["K"], r["M"]): r for name in RUNS
            for r in json.loads((RESULTS / name).read_text())["rows"]}
    pending = []  # the timings main() asks for after each search: bf16 cuBLAS, then dequantize + cuBLAS

    def search(M, N, K, ts, deadline):
        r = rows[(tune.KERNEL, N, K, M)]
        pending[:] = [r["bf16_us"], r["dequant_mm_us"], r["copy_us"]]
        return {k: r[k] for k in ("start", "start_us", "best", "best_us", "tried", "kernel", "default_us")}

    stub = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: True, get_device_name=lambda: "NVIDIA H100 80GB HBM3",
                                   empty_cache=lambda: None),
        randn=lambda *a, **k: 0, bfloat16=torch.bfloat16, nn=torch.nn)
    monkeypatch.setattr(tune, "torch", stub)
    monkeypatch.setattr(tune, "nf4_quantize", lambda w, **k: object())
    monkeypatch.setattr(tune, "_nf4_bytes", lambda N, K, t: 1e9)
    monkeypatch.setattr(tune, "search", search)
    monkeypatch.setattr(tune, "_graph_us", lambda fns, reps=5: pending.pop(0))
    monkeypatch.setattr(tune, "_copy_us", lambda nbytes: pending.pop(0))
    tune.main(["--kernels", "swap_early", "swap", "--ms", "2", "4", "8", "16", "32", "64", "--workers", "1",
               "--shapes", SHAPES, "--out", str(tmp_path / "tune.json")])
    out = capsys.readouterr().out
    start = out.index("TABLES[")
    return out[out.index("=", start) + 1:out.index("\n}}", start) + 3]


def test_printed_h100_table_dispatches_as_the_shipped_one(monkeypatch, tmp_path, capsys):
    from alignlab.kernels import nf4_configs

    tune = load_script("benchmarks/nf4_tune.py")
    printed = ast.literal_eval(_replay(tune, monkeypatch, tmp_path, capsys))
    # the later swap_flat runs (32 / 64 rows) taken in as merged_table takes a run into a table
    for name in ("nf4_tune_flat_h100_1207.json", "nf4_tune_flat_exh_h100_1207.json", "nf4_tune_flat16_h100_1207.json",
                 "nf4_tune_flat_kv_h100_1207.json"):
        printed = tune.merged_table(printed, json.loads((RESULTS / name).read_text())["rows"])
    assert printed["configs"] == nf4_configs.TABLES["H100"]["configs"]  # the rule itself is right (tested too)
    assert printed == nf4_configs.TABLES["H100"]  # bounds and shapes too: the literal pastes as it is
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: "H100")
    dev, bf16 = torch.device("cuda", 0), torch.bfloat16
    calls = [(M, N, K) for M in (2, 4, 8, 16, 32, 64) for N, K in ((4096, 4096), (14336, 4096), (4096, 14336),
                                                                   (8192, 8192), (28672, 8192), (1024, 4096),
                                                                   (1024, 8192), (2048, 5120))]
    def dispatch():
        return {c: (nf4_configs.small_choice(*c, 64, bf16, dev), nf4_configs.takes_small(*c, dev)) for c in calls}

    shipped = dispatch()
    # 1024 x 8192 (v / k of 70B): dequantize + cuBLAS at 64 rows; 1024 x 4096 listed there (the flat kernel won)
    assert not shipped[(64, 1024, 8192)][1] and shipped[(64, 1024, 4096)][1] and shipped[(64, 4096, 4096)][1]
    monkeypatch.setitem(nf4_configs.TABLES, "H100", printed)
    pasted = dispatch()
    assert pasted == shipped
