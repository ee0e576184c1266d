"""Completion-only SFT with sequence packing on a tiny random Llama (CPU, < 1 minute).

Pipeline (all alignlab.data):
  conversations --tokenize_chats--> {input_ids, labels (assistant tokens only)}
                --pack_examples---> rows of <= max_length tokens, position ids reset per sample
                --collate_packed--> (batch, max_length) tensors + block-diagonal causal mask

The task is synthetic (add two numbers written as words) so the script needs
no download: the tokenizer is a word-level `tokenizers` model wrapped in
`transformers.PreTrainedTokenizerFast` with a hand-written chat template.

    python examples/sft_packing.py --steps 100
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from alignlab.data import IGNORE_INDEX, collate_packed, pack_examples, packed_attention_mask, tokenize_chats

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen").split()
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = NUMBERS + "what is plus ? you add numbers the answer and also".split()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(special + words)}, "<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=special[4:])
    fast.chat_template = TEMPLATE
    return fast


def conversations(seed: int):
    """An endless stream of 1- or 2-turn addition dialogues."""
    rng = random.Random(seed)
    while True:
        messages = [{"role": "system", "content": "you add numbers"}] if rng.random() < 0.5 else []
        for _ in range(rng.choice((1, 2))):
            a, b = rng.randrange(10), rng.randrange(9)
            messages += [{"role": "user", "content": f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?"},
                         {"role": "assistant", "content": f"the answer is {NUMBERS[a + b]}"}]
        yield messages


def build_model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def answer_accuracy(model, tokenizer, seed: int, n: int = 64) -> float:
    """Teacher-forced accuracy on the supervised (assistant) tokens of fresh dialogues."""
    stream = tokenize_chats((c for c, _ in zip(conversations(seed), range(n))), tokenizer)
    rows = list(pack_examples(stream, max_length=128))
    batch = collate_packed(rows, tokenizer.pad_token_id, mask_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=packed_attention_mask(batch["position_ids"], dtype=torch.float32)).logits
    model.train()
    target = batch["labels"][:, 1:]
    sup = target != IGNORE_INDEX
    return (logits[:, :-1].argmax(-1)[sup] == target[sup]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rows-per-step", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    examples = tokenize_chats(conversations(args.seed), tokenizer, max_length=args.max_length)
    rows = pack_examples(examples, max_length=args.max_length)  # lazy: packs as training consumes
    acc_before = answer_accuracy(model, tokenizer, seed=args.seed + 1)
    tokens = supervised = 0
    for step in range(1, args.steps + 1):
        step_rows = [next(rows) for _ in range(args.rows_per_step)]
        batch = collate_packed(step_rows, tokenizer.pad_token_id, length=args.max_length, mask_dtype=torch.float32)
        out = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(sum(r["seq_lens"]) for r in step_rows)
        supervised += int((batch["labels"] != IGNORE_INDEX).sum())
        if step == 1 or step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {out.loss.item():.4f}")
    acc_after = answer_accuracy(model, tokenizer, seed=args.seed + 1)
    print(f"packed tokens {tokens} (fill {tokens / (args.steps * args.rows_per_step * args.max_length):.0%}), "
          f"supervised {supervised}")
    print(f"answer-token accuracy: {acc_before:.2f} -> {acc_after:.2f}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
