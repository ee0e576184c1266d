"""LoRA / DoRA layer forward+backward vs PEFT and vs the frozen-linear floor (GPU).

Shape from issue 3: bf16, in = out = 4096, tokens = 8192, r = 16. Each contestant
computes the layer output and its gradients w.r.t. the input and the adapter
weights (the base weight is frozen). The floor is the same frozen linear with
no adapter: one forward GEMM and one dX GEMM.

Two adapter precisions: bf16 adapters (PEFT with ``autocast_adapter_dtype=False``)
and fp32 adapters on the bf16 base (both libraries' default).

``--lora-gemm`` adds rows for alignlab's layers with ``fused.LORA_GEMM`` (the base GEMM with the rank-r term in its
own epilogue, ``kernels.lora_gemm``; "auto" by default) forced on for every pass and switched off, timed in the same
run.

Run: ``python benchmarks/lora.py [--lora-gemm] [--out PATH]`` on a CUDA machine (default
benchmarks/results/lora.json).
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from alignlab.adapters import DoRALinear, LoRALinear, fused
from alignlab.bench import compare, library_versions, write_json


def _fwd_bwd(layer, x, g):
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        y = layer(x)
        return torch.autograd.grad(y, [x, *params], g)

    return run


def _with_lora_gemm(run, setting):
    """``run`` with ``fused.LORA_GEMM`` set to ``setting`` for its forward and backward."""
    def wrapped():
        saved, fused.LORA_GEMM = fused.LORA_GEMM, setting
        try:
            return run()
        finally:
            fused.LORA_GEMM = saved

    return wrapped


def _randomise(layer):
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)


def main(out: Path, tokens=8192, features=4096, r=16, lora_gemm=False):
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lora.py needs a CUDA GPU")
    import peft

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    base = nn.Linear(features, features, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(tokens, features, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(tokens, features, device=dev, dtype=dt)
    floor_flops = 2 * (2 * tokens * features * features)
    results = []
    for adapter_dtype in (torch.bfloat16, torch.float32):
        contestants = {"floor (frozen linear)": _fwd_bwd(base, x, g)}
        for use_dora in (False, True):
            kind = "DoRA" if use_dora else "LoRA"
            ours = (DoRALinear if use_dora else LoRALinear)(copy.deepcopy(base), r=r, alpha=2 * r, adapter_dtype=adapter_dtype)
            _randomise(ours)
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=use_dora)
            wrapper = nn.Module()
            wrapper.lin = copy.deepcopy(base)
            theirs = peft.get_peft_model(wrapper, cfg, autocast_adapter_dtype=adapter_dtype == torch.float32).base_model.model.lin
            theirs.to(dev)
            with torch.no_grad():
                theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
                theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
            y1, y2 = ours(x), theirs(x)
            err = ((y1.float() - y2.float()).norm() / y2.float().norm()).item()
            print(f"{kind} adapter={adapter_dtype}: relative output difference ours vs PEFT {err:.2e}")
            contestants[f"alignlab {kind}"] = _fwd_bwd(ours, x, g)
            if lora_gemm:
                for setting in (True, False):
                    contestants[f"alignlab {kind}, LORA_GEMM={setting}"] = _with_lora_gemm(_fwd_bwd(ours, x, g), setting)
            contestants[f"PEFT {kind}"] = _fwd_bwd(theirs, x, g)
        cmp = compare(contestants, warmup=10, rep=50, flops=floor_flops,
                      name=f"LoRA/DoRA fwd+bwd, bf16 base, {str(adapter_dtype).removeprefix('torch.')} adapters",
                      meta={"tokens": tokens, "in": features, "out": features, "r": r, "adapter_dtype": str(adapter_dtype)})
        print(cmp.table())
        print(cmp.markdown())
        results.append(cmp.to_dict())
    write_json(out, {"versions": library_versions(), "results": results})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora.json")
    parser.add_argument("--lora-gemm", action="store_true", help="also time alignlab's layers with fused.LORA_GEMM forced on and off")
    args = parser.parse_args()
    main(args.out, lora_gemm=args.lora_gemm)
