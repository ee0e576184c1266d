"""Measure launch configurations of the decode-sized NF4 kernels on the GPU at hand (issue 24).

For each of the five benchmark shapes (``out x in``) and ``M = 1, 2, 4, ..., 64`` rows of bf16 activations
(blocksize 64, double quantization), a coordinate search over ``(block_n, nb, split, num_warps,
num_stages)`` of :func:`alignlab.kernels.nf4_small.small_m_matmul`: start from the configuration the
current table (or the H100 rules) gives, try every value of one parameter with the others held, keep the
fastest, move to the next parameter; two passes. Every time is a CUDA-graph replay over rotating weights
(more bytes than the L2 holds, no host overhead: ``nf4._graph_us``), median of 5. In the same run, per
shape and M: bf16 cuBLAS on a dense weight, NF4 dequantize + cuBLAS, and a device copy of the bytes the
kernel moves (``nf4._copy_us``), so the table says where the small kernels win at all.

Kernels for the first pass are compiled beforehand in parallel worker processes (Triton's on-disk cache
then serves the timing process); ``--deadline`` bounds the search (seconds, whatever is not searched
keeps its starting configuration).

``--kernels swap_early swap late`` searches each of those kernels in turn at every shape and M (one search
each, all in this process, the default path timed once per row), and the printed table lists, per shape and
row bucket, the fastest of them where it took at most ``--threshold`` (0.95) times the time of the best path
the dispatch had (``min(default, dequantize + cuBLAS)``): the rule the H100 table was made by
(:func:`table_from_rows`). ``max_m`` is the largest bucket up to which, at every shape, some small-M kernel
beat dequantize + cuBLAS.

Prints the table to paste into ``alignlab/kernels/nf4_configs.py`` (``TABLES[<device>]``) or to pass to
``nf4_configs.register_table`` at run time, and writes ``benchmarks/results/nf4_tune_<device>.json``.

    python benchmarks/nf4_tune.py [--ms 1 2 4 8 16 32 64] [--deadline 330] [--workers 14]
    python benchmarks/nf4_tune.py --kernels swap_early swap --ms 2 4 8 16 32 64
    python benchmarks/nf4_tune.py --kernels swap_flat --ms 64 --exhaustive --space num_stages=1 nb=1,2

``--space NAME=V1,V2`` restricts a launch parameter's searched values; ``--exhaustive`` times every configuration of
the (restricted) space, where the coordinate search can miss pairs of parameters that only pay together.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nf4 import SHAPES, _copy_us, _graph_us, _nf4_bytes  # noqa: E402

from alignlab.bench import library_versions, write_json  # noqa: E402
from alignlab.kernels import nf4_configs  # noqa: E402
from alignlab.kernels.nf4_dequant import nf4_dequant  # noqa: E402
from alignlab.kernels.nf4_small import small_m_matmul  # noqa: E402
from alignlab.quant.nf4 import nf4_quantize  # noqa: E402

SPACE = {
    "block_n": (32, 64, 128, 256),
    "nb": (1, 2, 4),
    "split": (1, 2, 4, 8, 16),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3),
}
NAMES = tuple(SPACE)
L2_BYTES = 200e6


KERNEL = None  # --kernel: None = the default kernel per M (GEMV at M = 1, tl.dot above)
EXHAUSTIVE = False  # --exhaustive: every configuration of SPACE instead of the coordinate search


def _start(M: int, N: int, K: int) -> tuple:
    """The search's starting point: the configuration the default kernel gets now (this GPU's table, else the
    H100 rules)."""
    kernel = "gemv" if M == 1 else "dot"
    if KERNEL is not None and KERNEL.startswith("swap"):  # no table entries yet: their own starting rule
        return nf4_configs.heuristic_config(KERNEL, M, N, 64, torch.bfloat16)
    if torch.cuda.is_available():
        return nf4_configs.small_config(kernel, M, N, K, 64, torch.bfloat16, torch.device("cuda"))
    return nf4_configs.heuristic_config(kernel, M, N, 64, torch.bfloat16)


def _neighbours(cfg: tuple):
    for i, name in enumerate(NAMES):
        for v in SPACE[name]:
            if v != cfg[i]:
                yield cfg[:i] + (v,) + cfg[i + 1:]


def _compile_worker(jobs, kernel=None):
    """Run each (M, N, K, cfg) once on small random data: compiles into Triton's disk cache."""
    torch.cuda.init()
    weights = {}
    for M, N, K, cfg in jobs:
        if (N, K) not in weights:
            weights[N, K] = nf4_quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        try:
            small_m_matmul(x, weights[N, K], kernel=kernel, **dict(zip(NAMES, cfg)))
        except Exception:  # noqa: BLE001 - out of resources etc.: the timing pass records it
            pass
    torch.cuda.synchronize()
    return len(jobs)


