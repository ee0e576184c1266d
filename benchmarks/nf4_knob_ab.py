"""A/B of one switch of the small-M NF4 kernels (issue 24), in one process: ``nf4_small.<KNOB>`` set to each value
in turn, at every benchmark shape and row count.

Per shape (``nf4.SHAPES``) and M: ``small_m_matmul`` (this GPU's default kernel and configuration, or
``--kernel``) under each value, CUDA-graph timed over rotating weights (``nf4._graph_us``) in ``--rounds``
alternated rounds (the best round per value is reported, each round's times are kept), the largest difference of
its output from the first value's, bf16 cuBLAS on a dense weight and a same-bytes copy. One JSON line per row.
Knobs: ``TABLE_REGS`` (``0`` PTX immediates / ``1`` registers / ``auto``, ``ALIGNLAB_NF4_TABLE_REGS``),
``X_WORDS`` (``0`` / ``1``: the swapped kernels' x read as 32-bit pairs, ``ALIGNLAB_NF4_X_WORDS``),
``LOOKUP_FIRST`` (``0`` / ``1`` / ``auto``: the swapped kernels' lookup before the layout change, ``ALIGNLAB_NF4_LOOKUP_FIRST``),
``PREFETCH`` / ``INTERLEAVE`` (``0`` / ``1``: the flat kernel's next-step loads ahead, its levels in column order against
x as stored; ``ALIGNLAB_NF4_PREFETCH`` / ``ALIGNLAB_NF4_INTERLEAVE``; with ``--kernel swap_flat``).

    python benchmarks/nf4_knob_ab.py [--knob TABLE_REGS --values 0,1,auto] [--ms 1,2,4,8,16,32,64]
        [--shapes 4096x4096,14336x4096] [--kernel swap_early] [--num-warps 4] [--out benchmarks/results/nf4_knob_ab.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nf4 import L2_BYTES, SHAPES, _copy_us, _graph_us, _nf4_bytes  # noqa: E402

from alignlab.bench import write_json  # noqa: E402
from alignlab.kernels import nf4_small  # noqa: E402
from alignlab.kernels.nf4_small import small_m_matmul  # noqa: E402
from alignlab.quant.nf4 import nf4_quantize  # noqa: E402

KNOBS = {"TABLE_REGS": str, "X_WORDS": lambda v: v != "0",
         "LOOKUP_FIRST": lambda v: "auto" if v == "auto" else v == "1", "PREFETCH": lambda v: v != "0",
         "INTERLEAVE": lambda v: v != "0"}  # how each knob's values are set on the module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--knob", choices=sorted(KNOBS), default="TABLE_REGS")
    p.add_argument("--values", default=None, help="comma separated (default: TABLE_REGS 0,1,auto; others 0,1)")
    p.add_argument("--ms", default="1,2,4,8,16,32,64")
    p.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096,14336x4096")
    p.add_argument("--kernel", default=None, choices=nf4_small.KERNEL_NAMES,
                   help="force this small_m_matmul kernel (default: the dispatch's)")
    p.add_argument("--num-warps", type=int, default=None,
                   help="force this many warps (e.g. 4: the table may give a forced kernel a 2-warp entry, where "
                        "LOOKUP_FIRST does not apply)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nf4_knob_ab.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/nf4_knob_ab.py needs a CUDA GPU")
    values = (args.values or ("0,1,auto" if args.knob == "TABLE_REGS" else "0,1")).split(",")
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    original = getattr(nf4_small, args.knob)

    def use(value):
        setattr(nf4_small, args.knob, KNOBS[args.knob](value))
        nf4_small._PLANS.clear()  # plans hold the meta-parameters the knob sets

    dt = torch.bfloat16
    a = torch.randn(8192, 8192, device="cuda", dtype=dt)
    for _ in range(60):  # clocks up before the first timing
        a @ a
    torch.cuda.synchronize()
    del a
    rows, t0 = [], time.time()
    try:
        for N, K in shapes:
            t = nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64, double_quant=True)
            wb = _nf4_bytes(N, K, t)
            cnt = max(3, -(-int(L2_BYTES) // int(wb)))
            ts = [t] + [nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64,
                                     double_quant=True) for _ in range(cnt - 1)]
            wds = [torch.randn(N, K, device="cuda", dtype=dt) for _ in range(max(2, -(-int(L2_BYTES) // (2 * N * K))))]
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=dt)
                r = {"N": N, "K": K, "M": M, "knob": args.knob, "kernel": args.kernel, "num_warps": args.num_warps}
                ref = None
                for value in values:
                    use(value)
                    y = small_m_matmul(x, t, kernel=args.kernel, num_warps=args.num_warps)
                    ref = y if ref is None else ref
                    r[f"maxdiff_{value}"] = (y.float() - ref.float()).abs().max().item()
                for rnd in range(args.rounds):
                    for value in values:
                        use(value)
                        r[f"{value}_round{rnd}_us"] = _graph_us(
                            [lambda tt=tt: small_m_matmul(x, tt, kernel=args.kernel, num_warps=args.num_warps) for tt in ts])
                for value in values:
                    r[f"{value}_us"] = min(r[f"{value}_round{i}_us"] for i in range(args.rounds))
                r["bf16_us"] = _graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in wds])
                r["copy_us"] = _copy_us(wb + 2 * M * (N + K))
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()
                                  if "round" not in k}), flush=True)
                rows.append(r)
            del ts, wds
            torch.cuda.empty_cache()
    finally:
        setattr(nf4_small, args.knob, original)
        nf4_small._PLANS.clear()
    print("took", round(time.time() - t0, 1), "s")
    write_json(args.out, {"device": torch.cuda.get_device_name(), "knob": args.knob, "values": values, "rows": rows})


if __name__ == "__main__":
    main()
