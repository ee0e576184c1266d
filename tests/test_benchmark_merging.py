"""benchmarks/merging.py: a tiny CPU run (no mergekit) with its paths under the home folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_workdir_under_home_is_the_one_the_merge_reads(tmp_path):
    """``--workdir '~/w'`` made ./~/w for the checkpoints, while ``python -m alignlab.merging`` read the recipe
    from the home folder, and the merge failed with "No such file or directory"."""
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "merging.py"), "--workdir", "~/w", "--out-json", "~/m.json",
           "--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "256", "--no-mergekit",
           "--methods", "slerp"]
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (entry,) = json.loads((tmp_path / "m.json").read_text())["runs"]
    assert entry["method"] == "slerp" and entry["ours"]["wall_s"] > 0
    assert list(run.iterdir()) == [] and not (tmp_path / "w").exists()  # the workdir is removed at the end


def test_a_workdir_holding_other_files_is_refused_not_deleted(tmp_path, monkeypatch):
    """The script deletes its workdir at the start and at the end; a folder of the user's own (``--workdir ~``, now
    that a quoted ``~`` is the home folder, or any existing project folder) was deleted with everything in it."""
    from conftest import load_script

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    bench = load_script("benchmarks/merging.py")
    monkeypatch.setattr(sys, "argv", ["merging.py", "--workdir", str(mine), "--out-json", str(tmp_path / "m.json"),
                                      "--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "256",
                                      "--no-mergekit", "--methods", "slerp"])
    with pytest.raises(SystemExit):
        bench.main()
    assert (mine / "precious.txt").read_text() == "keep" and not (tmp_path / "m.json").exists()
