"""A LoRA layer's two backward products of the output gradient (issue 18): ``s·dy B`` and ``dyᵀ (s·x Aᵀ)`` as the
fused path makes them today (two cuBLAS GEMMs, ``fused._scaled_mm`` and ``fused._mm_to`` with an fp32 result) against
``alignlab.kernels.lora_grads.rank_grads`` (one read of ``dy``), on the output widths of a Llama-3-8B layer at 8192
rows (batch 4 x 2048), r = 16, bf16. ``triton.testing.do_bench`` medians; the copy column moves ``dy``'s bytes once
(read + write of the same size: the time one read of ``dy`` costs at copy speed, roughly). One JSON line per shape.

    python benchmarks/lora_dy_pass.py [--rows 8192] [--rank 16] [--sweep] [--out benchmarks/results/lora_dy_pass.json]

``--sweep`` also times rank_grads over a grid of tiles (block_t x block_o), warps and pipeline stages at each shape
(the row slices left to the default rule) and reports the fastest configurations.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from alignlab.adapters.fused import _mm_to, _scaled_mm
from alignlab.bench import write_json
from alignlab.kernels.lora_grads import rank_grads

WIDTHS = [("q / o", 4096), ("k / v", 1024), ("gate / up", 14336)]  # down's output is 4096 wide too


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="time a grid of rank_grads launch configurations too")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora_dy_pass.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lora_dy_pass.py needs a CUDA GPU")
    import triton

    dt, T, R = torch.bfloat16, args.rows, args.rank
    rows = []
    for name, O in WIDTHS:
        g = torch.randn(T, O, device="cuda", dtype=dt)
        b = (torch.randn(O, R, device="cuda") / 30).to(dt)
        xa = (torch.randn(T, R, device="cuda") / 30).to(dt)
        ref = (_scaled_mm(g, b, 2.0), _mm_to(g.T, xa, torch.float32))
        got = rank_grads(g, b, xa, 2.0, torch.float32)
        row = {"layer": name, "T": T, "O": O, "r": R,
               "gb_maxdiff": (got[0].float() - ref[0].float()).abs().max().item(),
               "db_maxdiff": (got[1] - ref[1]).abs().max().item()}
        row["two_gemms_us"] = 1e3 * triton.testing.do_bench(
            lambda: (_scaled_mm(g, b, 2.0), _mm_to(g.T, xa, torch.float32)), warmup=25, rep=200)
        row["rank_grads_us"] = 1e3 * triton.testing.do_bench(lambda: rank_grads(g, b, xa, 2.0, torch.float32),
                                                            warmup=25, rep=200)
        dst = torch.empty_like(g)
        row["copy_dy_us"] = 1e3 * triton.testing.do_bench(lambda: dst.copy_(g), warmup=25, rep=200)
        if args.sweep:
            row["sweep"] = _sweep(g, b, xa, ref, triton)
            best = row["sweep"][:3]
            print(json.dumps({"layer": name, "fastest": best}), flush=True)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
        del g, dst
        torch.cuda.empty_cache()
    write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})


def _sweep(g, b, xa, ref, triton):
    """rank_grads' time per launch configuration, fastest first (a configuration whose result is off is dropped,
    one that fails to compile or run too)."""
    out = []
    for bt in (16, 32, 64, 128):
        for bo in (64, 128, 256, 512):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    kw = dict(block_t=bt, block_o=bo, num_warps=warps, num_stages=stages)
                    try:
                        got = rank_grads(g, b, xa, 2.0, torch.float32, **kw)
                        ok = ((got[0].float() - ref[0].float()).abs().max().item() <= 0.25
                              and (got[1] - ref[1]).abs().max().item() <= 1e-2 * ref[1].abs().max().item())
                        if not ok:
                            continue
                        us = 1e3 * triton.testing.do_bench(lambda: rank_grads(g, b, xa, 2.0, torch.float32, **kw),
                                                           warmup=10, rep=60)
                    except Exception as e:  # out of shared memory / registers: skip the configuration
                        print(f"  {kw}: {type(e).__name__}", file=sys.stderr)
                        continue
                    out.append({**kw, "us": round(us, 2)})
    return sorted(out, key=lambda r: r["us"])


if __name__ == "__main__":
    main()
