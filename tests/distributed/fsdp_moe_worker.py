"""What each rank runs in ``test_fsdp_moe.py`` (and the single-process oracle runs the same functions): QLoRA on
the NF4 experts (and attention) of a tiny random Mixtral, sharded by FSDP2. The rank set-up, the batch and the
training loop are ``fsdp_worker``'s."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import fsdp_worker as fw  # on sys.path: the test file puts this folder there, and spawned ranks inherit it
from alignlab.adapters import LoRAConfig, inject, save_adapter
from alignlab.distributed import full_state_dict, shard_model
from alignlab.quant import quantize_model

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 12, 64, 2
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(seed: int = 0):
    """Tiny random Mixtral (4 experts, top-2), NF4 base with fp32 compute; LoRA r=4 on q_proj and every expert
    weight, ``lora_B`` drawn at random so that every factor gets a gradient at the first step."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = quantize_model(MixtralForCausalLM(config), compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=TARGETS))
    return fw.randomise_lora_b(model, seed + 1)


def global_batch() -> torch.Tensor:
    return fw.global_batch(GLOBAL_BATCH, SEQ, VOCAB)


def train(model, ids):
    """Plain SGD; the global losses and the whole adapter gradients of each step (the router is not trained)."""
    losses, grads, _ = fw.train(model, ids, steps=STEPS, momentum=0.0)
    return losses, grads


def worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.tensor import DTensor

    fw.init_gloo(rank, world, port)
    try:
        out = Path(out)
        model = shard_model(build())
        experts = model.model.layers[0].mlp.experts.base_layer
        qdata = experts.gate_up_proj_qdata
        sharded = {"type": type(experts).__name__, "is_dtensor": isinstance(qdata, DTensor),
                   "local_rows": qdata.to_local().shape[0] if isinstance(qdata, DTensor) else qdata.shape[0]}
        losses, grads = train(model, global_batch().chunk(world)[rank])
        save_adapter(model, out / "fsdp")
        state = full_state_dict(model)
        if rank == 0:
            torch.save({"losses": losses, "grads": grads, "sharded": sharded, "state_dict": state}, out / "fsdp.pt")
    finally:
        dist.destroy_process_group()
