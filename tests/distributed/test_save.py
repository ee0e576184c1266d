"""save_adapter under torch.distributed when rank 0 cannot write: every rank raises, none waits."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the worker by module name
import save_worker as w  # noqa: E402


def test_a_failed_rank0_write_raises_on_every_rank(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    torch.multiprocessing.spawn(w.worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith(("FileExistsError", "NotADirectoryError")), rank0  # rank 0's own error
    assert rank1.startswith("RuntimeError") and "rank 0 failed to write adapter 'default'" in rank1, rank1
    assert time.monotonic() - start < 30  # told at once, not after the process group's timeout
