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
import time
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
    p.add_argument("--deadline", type=float, default=330.0, help="seconds the sweep may take in all")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora_dy_pass.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lora_dy_pass.py needs a CUDA GPU")
    import triton

    dt, T, R = torch.bfloat16, args.rows, args.rank
    t_end = time.time() + args.deadline
    rows, cases = [], []
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
        row["rank_grads_kernels_us"] = _kernels(lambda: rank_grads(g, b, xa, 2.0, torch.float32))
        dst = torch.empty_like(g)
        row["copy_dy_us"] = 1e3 * triton.testing.do_bench(lambda: dst.copy_(g), warmup=25, rep=200)
        del dst
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
        cases.append((g, b, xa, ref))
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.sweep:
        result["sweep"] = _sweep(cases, [r["layer"] for r in rows], triton, time.time() + args.deadline)
        for row in rows:
            fastest = sorted((c for c in result["sweep"] if row["layer"] in c["us"]),
                             key=lambda c: c["us"][row["layer"]])[:6]
            print(json.dumps({"layer": row["layer"], "fastest": fastest}), flush=True)
        total = sorted((c for c in result["sweep"] if len(c["us"]) == len(rows)), key=lambda c: sum(c["us"].values()))
        print(json.dumps({"fastest over all shapes": total[:6]}), flush=True)
    write_json(args.out, result)


def _kernels(fn, reps=20):
    """GPU time per call of each kernel ``fn`` launches (torch.profiler, mean over ``reps`` calls), by name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0))
        if us > 0 and ev.count >= reps:
            times[ev.key[:60]] = round(us / reps, 2)
    return times


def _sweep(cases, names, triton, deadline):
    """rank_grads' time per launch configuration and shape (``{"us": {layer: us}}`` per configuration; a shape whose
    result is off, or that fails to compile or run, is left out of its configuration), until ``deadline``."""
    out = []
    for bt in (32, 64, 128):
        for bo in (64, 128, 256, 512):
            for warps in (4, 8):
                for stages in (2, 3):
                    if time.time() > deadline:
                        print("  sweep: out of time", file=sys.stderr)
                        return out
                    kw = dict(block_t=bt, block_o=bo, num_warps=warps, num_stages=stages)
                    times = {}
                    for name, (g, b, xa, ref) in zip(names, cases):
                        try:
                            got = rank_grads(g, b, xa, 2.0, torch.float32, **kw)
                            if ((got[0].float() - ref[0].float()).abs().max().item() > 0.25
                                    or (got[1] - ref[1]).abs().max().item() > 1e-2 * ref[1].abs().max().item()):
                                print(f"  {kw} {name}: wrong result", file=sys.stderr)
                                continue
                            times[name] = round(1e3 * triton.testing.do_bench(
                                lambda: rank_grads(g, b, xa, 2.0, torch.float32, **kw), warmup=10, rep=50), 2)
                        except Exception as e:  # out of shared memory / registers: skip the configuration
                            print(f"  {kw} {name}: {type(e).__name__}", file=sys.stderr)
                            break
                    out.append({**kw, "us": times})
    return out


if __name__ == "__main__":
    main()
