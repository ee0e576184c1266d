"""Quickstart: LoRA on a tiny random Llama, on CPU, in a few seconds.

1. build a tiny random-weight Llama (no download),
2. inject LoRA into every linear layer but the head,
3. train a few steps on a toy task (continue a counting sequence) and watch the loss fall,
4. save the adapter in PEFT's format, load it into a fresh copy of the base and check
   the outputs match (``peft.PeftModel.from_pretrained`` reads the same directory).

Run: ``python examples/quickstart.py [--steps 40] [--out /tmp/alignlab-quickstart]``
"""

import argparse
import copy
import tempfile
import time

import torch
import transformers

from alignlab.adapters import LoRAConfig, count_parameters, disabled, inject, load_adapter, save_adapter


def tiny_llama(vocab: int = 64) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def counting_batch(batch: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences ``s, s+k, s+2k, ... (mod vocab)``: the model must infer the step ``k`` and continue."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + step * torch.arange(length)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="adapter directory (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    model = tiny_llama()
    base = copy.deepcopy(model)  # kept only to demonstrate loading into a fresh base below
    inject(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    counts = count_parameters(model)
    print(f"trainable {counts.trainable:,} of {counts.total:,} parameters ({100 * counts.fraction:.1f}%)")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    eval_ids = counting_batch(16, 24, 64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        first = model(input_ids=eval_ids, labels=eval_ids).loss.item()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = counting_batch(16, 24, 64, gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.1f}s)")
    with torch.no_grad():
        last = model(input_ids=eval_ids, labels=eval_ids).loss.item()
        with disabled(model):
            base_loss = model(input_ids=eval_ids, labels=eval_ids).loss.item()
    print(f"held-out loss: {first:.3f} -> {last:.3f} (base model without adapter: {base_loss:.3f})")
    if not last < first:
        raise SystemExit("loss did not go down")

    with tempfile.TemporaryDirectory(prefix="alignlab-quickstart-") as tmp:  # removed at the end
        out = args.out or tmp
        save_adapter(model, out)
        reloaded = load_adapter(base, out)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(eval_ids).logits - reloaded(eval_ids).logits).abs().max().item()
    print(f"saved PEFT-format adapter to {out if args.out else 'a temporary directory'}; "
          f"reloaded outputs differ by {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("reloaded adapter does not reproduce the outputs")


if __name__ == "__main__":
    main()
