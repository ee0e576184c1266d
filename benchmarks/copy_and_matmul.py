"""Measure the two rooflines every other benchmark is judged against.

* device-to-device copy bandwidth (bytes read + written per second) over
  buffer sizes, against the cached :func:`alignlab.bench.copy_bandwidth`;
* dense square matmul throughput over sizes and dtypes, against the cached
  :func:`alignlab.bench.matmul_tflops` (bf16, n=8192).

Run on a GPU:  ``python benchmarks/copy_and_matmul.py``
(``--quick`` for fewer sizes; runs on CPU too, with small sizes).
Writes ``benchmarks/results/copy_and_matmul.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignlab.bench import compare, copy_bandwidth, matmul_tflops, save_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON results (default on a GPU without --quick: "
                        "benchmarks/results/copy_and_matmul.json; otherwise none unless given)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    copy_sizes = [64 << 20, 256 << 20, 1 << 30] if cuda else [8 << 20, 64 << 20]
    mm_sizes = [2048, 4096, 8192] if cuda else [256, 512]
    mm_dtypes = [torch.bfloat16, torch.float16, torch.float32] if cuda else [torch.float32]
    if args.quick:
        copy_sizes, mm_sizes = copy_sizes[-1:], mm_sizes[-1:]

    bw = copy_bandwidth(device)
    peak = matmul_tflops(device)
    print(f"roofline on {device}: copy {bw / 1e9:.4g} GB/s (read+write), bf16 matmul {peak:.4g} TFLOP/s\n")

    results = []
    for nbytes in copy_sizes:
        src = torch.ones(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        cmp = compare(
            {"copy_": dst.copy_, "clone": torch.clone},  # clone also allocates its output
            src,
            bytes_moved=2 * nbytes,
            flush_cache=False,
            memory=True,
            name=f"copy {nbytes >> 20} MiB",
            meta={"nbytes": nbytes},
        )
        print(cmp.table(), "\n")
        results.append(cmp)
        del src, dst

    for dtype in mm_dtypes:
        for n in mm_sizes:
            gen = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
            b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
            cmp = compare(
                {"torch.matmul": torch.matmul},
                a,
                b,
                flops=2 * n**3,
                peak_dtype=torch.bfloat16,  # every row as a share of the bf16 peak
                name=f"matmul {n}^3 {str(dtype).removeprefix('torch.')}",
                meta={"n": n, "dtype": str(dtype).removeprefix("torch.")},
            )
            m = cmp["torch.matmul"]
            print(cmp.table(), f"\n  -> {m.achieved_flops() / 1e12:.4g} TFLOP/s\n")
            results.append(cmp)

    meta = {"copy_bandwidth_bytes_per_s": bw, "matmul_bf16_tflops": peak, "device": device}
    if cuda:
        meta["device_name"] = torch.cuda.get_device_name()
        meta["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    out = args.out or (Path(__file__).parent / "results" / "copy_and_matmul.json" if cuda and not args.quick else None)
    if out is not None:  # a CPU or --quick run does not overwrite the GPU results
        print(f"wrote {save_results(out, results, meta=meta)}")


if __name__ == "__main__":
    main()