def precompile(ms, workers: int, shapes=SHAPES) -> float:
    t0 = time.perf_counter()
    jobs = []
    for (N, K), M in itertools.product(shapes, ms):
        start = _start(M, N, K)
        cands = itertools.product(*SPACE.values()) if EXHAUSTIVE else _neighbours(start)
        jobs += [(M, N, K, c) for c in (start, *cands)]
    seen, uniq = set(), []
    for M, N, K, c in jobs:  # Triton compiles per specialization, not per shape value
        k = (min(M, 2) if M < 16 else M, N > 4096, c)
        if k not in seen:
            seen.add(k)
            uniq.append((M, N, K, c))
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.starmap(_compile_worker, [(uniq[i::workers], KERNEL) for i in range(workers)])
    print(f"precompiled {len(uniq)} variants in {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def search(M, N, K, ts, deadline: float) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ nf4_dequant(ts[0], torch.float32).double().T
    timed: dict = {}

    def time_cfg(cfg):
        if cfg not in timed:
            kw = dict(zip(NAMES, cfg), kernel=KERNEL)
            try:
                y = small_m_matmul(x, ts[0], **kw)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise AssertionError(f"relative error {err}")
                timed[cfg] = _graph_us([lambda t=t: small_m_matmul(x, t, **kw) for t in ts], reps=5)
            except Exception as e:  # noqa: BLE001
                timed[cfg] = float("inf")
                print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return timed[cfg]

    start = _start(M, N, K)
    best = start
    time_cfg(best)
    default_us = _graph_us([lambda t=t: small_m_matmul(x, t) for t in ts], reps=5)
    if EXHAUSTIVE:
        for cand in itertools.product(*SPACE.values()):
            if time.perf_counter() > deadline:
                break
            if time_cfg(cand) < timed[best]:
                best = cand
    for _ in range(0 if EXHAUSTIVE else 2):
        for i, name in enumerate(NAMES):
            if time.perf_counter() > deadline:
                break
            for v in SPACE[name]:
                cand = best[:i] + (v,) + best[i + 1:]
                if time_cfg(cand) < timed[best]:
                    best = cand
    return {"start": start, "start_us": timed[start], "best": best, "best_us": timed[best], "tried": len(timed),
            "kernel": KERNEL, "default_us": default_us}


def table_from_rows(rows: list[dict], threshold: float = 0.95) -> tuple[dict, int]:
    """``(configs, max_m)`` for ``nf4_configs.TABLES`` from the rows of one run.

    Rows of the base search (``kernel`` None: GEMV at M = 1, ``tl.dot`` above; or ``"gemv"`` / ``"dot"`` named)
    give ``(base, bucket)`` entries as they are. Rows of the alternatives (``nf4_configs.ALTERNATIVES``) give, per shape and row bucket, the
    fastest alternative's configuration where its best time is at most ``threshold`` times the best path the
    dispatch had in the same run, ``min(default, dequantize + cuBLAS)`` (each row times both). ``max_m``: the
    largest bucket up to which (from the smallest M of the run) every shape had a small-M time (a searched best or
    the default) below dequantize + cuBLAS."""
    configs: dict = {}
    groups: dict = {}
    for r in rows:
        if r["kernel"] in (None, "gemv", "dot"):  # the base search (default, or named with --kernels gemv / dot)
            base = r["kernel"] or ("gemv" if r["M"] == 1 else "dot")
            configs.setdefault((base, nf4_configs.m_bucket(r["M"])), {})[(r["N"], r["K"])] = tuple(r["best"])
        else:
            groups.setdefault((r["N"], r["K"], r["M"]), []).append(r)
    for (N, K, M), group in groups.items():
        reference = min(min(r["default_us"], r["dequant_mm_us"]) for r in group)
        best = min(group, key=lambda r: r["best_us"])
        if best["best_us"] <= threshold * reference:
            configs.setdefault((best["kernel"], nf4_configs.m_bucket(M)), {})[(N, K)] = tuple(best["best"])
    wins: dict = {}  # (M, N, K) -> some small-M time below dequantize + cuBLAS
    for r in rows:
        cell = (r["M"], r["N"], r["K"])
        wins[cell] = wins.get(cell, False) or min(r["best_us"], r["default_us"]) < r["dequant_mm_us"]
    max_m = 0
    for m in sorted({r["M"] for r in rows}):
        if not all(won for (mm, _, _), won in wins.items() if mm == m):
            break
        max_m = m
    return configs, max_m


def merged_table(table: dict, rows: list[dict], threshold: float = 0.95) -> dict:
    """``table`` (a ``nf4_configs.TABLES`` entry) with the entries :func:`table_from_rows` gives from ``rows`` (a run
    of the alternatives at shapes of its own, e.g. ``--shapes 1024x4096,1024x8192``) taken in: at each bucket a shape
    the run lists drops its other alternatives' entries there; the run's shapes join ``"shapes"`` (a table without
    them had its entries' shapes); ``max_m`` comes down to the run's own bound where that is lower (a shape of the
    run lost to dequantize + cuBLAS above it; a run that lost at its smallest row count, or lost nowhere, leaves
    it), and
    ``"max_m_listed"`` keeps the buckets above it that some shape lists. The base kernel's entries stay (the run
    measured alternatives only). A new dict; ``table`` is not changed."""
    new, run_max = table_from_rows(rows, threshold)
    configs = {k: dict(v) for k, v in table["configs"].items()}
    before = table.get("shapes") or [s for entries in configs.values() for s in entries]
    for (kernel, bucket), entries in new.items():
        for (other, b), held in configs.items():
            if b == bucket and other in nf4_configs.ALTERNATIVES:
                for shape in entries:
                    held.pop(shape, None)
        configs.setdefault((kernel, bucket), {}).update(entries)
    configs = {k: v for k, v in configs.items() if v}
    shapes = list(dict.fromkeys([*before, *((r["N"], r["K"]) for r in rows)]))
    # the run bounds max_m only where one of its shapes lost at some row count it measured (a run that won at
    # every M it timed, say --ms 16 alone, says nothing of the buckets above)
    lost = run_max < max(r["M"] for r in rows)
    max_m = min(table["max_m"], run_max) if run_max and lost else table["max_m"]
    listed = max([table.get("max_m_listed", table["max_m"])] + [b for (_, b) in new])
    out = {"max_m": max_m, "shapes": shapes, "configs": configs}
    return {**out, "max_m_listed": listed} if listed > max_m else out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096,14336x4096")
    p.add_argument("--deadline", type=float, default=330.0, help="seconds for the whole search (all kernels)")
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--kernels", "--kernel", nargs="+", choices=["gemv", "dot", *nf4_configs.ALTERNATIVES],
                   default=None, help="search these kernels at every M, one after the other (default: the base "
                   "kernel, GEMV at M = 1 and tl.dot above)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="an alternative kernel enters the table where it took <= this x the best existing path")
    p.add_argument("--space", nargs="+", default=[], metavar="NAME=V1,V2",
                   help=f"restrict the searched values of a launch parameter ({', '.join(NAMES)}), e.g. "
                        "block_n=64,128 num_stages=1")
    p.add_argument("--exhaustive", action="store_true",
                   help="time every configuration of the (restricted) space instead of the coordinate search")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    global KERNEL, EXHAUSTIVE
    EXHAUSTIVE = args.exhaustive
    for item in args.space:
        name, _, values = item.partition("=")
        if name not in SPACE or not values:
            p.error(f"--space takes NAME=V1,V2 with NAME one of {', '.join(NAMES)}, got {item!r}")
        try:
            SPACE[name] = tuple(int(v) for v in values.split(","))
        except ValueError:
            p.error(f"--space {name}: integers expected, got {values!r}")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t_start = time.perf_counter()
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    name = torch.cuda.get_device_name()
    key = next((k for k in ("H200", "H100", "A100", "L40S", "B200") if k in name), name.replace(" ", "_"))
    kernels = args.kernels or [None]
    rows = []
    for i, KERNEL in enumerate(kernels):
        if args.workers > 1:
            precompile(args.ms, args.workers, shapes)
        deadline = t_start + args.deadline * (i + 1) / len(kernels)  # an equal share of the time per kernel
        for N, K in shapes:
            t = nf4_quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64)
            wbytes = _nf4_bytes(N, K, t)
            count = max(3, -(-int(L2_BYTES) // int(wbytes)))
            ts = [t] + [nf4_quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64)
                        for _ in range(count - 1)]
            wds = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                   for _ in range(max(2, -(-int(L2_BYTES) // (2 * N * K))))]
            for M in args.ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                r = {"N": N, "K": K, "M": M}
                r.update(search(M, N, K, ts, deadline))
                r["bf16_us"] = _graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in wds], reps=5)
                r["dequant_mm_us"] = _graph_us([lambda tt=tt: torch.nn.functional.linear(x, nf4_dequant(tt))
                                                for tt in ts], reps=5)
                r["copy_us"] = _copy_us(wbytes + 2 * M * (N + K))
                r["best_pct_copy"] = 100 * r["copy_us"] / r["best_us"]
                r["bf16_over_best"] = r["bf16_us"] / r["best_us"]
                rows.append(r)
                print(f"{KERNEL or 'base'} {N}x{K} M={M:2d} start {r['start']} {r['start_us']:.1f} us -> best "
                      f"{r['best']} {r['best_us']:.1f} us ({r['best_pct_copy']:.0f}% copy), default now "
                      f"{r['default_us']:.1f}, bf16 {r['bf16_us']:.1f}, dequant+mm {r['dequant_mm_us']:.1f} "
                      f"({r['tried']} tried, {time.perf_counter() - t_start:.0f} s)", flush=True)
            del ts, wds
            torch.cuda.empty_cache()

    configs, max_m = table_from_rows(rows, args.threshold)
    # "shapes": what small_choice matches a call against where the base kernel has no entries (a run of alternatives)
    measured = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    # "max_m_listed": the largest bucket some shape lists an entry at, where above max_m (takes_small)
    listed = max([max_m] + [bucket for (_, bucket) in configs])
    wider = f"\"max_m_listed\": {listed}, " if listed > max_m else ""
    print(f"\nTABLES[{key!r}] = {{\"max_m\": {max_m}, {wider}\"shapes\": {measured!r}, \"configs\": {{")
    for k, v in configs.items():
        print(f"    {k!r}: {{" + ", ".join(f"{s!r}: {c!r}" for s, c in v.items()) + "},")
    print("}}")
    out = args.out or Path(__file__).parent / "results" / f"nf4_tune_{key}.json"
    doc = {"device": name, "versions": library_versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "space": SPACE, "max_m": max_m,
           "threshold": args.threshold, "rows": rows, "seconds": time.perf_counter() - t_start}
    write_json(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
