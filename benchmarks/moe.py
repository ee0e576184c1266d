"""LoRA on the fused experts of one MoE block: forward+backward vs the frozen block and vs PEFT (one GPU).

The shape of the issue: one Mixtral-style sparse MoE block (transformers' ``MixtralSparseMoeBlock``: router +
fused experts), 8 experts, top-2, hidden 4096, intermediate 14336, 4096 tokens, bf16; LoRA r = 16, α = 32 on
both fused expert weights (``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I)), fp32
adapter weights on the bf16 base (both libraries' default).

One call = the block's forward and the gradients of a fixed random cotangent with respect to the input and
every trainable parameter. Contestants, in one process on the same weights and routing:

* ``frozen block (grouped_mm)``: transformers' own experts forward (``grouped_mm``), nothing trainable: the
  floor (baseline of the ratios); ``frozen block (eager)``: its per-expert Python loop, for reference;
* ``alignlab LoRA experts`` / ``alignlab DoRA experts``: :class:`alignlab.adapters.ExpertLoRA` through
  ``inject(block, LoRAConfig(target_parameters=[...]))`` (grouped matmuls, ``W_e + s·B_e A_e`` never formed);
* ``PEFT LoRA target_parameters``: ``peft.LoraConfig(target_parameters=[...])`` on the same block
  (``grouped_mm`` experts), with the same factors (the relative difference of the outputs is printed and saved).

``--nf4`` adds the block with NF4-quantized experts (:class:`alignlab.quant.NF4Experts`), frozen and with the
same LoRA on it (QLoRA on experts; see :func:`nf4_contestants`).

The % of matmul peak is of the floor's FLOPs: forward ``2·S·(H·2I + I·H)`` with ``S = tokens·top_k`` plus the
same again for the input gradient (the router's matmuls and the adapters' thin products are not counted).

    python benchmarks/moe.py [--tokens 4096 --hidden 4096 --intermediate 14336 --experts 8 --top-k 2 --rank 16]
        [--nf4] [--out benchmarks/results/moe.json]

``--quick`` runs tiny shapes (hidden 64, intermediate 96, 256 tokens) in seconds and works on CPU
(``--device cpu``), to check the script, not to measure anything; it writes no JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

from alignlab.adapters import ExpertLoRA, LoRAConfig, adapter_layers, inject
from alignlab.bench import compare, library_versions, save_results

QUICK = dict(tokens=256, hidden=64, intermediate=96, experts=8, top_k=2, rank=8)
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help=f"tiny shapes {QUICK} (CPU works)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rep", type=int, default=None, help="timed rounds (default: about 0.25 s of work each)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-peft", action="store_true", help="leave PEFT out")
    ap.add_argument("--nf4", action="store_true", help="also the adapters on NF4-quantized experts")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe.json",
                    help="JSON results (not written with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def make_block(args, dtype: torch.dtype, implementation: str = "grouped_mm"):
    """A transformers Mixtral sparse MoE block (router + fused experts) with seeded random weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return block.to(args.device, dtype).requires_grad_(False)


def fwd_bwd(block, x: torch.Tensor, g: torch.Tensor):
    params = [p for p in block.parameters() if p.requires_grad]

    def run():
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, [x, *params], g)

    return run


def output(block, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = block(x)
    return (out[0] if isinstance(out, tuple) else out).float()


def randomise(block) -> None:
    """Non-zero B (so the adapters do something) and DoRA magnitudes off the base norms."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def peft_block(base, ours, rank: int):
    """PEFT's ``target_parameters`` LoRA on a copy of ``base``, with the factors of ``ours`` copied in."""
    import peft

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                                                                      target_parameters=TARGETS))
    named = dict(theirs.named_parameters())
    for lname, layer in adapter_layers(ours):
        for key, tensor in layer.peft_tensors("default").items():
            dst = named[f"base_model.model.{lname}.{key.replace('.weight', '.default.weight')}"]
            with torch.no_grad():
                dst.copy_(tensor)
    return theirs


