"""benchmarks/grpo.py: argument parsing and a tiny CPU dry run (the GPU run is recorded in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/grpo.py")


def test_parse_args(bench):
    a = bench.parse_args([])
    assert (a.completions, a.seq, a.hidden, a.vocab) == (8, 2048, 4096, 151936)  # the shape
    q = bench.parse_args(["--quick"])
    assert (q.completions, q.seq, q.hidden, q.vocab) == (2, 512, 1024, 32768)
    with pytest.raises(SystemExit):
        bench.parse_args(["--seq", "0"])


def test_sizes_given_with_quick_win(bench):
    # --quick overwrote them: "--quick --device cpu --seq 16 --vocab 64" ran 2 x 512 x 32768 for minutes on a CPU
    a = bench.parse_args(["--quick", "--seq", "16", "--vocab", "64"])
    assert (a.completions, a.seq, a.hidden, a.vocab) == (2, 16, 1024, 64)
    assert bench.parse_args(["--hidden", "8"]).hidden == 8 and bench.parse_args(["--hidden", "8"]).seq == 2048


def test_cpu_dry_run(bench, tmp_path, torch_mode):
    out = tmp_path / "grpo.json"
    report = bench.main(["--device", "cpu", "--completions", "2", "--seq", "6", "--hidden", "8", "--vocab", "32", "--ragged",
                         "--rep", "1", "--warmup", "1", "--no-liger", "--out", str(out)])
    assert json.loads(out.read_text())["shape"]["rows"] == 12
    assert report["liger_skipped"] == "--no-liger"
    for rows in report["settings"].values():
        names = {r["name"]: r for r in rows}
        assert set(names) == {"naive (full logits) + grpo_loss", "alignlab fused_linear_grpo",
                              "alignlab fused_linear_grpo +entropy"}
        ours = names["alignlab fused_linear_grpo"]
        assert ours["grad_hidden_rel"] < 1e-5 and ours["grad_weight_rel"] < 1e-5 and ours["loss_abs_err"] < 1e-5


def test_the_report_is_readable_and_nothing_is_left_behind(bench, tmp_path, torch_mode):
    """The script wrote its report through mkstemp: a 0600 file, unreadable to the other users of the machine
    (and the temp file left behind when the write failed); now alignlab.bench.write_json."""
    import os

    out = tmp_path / "sub" / "grpo.json"
    old = os.umask(0o022)
    try:
        bench.main(["--device", "cpu", "--completions", "2", "--seq", "4", "--hidden", "8", "--vocab", "16",
                    "--rep", "1", "--warmup", "1", "--no-liger", "--out", str(out)])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["grpo.json"]
    assert json.loads(out.read_text())["shape"]["rows"] == 8
