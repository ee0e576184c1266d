import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "evaluate.py")


def test_evaluate_example_runs_and_writes_plot(tmp_path):
    plot = tmp_path / "metrics.png"
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--steps", "3", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}
    for metric in ("perplexity", "exact_match", "f1", "rouge1", "rouge2", "rougeL"):
        before, after = map(float, rows[metric])
        assert before >= 0 and after >= 0
    assert float(rows["perplexity"][0]) > 1.0
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install alignlab[plot]" in proc.stdout and not plot.exists()
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == (["metrics.png"] if plot.exists() else [])  # no temp file left behind
