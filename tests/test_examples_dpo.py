"""Smoke test: examples/dpo.py runs on CPU, starts at the reference (loss log 2, margin 0) and moves."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dpo.py"
LINE = re.compile(r"step\s+(\d+)\s+loss ([\d.]+)\s+reward margin ([+-][\d.]+)")


def _run(*args: str) -> list[tuple[int, float, float]]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [(int(m[1]), float(m[2]), float(m[3])) for m in LINE.finditer(out.stdout)]
    assert "done in" in out.stdout
    return rows


def test_dpo_example_runs_and_learns():
    rows = _run("--steps", "12", "--pairs", "8")
    assert [r[0] for r in rows] == list(range(12))
    # LoRA B starts at 0: policy == reference, so sigmoid DPO gives log 2 and a zero margin
    assert rows[0][1] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0][2] == pytest.approx(0.0, abs=1e-4)
    # after a few steps on a learnable preference the margin is positive and the loss below log 2
    assert max(r[2] for r in rows[-4:]) > 0.01
    assert min(r[1] for r in rows[-4:]) < math.log(2) - 0.005
