"""QLoRA on more than one process: NF4 base + LoRA (or DoRA) under FSDP2 (or DDP), launched with torchrun.

    torchrun --nproc_per_node 2 examples/fsdp_qlora.py [--ddp] [--dora] [--steps 20] [--out DIR]

Started with plain ``python`` instead of ``torchrun`` it runs as a world of one process.

On GPUs each rank takes one device and talks NCCL; on CPU the ranks talk gloo. Each rank
trains on its own slice of the global batch; FSDP2 (:func:`alignlab.distributed.shard_model`)
shards the parameters (adapters, embeddings, norms, ``lm_head``) and the packed NF4 bytes of
the base; on GPU the bf16 mixed-precision policy computes in bf16 and reduces
gradients in fp32 over fp32 master adapter weights. Only the adapter trains.

At the end ``save_adapter`` gathers the adapter and rank 0 writes it in PEFT's layout; a fresh
sharded model then loads it (``load_adapter`` into the shards) and must reproduce the trained
model's loss.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist


def tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def build(args, device, compute_dtype, adapter=None):
    """Quantize, add the adapter, then wrap: FSDP2 (each decoder layer, then the root) or DDP.

    With ``adapter`` (a saved directory) the weights come from there: DDP loads into the plain
    model before wrapping; FSDP2 injects, shards, then ``load_adapter`` fills the shards.
    """
    from alignlab.adapters import LoRAConfig, inject, load_adapter
    from alignlab.distributed import bf16_policy, ddp_model, shard_model
    from alignlab.quant import quantize_model

    model = quantize_model(tiny_llama(args.seed).to(device), compute_dtype=compute_dtype)
    if args.ddp:
        if adapter is not None:
            load_adapter(model, adapter)
        else:
            inject(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear", use_dora=args.dora))
        return ddp_model(model, device_ids=[device.index] if device.type == "cuda" else None)
    inject(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear", use_dora=args.dora))
    model = shard_model(model, mp_policy=bf16_policy() if device.type == "cuda" else None)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (>= 1)")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    p.add_argument("--dora", action="store_true", help="QDoRA: DoRA adapters on the NF4 base")
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:  # the summary line formatted None: TypeError after the model was built
        p.error(f"--steps must be >= 1, got {args.steps}")

    from alignlab.adapters import count_parameters, save_adapter
    from alignlab.distributed import is_writer, unwrap

    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # plain `python examples/fsdp_qlora.py`: one process, a world of one
        print("RANK is not set (not started by torchrun): running as a world of one process")
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    try:
        model = build(args, device, compute_dtype)
        trainable = count_parameters(unwrap(model)).trainable
        if is_writer():
            print(f"world={world} backend={dist.get_backend()} {'DDP' if args.ddp else 'FSDP2'}  trainable={trainable}")

        # a toy task: continue a fixed repeating pattern; each rank takes its rows of the global batch
        g = torch.Generator().manual_seed(args.seed)
        pattern = torch.randint(0, unwrap(model).config.vocab_size, (16,), generator=g)
        batch = pattern.repeat(2 * world, 3).chunk(world)[rank].to(device)  # (2, 48) per rank
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        model.train()
        first = last = None
        t0 = time.time()
        for step in range(args.steps):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            last = mean.item() / world
            first = last if first is None else first
            if is_writer() and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {last:.4f}")
        if is_writer():
            print(f"loss {first:.4f} -> {last:.4f} in {time.time() - t0:.1f}s")

        # save from the sharded model (gathered, written by rank 0), reload into a fresh sharded model
        holder = [args.out or (tempfile.mkdtemp(prefix="alignlab-fsdp-") if is_writer() else None)]
        dist.broadcast_object_list(holder, src=0)
        path = save_adapter(model, holder[0])
        if is_writer():
            kept = "" if args.out else " (a temporary folder, removed at the end; --out keeps it)"
            print(f"adapter saved to {path}{kept}")
        model.eval()
        fresh = build(args, device, compute_dtype, adapter=path)
        fresh.eval()
        with torch.no_grad():
            a = model(input_ids=batch, labels=batch).loss.detach().reshape(1)
            b = fresh(input_ids=batch, labels=batch).loss.detach().reshape(1)
        diff = (a - b).abs()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if is_writer():
            print(f"reloaded adapter reproduces the loss to {diff.item():.2e}")
            if args.out is None:
                import shutil

                shutil.rmtree(path)
        if diff.item() > 1e-3:
            raise SystemExit("the reloaded adapter does not reproduce the trained model")
        return last
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
