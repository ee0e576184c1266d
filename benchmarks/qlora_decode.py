"""A QLoRA layer's decode call in the forms its switches give, side by side (GPU).

``alignlab.adapters.fused.RANK_EPILOGUE`` on: ``s·x Aᵀ`` by the decode down kernel, then one small-M NF4 launch that
adds ``(s·x Aᵀ) Bᵀ`` before its one rounding (the default). Off: the NF4 product, then the down and up kernels (the up
kernel reads and writes ``y`` once more). "kernels to 16 rows": ``lora_decode.MAX_ROWS`` at 16, where more rows took
the rank term through torch ops (the decode kernels' bound before they took 64). "overlap": ``nf4_small.RANK_OVERLAP``,
the NF4 product launched as a programmatic dependent of the down kernel, its K loop alongside it. The variants (``--variants``) in one
process, per shape and row count:

* ``graph``: GPU time of one no-grad call, from a CUDA graph of one call per layer over layers whose packed weights
  together exceed the L2 cache (what a captured decode step pays; ``benchmarks/nf4.py``'s ``_graph_us``), with the
  plain ``NF4Linear`` product (no adapter) and bf16 ``nn.Linear`` timed the same way;
* ``host``: median wall time of one eager call in a loop, kept launchers on (``benchmarks/host_overhead.py``'s
  ``per_call_us``), under ``torch.no_grad()`` and with the input needing grad;
* ``graph_us down``: the down kernel alone (``lora_decode.down_``), from a CUDA graph the same way, over at most
  ``P`` programs for each ``P`` of ``--down-programs`` (``lora_decode.DOWN_PROGRAMS``; 0, the default: its rule).

Run: ``python benchmarks/qlora_decode.py [--rows 1 4 16 32 64] [--variants ...] [--down-programs 0 8 64] [--out PATH]``
on a CUDA machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from host_overhead import per_call_us  # noqa: E402
from nf4 import _graph_us  # noqa: E402

from alignlab.adapters import LoRAConfig, fused, inject  # noqa: E402
from alignlab.bench import library_versions, write_json  # noqa: E402
from alignlab.kernels import lora_decode, nf4_small  # noqa: E402
from alignlab.quant import NF4Linear  # noqa: E402

# the settings of each variant: fused.RANK_EPILOGUE, lora_decode.MAX_ROWS (16: more rows take the torch ops, as
# before the decode kernels took up to 64), nf4_small.RANK_OVERLAP
VARIANTS = {"up kernel": (False, 64, False), "epilogue": (True, 64, False),
            "epilogue, kernels to 16 rows": (True, 16, False), "epilogue, overlap": (True, 64, True)}
# (in, out): Llama-3-8B's q / o, k / v, gate / up and down projections
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


def _layers(k: int, n: int, count: int) -> list[nn.Module]:
    """``count`` QLoRA layers (r = 16, alpha 32, fp32 factors, B non-zero) over bf16-computing NF4 bases."""
    layers = []
    for i in range(count):
        torch.manual_seed(i)
        holder = nn.Module()
        holder.lin = NF4Linear.from_linear(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
        inject(holder, LoRAConfig(r=16, alpha=32, target_modules=["lin"]))
        nn.init.normal_(holder.lin.lora_B["default"].weight, std=0.02)
        layers.append(holder.lin)
    return layers


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["up kernel", "epilogue"])
    parser.add_argument("--down-programs", type=int, nargs="+", default=[0],
                        help="caps on the down kernel's programs to time (0: the default rule)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qlora_decode.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rows_out = []
    default = fused.RANK_EPILOGUE, lora_decode.MAX_ROWS, nf4_small.RANK_OVERLAP, lora_decode.DOWN_PROGRAMS
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for k, n in SHAPES:
        count = max(2, -(-3 * l2 // (k * n // 2)))  # packed weights (0.5 byte each) over three times the L2
        layers = _layers(k, n, count)
        dense = [nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
                 for _ in range(count)]
        for m in args.rows:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
            xg = xs[0].clone().requires_grad_(True)
            row = {"in": k, "out": n, "rows": m, "layers_in_graph": count}
            row["graph_us bf16 nn.Linear"] = _graph_us([_no_grad(lambda d=d, x=x: d(x)) for d, x in zip(dense, xs)])
            row["graph_us NF4Linear"] = _graph_us(
                [_no_grad(lambda q=q, x=x: q.base_layer(x)) for q, x in zip(layers, xs)])
            row["host_us bf16 nn.Linear"] = per_call_us(_no_grad(lambda: dense[0](xs[0])))
            factors = [(q.lora_A["default"].weight, q.scaling["default"]) for q in layers]
            for programs in args.down_programs:
                lora_decode.DOWN_PROGRAMS = programs or None
                row[f"graph_us down, {f'<= {programs} programs' if programs else 'default programs'}"] = _graph_us(
                    [_no_grad(lambda a=a, s=s, x=x: lora_decode.down_(x, a, s)) for (a, s), x in zip(factors, xs)])
            lora_decode.DOWN_PROGRAMS = default[3]
            outs = {}
            for tag in [*args.variants, *args.variants]:  # twice each, alternating: drift shows as a spread
                fused.RANK_EPILOGUE, lora_decode.MAX_ROWS, nf4_small.RANK_OVERLAP = VARIANTS[tag]
                for q in layers:
                    q._decode_runs.clear()
                outs[tag] = _no_grad(lambda: layers[0](xs[0]))()
                row.setdefault(f"graph_us QLoRA, {tag}", []).append(
                    _graph_us([_no_grad(lambda q=q, x=x: q(x)) for q, x in zip(layers, xs)]))
                row.setdefault(f"host_us QLoRA no_grad, {tag}", []).append(
                    per_call_us(_no_grad(lambda: layers[0](xs[0]))))
                row.setdefault(f"host_us QLoRA x needs grad, {tag}", []).append(per_call_us(lambda: layers[0](xg)))
            fused.RANK_EPILOGUE, lora_decode.MAX_ROWS, nf4_small.RANK_OVERLAP = default[:3]
            # one rounding against two, another order of sums: the outputs agree to bf16 rounding, not bit for bit
            first = args.variants[0]
            for tag in args.variants[1:]:
                row[f"max_abs_diff {tag} vs {first}"] = (outs[tag].float() - outs[first].float()).abs().max().item()
            print(f"{k:5d} -> {n:5d}  M={m:2d}  " + "  ".join(
                f"{key.split(' ', 1)[1]}: {v if isinstance(v, float) else min(v):.1f}"
                for key, v in row.items() if key.startswith(("graph_us", "host_us"))))
            rows_out.append(row)
        del layers, dense
        torch.cuda.empty_cache()
    doc = {"versions": library_versions(), "device": torch.cuda.get_device_name(), "rows": rows_out}
    write_json(args.out, doc)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
