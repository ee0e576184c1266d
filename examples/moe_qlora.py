"""QLoRA on a mixture-of-experts model, with two new special tokens, end to end on a tiny random Mixtral.

1. Add two special tokens: the vocabulary grows by two rows in the input embedding and the output head.
2. ``quantize_model``: the attention projections become ``NF4Linear`` and every block's fused experts
   (``mlp.experts.gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``) an ``NF4Experts``, each
   expert's matrix in bitsandbytes' NF4 bytes (0.258x the bf16 bytes, scales included).
3. ``inject``: LoRA on the attention projections and on every expert (one pair per expert), and the rows
   of the new tokens trained on their own (``trainable_token_indices``): only those rows of the
   embedding and the head get gradients; the rest of both tables stays frozen.
4. A few training steps on a toy task that uses the new tokens, then save (PEFT's layout) and reload onto
   a freshly built, resized and quantized base: the reloaded model reproduces the trained one's logits
   (the new rows travel in the adapter file, so their random initialisation does not matter).

The training loop and the save-and-reload check are ``qlora.py``'s (imported from next to this file).

    python examples/moe_qlora.py [--steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
from qlora import check_reload, train  # examples/ is on sys.path when this file runs as a script

NEW_TOKENS = 2


def tiny_mixtral(seed: int = 0, vocab: int = 128):
    """A tiny random Mixtral (4 experts, top-2) whose vocabulary then grows by ``NEW_TOKENS`` rows."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=128)
    model = MixtralForCausalLM(config)
    model.resize_token_embeddings(vocab + NEW_TOKENS)  # the new rows: random, trained below
    return model


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="adapter directory (default: a temporary one, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from alignlab.adapters import LoRAConfig, count_parameters, inject
    from alignlab.quant import NF4Experts, NF4Linear, quantize_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_mixtral(args.seed).to(device)
    vocab = model.config.vocab_size
    new_ids = list(range(vocab - NEW_TOKENS, vocab))

    quantize_model(model, compute_dtype=compute_dtype)
    n_linear = sum(isinstance(m, NF4Linear) for m in model.modules())
    n_experts = sum(isinstance(m, NF4Experts) for m in model.modules())
    print(f"device={device}  NF4 linears={n_linear}  NF4 experts modules={n_experts}")

    config = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids})
    inject(model, config)
    counts = count_parameters(model)
    print(f"trainable={counts.trainable}  total={counts.total}")

    # a toy task: a repeating pattern framed by the two new tokens
    g = torch.Generator().manual_seed(args.seed)
    body = torch.randint(0, vocab - NEW_TOKENS, (10,), generator=g)
    pattern = torch.cat([torch.tensor(new_ids[:1]), body, torch.tensor(new_ids[1:])])
    batch = pattern.repeat(4, 4)[:, :36].to(device)
    last = train(model, batch, args.steps)

    def fresh_base():  # other values in the new rows: the adapter brings its own
        fresh = tiny_mixtral(args.seed).to(device)
        with torch.no_grad():
            fresh.model.embed_tokens.weight[new_ids] = 0.0
            fresh.lm_head.weight[new_ids] = 0.0
        return quantize_model(fresh, compute_dtype=compute_dtype)

    check_reload(model, batch, args.out, fresh_base)
    return last


if __name__ == "__main__":
    main()
