"""Smoke test: examples/sft.py runs on CPU, its step-0 loss equals LlamaForCausalLM's, and it learns."""

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sft.py"


def test_sft_example_runs_and_learns():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "6", "--lr", "1e-2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 0 check" in proc.stdout  # the script exits non-zero when the losses differ
    m = re.search(r"final loss ([\d.]+) \(first ([\d.]+)\)", proc.stdout)
    assert m, proc.stdout
    final, first = float(m.group(1)), float(m.group(2))
    assert final < first
