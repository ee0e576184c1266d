"""Fixtures of the distributed tests: a one-process gloo group, and free ports for spawned ranks."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone (rank 0 of 1), torn down after the test."""
    if dist.is_initialized():  # pragma: no cover - the test process never joins a group otherwise
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function giving a free local port, for ``torch.multiprocessing.spawn`` ranks to meet on."""
    return _free_port
