"""Smoke test: examples/grpo.py runs on CPU, the KL starts at 0 (LoRA B = 0: policy = reference) and the
verifiable reward goes up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo.py"
LINE = re.compile(r"step\s+(\d+)\s+reward ([\d.]+)\s+loss ([+-][\d.]+)\s+kl ([\d.]+)\s+entropy ([\d.]+)\s+is_ratio ([\d.]+)")


def test_grpo_example_runs_and_reward_goes_up():
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "12"], capture_output=True, text=True,
                         timeout=180, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done in" in out.stdout
    rows = [tuple(float(x) for x in m.groups()) for m in LINE.finditer(out.stdout)]
    assert [int(r[0]) for r in rows] == list(range(12))
    assert rows[0][3] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert all(r[5] == pytest.approx(1.0, abs=1e-3) for r in rows)  # the sampler is the policy itself
    first = sum(r[1] for r in rows[:2]) / 2
    last = sum(r[1] for r in rows[-4:]) / 4
    assert last > first + 0.1, (first, last)
