"""The rank-r update a LoRA layer adds into its base product (issue 18): ``y += c d`` as the fused path makes it today
(``y.addmm_(xa, Bᵀ)`` in forward, ``dx.addmm_(gb, A)`` in backward: cuBLAS with K = r) against
``alignlab.kernels.lora_gemm.rank_update_`` (one Triton kernel reading and writing each tile once), on the output
widths of a Llama-3-8B layer at 2048 and 8192 rows (batch 1 and 4 at seq 2048), r = 16, bf16.
``triton.testing.do_bench`` medians; the copy column copies a tensor of ``y``'s size (a read and a write of it: the
update's traffic at copy speed), and ``pct_of_copy`` is that time over the form's. One JSON line per shape and pass.

    python benchmarks/rank_update.py [--rows 2048,8192] [--rank 16] [--sweep] [--out benchmarks/results/rank_update.json]

``--sweep`` also times rank_update_ over a grid of tiles (BLOCK_M x BLOCK_N) and warps (each configuration's time per
case in the JSON) and prints the fastest configurations over all cases (what ``lora_gemm.RANK_UPDATE_CONFIG`` should
be). ``maxdiff_vs_float64``: the kernel's error on the added product, relative to its largest entry.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from alignlab.bench import write_json
from alignlab.kernels.lora_gemm import rank_update_

# (name, output width) of forward's y = x Wᵀ: q / o 4096, k / v 1024, gate / up 14336, down 4096; backward's dx is
# as wide as the input: 4096 for q / k / v / gate / up, 14336 for down
WIDTHS = [("4096 (q / o / down fwd; dx of q..up)", 4096), ("1024 (k / v fwd)", 1024),
          ("14336 (gate / up fwd; dx of down)", 14336)]
# (BLOCK_M, BLOCK_N, num_warps), the fp32 tile at most 128 values per thread (more spills: 128 x 256 on 4 warps,
# `nf4_sass.py --rank-update`)
SWEEP = [(bm, bn, w) for bm in (32, 64, 128) for bn in (64, 128, 256) for w in (4, 8) if bm * bn <= 128 * 32 * w]


def forms(y: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> dict:
    """The two forms of ``y += c d`` timed here (each call adds into ``y`` again; ``c``, ``d`` small, so the values
    stay finite over a benchmark's calls)."""
    return {"addmm_": lambda: y.addmm_(c, d), "rank_update_": lambda: rank_update_(y, c, d)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="2048,8192")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="time a grid of rank_update_ launch configurations too")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds the sweep may take in all")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rank_update.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/rank_update.py needs a CUDA GPU")
    import triton

    from alignlab.bench import library_versions

    dt, R = torch.bfloat16, args.rank
    t_end = time.time() + args.deadline
    rows, cases = [], []
    for M in (int(v) for v in args.rows.split(",")):
        for name, N in WIDTHS:
            for layout in ("forward (d = Bᵀ, read transposed)", "backward (d = A)"):
                y = torch.randn(M, N, device="cuda", dtype=dt)
                c = (torch.randn(M, R, device="cuda") / 100).to(dt)
                d = ((torch.randn(N, R, device="cuda") / 100).to(dt).T if layout.startswith("forward")
                     else (torch.randn(R, N, device="cuda") / 100).to(dt))
                row = {"rows": M, "width": name, "N": N, "r": R, "pass": layout,
                       "maxdiff_vs_float64": _error(y, c * 100, d * 100)}
                for form, fn in forms(y, c, d).items():
                    row[f"{form}_us"] = 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200)
                dst = torch.empty_like(y)
                row["copy_us"] = 1e3 * triton.testing.do_bench(lambda: dst.copy_(y), warmup=25, rep=200)
                for form in ("addmm_", "rank_update_"):
                    row[f"{form}_pct_of_copy"] = 100 * row["copy_us"] / row[f"{form}_us"]
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                rows.append(row)
                cases.append((y, c, d))
                del dst
    result = {"versions": library_versions(), "device": torch.cuda.get_device_name(), "rows": rows}
    if args.sweep:
        result["sweep"] = _sweep(cases, rows, triton, t_end)
        total = sorted((c for c in result["sweep"] if len(c["us"]) == len(rows)), key=lambda c: sum(c["us"].values()))
        print(json.dumps({"fastest over all shapes": total[:6]}), flush=True)
    write_json(args.out, result)


def _error(y: torch.Tensor, c: torch.Tensor, d: torch.Tensor, config=None) -> float:
    """Largest error of the update rank_update_ adds to a copy of ``y`` against ``c d`` in float64, relative to that
    product's largest entry (factors of order one: the timed ones are small, so that repeated calls stay finite, and
    their product would vanish in ``y``'s rounding)."""
    want = c.double() @ d.double()
    got = rank_update_(y.clone(), c, d, config=config).double() - y.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def _sweep(cases, rows, triton, deadline):
    """rank_update_'s time per launch configuration and case (``{"us": {case: us}}``; a case whose result is off, or
    that fails to compile or run, is left out), until ``deadline``."""
    out = []
    for config in SWEEP:
        if time.time() > deadline:
            print("  sweep: out of time", file=sys.stderr)
            break
        times = {}
        for i, ((y, c, d), row) in enumerate(zip(cases, rows)):
            try:
                if _error(y, c * 100, d * 100, config) > 0.02:
                    print(f"  {config} case {i}: wrong result", file=sys.stderr)
                    continue
                times[i] = round(1e3 * triton.testing.do_bench(lambda: rank_update_(y, c, d, config=config),
                                                                warmup=10, rep=50), 2)
            except Exception as e:  # out of registers / shared memory: skip the configuration
                print(f"  {config} case {i}: {type(e).__name__}", file=sys.stderr)
                break
        out.append({"config": list(config), "us": times})
    return out


if __name__ == "__main__":
    main()
