"""Optimizer state: torch AdamW vs alignlab AdamW8bit (in GPU memory, offloaded) vs bitsandbytes (GPU).

Issue 26, part 1. Two workloads, each optimizer from its library's defaults (lr 1e-5 / 1e-4, betas
(0.9, 0.999), weight decay 0):

* **full fine-tune** of a ~1.1B-parameter Llama-shaped model (TinyLlama shape: hidden 2048, MLP 5632,
  22 layers, 32 heads, 4 KV heads, vocab 32000), parameters in bf16, seq 1024, batch 2;
* **QLoRA step** of ``benchmarks/qlora_step.py`` (4 Llama-3-8B layers, NF4 base, LoRA r=16 on all
  projections, seq 2048, batch 1) with each optimizer on the adapter weights.

Optimizers: ``torch.optim.AdamW(fused=True)``, ``alignlab.optim.AdamW8bit``, ``AdamW8bit(offload=True)``,
``bitsandbytes.optim.AdamW8bit`` and ``PagedAdamW8bit``. Per row: median ms per step (forward + backward
+ ``step()`` + ``zero_grad``, CUDA events), median ms of ``step()`` alone on the current stream (for the
offloaded optimizer: how long the next forward waits), peak allocated GPU memory over the timed steps,
optimizer state bytes on the GPU and in CPU memory, the state ratio to fp32 AdamW's 8 bytes per
parameter, and the first / last loss (same weights and data everywhere, so they must track).

Targets (issue 26): state <= 0.27x fp32 AdamW's; step time <= 1.05x torch's fused AdamW; faster than
bitsandbytes at equal memory.

Run: ``python benchmarks/optim.py [--quick] [--only full|qlora] [--out PATH]`` on a CUDA machine;
``--quick`` shrinks the model (2 layers, seq 256) and the step counts for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
from pathlib import Path

import torch

from alignlab.bench import library_versions, write_json
from alignlab.optim import AdamW8bit

sys.path.insert(0, str(Path(__file__).parent))


def llama_1b(layers: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model.cpu()


def optimizers(lr: float) -> dict:
    table = {
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, fused=True),
        "alignlab AdamW8bit": lambda ps: AdamW8bit(ps, lr=lr, weight_decay=0.0),
        "alignlab AdamW8bit offload": lambda ps: AdamW8bit(ps, lr=lr, weight_decay=0.0, offload=True),
    }
    try:
        import bitsandbytes as bnb

        table["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=0.0)
        table["bnb PagedAdamW8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=lr, weight_decay=0.0)
    except ImportError:
        print("bitsandbytes is not installed: its rows are skipped", file=sys.stderr)
    return table


def _state_split(opt) -> tuple[int, int]:
    """(GPU bytes, CPU bytes) of the optimizer state; bitsandbytes' paged state counts as CPU."""
    gpu = cpu = 0
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                nbytes = t.numel() * t.element_size()
                if t.is_cuda and not getattr(t, "is_paged", False):
                    gpu += nbytes
                else:
                    cpu += nbytes
    return gpu, cpu


def run(model, make_opt, ids, warmup: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = make_opt(params)

    def step(times_opt):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        opt.step()
        e.record()
        opt.zero_grad(set_to_none=True)
        times_opt.append((s, e))
        return loss.detach()

    for _ in range(warmup):
        step([])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, opt_events, losses = [], [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(step(opt_events))
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    gpu, cpu = _state_split(opt)
    row = dict(ms=statistics.median(times), ms_p10=sorted(times)[len(times) // 10],
               ms_p90=sorted(times)[(9 * len(times)) // 10],
               step_ms=statistics.median(s.elapsed_time(e) for s, e in opt_events),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               state_gpu_bytes=gpu, state_cpu_bytes=cpu, state_ratio_to_fp32=(gpu + cpu) / (8 * n_params),
               trainable=n_params, first_loss=losses[0].item(), last_loss=losses[-1].item())
    del opt
    return row


def _cleanup():
    gc.collect()
    torch.cuda.empty_cache()


def full_finetune(args) -> dict:
    base = llama_1b(2 if args.quick else 22)
    seq, batch = (256, 2) if args.quick else (1024, 2)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).cuda()
    rows = {}
    for name, make in optimizers(1e-5).items():
        model = copy.deepcopy(base).cuda()
        rows[name] = run(model, make, ids, args.warmup, args.steps)
        print(f"full  {name:28s} {rows[name]['ms']:8.1f} ms/step  step() {rows[name]['step_ms']:7.2f} ms  "
              f"peak {rows[name]['peak_gib']:6.2f} GiB  state x{rows[name]['state_ratio_to_fp32']:.3f}", flush=True)
        del model
        _cleanup()
    return dict(shape=dict(params=sum(p.numel() for p in base.parameters()), seq=seq, batch=batch,
                           layers=base.config.num_hidden_layers, dtype="bfloat16"), rows=rows)


def qlora(args) -> dict:
    import qlora_step

    base = qlora_step.llama8b_stack(1 if args.quick else 4)
    seq = 256 if args.quick else qlora_step.SEQ
    ids = torch.randint(0, 128256, (1, seq), generator=torch.Generator().manual_seed(0)).cuda()
    rows = {}
    for name, make in optimizers(1e-4).items():
        model = qlora_step.alignlab_model(base, False, None)
        rows[name] = run(model, make, ids, args.warmup, args.steps)
        print(f"qlora {name:28s} {rows[name]['ms']:8.1f} ms/step  step() {rows[name]['step_ms']:7.2f} ms  "
              f"peak {rows[name]['peak_gib']:6.2f} GiB  state x{rows[name]['state_ratio_to_fp32']:.3f}", flush=True)
        del model
        _cleanup()
    return dict(shape=dict(layers=base.config.num_hidden_layers, seq=seq, batch=1, lora_r=16), rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer model, seq 256, few steps (smoke run)")
    parser.add_argument("--only", choices=["full", "qlora"], default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optim.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/optim.py needs a CUDA GPU")
    args.warmup = args.warmup or (2 if args.quick else 5)
    args.steps = args.steps or (3 if args.quick else 20)
    results = {}
    if args.only in (None, "full"):
        results["full_finetune"] = full_finetune(args)
    if args.only in (None, "qlora"):
        results["qlora_step"] = qlora(args)
    for part in results.values():
        rows = part["rows"]
        ref = rows.get("torch AdamW (fused)")
        for name, row in rows.items():
            row["ms_ratio_to_torch_fused"] = row["ms"] / ref["ms"] if ref else None
    if args.quick and args.out == parser.get_default("out"):
        args.out = args.out.with_name("optim_quick.json")
    write_json(args.out, {"versions": library_versions(), "device": torch.cuda.get_device_name(),
                          "quick": args.quick, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
