"""A/B of where the small-M NF4 kernels keep their codebook (issue 24): ``TABLE_REGS`` 0 (PTX immediates),
1 (registers) and ``auto`` (the rule of ``nf4_small._table_in_registers``), in one process.

Per benchmark shape (``nf4.SHAPES``) and M: ``small_m_matmul`` under each setting, CUDA-graph timed over rotating
weights (``nf4._graph_us``), the largest difference of its output from the setting-0 output, bf16 cuBLAS on a
dense weight and a same-bytes copy; at M = 1 also the late (tensor-core) kernel at a few ``block_n`` /
``num_warps``, which the dispatch table may name with ``("late", 1)`` entries. One JSON line per row.

    python benchmarks/nf4_table_regs.py [--ms 1,2,4,8,16,32,64] [--out benchmarks/results/nf4_table_regs.json]
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

p = argparse.ArgumentParser()
p.add_argument("--ms", default="1,2,4,8,16,32,64")
p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nf4_table_regs.json")
args = p.parse_args()
if not torch.cuda.is_available():
    sys.exit("benchmarks/nf4_table_regs.py needs a CUDA GPU")

dt = torch.bfloat16
a = torch.randn(8192, 8192, device="cuda", dtype=dt)
for _ in range(60):
    a @ a
torch.cuda.synchronize()
del a
rows = []
t0 = time.time()
ms = [int(v) for v in args.ms.split(",")]
for N, K in SHAPES:
    t = nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64, double_quant=True)
    wb = _nf4_bytes(N, K, t)
    cnt = max(3, -(-int(L2_BYTES) // int(wb)))
    ts = [t] + [nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64, double_quant=True)
                for _ in range(cnt - 1)]
    wds = [torch.randn(N, K, device="cuda", dtype=dt) for _ in range(max(2, -(-int(L2_BYTES) // (2 * N * K))))]
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        r = {"N": N, "K": K, "M": M}
        ref = None
        for mode in ("0", "1", "auto"):
            nf4_small.TABLE_REGS = mode
            nf4_small._PLANS.clear()
            y = small_m_matmul(x, t)
            if ref is None:
                ref = y
            else:
                r[f"maxdiff_{mode}"] = (y.float() - ref.float()).abs().max().item()
            r[f"regs{mode}_us"] = _graph_us([lambda tt=tt: small_m_matmul(x, tt) for tt in ts])
        if M == 1:
            nf4_small.TABLE_REGS = "auto"
            for kern in ("late",):
                for bn in (32, 64, 128):
                    for nw in (4, 8):
                        nf4_small._PLANS.clear()
                        try:
                            r[f"late_bn{bn}_w{nw}_us"] = _graph_us(
                                [lambda tt=tt: small_m_matmul(x, tt, kernel="late", block_n=bn, num_warps=nw) for tt in ts])
                        except Exception as e:
                            r[f"late_bn{bn}_w{nw}_err"] = repr(e)[:120]
        r["bf16_us"] = _graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in wds])
        r["copy_us"] = _copy_us(wb + 2 * M * (N + K))
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        rows.append(r)
    del ts, wds
    torch.cuda.empty_cache()
print("took", time.time() - t0)
write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
