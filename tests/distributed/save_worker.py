"""What each rank runs in ``test_save.py``: a save_adapter of a DDP model whose rank-0 write fails, and one of a plain
model that rank 0 alone saves.

A module of its own: ``torch.multiprocessing.spawn`` pickles the worker by module name.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch import nn

from alignlab.adapters import LoRAConfig, inject, save_adapter
from alignlab.distributed import ddp_model


def _ddp_lora(rank: int, world: int, port: int, seconds: int) -> nn.Module:
    """Join a gloo group of ``world`` ranks (its timeout ``seconds``) and return a one-layer LoRA model in DDP."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=seconds))
    model = nn.Sequential(nn.Linear(8, 8))
    inject(model, LoRAConfig(r=2, target_modules=["0"]))
    return ddp_model(model)


def _leave(model: nn.Module) -> None:
    """End the spawned rank at once, ``model`` (the DDP wrapper) still referenced, after its results are written and
    its group destroyed. Freed at the worker's return, the DDP reducer destroyed its gloo process group while that
    group's thread was still freeing a finished broadcast: the main thread held the GIL joining the thread, the
    thread waited for the GIL to drop a tensor, and the rank never exited (torch 2.13.0 on a CI run: the test hung
    in ``spawn``'s join). ``model`` is held by this frame until the exit; nothing is left to clean up that the OS
    does not."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank: int, world: int, port: int, out: str) -> None:
    # a short timeout: without the outcome broadcast, rank 1 would sit in a barrier rank 0 never reaches
    model = _ddp_lora(rank, world, port, 30)  # a DDP model: every rank calls save_adapter, rank 0 writes
    try:
        blocked = Path(out) / "a_file"  # a regular file where rank 0 must make a directory
        try:
            save_adapter(model, blocked / "adapter")
            result = "returned"
        except Exception as e:  # what each rank saw
            result = f"{type(e).__name__}: {e}"
        (Path(out) / f"rank{rank}.txt").write_text(result)
    finally:
        dist.destroy_process_group()
    _leave(model)


def worker_interrupted(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0's write is interrupted (Ctrl-C, ``KeyboardInterrupt``) in the middle of writing the weights."""
    import alignlab.adapters.io as io

    model = _ddp_lora(rank, world, port, 60)
    try:
        if rank == 0:
            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt("Ctrl-C while writing")

            io.save_file = interrupted
        try:
            save_adapter(model, Path(out) / "adapter")
            result = "returned"
        except BaseException as e:  # what each rank saw
            result = f"{type(e).__name__}: {e}"
        (Path(out) / f"rank{rank}.txt").write_text(result)
    finally:
        dist.destroy_process_group()
    _leave(model)


def worker_rank0_saves_a_plain_model(rank: int, world: int, port: int, out: str) -> None:
    """The usual idiom with a process group running: ``if rank == 0: save_adapter(ddp.module, ...)``. Rank 1 never
    calls it; rank 0's call must return by itself (it used to wait in a collective until the group's timeout)."""
    import time

    ddp = _ddp_lora(rank, world, port, 60)
    try:
        if rank == 0:
            start = time.monotonic()
            save_adapter(ddp.module, Path(out) / "adapter")
            (Path(out) / "rank0.txt").write_text(f"{time.monotonic() - start:.3f}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave(ddp)
