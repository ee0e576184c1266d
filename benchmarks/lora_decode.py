"""The LoRA update of a decode-sized call: one Triton kernel vs the default path's casts and GEMMs (GPU).

``LoRALinear.decode_kernel`` (opt-in) adds ``s·(x Aᵀ) Bᵀ`` to the base layer's output with
:func:`alignlab.kernels.lora_decode.lora_update_` (one launch, fp32 factors read as they are) where the
default no-grad path casts ``A`` and ``B`` to the activation dtype and runs ``x Aᵀ`` and an ``addmm_``
(four launches). Per shape (Llama-3-8B projections, r = 16, fp32 factors, bf16 activations) and row count:
the GPU time of each (CUDA-graph replay of 20 calls, median of 7) and the eager wall time per call (median
of a loop, host-bound), plus the relative error of each against a float64 oracle.

Run: ``python benchmarks/lora_decode.py [--out PATH]`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from host_overhead import per_call_us  # noqa: E402
from nf4 import _graph_us  # noqa: E402

from alignlab.bench import library_versions  # noqa: E402
from alignlab.kernels.lora_decode import lora_update_  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
ROWS = [1, 8, 32, 64]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev, bf16, s = torch.device("cuda"), torch.bfloat16, 2.0
    rows = []
    for N, K in SHAPES:
        a = torch.randn(args.rank, K, device=dev) / K ** 0.5
        b = torch.randn(N, args.rank, device=dev) / args.rank ** 0.5
        for M in ROWS:
            x = torch.randn(M, K, device=dev, dtype=bf16)
            y0 = torch.randn(M, N, device=dev, dtype=bf16)
            y = y0.clone()

            def plain():
                ac, bc = a.to(bf16), b.to(bf16)
                return y.addmm_(x @ ac.T, bc.T, alpha=s)

            def kernel():
                return lora_update_(y, x, a, b, s)

            want = y0.double() + s * (x.double() @ a.double().T) @ b.double().T
            err = {}
            for name, fn in (("plain", plain), ("kernel", kernel)):
                y.copy_(y0)
                got = fn().double()
                err[name] = ((got - want).norm() / want.norm()).item()
            r = {"N": N, "K": K, "M": M, "rank": args.rank,
                 "plain_gpu_us": _graph_us([plain] * 20), "kernel_gpu_us": _graph_us([kernel] * 20),
                 "plain_wall_us": per_call_us(plain), "kernel_wall_us": per_call_us(kernel),
                 "plain_rel_err": err["plain"], "kernel_rel_err": err["kernel"]}
            rows.append(r)
            print(f"{N}x{K} M={M:2d}  GPU plain {r['plain_gpu_us']:6.1f} us  kernel {r['kernel_gpu_us']:6.1f} us   "
                  f"eager plain {r['plain_wall_us']:6.1f} us  kernel {r['kernel_wall_us']:6.1f} us   "
                  f"err plain {err['plain']:.1e} kernel {err['kernel']:.1e}", flush=True)
    out = args.out or Path(__file__).parent / "results" / "lora_decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "versions": library_versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
