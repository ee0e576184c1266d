"""QDoRA's row norm ``‖W + s·B A‖_row`` with its per-row factors (``dora_norm_and_scales``, one launch per layer
call), timed on the Llama-3-8B layer shapes, with the input-dimension split (``dora.NORM_SPLIT``) off and on, and
with it on, one scale lookup per quantization block (``dora.NORM_BLOCK_SCALES``), in one process (issue 18).

Per shape: the kernel on a blocksize-64 double-quantized NF4 weight, r = 16, bf16 factors, CUDA-graph timed over
rotating weights (``nf4._graph_us``) in ``--rounds`` alternated rounds (the best round per setting is reported),
the split count the rule chose, the largest differences of the norm from the unsplit one and of the per-block
form from the per-byte one, and a copy of the
packed weight's bytes (``nf4._copy_us``): the time the pass would take at copy speed. One JSON line per shape.

    python benchmarks/dora_norm.py [--rounds 2] [--out benchmarks/results/dora_norm.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nf4 import L2_BYTES, _copy_us, _graph_us, _nf4_bytes  # noqa: E402

from alignlab.bench import write_json  # noqa: E402
from alignlab.kernels import dora  # noqa: E402
from alignlab.kernels.launch import cdiv  # noqa: E402
from alignlab.quant.nf4 import nf4_quantize  # noqa: E402

# (out, in) of q / o, k / v, gate / up, down in Llama-3 8B
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dora_norm.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dora_norm.py needs a CUDA GPU")
    dt, r = torch.bfloat16, 16
    rows, t0, before = [], time.time(), (dora.NORM_SPLIT, dora.NORM_BLOCK_SCALES)
    # (name, NORM_SPLIT, NORM_BLOCK_SCALES): the settings timed against each other
    settings = [("split0", False, False), ("split1", True, False), ("split1_blocks", True, True)]
    try:
        for N, K in SHAPES:
            def weight():
                return nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64,
                                    double_quant=True)

            t = weight()
            ts = [t] + [weight() for _ in range(max(3, -(-int(L2_BYTES) // int(_nf4_bytes(N, K, t)))) - 1)]
            a = (torch.randn(r, K, device="cuda") / 30).to(dt)
            b = (torch.randn(N, r, device="cuda") / 30)
            m = torch.rand(N, device="cuda") + 0.5
            blocks, iters = cdiv(N, dora.ROW_NORM_CONFIG[0]), cdiv(K, dora.ROW_NORM_CONFIG[1])
            row = {"N": N, "K": K, "r": r, "config": list(dora.ROW_NORM_CONFIG)}
            norms = {}
            for name, split, blocks_on in settings:
                dora.NORM_SPLIT, dora.NORM_BLOCK_SCALES = split, blocks_on
                norms[name] = dora.dora_norm_and_scales(t, a, b.to(dt), 2.0, m, b, dt)[0]
            dora.NORM_SPLIT = True
            row["split"] = dora._norm_split(blocks, iters, t.data.device)
            row["maxdiff"] = (norms["split1"] - norms["split0"]).abs().max().item()
            row["maxdiff_blocks"] = (norms["split1_blocks"] - norms["split1"]).abs().max().item()
            for rnd in range(args.rounds):
                for name, split, blocks_on in settings:
                    dora.NORM_SPLIT, dora.NORM_BLOCK_SCALES = split, blocks_on
                    row[f"{name}_round{rnd}_us"] = _graph_us(
                        [lambda tt=tt: dora.dora_norm_and_scales(tt, a, b.to(dt), 2.0, m, b, dt) for tt in ts])
            for name, _, _ in settings:
                row[f"{name}_us"] = min(row[f"{name}_round{i}_us"] for i in range(args.rounds))
            row["copy_us"] = _copy_us(_nf4_bytes(N, K, t))
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
                              if "round" not in k}), flush=True)
            rows.append(row)
            del ts
            torch.cuda.empty_cache()
    finally:
        dora.NORM_SPLIT, dora.NORM_BLOCK_SCALES = before
    print("took", round(time.time() - t0, 1), "s")
    write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
