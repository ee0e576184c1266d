"""benchmarks/device_run.sh: each step runs under its own time limit with its whole log kept, a step past its limit
does not stop the next, and an unknown step is refused (run here in a scratch copy with stand-in scripts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "device_run.sh", tmp_path / "benchmarks")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)  # the steps call `python`
    return tmp_path


def _run(repo, *steps):
    env = {"PATH": f"{repo / 'bin'}:/usr/bin:/bin", "OUT": str(repo / "out")}
    return subprocess.run(["bash", "benchmarks/device_run.sh", *steps], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)


def test_each_step_has_its_limit_and_its_log(repo):
    slow = "import time\nprint('started', flush=True)\ntime.sleep(30)\n"
    (repo / "benchmarks" / "adapter_epilogue.py").write_text(slow)
    (repo / "benchmarks" / "lora.py").write_text("import sys\nprint('lora ran with', sys.argv[1:])\n")
    done = _run(repo, "epilogue:1", "lora")
    assert done.returncode == 0, done.stderr
    assert "=== epilogue: exit 124" in done.stdout and "(time limit)" in done.stdout
    assert (repo / "out" / "epilogue.log").read_text() == "started\n"
    assert f"lora ran with ['--out', '{repo / 'out' / 'lora.json'}']" in (repo / "out" / "lora.log").read_text()
    assert "=== lora: exit 0" in done.stdout


def test_an_unknown_step_is_refused(repo):
    done = _run(repo, "lroa")
    assert done.returncode == 2
    assert "unknown step 'lroa'" in done.stderr


def test_an_unknown_step_is_refused_before_anything_runs_or_is_installed(repo):
    """A typo after good steps: nothing runs, no wheel is installed into .peers, nothing is written (the names were
    checked only when the loop reached them, after the installs and the first steps)."""
    (repo / ".whl").mkdir()
    (repo / ".whl" / "peer-0.0-py3-none-any.whl").write_bytes(b"not a wheel")
    (repo / "benchmarks" / "lora.py").write_text("print('lora ran')\n")
    done = _run(repo, "lora", "nf4:50", "lroa")
    assert done.returncode == 2 and "unknown step 'lroa'" in done.stderr
    assert "lora ran" not in done.stdout and not (repo / ".peers").exists() and not (repo / "out").exists()
