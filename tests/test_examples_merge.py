"""Smoke test: examples/merge.py runs end to end and the adapters learn their tasks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_merge_example_runs():
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "merge.py"), "--steps", "10"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] != "model":
            rows[parts[0]] = (float(parts[1]), float(parts[2]))
    assert set(rows) >= {"base", "lora[low]", "lora[high]", "task_arithmetic", "ties(d=0.5)", "lora_svd(r=8)"}
    assert rows["lora[low]"][0] < rows["base"][0] - 1.0  # each adapter learned its own task
    assert rows["lora[high]"][1] < rows["base"][1] - 1.0
    for name in ("task_arithmetic", "ties(d=0.5)"):  # merges keep a good part of both
        assert rows[name][0] < rows["base"][0] and rows[name][1] < rows["base"][1]
