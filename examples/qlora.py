"""QLoRA end to end on a tiny random Llama: NF4 base + LoRA adapters, a few training steps, save.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) freezes the base model in 4-bit
NormalFloat with double quantization and trains low-rank adapters on top:

    y = NF4(W) x + (alpha / r) B A x,      only A and B are trained.

On CPU this runs the PyTorch reference path; on a CUDA GPU the same script runs
alignlab's Triton NF4 kernels (fused GEMV / matmul, dequantization).

    python examples/qlora.py [--steps 20] [--out DIR] [--dora]

The adapter is saved in PEFT's layout (to ``--out``, or a temporary directory that is
removed at the end), reloaded onto a freshly quantized copy of the same base, and the
reloaded model must reproduce the trained one's logits.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one, removed at the end)")
    p.add_argument("--dora", action="store_true", help="QDoRA: DoRA adapters on the NF4 base")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from alignlab.adapters import LoRAConfig, count_parameters, inject
    from alignlab.quant import NF4Linear, quantize_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_llama(args.seed).to(device)

    # 1. freeze the base in NF4 (blocksize 64 + double quantization); keep lm_head in full precision
    quantize_model(model, skip=("lm_head",), compute_dtype=compute_dtype)
    n_nf4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    for param in model.parameters():
        param.requires_grad_(False)

    # 2. LoRA on every linear layer (the NF4 ones), PEFT-compatible
    inject(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear", use_dora=args.dora))
    counts = count_parameters(model)
    print(f"device={device}  NF4 layers={n_nf4}  trainable={counts.trainable}  total={counts.total}")

    # 3. a toy task: learn to continue a fixed repeating token pattern
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    pattern = torch.randint(0, vocab, (16,), generator=g)
    batch = pattern.repeat(4, 4)[:, :48].to(device)  # (batch, seq)
    last = train(model, batch, args.steps, autocast_dtype=compute_dtype if device == "cuda" else None)

    # 4. save only the adapter (adapter_config.json + adapter_model.safetensors, PEFT layout), then
    #    reload it onto a freshly quantized copy of the same base: the logits must come back
    check_reload(model, batch, args.out, lambda: quantize_model(tiny_llama(args.seed).to(device), compute_dtype=compute_dtype))
    return last


def train(model, batch: torch.Tensor, steps: int, autocast_dtype: torch.dtype | None = None) -> float:
    """AdamW (lr 3e-3) on the next-token loss of ``batch (batch, seq)`` for ``steps`` steps, under autocast to
    ``autocast_dtype`` where given; prints the loss every fifth step and returns the last one."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    first = last = None
    t0 = time.time()
    for step in range(steps):
        with torch.autocast(device_type=batch.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {last:.4f}")
    print(f"loss {first:.4f} -> {last:.4f} in {time.time() - t0:.1f}s")
    return last


def check_reload(model, batch: torch.Tensor, out: str | None, fresh_base) -> float:
    """Save ``model``'s adapter (PEFT layout) to ``out`` (default: a temporary directory, removed after), load it
    onto ``fresh_base()`` (a newly built, quantized base) and return the largest logit difference on ``batch``.

    Raises:
        SystemExit: the reloaded model's logits differ by more than 1e-4.
    """
    from alignlab.adapters import load_adapter, save_adapter

    with tempfile.TemporaryDirectory(prefix="alignlab-qlora-") as tmp:
        path = save_adapter(model, out or Path(tmp) / "adapter")
        kept = "" if out else " (a temporary folder, removed at the end; --out keeps it)"
        print(f"adapter saved to {path}{kept}")
        reloaded = load_adapter(fresh_base(), path)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(input_ids=batch).logits - reloaded(input_ids=batch).logits).abs().max().item()
    print(f"reloaded adapter reproduces the logits to {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")
    return diff


if __name__ == "__main__":
    main()
