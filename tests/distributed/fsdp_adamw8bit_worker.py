"""What each rank runs in ``test_fsdp_adamw8bit.py`` (and the single-process oracle runs the same functions):
``AdamW8bit`` on a small net sharded by FSDP2 (``fully_shard``), each rank a half of the global batch.

A module of its own, not the test file: ``torch.multiprocessing.spawn`` pickles the worker by module name.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fsdp_worker as fw  # on sys.path: the test file puts this folder there, and spawned ranks inherit it
from alignlab.distributed import full_tensor
from alignlab.optim import AdamW8bit

STEPS, BATCH = 12, 16
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
MIN_8BIT = 1000  # blocksize 256


class Net(nn.Module):
    """``fc1.weight`` (101, 40), 8-bit: sharded along dim 0 as 51 / 50 rows, 2040 / 2000 values, so the shards'
    blocks of 256 do not line up with the unsharded parameter's; ``row`` (1, 1010), 8-bit: rank 1's shard is
    empty; ``fc2.weight`` (8, 101) and the biases keep fp32 moments."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(40, 101), nn.Linear(101, 8)
        self.row = nn.Parameter(0.1 * torch.randn(1, 1010))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(h) + (h.repeat(1, 10) * self.row).sum(-1, keepdim=True)


def build(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def shard(model: Net) -> Net:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.fc2):
        fully_shard(layer)
    return fully_shard(model)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 40, generator=g), torch.randn(BATCH, 8, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS):
    """MSE on ``(x, y)``; the global losses, and the whole parameters after the first and the last step."""
    losses, first = [], None
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(fw.global_mean(loss))
        opt.step()
        opt.zero_grad()
        if step == 0:
            first = whole_params(model)
    return {"losses": losses, "first": first, "last": whole_params(model)}


def whole_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


def local_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    """Per parameter: the numel of this rank's shard and the shapes of its state tensors."""
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        st = opt.state[p]
        out[name] = {"local_numel": local.numel(), "local_shape": tuple(local.shape),
                     **{k: (type(v).__name__, tuple(v.shape)) for k, v in st.items() if isinstance(v, torch.Tensor)}}
    return out


def same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, params) -> bool:
    for p in params:
        sa, sb = a.state[p], b.state[p]
        if sorted(sa) != sorted(sb) or sa["step"] != sb["step"]:
            return False
        if not all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor)):
            return False
    return True


def worker(rank: int, world: int, port: int, out: str) -> None:
    fw.init_gloo(rank, world, port)
    try:
        x, y = (t.chunk(world)[rank] for t in batch())
        model = shard(build())
        opt = AdamW8bit(model.parameters(), **HYPER, min_8bit_size=MIN_8BIT)
        result = train(model, opt, x, y)

        # the state dict holds this rank's local pieces: it loads back bit for bit into the same sharding
        params = list(model.parameters())
        fresh = AdamW8bit(params, **HYPER, min_8bit_size=MIN_8BIT)
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
        round_trip = same_state(opt, fresh, params)

        # offload=True on CPU parameters: the same staging path, synchronously; bit-identical to the in-memory one
        offloaded = shard(build())
        opt_off = AdamW8bit(offloaded.parameters(), **HYPER, min_8bit_size=MIN_8BIT, offload=True)
        result["offload_last"] = train(offloaded, opt_off, x, y)["last"]
        offload_state_equal = all(
            torch.equal(opt.state[p][k], opt_off.state[q][k])
            for p, q in zip(model.parameters(), offloaded.parameters())
            for k in opt.state[p] if isinstance(opt.state[p][k], torch.Tensor))

        # a torch.optim.AdamW state of the sharded model (DTensor moments) loads as 8-bit state of the local shards
        migrated = shard(build())
        ref = torch.optim.AdamW(migrated.parameters(), **HYPER)
        train(migrated, ref, x, y, steps=2)
        from_torch = AdamW8bit(migrated.parameters(), **HYPER, min_8bit_size=MIN_8BIT)
        from_torch.load_state_dict(ref.state_dict())

        states = [None] * world
        mine = {"trained": local_state(model, opt), "migrated": local_state(migrated, from_torch),
                "round_trip": round_trip, "offload_state_equal": offload_state_equal}
        dist.all_gather_object(states, mine)
        result["state"] = states
        if rank == 0:
            torch.save(result, Path(out) / "fsdp.pt")
    finally:
        dist.destroy_process_group()
