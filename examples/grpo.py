"""GRPO with a LoRA policy on a tiny random Llama and a verifiable arithmetic reward, on CPU, in seconds.

Each prompt is ``<bos> a + b =`` with digits ``a, b < 5``; the policy samples ``--group`` completions per
prompt with HF ``generate`` and a completion is scored by a rule, no reward model: 1 if its first token is the
digit ``a + b``, partial credit for a digit within 3 of it, 0 otherwise.  Advantages are group-relative
(:func:`alignlab.losses.reward.group_advantages`), the reference policy is the same model with its adapters
switched off (``with disabled(model):``, no second copy of the weights), and the loss is DAPO-aggregated GRPO
with a k3 KL to the reference computed straight from hidden states by
:func:`alignlab.losses.fused_rl.fused_linear_grpo`: the ``(tokens, vocab)`` logits are never materialised for
the loss.  The sampler's own log-probs (from ``generate``'s logits) are passed as ``sampling_logprobs``, the
truncated importance-sampling correction a vLLM sampler needs (here the sampler is the policy itself, so the
weights are ~1).  The mean reward goes up within a few steps (first the policy learns to answer with digits
near the sum).

    python examples/grpo.py [--steps 20] [--prompts 8] [--group 8]

Needs ``transformers`` (``pip install 'alignlab[hf]'``).
"""

from __future__ import annotations

import argparse
import time

import torch

from alignlab.adapters import LoRAConfig, disabled, inject
from alignlab.losses.fused_rl import fused_linear_grpo
from alignlab.losses.reward import group_advantages

PLUS, EQUALS, BOS, EOS, PAD = 10, 11, 12, 13, 14
VOCAB = 16


def tiny_llama(seed: int):
    try:
        import transformers
    except ImportError as exc:  # an optional extra of alignlab
        raise SystemExit("examples/grpo.py needs transformers: pip install 'alignlab[hf]'") from exc
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2,  # logits that can move
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(config)


def reward(a: torch.Tensor, b: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The verifiable reward of a completion's first token: 1 for ``a + b``, partial credit for a digit close
    to it, 0 for anything that is not a digit."""
    close = (1.0 - (first - (a + b)).abs() / 4.0).clamp(min=0.0)
    return torch.where(first == a + b, 1.0, torch.where(first < 10, 0.5 * close, 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions sampled per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(min(4, torch.get_num_threads()))
    model = tiny_llama(args.seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    inject(model, LoRAConfig(r=8, alpha=16, target_modules=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"tiny Llama, LoRA r=8: {sum(p.numel() for p in trainable)} trainable parameters; "
          f"{args.prompts} prompts x {args.group} completions per step, DAPO, beta={args.beta}", flush=True)

    t0 = time.perf_counter()
    for step in range(args.steps):
        a = torch.randint(0, 5, (args.prompts,), generator=gen)  # a + b is one digit
        b = torch.randint(0, 5, (args.prompts,), generator=gen)
        prompts = torch.stack([torch.full_like(a, BOS), a, torch.full_like(a, PLUS), b,
                               torch.full_like(a, EQUALS)], dim=1)
        plen = prompts.shape[1]
        model.eval()
        with torch.no_grad():
            out = model.generate(
                prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=args.temperature,
                top_k=0, max_new_tokens=args.max_new_tokens, num_return_sequences=args.group,
                return_dict_in_generate=True, output_logits=True, pad_token_id=PAD,
            )
        seq = out.sequences  # (prompts * group, plen + new), the groups contiguous
        completion = seq[:, plen:]
        # the completion counts up to and including its first EOS; generate pads after it
        after_eos = (completion == EOS).long().cumsum(1) - (completion == EOS).long()
        mask = after_eos == 0
        # the sampler's log-probs of what it sampled (vLLM would report these)
        samp = torch.stack(out.logits, dim=1).div(args.temperature).log_softmax(-1)
        samp = samp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        rewards = reward(a.repeat_interleave(args.group), b.repeat_interleave(args.group), completion[:, 0])
        adv = group_advantages(rewards, args.group)

        model.train()
        attention = torch.cat([torch.ones_like(prompts).repeat_interleave(args.group, 0), mask.long()], dim=1)
        # hidden state at position t scores token t + 1: the completion is scored from plen - 1 ... -2
        hidden = model.model(input_ids=seq, attention_mask=attention).last_hidden_state[:, plen - 1 : -1]
        with torch.no_grad(), disabled(model):
            ref_hidden = model.model(input_ids=seq, attention_mask=attention).last_hidden_state[:, plen - 1 : -1]
        loss, metrics = fused_linear_grpo(
            hidden, model.lm_head.weight, completion, adv, mask, ref_hidden=ref_hidden, beta=args.beta,
            epsilon=0.2, epsilon_high=0.28, loss_type="dapo", temperature=args.temperature, compute_entropy=True,
            sampling_logprobs=samp, is_max=3.0,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step:3d}  reward {rewards.mean().item():.3f}  loss {loss.item():+.4f}  "
              f"kl {metrics['kl'].item():.4f}  entropy {metrics['entropy'].item():.3f}  "
              f"is_ratio {metrics['sampling/importance_sampling_ratio/mean'].item():.3f}", flush=True)
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
