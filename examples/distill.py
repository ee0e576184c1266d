"""Distil a tiny random Llama teacher into a smaller student on CPU.

The student learns the teacher's next-token distributions with the fused
generalised-JSD loss (student hidden state + lm_head weight, teacher logits),
never forming the student's full logits. Prompts are random token sequences
with right padding, masked out of the loss.

    python examples/distill.py [--steps 40] [--kind jsd|forward_kl|reverse_kl|tv]
"""

from __future__ import annotations

import argparse
import time

import torch

from alignlab.losses.distill import fused_linear_distill_loss


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise SystemExit("this example needs transformers: pip install 'alignlab[hf]'") from exc
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kind", default="jsd", choices=["jsd", "forward_kl", "reverse_kl", "tv"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    start = time.time()

    vocab, batch, seq = 256, 8, 24
    teacher = tiny_llama(hidden=64, layers=2, vocab=vocab, seed=0).eval()
    student = tiny_llama(hidden=32, layers=1, vocab=vocab, seed=1).train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()

    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits

    losses = []
    for step in range(args.steps):
        hidden = student.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = fused_linear_distill_loss(
            hidden,
            student.lm_head.weight,
            teacher_logits,
            kind=args.kind,
            beta=args.beta,
            temperature=args.temperature,
            mask=attention_mask.bool(),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  {args.kind} {loss.item():.4f}")
    print(f"first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f} in {time.time() - start:.1f}s")
    if not losses[-1] < losses[0]:
        raise SystemExit("distillation loss did not go down")


if __name__ == "__main__":
    main()
