"""Smoke test: the quickstart example runs end to end (few steps) and checks itself."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reloaded outputs differ" in proc.stdout
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_examples_leave_nothing_behind(tmp_path):
    """Without --out, the quickstart and the QLoRA example write only to temporary directories they remove."""
    import os

    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "CUDA_VISIBLE_DEVICES": ""}
    for script, steps in (("quickstart.py", "2"), ("qlora.py", "2")):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", steps],
                              capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    left = list(cwd.iterdir()) + [p for p in scratch.iterdir() if not p.name.startswith("torchinductor")]  # torch's cache
    assert not left, left
