"""Stored bytes of one MoE block's expert weights: bf16 vs NF4 (:class:`alignlab.quant.NF4Experts`), CPU count.

For real model shapes (Mixtral-8x7B, Qwen3-30B-A3B, gpt-oss-20b) a transformers experts module with a few of
the block's experts (``--experts-measured``, default 1) at the real per-expert shapes is built with random
weights, quantized, and its tensors counted: packed codes, 8-bit block scales, fp32 second-level scales and
offsets, biases. Every expert stores the same number of bytes, so the block's total is that count per expert
times the block's ``E`` (printed next to the formula ``0.5 + 1/64 + 4/(64·256)`` bytes per weight plus 4 bytes
of offset per expert matrix). Writes ``benchmarks/results/moe_nf4_bytes.json``.

    python benchmarks/moe_nf4_bytes.py [--experts-measured 1] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignlab.bench import write_json
from alignlab.quant import NF4Experts

DEFAULT_OUT = Path(__file__).parent / "results" / "moe_nf4_bytes.json"

# (name, transformers experts class, config kwargs, experts in the real block)
MODELS = {
    "Mixtral-8x7B": ("mixtral", dict(hidden_size=4096, intermediate_size=14336), 8),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768), 128),
    "gpt-oss-20b": ("gpt_oss", dict(hidden_size=2880, intermediate_size=2880), 32),
}
QUICK = {"tiny": ("mixtral", dict(hidden_size=128, intermediate_size=256), 8)}


def experts_module(kind: str, shape: dict, experts: int):
    import transformers

    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=experts, **shape)
        cls = transformers.models.mixtral.modeling_mixtral.MixtralExperts
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(num_experts=experts, **shape)
        cls = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts
    else:
        config = transformers.GptOssConfig(num_local_experts=experts, **shape)
        cls = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts
    torch.manual_seed(0)
    module = cls(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts-measured", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one tiny shape, to check the script (no JSON unless --out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON report (default benchmarks/results/moe_nf4_bytes.json; with --quick none)")
    args = ap.parse_args(argv)
    rows = {}
    for name, (kind, shape, block_experts) in (QUICK if args.quick else MODELS).items():
        module = experts_module(kind, shape, args.experts_measured)
        weights = sum(p.numel() for n, p in module.named_parameters() if p.dim() == 3)
        biases = sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2)
        bf16 = sum(p.numel() * p.element_size() for p in module.parameters())
        q = NF4Experts.from_experts(module)
        nf4 = q.nbytes()
        scale = block_experts / args.experts_measured
        formula = weights * (0.5 + 1 / 64 + 4 / (64 * 256)) + 4 * len(q.expert_parameters) * args.experts_measured + 2 * biases
        rows[name] = {
            "experts_in_block": block_experts, "experts_measured": args.experts_measured,
            "per_expert_shapes": {n: list(q.shape_of(n)) for n in q.expert_parameters},
            "block_bf16_bytes": int(bf16 * scale), "block_nf4_bytes": int(nf4 * scale),
            "ratio": nf4 / bf16, "formula_ratio": formula / bf16, "nf4_bytes_per_weight": (nf4 - 2 * biases) / weights,
        }
        r = rows[name]
        print(f"{name:16s} E={block_experts:4d}  bf16 {r['block_bf16_bytes'] / 2**20:9.1f} MiB  "
              f"NF4 {r['block_nf4_bytes'] / 2**20:8.1f} MiB  ratio {r['ratio']:.4f} (formula {r['formula_ratio']:.4f})",
              flush=True)
        del module, q
    # --quick alone must not overwrite the committed results; an --out given with it was ignored without a word
    out = args.out if args.out is not None else None if args.quick else DEFAULT_OUT
    if out is not None:
        write_json(out, rows)
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
