"""Online AI feedback (OAIF) on a tiny random Llama, on CPU, in well under a minute.

"Direct Language Model Alignment from Online AI Feedback" (Guo et al. 2024, arXiv 2402.04792): every step
samples two completions per prompt from the *current* policy, a judge picks one, and the policy takes a
DPO step on those pairs. Here the judge is a rule -- **the shorter answer wins** (fewer tokens before the
end-of-sequence token) -- so the behaviour to watch is the mean completion length, which falls as the
policy learns to end earlier. Swap the rule for an LM judge with
``alignlab.data.lm_preference(judge)`` (position-swap debiased) and nothing else changes.

The policy is LoRA on a random Llama; the DPO reference is the same model with adapters off
(``with disabled(model):``); the loss is :func:`alignlab.losses.fused_preference.fused_linear_dpo` on the
last hidden states. At step 0 policy == reference, so the loss is exactly log 2.

    python examples/oaif.py [--steps 20] [--prompts 16]

Needs ``transformers`` (``pip install 'alignlab[hf]'``).
"""

from __future__ import annotations

import argparse
import time

import torch

from alignlab.adapters import LoRAConfig, disabled, inject
from alignlab.data import oaif_batch, sample_completions
from alignlab.losses.fused_preference import fused_linear_dpo

PAD, EOS, VOCAB = 0, 1, 16


def tiny_llama(seed: int):
    try:
        import transformers
    except ImportError as exc:  # an optional extra of alignlab
        raise SystemExit("examples/oaif.py needs transformers: pip install 'alignlab[hf]'") from exc
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def decode(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"w{i}" for i in ids)


def shorter_wins(question: str, a: str, b: str) -> str:
    """The rule-based judge: fewer tokens is better; equal lengths are a tie (no pair)."""
    na, nb = len(a.split()), len(b.split())
    return "a" if na < nb else "b" if nb < na else "tie"


def mean_length(model, prompts, max_new_tokens: int, seed: int) -> float:
    samples = sample_completions(model, prompts, 4, max_new_tokens=max_new_tokens, eos_token_id=EOS,
                                 pad_token_id=PAD, seed=seed)
    return sum(len(c) for cs in samples for c in cs) / sum(len(cs) for cs in samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (two samples each)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)  # tiny tensors: more intra-op threads only add synchronisation
    model = tiny_llama(args.seed)
    inject(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    eval_prompts = [torch.randint(2, VOCAB, (3,), generator=gen).tolist() for _ in range(16)]
    before = mean_length(model, eval_prompts, args.max_new_tokens, seed=10_000)
    print(f"mean completion length before: {before:.2f} tokens (max {args.max_new_tokens})", flush=True)

    t0 = time.perf_counter()
    for step in range(args.steps):
        prompts = [torch.randint(2, VOCAB, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(args.prompts)]
        model.eval()  # sample from the current policy
        data = oaif_batch(model, prompts, shorter_wins, decode, max_new_tokens=args.max_new_tokens,
                          eos_token_id=EOS, pad_token_id=PAD, seed=args.seed * 100_003 + step)
        sampled = sum(len(c) for cs in data.completions for c in cs) / (2 * len(prompts))
        if data.batch is None:
            print(f"step {step:3d}  no pairs (all ties)  sampled length {sampled:.2f}", flush=True)
            continue
        b = data.batch
        model.train()
        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        with torch.no_grad(), disabled(model):
            ref = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        loss, metrics = fused_linear_dpo(hidden[:, :-1], model.lm_head.weight, b["labels"][:, 1:],
                                         ref_hidden=ref[:, :-1], beta=args.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step:3d}  pairs {data.num_pairs:2d}  loss {loss.item():.4f}  "
              f"reward margin {metrics['rewards/margins'].item():+.4f}  sampled length {sampled:.2f}", flush=True)
    model.eval()
    after = mean_length(model, eval_prompts, args.max_new_tokens, seed=10_000)
    print(f"mean completion length after: {after:.2f} tokens (before {before:.2f})", flush=True)
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
