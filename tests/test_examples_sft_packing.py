"""Smoke test: examples/sft_packing.py runs on CPU and its loss goes down."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sft_packing.py"


def test_sft_packing_example_runs():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "6"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0], proc.stdout
    acc = re.search(r"accuracy: (\d\.\d+) -> (\d\.\d+)", proc.stdout)
    assert acc and float(acc.group(2)) > float(acc.group(1)), proc.stdout
