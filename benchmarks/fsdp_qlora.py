"""QLoRA steps under FSDP2 and DDP vs the plain model: step time and peak memory per GPU (issue 20).

Shape: the 4-layer Llama-3-8B-shaped stack of ``benchmarks/qlora_step.py`` (hidden 4096, MLP 14336,
128k vocabulary), seq 2048, one sequence per rank; NF4 base (``quantize_model``) + LoRA r=16 on
q/k/v/o/gate/up/down, AdamW on the adapters. Contestants (each starts from the same weights):

* plain -- the model as is (world size 1 only);
* FSDP2, bf16 policy -- ``shard_model(model, mp_policy=bf16_policy())``: each decoder layer is one unit,
  fp32 sharded master adapter weights, bf16 all-gather / compute, fp32 gradient reduce-scatter;
* FSDP2, no policy -- ``shard_model(model)``: fp32 adapters all-gathered as they are (same math as plain);
* DDP -- ``ddp_model(model)`` (no per-step buffer broadcast; adapter gradients all-reduced).

Per contestant: median ms/step (CUDA events) over the timed steps, tokens/s per rank, memory allocated
once the model is built (the model's own state on this GPU) and the peak over the timed steps, the
bytes of this rank's parameter shards (the packed NF4 bytes are parameters under ``shard_model``) and
of its replicated buffers (fp32 second-level scales), and the first
and last timed loss. At world size 1 this measures what FSDP2 / DDP cost over the plain model; with
``torchrun --nproc_per_node N`` the same script gives the per-GPU numbers of N ranks.

    python benchmarks/fsdp_qlora.py [--steps 20] [--out PATH]                 # world size 1, one GPU
    torchrun --nproc_per_node N benchmarks/fsdp_qlora.py                      # N GPUs (nccl)
    torchrun --nproc_per_node 2 benchmarks/fsdp_qlora.py --tiny               # CPU dry run (gloo), tiny model

Writes ``benchmarks/results/fsdp_qlora_w{N}.json`` (rank 0) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from qlora_step import SEQ, TARGETS, llama8b_stack  # noqa: E402

from alignlab.adapters import LoRAConfig, inject  # noqa: E402
from alignlab.bench import library_versions, write_json  # noqa: E402
from alignlab.distributed import bf16_policy, ddp_model, is_writer, shard_model  # noqa: E402
from alignlab.quant import quantize_model  # noqa: E402


def _frozen_integer_shards_on_old_torch() -> None:
    """torch < 2.13 only (the GPU image has 2.11; alignlab's floor is 2.13): there FSDP2 wraps every shard in
    ``nn.Parameter(data)`` with the default ``requires_grad=True``, which a uint8 tensor cannot take, so
    ``fully_shard`` of the packed NF4 bytes raises. torch 2.13 passes the original parameter's
    ``requires_grad``. This shim gives torch 2.11's FSDP2 module that behaviour for non-float data only;
    nothing else changes. Not needed (and not applied) on the versions alignlab supports."""
    import types

    from torch import nn
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        return

    class _Meta(type):
        def __instancecheck__(cls, obj):  # isinstance checks in that module still see nn.Parameter
            return isinstance(obj, nn.Parameter)

    class Parameter(metaclass=_Meta):
        def __new__(cls, data=None, requires_grad=True):
            return nn.Parameter(data, requires_grad=requires_grad and data.is_floating_point())

    _fsdp_param.nn = types.SimpleNamespace(**{**vars(nn), "Parameter": Parameter})


def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).requires_grad_(False)


def build(base, device, wrapper: str):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = quantize_model(copy.deepcopy(base).to(device), compute_dtype=dtype)
    torch.manual_seed(0)  # the same lora_A init for every contestant
    inject(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)  # non-zero B: a non-trivial adapter from the first step
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    if wrapper.startswith("FSDP2"):
        _frozen_integer_shards_on_old_torch()
    if wrapper == "FSDP2, bf16 policy":
        return shard_model(model, mp_policy=bf16_policy())
    if wrapper == "FSDP2, no policy":
        return shard_model(model)
    if wrapper == "DDP":
        return ddp_model(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def state_bytes(model) -> dict:
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"param_shard_mib": local / 2**20, "buffer_mib": buffers / 2**20}


def run_steps(model, ids, device, warmup: int, steps: int) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cuda = device.type == "cuda"

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return {"ms": ms, "tokens_per_s": ids.numel() / ms * 1e3, "first_loss": losses[0].item(),
            "last_loss": losses[-1].item(),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny Llama, seq 64: a dry run of the script (CPU works)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:  # the 8B-shaped stack is built on the GPU: it failed deep inside torch.cuda
        sys.exit("benchmarks/fsdp_qlora.py needs a CUDA GPU (or --tiny to check the script on the CPU)")
    if "RANK" not in os.environ:  # plain `python benchmarks/fsdp_qlora.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        base = tiny_base() if args.tiny else llama8b_stack()
        seq = 64 if args.tiny else SEQ
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own sequence
        ids = torch.randint(0, base.config.vocab_size, (1, seq), generator=g).to(device)
        wrappers = (["plain"] if world == 1 else []) + ["FSDP2, bf16 policy", "FSDP2, no policy", "DDP"]
        rows = {}
        for name in wrappers:
            model = build(base, device, name)
            if cuda:
                torch.cuda.synchronize()
            row = {**state_bytes(model),
                   "model_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None,
                   **run_steps(model, ids, device, args.warmup, args.steps)}
            rows[name] = row
            if is_writer():
                peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
                model_gib = "n/a" if row["model_gib"] is None else f"{row['model_gib']:.2f}"
                print(f"{name:22s} {row['ms']:9.1f} ms/step {row['tokens_per_s']:9.0f} tok/s/rank  "
                      f"model {model_gib} GiB  peak {peak} GiB  param shard {row['param_shard_mib']:.1f} MiB  "
                      f"replicated buffers {row['buffer_mib']:.1f} MiB  loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}",
                      flush=True)
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        result = {"world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                  "tiny": args.tiny, "seq_per_rank": seq, "versions": library_versions(), "rows": rows}
        if is_writer():
            default = Path(__file__).parent / "results" / f"fsdp_qlora_w{world}{'_tiny' if args.tiny else ''}.json"
            out = Path(args.out) if args.out else default
            write_json(out, result)
            print(f"wrote {out}")
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
