"""DPO with a LoRA policy on a tiny random Llama, on CPU, in well under a minute.

The reference policy is the same model with its adapters switched off (``with disabled(model):``), so there
is no second copy of the weights.  The loss is computed straight from the last hidden states and the
(frozen) lm_head weight with :func:`alignlab.losses.fused_preference.fused_linear_dpo`; pass ``--unfused``
to go through full logits + :func:`alignlab.losses.preference.dpo_loss` instead (same numbers).

The synthetic task: after a random prompt, the *chosen* completion counts upwards from the prompt's last
token (``t, t+1, t+2, ...`` modulo the vocabulary), the *rejected* one is random.  Since LoRA's B matrices
start at zero, the policy equals the reference at step 0, so the first loss is exactly ``log 2`` and the
reward margin is 0; both then move as the policy learns the preference.

    python examples/dpo.py [--steps 40] [--loss-type sigmoid] [--unfused]

Needs ``transformers`` (``pip install 'alignlab[hf]'``).
"""

from __future__ import annotations

import argparse
import time

import torch

from alignlab.adapters import LoRAConfig, disabled, inject
from alignlab.losses.fused_preference import fused_linear_dpo
from alignlab.losses.logprobs import sequence_logprobs
from alignlab.losses.preference import DPO_LOSS_TYPES, dpo_loss


def tiny_llama(seed: int, vocab: int):
    try:
        import transformers
    except ImportError as exc:  # an optional extra of alignlab
        raise SystemExit("examples/dpo.py needs transformers: pip install 'alignlab[hf]'") from exc
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def make_pairs(gen: torch.Generator, n_pairs: int, vocab: int, prompt_len: int, max_completion: int):
    """``input_ids`` (2n, L) chosen-then-rejected, right-padded, and ``labels`` with -100 on prompt/padding."""
    seqs, labs = [], []
    prompts = torch.randint(0, vocab, (n_pairs, prompt_len), generator=gen)
    lengths = torch.randint(max_completion // 2, max_completion + 1, (n_pairs,), generator=gen)
    for kind in ("chosen", "rejected"):
        for i in range(n_pairs):
            n = int(lengths[i])
            if kind == "chosen":
                completion = (prompts[i, -1] + 1 + torch.arange(n)) % vocab
            else:
                completion = torch.randint(0, vocab, (n,), generator=gen)
            ids = torch.cat([prompts[i], completion])
            seqs.append(ids)
            labs.append(torch.cat([torch.full((prompt_len,), -100), completion]))
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[j, : len(s)] = s
        labels[j, : len(s)] = lab
        attention[j, : len(s)] = 1
    return input_ids, attention, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", default="sigmoid", choices=DPO_LOSS_TYPES)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unfused", action="store_true", help="full logits + dpo_loss instead of fused_linear_dpo")
    args = ap.parse_args()

    torch.set_num_threads(min(4, torch.get_num_threads()))
    vocab = 128
    model = tiny_llama(args.seed, vocab)
    inject(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n_train = sum(p.numel() for p in trainable)
    print(f"tiny Llama, LoRA r=8: {n_train} trainable of {sum(p.numel() for p in model.parameters())} parameters; "
          f"loss_type={args.loss_type} beta={args.beta} {'unfused' if args.unfused else 'fused'}", flush=True)

    t0 = time.perf_counter()
    for step in range(args.steps):
        input_ids, attention, labels = make_pairs(gen, args.pairs, vocab, prompt_len=6, max_completion=10)
        # causal LM: hidden state t scores token t+1
        shifted = labels[:, 1:]
        extra = {"label_smoothing": 1e-3} if args.loss_type == "exo_pair" else {}
        model.train()
        if args.unfused:
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
            with torch.no_grad(), disabled(model):
                ref_logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
            pi = sequence_logprobs(logits, shifted)
            ref = sequence_logprobs(ref_logits, shifted)
            n = args.pairs
            counts = (shifted != -100).sum(1)
            loss, metrics = dpo_loss(
                pi[:n], pi[n:], ref[:n], ref[n:], beta=args.beta, loss_type=args.loss_type,
                chosen_lengths=counts[:n], rejected_lengths=counts[n:], **extra,
            )
        else:
            hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
            with torch.no_grad(), disabled(model):
                ref_hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
            loss, metrics = fused_linear_dpo(
                hidden, model.lm_head.weight, shifted, ref_hidden=ref_hidden, beta=args.beta,
                loss_type=args.loss_type, **extra,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(
            f"step {step:3d}  loss {loss.item():.4f}  reward margin {metrics['rewards/margins'].item():+.4f}  "
            f"accuracy {metrics['rewards/accuracies'].item():.2f}  chosen {metrics['rewards/chosen'].item():+.4f}  "
            f"rejected {metrics['rewards/rejected'].item():+.4f}",
            flush=True,
        )
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
