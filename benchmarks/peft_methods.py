"""Every PEFT family on one model shape: trainable parameters, step time, peak memory (GPU).

One training step = forward + backward + AdamW step on the trainable parameters of a
random-weight Llama (bf16 base, adapters in their default dtype), batch 4 × 512
tokens. Peak memory is the allocator peak *above* what was allocated before the step
(activations, gradients, temporaries; the optimizer state is already allocated after
warm-up and is reported separately as ``2 · 4 B`` per optimised number for AdamW in fp32;
for ALPS that is the whole q/k/v/o matrices, whose unselected slices get zero gradients).
PEFT's LoRA runs in the same process as the peer for the one method both have on the
hot path; every contestant sees the same input ids.

Run: ``python benchmarks/peft_methods.py`` on a CUDA machine (writes
``benchmarks/results/peft_methods.json``); ``--smoke`` runs a tiny shape on CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from alignlab.adapters import (
    AdaLoRAConfig,
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoKrConfig,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SoRAConfig,
    VeRAConfig,
    count_parameters,
    inject,
)
from alignlab.adapters.heads import restrict_to_heads, selected_parameter_count, top_heads
from alignlab.bench import compare, format_bytes, save_results

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def methods(r: int) -> dict:
    return {
        "LoRA r=16 (all-linear)": LoRAConfig(r=r, alpha=2 * r, target_modules=ATTN_MLP),
        "DoRA r=16 (all-linear)": LoRAConfig(r=r, alpha=2 * r, target_modules=ATTN_MLP, use_dora=True),
        "(IA)3 (k, v, down)": IA3Config(),
        "VeRA r=256 (all-linear)": VeRAConfig(r=256, target_modules=ATTN_MLP),
        "LoKr r=16 (all-linear)": LoKrConfig(r=r, alpha=2 * r, target_modules=ATTN_MLP),
        "BitFit (all-linear)": BitFitConfig(target_modules="all-linear"),
        "prompt tuning n=20": PromptTuningConfig(num_virtual_tokens=20),
        "prefix tuning n=20": PrefixTuningConfig(num_virtual_tokens=20),
        "prefix tuning n=20 + MLP": PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512),
        "bottleneck Houlsby rf=16": BottleneckConfig(reduction_factor=16, placement="houlsby"),
        "bottleneck parallel rf=16": BottleneckConfig(reduction_factor=16, placement="parallel", scaling=4.0),
        "AdaLoRA r=12->8 (q, v)": AdaLoRAConfig(init_r=12, target_r=8, total_step=1000),
        "SoRA r=16 (all-linear)": SoRAConfig(r=r, target_modules=ATTN_MLP),
    }


def _step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)  # no decay: ALPS' masked slices must stay put

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def build_model(hidden: int, layers: int, vocab: int, device: str, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,
                                   max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, no JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        hidden, layers, vocab, batch, seq, device, dtype, rep = 512, 2, 512, 1, 32, "cpu", torch.float32, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/peft_methods.py needs a CUDA GPU (or --smoke)")
        hidden, layers, vocab, batch, seq, device, dtype, rep = 2048, 8, 32000, 4, 512, "cuda", torch.bfloat16, 10
    base = build_model(hidden, layers, vocab, device, dtype)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    total = count_parameters(base).total
    contestants, trainable, optim_numel = {}, {}, {}
    for name, cfg in methods(16).items():
        model = inject(copy.deepcopy(base), cfg)
        trainable[name] = count_parameters(model).trainable
        optim_numel[name] = trainable[name]
        contestants[name] = _step(model, ids)
    heads_model = copy.deepcopy(base)
    n_heads = heads_model.config.num_attention_heads
    chosen = top_heads(torch.rand(layers, n_heads, generator=torch.Generator().manual_seed(0)), 0.1)  # timing does not depend on which
    restrict_to_heads(heads_model, chosen)
    trainable["ALPS heads 10% (full q/k/v/o, masked grads)"] = selected_parameter_count(heads_model, chosen)
    optim_numel["ALPS heads 10% (full q/k/v/o, masked grads)"] = count_parameters(heads_model).trainable  # whole matrices
    contestants["ALPS heads 10% (full q/k/v/o, masked grads)"] = _step(heads_model, ids)
    try:
        import peft

        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN_MLP))
        trainable["PEFT LoRA r=16 (all-linear)"] = count_parameters(theirs).trainable
        optim_numel["PEFT LoRA r=16 (all-linear)"] = trainable["PEFT LoRA r=16 (all-linear)"]
        contestants["PEFT LoRA r=16 (all-linear)"] = _step(theirs, ids)
    except ImportError:
        pass
    cmp = compare(contestants, warmup=3, rep=rep, device=device, name=f"PEFT families: train step, Llama h={hidden} L={layers}, {batch}x{seq} tokens",
                  meta={"hidden": hidden, "layers": layers, "vocab": vocab, "batch": batch, "seq": seq, "dtype": str(dtype),
                        "base_parameters": total, "trainable": trainable})
    print(cmp.table())
    lines = ["| method | trainable params | % of base | step ms (median) | peak extra memory | AdamW state |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in cmp.results.items():
        t = trainable[name]
        peak = format_bytes(m.peak_bytes) if m.peak_bytes is not None else "n/a"
        step = f"{m.median_ms:.2f}" if m.ok else f"error: {m.error}"
        lines.append(f"| {name} | {t:,} | {100 * t / total:.3f} | {step} | {peak} | {format_bytes(8 * optim_numel[name])} |")
    table = "\n".join(lines)
    print(table)
    if not args.smoke:
        out = Path(__file__).parent / "results" / "peft_methods.json"
        save_results(out, [cmp], meta={"table_markdown": table})
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