def nf4_contestants(args, base, x, g) -> dict:
    """The ``--nf4`` rows: the block after :func:`alignlab.quant.quantize_model` (every expert's ``(out, in)``
    matrix in NF4, bitsandbytes' bytes; :class:`alignlab.quant.NF4Experts`), frozen, and with the same LoRA on
    it (QLoRA on experts). PEFT + bitsandbytes has no 4-bit 3-D expert weights, so no peer row. Prints the
    stored bytes of the expert weights (bf16 vs NF4) and the relative output change that quantization makes."""
    from alignlab.quant import NF4Experts, quantize_model

    frozen = quantize_model(copy.deepcopy(base), compute_dtype=torch.bfloat16)
    assert isinstance(frozen.experts, NF4Experts)
    qlora = inject(copy.deepcopy(frozen), LoRAConfig(r=args.rank, alpha=2 * args.rank, target_parameters=TARGETS))
    assert isinstance(qlora.experts, ExpertLoRA)
    randomise(qlora)
    dense = sum(p.numel() * p.element_size() for p in base.experts.parameters())
    packed = frozen.experts.nbytes()
    print(f"expert weights: bf16 {dense / 2**20:.1f} MiB, NF4 {packed / 2**20:.1f} MiB ({packed / dense:.3f}x, "
          "codes + 8-bit scales + second-level scales + offsets)", flush=True)
    print(f"relative output difference, NF4 experts vs bf16 experts: {rel(output(frozen, x), output(base, x)):.2e}",
          flush=True)
    return {"frozen block, NF4 experts": fwd_bwd(frozen, x, g), "alignlab LoRA on NF4 experts (QLoRA)": fwd_bwd(qlora, x, g)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if (args.device.startswith("cuda") and not torch.cuda.is_available()) or (args.device == "cpu" and not args.quick):
        # --device defaults to the CPU where there is no GPU: the full Mixtral shape took 18 GB there, unasked
        sys.exit("benchmarks/moe.py needs a CUDA GPU (or --quick --device cpu to check the script)")
    dtype = torch.bfloat16
    T, H, I, E, k, r = args.tokens, args.hidden, args.intermediate, args.experts, args.top_k, args.rank
    base = make_block(args, dtype)
    x = torch.randn(1, T, H, device=args.device, dtype=dtype, requires_grad=True)
    g = torch.randn(1, T, H, device=args.device, dtype=dtype)
    S = T * k
    floor_flops = 2 * (2 * S * (H * 2 * I + I * H))

    contestants = {"frozen block (grouped_mm)": fwd_bwd(base, x, g)}
    eager = copy.deepcopy(base)
    eager.experts.config = copy.copy(eager.experts.config)
    eager.experts.config._experts_implementation = "eager"
    contestants["frozen block (eager)"] = fwd_bwd(eager, x, g)
    checks = {}
    ours = {}
    for kind, dora in (("LoRA", False), ("DoRA", True)):
        block = inject(copy.deepcopy(base), LoRAConfig(r=r, alpha=2 * r, target_parameters=TARGETS, use_dora=dora))
        assert isinstance(block.experts, ExpertLoRA)
        randomise(block)
        ours[kind] = block
        contestants[f"alignlab {kind} experts"] = fwd_bwd(block, x, g)
    peft_reason = "--no-peft" if args.no_peft else None
    if peft_reason is None:
        try:
            theirs = peft_block(base, ours["LoRA"], r)
        except Exception as exc:  # keep the others running (e.g. a PEFT without target_parameters)
            peft_reason = f"{type(exc).__name__}: {exc}"
        else:
            checks["relative output difference, alignlab LoRA vs PEFT"] = rel(output(ours["LoRA"], x), output(theirs, x))
            contestants["PEFT LoRA target_parameters"] = fwd_bwd(theirs, x, g)
    if peft_reason:
        print(f"PEFT row skipped: {peft_reason}", flush=True)
    if args.nf4:
        contestants.update(nf4_contestants(args, base, x, g))
    checks["relative output difference, frozen grouped_mm vs eager"] = rel(output(base, x), output(eager, x))
    for name, value in checks.items():
        print(f"{name}: {value:.2e}", flush=True)

    shape = dict(tokens=T, hidden=H, intermediate=I, experts=E, top_k=k, rank=r, alpha=2 * r, dtype="bfloat16",
                 adapter_dtype="float32")
    cmp = compare(contestants, warmup=args.warmup, rep=args.rep, device=args.device, flops=floor_flops,
                  name=f"MoE block fwd+bwd, LoRA on fused experts ({E} experts, top-{k}, H={H}, I={I}, {T} tokens)",
                  meta={**shape, "checks": checks, "peft_skipped": peft_reason})
    print(cmp.table())
    print(cmp.markdown())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "quick": args.quick, "versions": library_versions()}
    if args.out is not None and not args.quick:  # a check of the script does not overwrite the GPU results
        save_results(args.out, [cmp], meta=meta)
    return cmp.to_dict()


if __name__ == "__main__":
    main()
