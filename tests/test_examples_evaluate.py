import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import load_script

pytest.importorskip("transformers")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "evaluate.py")


def test_evaluate_example_runs_and_writes_plot(tmp_path):
    plot = tmp_path / "metrics.png"
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--steps", "3", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scores on 32 held-out items" in proc.stdout
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


def test_evaluate_example_held_out_items_are_not_trained_on():
    module = load_script("examples/evaluate.py")
    train, held_out = module.build_data(0)
    assert len(held_out) == 32 and not set(held_out) & set(train)
    assert all(q.split(" is ")[1].startswith(a) for q, a in held_out)  # the answer is in the context


def test_evaluate_example_writes_nothing_by_default(tmp_path):
    proc = subprocess.run([sys.executable, EXAMPLE, "--steps", "2"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []


def test_evaluate_example_plot_follows_the_umask_and_expands_home(tmp_path):
    """The chart came out 0600 (mkstemp's) whatever the umask, and ``--plot '~/m.png'`` failed looking for a
    folder named ``~``."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, EXAMPLE, "--steps", "2", "--plot", "~/m.png"], capture_output=True,
                          text=True, timeout=300, cwd=run, env={**os.environ, "HOME": str(tmp_path)}, umask=0o027)
    assert proc.returncode == 0, proc.stderr
    plot = tmp_path / "m.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_mode & 0o777 == 0o640
    assert os.listdir(run) == [] and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # HOME gets caches
