"""Rank worker for test_batching.py's two-process GRPO accumulation test.

A module of its own, not the test file: ``torch.multiprocessing.spawn`` pickles the worker by module name,
which the spawned processes import.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from alignlab.losses import fused_linear_grpo

B, T, H, V = 6, 5, 8, 19
SHARDS = (slice(0, 1), slice(1, 6))  # uneven ranks: 1 and 5 completions


def global_batch():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 3.0
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 3.0
    return hidden, weight, ids, mask, adv, old, ref


def local_loss(hidden, weight, ids, mask, adv, old, ref, loss_type, num_items):
    return fused_linear_grpo(hidden, weight, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04,
                             loss_type=loss_type, num_items=num_items, max_completion_length=T, chunk_size=4)[0]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["ALIGNLAB_KERNELS"] = "torch"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hidden, weight, ids, mask, adv, old, ref = (t[SHARDS[rank]] if t.dim() and t.shape[0] == B else t
                                                    for t in global_batch())
        results = {}
        for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
            # the step-wide normaliser: a SUM of the ranks' counts, not a mean of their means
            local = torch.tensor(float(mask.sum() if loss_type in ("bnpo", "dapo") else mask.shape[0]),
                                 dtype=torch.float64)
            dist.all_reduce(local)
            w = weight.clone().requires_grad_(True)
            # DDP averages gradients over ranks: scale the loss by the world size to get the sum
            loss = local_loss(hidden, w, ids, mask, adv, old, ref, loss_type, local) * world
            loss.backward()
            grad = w.grad.clone()
            dist.all_reduce(grad)
            grad /= world
            total = loss.detach() / world
            dist.all_reduce(total)
            results[loss_type] = (total, grad)
        if rank == 0:
            torch.save(results, Path(out) / "grpo_ranks.pt")
    finally:
        dist.destroy_process_group()
