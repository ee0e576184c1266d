"""Merge two LoRA fine-tunes of a tiny Llama with TIES and task arithmetic.

Two toy tasks, told apart by their first token: after marker ``0`` the
sequence is drawn from the "low" tokens 2..17, after marker ``1`` from the
"high" tokens 48..63 (16 tokens each, so the best possible loss is
``ln 16 ≈ 2.77`` against ``ln 64 ≈ 4.16`` for a uniform guess).

A random tiny Llama (no download) gets one LoRA adapter per task. Each adapter
is trained, saved in PEFT format (``save_adapter``) and folded into a copy of the
base (``merge_and_unload``); the two folded models are written as sharded
safetensors checkpoints and merged tensor by tensor with
``merge_checkpoints`` (TIES and task arithmetic), exactly what
``python -m alignlab.merging recipe.yaml OUT`` does. The table shows every
model's loss on both tasks: each fine-tune is good at its own task only; the
merges keep part of both.

    python examples/merge.py            # ~20-40 s on a laptop CPU
    python examples/merge.py --steps 10 # smoke test
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alignlab.adapters import LoRAConfig, inject, merge_and_unload, save_adapter
from alignlab.merging import lora_svd, merge_checkpoints

VOCAB, SEQ = 64, 16
TASKS = {"low": (0, 2), "high": (1, 48)}  # task -> (marker token, first token of its 16-token range)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3)  # large enough that a frozen lm_head can express sharp outputs
    return LlamaForCausalLM(cfg).eval()


def batch(task: str, n: int, g: torch.Generator) -> torch.Tensor:
    marker, first = TASKS[task]
    body = torch.randint(first, first + 16, (n, SEQ - 1), generator=g)
    return torch.cat([torch.full((n, 1), marker), body], dim=1)


def loss_on(model, task: str, seed: int = 123) -> float:
    ids = batch(task, 128, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # score every token after the marker
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()


def finetune(base, task: str, steps: int, out: Path):
    """Train one LoRA adapter on ``task``; save it (PEFT format) and return the folded model."""
    model = inject(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2)
    g = torch.Generator().manual_seed(list(TASKS).index(task) + 1)
    model.train()
    for _ in range(steps):
        ids = batch(task, 32, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_adapter(model, out / f"adapter_{task}")
    return merge_and_unload(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="training steps per adapter")
    ap.add_argument("--density", type=float, default=0.5, help="TIES density")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    from transformers import LlamaForCausalLM

    base = tiny_llama()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"base": base}
        base.save_pretrained(tmp / "base", max_shard_size="100KB")  # sharded, like real checkpoints
        for task in TASKS:
            models[f"lora[{task}]"] = finetune(base, task, args.steps, tmp)
            models[f"lora[{task}]"].save_pretrained(tmp / task, max_shard_size="100KB")

        common = {"base_model": str(tmp / "base"), "out_shard_size": "100KB"}
        recipes = {
            "task_arithmetic": {"merge_method": "task_arithmetic", **common,
                                "models": [{"model": str(tmp / t), "parameters": {"weight": 1.0}} for t in TASKS]},
            f"ties(d={args.density})": {"merge_method": "ties", **common,
                                        "models": [{"model": str(tmp / t),
                                                    "parameters": {"weight": 1.0, "density": args.density}}
                                                   for t in TASKS]},
        }
        for name, recipe in recipes.items():
            out = merge_checkpoints(recipe, tmp / name.split("(")[0])
            models[name] = LlamaForCausalLM.from_pretrained(out).eval()

        # The same sum of the two low-rank updates, re-factorised to a single rank-8 adapter per layer.
        from safetensors.torch import load_file

        svd = copy.deepcopy(base)
        state = svd.state_dict()
        adapters = [load_file(tmp / f"adapter_{t}" / "adapter_model.safetensors") for t in TASKS]
        for key in [k for k in adapters[0] if k.endswith("lora_A.weight")]:
            target = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            As = [ad[key] for ad in adapters]
            Bs = [ad[key.replace("lora_A", "lora_B")] for ad in adapters]
            a, b = lora_svd(As, Bs, rank=8, scales=[16 / 8, 16 / 8])
            state[target] += b @ a
        svd.load_state_dict(state)
        models["lora_svd(r=8)"] = svd

        print(f"{'model':22}" + "".join(f"{'loss[' + t + ']':>14}" for t in TASKS))
        for name, model in models.items():
            print(f"{name:22}" + "".join(f"{loss_on(model, t):14.3f}" for t in TASKS))
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
