"""Host cost of one eager call, piece by piece: where the enqueue time of an NF4 / QLoRA layer call goes (GPU).

Eager decoding and small-batch training steps are host-bound: the GPU waits while Python enqueues the
next kernel. This script times, per call, the median wall time of a loop of calls (the GPU queue is
drained every 50 calls so that it never fills and the numbers stay host time), for a ladder of pieces
from a bare ``torch.empty`` to a whole adapted ``LoRALinear`` forward, at one shape (default the
q_proj of Llama-3-8B, 4096 x 4096, M = 1, bf16). Compare each row with the bf16 ``nn.Linear`` row.

Run: ``python benchmarks/host_overhead.py [--m 1] [--n 4096] [--k 4096] [--out PATH]`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from alignlab.adapters import LoRAConfig, fused, inject
from alignlab.bench import library_versions, write_json
from alignlab.quant import NF4Linear


def per_call_us(fn, reps: int = 400, warmup: int = 30, sync_every: int = 50) -> float:
    """Median host µs of one ``fn()`` call, synchronizing every ``sync_every`` calls (a full launch queue
    would time the GPU instead)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if i % sync_every == sync_every - 1:
            torch.cuda.synchronize()
    return statistics.median(samples)


def _no_grad(layer, x):
    """One call of an adapted layer under ``torch.no_grad()`` (generation)."""
    with torch.no_grad():
        return layer(x)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host_overhead.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/host_overhead.py needs a CUDA GPU")
    from alignlab.kernels.dispatch import use_triton
    from alignlab.kernels.nf4_matmul import nf4_matmul
    from alignlab.kernels.nf4_small import small_m_matmul

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    lin = nn.Linear(args.k, args.n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    q = NF4Linear.from_linear(lin)
    holder = nn.Module()
    holder.lin = NF4Linear.from_linear(lin)
    inject(holder, LoRAConfig(r=16, alpha=32, target_modules=["lin"]))
    lora = holder.lin
    dora_holder = nn.Module()
    dora_holder.lin = NF4Linear.from_linear(lin)
    inject(dora_holder, LoRAConfig(r=16, alpha=32, target_modules=["lin"], use_dora=True))
    dora = dora_holder.lin
    dense_holder = nn.Module()
    dense_holder.lin = nn.Linear(args.k, args.n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    inject(dense_holder, LoRAConfig(r=16, alpha=32, target_modules=["lin"]))
    dense_lora = dense_holder.lin
    x = torch.randn(args.m, args.k, device=dev, dtype=dt)
    xg = x.clone().requires_grad_(True)
    a32 = torch.randn(16, args.k, device=dev)
    t = q.quant_weight

    rows = {
        "torch.empty((M, N))": lambda: torch.empty(args.m, args.n, device=dev, dtype=dt),
        "fp32 (16, K) .to(bf16)": lambda: a32.to(dt),
        "x @ A^T (r = 16)": lambda: x @ a32.to(dt).T,
        "autograd.Function identity (x needs grad)": lambda: _Identity.apply(xg),
        "use_triton(x)": lambda: use_triton(x),
        "NF4Linear.quant_weight": lambda: q.quant_weight,
        "small_m_matmul (launch + Python)": (lambda: small_m_matmul(x, t)) if args.m <= 16 else None,
        "nf4_matmul": lambda: nf4_matmul(x, t),
        "bf16 nn.Linear": lambda: lin(x),
        "bf16 nn.Linear, x needs grad": lambda: lin(xg),
        "NF4Linear": lambda: q(x),
        "NF4Linear, x needs grad": lambda: q(xg),
        "LoRA on bf16 nn.Linear, x needs grad": lambda: dense_lora(xg),
        "LoRA on bf16 nn.Linear, torch.no_grad()": lambda: _no_grad(dense_lora, x),
        "LoRA on NF4Linear (QLoRA), x needs no grad": lambda: lora(x),
        "LoRA on NF4Linear (QLoRA), x needs grad": lambda: lora(xg),
        "LoRA on NF4Linear (QLoRA), torch.no_grad()": lambda: _no_grad(lora, x),
        "DoRA on NF4Linear (QDoRA), x needs grad": lambda: dora(xg),
        "DoRA on NF4Linear (QDoRA), torch.no_grad()": lambda: _no_grad(dora, x),
    }
    # the QLoRA layer with its decode launchers not kept (fused.DECODE_RUNNERS off; on by default), a layer of its own
    runner_holder = nn.Module()
    runner_holder.lin = NF4Linear.from_linear(lin)
    inject(runner_holder, LoRAConfig(r=16, alpha=32, target_modules=["lin"]))
    runner_lora = runner_holder.lin
    not_kept = {
        "QLoRA, launchers not kept (DECODE_RUNNERS off), x needs grad": lambda: runner_lora(xg),
        "QLoRA, launchers not kept (DECODE_RUNNERS off), torch.no_grad()": lambda: _no_grad(runner_lora, x),
    }
    out = {}
    has_runners = hasattr(fused, "DECODE_RUNNERS")  # (an older tree under A/B has none)
    for group, runners_on in ((rows, getattr(fused, "DECODE_RUNNERS", False)), (not_kept if has_runners else {}, False)):
        saved, fused.DECODE_RUNNERS = getattr(fused, "DECODE_RUNNERS", False), runners_on
        try:
            for name, fn in group.items():
                if fn is None:
                    continue
                out[name] = per_call_us(fn)
                print(f"{name:45s} {out[name]:8.1f} us", flush=True)
        finally:
            fused.DECODE_RUNNERS = saved
    # issue 18's host target: one adapted NF4 linear call enqueues in at most 2x the time of a bf16 nn.Linear call
    ratios = {}
    pairs = (("x needs grad", "LoRA on NF4Linear (QLoRA), x needs grad", "bf16 nn.Linear, x needs grad"),
             ("no grad", "LoRA on NF4Linear (QLoRA), torch.no_grad()", "bf16 nn.Linear"))
    for what, ours, floor in pairs:
        ratios[what] = out[ours] / out[floor]
        print(f"QLoRA layer / bf16 nn.Linear, {what}: {ratios[what]:.2f}x (target <= 2x: "
              f"{'met' if ratios[what] <= 2 else 'not met'})")
    write_json(args.out, {"versions": library_versions(), "device": torch.cuda.get_device_name(),
                          "shape": dict(m=args.m, n=args.n, k=args.k), "host_us": out, "qlora_over_linear": ratios})


if __name__ == "__main__":
    main()
