"""save_adapter under torch.distributed: of a DDP model when rank 0 cannot write, every rank raises, none waits; of a
plain model, the calling rank writes with no collective."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks

if not torch.distributed.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the worker by module name
import save_worker as w  # noqa: E402


def test_a_failed_rank0_write_raises_on_every_rank(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    start = time.monotonic()
    spawn_ranks(w.worker, str(tmp_path))
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith(("FileExistsError", "NotADirectoryError")), rank0  # rank 0's own error
    assert rank1.startswith("RuntimeError") and "rank 0 failed to write adapter 'default'" in rank1, rank1
    assert time.monotonic() - start < 30  # told at once, not after the process group's timeout


def test_ctrl_c_on_rank0_while_writing_tells_every_rank(tmp_path):
    """A KeyboardInterrupt in rank 0's write went past the outcome broadcast (only Exception was caught): rank 1
    sat in it until rank 0's process was gone or the group's timeout came, and heard nothing of why."""
    start = time.monotonic()
    spawn_ranks(w.worker_interrupted, str(tmp_path))
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0 == "KeyboardInterrupt: Ctrl-C while writing", rank0  # rank 0's own exception, re-raised
    assert rank1.startswith("RuntimeError") and "rank 0 failed to write adapter 'default'" in rank1, rank1
    assert time.monotonic() - start < 40
    assert not (tmp_path / "adapter").exists() or not any((tmp_path / "adapter").iterdir())  # nothing half-written


def test_rank0_alone_saves_a_plain_model_without_waiting_for_the_others(tmp_path):
    start = time.monotonic()
    spawn_ranks(w.worker_rank0_saves_a_plain_model, str(tmp_path))
    assert float((tmp_path / "rank0.txt").read_text()) < 20
    assert time.monotonic() - start < 45
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
