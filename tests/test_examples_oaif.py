"""Smoke test: examples/oaif.py runs on CPU, starts at the reference (loss log 2) and the rule judge's
preference (shorter answers) shows: the mean completion length falls."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "oaif.py"
STEP = re.compile(r"step\s+(\d+)\s+pairs\s+(\d+)\s+loss ([\d.]+)")
LENGTHS = re.compile(r"mean completion length after: ([\d.]+) tokens \(before ([\d.]+)\)")


def test_oaif_example_runs_and_prefers_shorter():
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "6", "--prompts", "8"], capture_output=True,
                         text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [(int(m[1]), int(m[2]), float(m[3])) for m in STEP.finditer(out.stdout)]
    assert [r[0] for r in rows] == list(range(6)) and all(r[1] > 0 for r in rows)
    assert rows[0][2] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: policy == reference
    after, before = map(float, LENGTHS.search(out.stdout).groups())
    assert after < before - 1.0
    assert "done in" in out.stdout
