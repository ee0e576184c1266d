"""The merged QLoRA dequantization ``W + s·B A`` (``nf4_dequant_lora``) vs plain NF4 dequantization, per tile.

Times (``triton.testing.do_bench``, median, L2 flushed) at the Llama-3-8B projection shapes, r = 16, bf16:
the plain dequantization kernel, the merged kernel at each candidate tile ``(BLOCK_N, HALF_K, warps)``, and a
device-to-device copy of the same bytes (read the packed weight + scales, write the bf16 weight) as the
physical limit. Picks the tile the library ships (``alignlab.kernels.nf4_dequant._MERGE_TILE``).

    python benchmarks/nf4_merge.py [--out benchmarks/results/nf4_merge.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import alignlab.kernels.nf4_dequant as deq
from alignlab.bench import library_versions
from alignlab.quant.nf4 import nf4_quantize

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TILES = [(32, 128, 4), (16, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (8, 256, 4), (32, 64, 4)]


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nf4_merge.json")
    args = ap.parse_args(argv)
    rows = []
    for n, k in SHAPES:
        t = nf4_quantize(torch.randn(n, k, device="cuda"), blocksize=64, double_quant=True)
        a = (0.02 * torch.randn(args.rank, k, device="cuda")).bfloat16()
        b = (0.02 * torch.randn(n, args.rank, device="cuda")).bfloat16()
        nbytes = t.data.numel() + t.absmax.numel() + n * k * 2
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))  # reads half the bytes and writes half: all of them
        plain_ms = triton.testing.do_bench(lambda: deq.nf4_dequant(t, torch.bfloat16))
        row = {"shape": [n, k], "rank": args.rank, "copy_same_bytes_ms": copy_ms, "dequant_ms": plain_ms, "tiles": {}}
        for tile in TILES:
            deq._MERGE_TILE = tile
            row["tiles"][str(tile)] = triton.testing.do_bench(lambda: deq.nf4_dequant_lora(t, torch.bfloat16, a, b, 2.0))
        best = min(row["tiles"], key=row["tiles"].get)
        print(f"{n}x{k}: copy {copy_ms * 1e3:.1f} us, dequant {plain_ms * 1e3:.1f} us, merged best {best} "
              f"{row['tiles'][best] * 1e3:.1f} us; all: " + ", ".join(f"{k_}: {v * 1e3:.1f}" for k_, v in row["tiles"].items()))
        rows.append(row)
    # one tile for every shape: the smallest total time; merging pays where it costs at most ~20% over a plain
    # dequantization (then the one GEMM saves the adapter term's passes over the activations)
    totals = {tile: sum(r["tiles"][tile] for r in rows) for tile in rows[0]["tiles"]}
    best = min(totals, key=totals.get)
    ratio = totals[best] / sum(r["dequant_ms"] for r in rows)
    print(f"best tile {best}: merged / plain dequantization over all shapes = {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "versions": library_versions(),
                                    "rows": rows, "best_tile": best, "merged_over_plain": ratio}, indent=1))


if __name__ == "__main__":
    main()
