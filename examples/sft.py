"""Supervised fine-tuning with the fused linear cross-entropy, on a tiny random Llama (CPU, seconds).

The loss is taken straight from the decoder's last hidden state and the
``lm_head`` weight with :func:`alignlab.losses.cross_entropy.linear_cross_entropy`,
so the ``(tokens, vocab)`` logits never exist in full. Prompt tokens are masked
with ``-100`` (only the response is learned), and each optimizer step
accumulates two micro-batches normalised by the token count of the whole step
(:func:`count_tokens`), which makes accumulation equal to one big batch.

Step 0 checks the loss against ``LlamaForCausalLM``'s own loss on the same batch.

    python examples/sft.py --steps 30
"""

from __future__ import annotations

import argparse

import torch


def make_batch(gen: torch.Generator, batch: int, prompt_len: int, resp_len: int, vocab: int):
    """Synthetic instruction data: the response repeats the prompt (learnable in a few steps)."""
    prompt = torch.randint(3, vocab, (batch, prompt_len), generator=gen)
    ids = torch.cat([prompt, prompt[:, :resp_len]], dim=1)
    labels = ids.clone()
    labels[:, :prompt_len] = -100  # learn the response only
    # ragged batch: drop the tail of a random number of responses (right padding)
    for b in range(batch):
        cut = int(torch.randint(0, resp_len // 2 + 1, (1,), generator=gen))
        if cut:
            labels[b, -cut:] = -100
    return ids, labels


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # optional extra
        raise SystemExit("examples/sft.py needs transformers: pip install 'alignlab[hf]'") from exc

    from alignlab.losses.cross_entropy import count_tokens, linear_cross_entropy

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = 96
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def fused_loss(ids, labels, reduction):
        hidden = model.model(input_ids=ids).last_hidden_state
        # causal shift: position t predicts token t + 1
        return linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], reduction=reduction)

    # step-0 check against the model's own loss (HF shifts internally and averages over tokens)
    ids, labels = make_batch(gen, args.batch, 8, 8, vocab)
    with torch.no_grad():
        ours = fused_loss(ids, labels, "mean").loss
        theirs = model(input_ids=ids, labels=labels).loss
    if not torch.allclose(ours, theirs.float(), rtol=1e-4, atol=1e-5):
        raise SystemExit(f"fused loss {ours.item():.6f} != LlamaForCausalLM loss {theirs.item():.6f}")
    print(f"step 0 check: linear_cross_entropy {ours.item():.5f} == LlamaForCausalLM loss {theirs.item():.5f}")

    first = last = float("nan")
    for step in range(args.steps):
        micro = [make_batch(gen, args.batch, 8, 8, vocab) for _ in range(args.micro_batches)]
        n_step = count_tokens([y[:, 1:] for _, y in micro])  # normaliser of the whole step
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ids, labels in micro:
            out = fused_loss(ids, labels, "sum")
            (out.loss / n_step).backward()
            total += out.loss.item()
        opt.step()
        loss = total / n_step.item()
        first = loss if step == 0 else first
        last = loss
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss:.4f}  tokens {n_step.item()}")
    print(f"final loss {last:.4f} (first {first:.4f})")
    return last


if __name__ == "__main__":
    main()
