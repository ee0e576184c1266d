"""benchmarks/cross_entropy.py: the row kernel it times makes no host read (the GPU run is in benchmarks/RESULTS.md).

The launcher's label check (one ``.tolist()`` of the labels' min and max, a stream sync) ran inside the timed
region of every launch, so the kernel's time and its share of the copy bandwidth included a sync and two small
kernels of no interest there."""

from __future__ import annotations

import pytest
import torch

import alignlab.kernels.linear_logprobs as lk
from conftest import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/cross_entropy.py")


def test_the_timed_row_kernel_reads_nothing_back(bench, kernel_device, monkeypatch):
    pytest.importorskip("triton")
    reads = []
    monkeypatch.setattr(lk, "check_label_range", lambda *args, **kwargs: reads.append(args))
    g = torch.Generator().manual_seed(0)
    chunk = torch.randn(3, 11, generator=g).to(kernel_device)
    labels = torch.tensor([0, 10, 4], device=kernel_device)
    scale = torch.full((3,), 0.5, device=kernel_device)
    work = chunk.clone()
    bench.row_kernel(work, labels, scale, (4, 1, 0, False))
    assert reads == []
    want = chunk.clone()
    lk.chunk_softmax_grad_reference_(want, labels, grad_scale=scale, labels_checked=True)
    torch.testing.assert_close(work, want)
