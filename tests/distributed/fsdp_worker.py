"""What each rank runs in ``test_fsdp.py`` (and the single-process oracle runs the same functions).

A module of its own, not the test file: ``torch.multiprocessing.spawn`` pickles the worker by
module name, which the spawned processes import.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from alignlab.adapters import LoRAConfig, disabled, inject, load_adapter, save_adapter
from alignlab.distributed import bf16_policy, ddp_model, full_state_dict, full_tensor, shard_model, unwrap
from alignlab.quant import quantize_model

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 16, 128, 3


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def build(dora: bool, with_adapter: bool = True, seed: int = 0):
    """Tiny random Llama, NF4 base (fp32 compute, for exact parity), LoRA/DoRA r=4 on every linear;
    ``lora_B`` drawn at random so that every adapter factor gets a gradient at the first step."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = quantize_model(LlamaForCausalLM(llama_config()), compute_dtype=torch.float32)
    if not with_adapter:
        return model
    inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=dora))
    return randomise_lora_b(model, seed + 1)


def randomise_lora_b(model, seed: int):
    """``lora_B`` drawn at random (it starts at zero), so that every adapter factor gets a gradient at the first step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def global_batch(batch: int = GLOBAL_BATCH, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


def global_mean(x: torch.Tensor) -> float:
    """Mean over ranks of a per-rank mean (equal token counts per rank: the global batch mean)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def train(model, ids, steps: int = STEPS, momentum: float = 0.9):
    """SGD (lr 0.5); returns the global losses and the whole adapter gradients of each step, and the optimiser."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5, momentum=momentum)
    losses, grads = [], []
    for _ in range(steps):
        loss = loss_of(model, ids)
        loss.backward()
        losses.append(global_mean(loss))
        grads.append({n: full_tensor(p.grad).clone() for n, p in unwrap(model).named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    return losses, grads, opt


def wrap(model, how: str, mp_policy=None):
    if how == "fsdp":
        return shard_model(model, mp_policy=mp_policy)
    return ddp_model(model)


def local_bytes(model) -> dict:
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"param_bytes_local": params, "param_bytes_full": full, "buffer_bytes": buffers}


def run_case(model, ids, out: Path, name: str) -> dict:
    """Save the initial adapter, train, save, then the next loss and the adapters-off (reference) loss."""
    save_adapter(model, out / name / "init")
    losses, grads, opt = train(model, ids)
    save_adapter(model, out / name / "trained")
    with torch.no_grad():
        next_loss = global_mean(loss_of(model, ids))
        with disabled(model):
            ref_loss = global_mean(loss_of(model, ids))
    n_state = len(opt.state)
    return {"losses": losses, "grads": grads, "next_loss": next_loss, "ref_loss": ref_loss, "opt_state": n_state}


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join the gloo group on localhost, one thread a rank, PyTorch kernels (the CPU reference path)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["ALIGNLAB_KERNELS"] = "torch"
    torch.set_num_threads(1)
    # a collective that waits longer than this fails the test instead of holding CI until its wall-clock limit
    # (one such hang, both ranks inside full_tensor's all-gather of an FSDP gradient, was seen once in CI)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))


def worker(rank: int, world: int, port: int, out: str, phase: str) -> None:
    init_gloo(rank, world, port)
    try:
        out = Path(out)
        ids = global_batch().chunk(world)[rank]
        results = {}
        if phase == "train":
            for how in ("fsdp", "ddp"):
                for dora in (False, True):
                    name = f"{how}_{'dora' if dora else 'lora'}"
                    model = wrap(build(dora), how)
                    results[name] = run_case(model, ids, out, name)
                    if how == "fsdp":
                        results[name]["cache_casts"] = [m.cache_casts for m in model.modules() if hasattr(m, "cache_casts")]
                        results[name]["bytes"] = local_bytes(model)
                        results[name]["state_dict"] = full_state_dict(model)
            model = wrap(build(False), "fsdp", mp_policy=bf16_policy())
            results["fsdp_bf16"] = {"losses": train(model, ids)[0]}
        else:  # restart: fresh processes resume from the adapters saved by the "train" phase
            for how in ("fsdp", "ddp"):
                for dora in (False, True):
                    name = f"{how}_{'dora' if dora else 'lora'}"
                    if how == "fsdp":  # sharded model: inject first, shard, then load into the shards
                        model = wrap(build(dora), how)
                        load_adapter(model, out / name / "trained")
                    else:
                        model = wrap(load_adapter(build(dora, with_adapter=False), out / name / "trained"), how)
                    with torch.no_grad():
                        results[name] = {"loss": global_mean(loss_of(model, ids))}
                    if how == "fsdp" and not dora:
                        try:
                            load_adapter(model, out / name / "trained", adapter_name="other")
                        except ValueError as e:
                            results["missing_adapter_error"] = str(e)
        if rank == 0:
            torch.save(results, out / f"{phase}.pt")
    finally:
        dist.destroy_process_group()
