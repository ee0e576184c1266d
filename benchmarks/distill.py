"""Fused linear distillation (issue 8): alignlab vs Liger-Kernel vs eager PyTorch, one run, one GPU.

Forward + backward of the token-mean generalised JSD (beta = 0.5, temperature 1)
between a student ``softmax(x W^T)`` and a teacher ``softmax(x_t W_t^T)``, both
given as last hidden state ``(T, H)`` + lm_head ``(V, H)`` in bf16 (default shape
T=4096, H=4096, V=128256, a Llama-3-8B head). Two settings:

* ``trainable-head``: gradients to the student hidden state and lm_head weight;
* ``frozen-head``: gradient to the hidden state only (LoRA-style distillation).

Contestants: ``alignlab`` (:func:`alignlab.losses.distill.fused_linear_distill_loss`),
``liger_ops`` (Liger's ``LigerFusedLinearJSDFunction``, the op behind
``liger_kernel.transformers.LigerFusedLinearJSD``), ``liger_chunked``
(``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``, soft loss only, torch.compile'd
chunks), and ``eager`` (full logits + ``distill_loss``). For each: median time (CUDA
events, L2 flushed), extra peak memory above the inputs (the returned gradients
included) and "workspace" = extra peak minus the gradient bytes every method must
return. Correctness: loss and gradients against a float64 reference on a row subset
and against Liger on the full shape.

Floor: the matmuls, ``2 T H V`` FLOP each: student logits, teacher logits, dL/dx,
(+ dL/dW when trainable), at the bf16 rate measured in the same run.

    python benchmarks/distill.py [--tokens 4096 --hidden 4096 --vocab 128256] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

from alignlab.bench import compare, matmul_tflops, save_results
from alignlab.losses.distill import distill_loss, fused_linear_distill_loss

GiB = 2**30


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction
    except ImportError as exc:  # pragma: no cover - depends on the machine
        print(f"liger-kernel not importable ({exc}); Liger rows skipped")
        return None, None
    return LigerFusedLinearJSDFunction, LigerFusedLinearJSDLoss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_against_float64(x, w, th, tw, rows: int, chunk: int | None) -> dict:
    """alignlab (bf16 inputs) vs float64 math on the same bf16 values, first ``rows`` tokens."""
    xs = x[:rows].detach().clone().requires_grad_(True)
    ws = w.detach().clone().requires_grad_(True)
    loss = fused_linear_distill_loss(xs, ws, teacher_hidden=th[:rows], teacher_weight=tw, chunk_size=chunk)
    gx, gw = torch.autograd.grad(loss, (xs, ws))
    x64 = xs.detach().double().requires_grad_(True)
    w64 = ws.detach().double().requires_grad_(True)
    ref = distill_loss(x64 @ w64.T, th[:rows].double() @ tw.double().T, "jsd")
    rx, rw = torch.autograd.grad(ref, (x64, w64))
    out = {"rows": rows, "loss": loss.item(), "loss_ref": ref.item(), "loss_rel": abs(loss.item() - ref.item()) / ref.item(),
           "dx_rel": _rel(gx, rx), "dw_rel": _rel(gw, rw)}
    # Unfused bf16 path users would write (bf16 logits, fp32 softmax), for scale.
    xe = xs.detach().clone().requires_grad_(True)
    we = ws.detach().clone().requires_grad_(True)
    eager = distill_loss(xe @ we.T, th[:rows] @ tw.T, "jsd")
    ex, ew = torch.autograd.grad(eager, (xe, we))
    out.update({"eager_bf16_loss_rel": abs(eager.item() - ref.item()) / ref.item(),
                "eager_bf16_dx_rel": _rel(ex, rx), "eager_bf16_dw_rel": _rel(ew, rw)})
    del rx, rw, x64, w64, ref
    return out


def _with_config(fn, block: int, warps: int):
    """Run ``fn`` with another row-kernel block size / warp count (a tuning sweep)."""
    import alignlab.kernels.distill as kd

    orig = kd._block_size
    kd._block_size = lambda vocab: (block, warps)
    try:
        return fn()
    finally:
        kd._block_size = orig


def run(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, chunks: list, skip_eager: bool, dev: str = "cuda",
        kernel_configs: tuple = ()):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=g)
    w = torch.randn(vocab, hidden, device=dev, dtype=dtype, generator=g) * hidden**-0.5
    th = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=g)
    tw = torch.randn(vocab, hidden, device=dev, dtype=dtype, generator=g) * hidden**-0.5
    labels = torch.randint(0, vocab, (tokens,), device=dev, generator=g)
    liger_fn, liger_chunked_cls = _liger() if dev == "cuda" else (None, None)

    t0 = time.time()
    checks = {"float64": check_against_float64(x, w, th, tw, rows=min(tokens, 512), chunk=None)}
    print("float64 check:", json.dumps(checks["float64"]), f"({time.time() - t0:.1f}s)", flush=True)

    peak = matmul_tflops(dev, dtype)
    comparisons = []
    for setting in ("trainable-head", "frozen-head"):
        train_w = setting == "trainable-head"
        xs = x.detach().clone().requires_grad_(True)
        ws = w.detach().clone().requires_grad_(train_w)
        params = (xs, ws) if train_w else (xs,)
        grad_bytes = sum(p.numel() * p.element_size() for p in params)

        def ours(chunk=None, grad_chunk=None):
            loss = fused_linear_distill_loss(xs, ws, teacher_hidden=th, teacher_weight=tw, kind="jsd", beta=0.5,
                                             chunk_size=chunk, grad_chunk_size=grad_chunk)
            return torch.autograd.grad(loss, params)

        contestants = {"alignlab": ours}
        for c, gc_ in chunks:
            contestants[f"alignlab_{c}_{gc_}"] = lambda c=c, gc_=gc_: ours(c, gc_)
        for block, warps in kernel_configs:
            contestants[f"alignlab_b{block}_w{warps}"] = lambda block=block, warps=warps: _with_config(ours, block, warps)
        if liger_fn is not None:
            def liger_ops():
                loss = liger_fn.apply(xs, ws, th, tw, None, 0.5, -100, 1.0)
                return torch.autograd.grad(loss, params)

            chunked = liger_chunked_cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)

            def liger_chunked():
                loss = chunked(xs, ws, th, tw, labels)
                return torch.autograd.grad(loss, params)

            contestants["liger_ops"] = liger_ops
            contestants["liger_chunked"] = liger_chunked
            # Same numbers as Liger on the full shape.
            ours_g = ours()
            lig_g = liger_ops()
            lo = fused_linear_distill_loss(xs, ws, teacher_hidden=th, teacher_weight=tw).item()
            ll = liger_fn.apply(xs.detach(), ws.detach(), th, tw, None, 0.5, -100, 1.0).item()
            checks[f"vs_liger_{setting}"] = {"loss": lo, "liger_loss": ll, "loss_rel": abs(lo - ll) / abs(ll),
                                            **{f"grad{i}_rel": _rel(a, b) for i, (a, b) in enumerate(zip(ours_g, lig_g))}}
            print(setting, "vs liger:", json.dumps(checks[f"vs_liger_{setting}"]), flush=True)
            del ours_g, lig_g
        if not skip_eager:
            def eager():
                loss = distill_loss(xs @ ws.T, th @ tw.T, "jsd", beta=0.5)
                return torch.autograd.grad(loss, params)

            contestants["eager"] = eager
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        flops = 2.0 * tokens * hidden * vocab * (4 if train_w else 3)
        cmp = compare(
            contestants, warmup=3, rep=10, flops=flops, baseline="liger_ops" if liger_fn is not None else "alignlab",
            name=f"fused linear JSD, {setting}, T={tokens} H={hidden} V={vocab} {str(dtype).split('.')[-1]}",
            meta={"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype), "setting": setting,
                  "grad_bytes": grad_bytes, "matmul_floor_ms": flops / (peak * 1e12) * 1e3},
        )
        print(cmp.table(), flush=True)
        summary = {}
        for name in contestants:
            m = cmp[name]
            if m.ok and m.peak_bytes is not None:
                summary[name] = {"median_ms": round(m.median_ms, 3), "extra_peak_GiB": round(m.peak_bytes / GiB, 3),
                                 "workspace_GiB": round((m.peak_bytes - grad_bytes) / GiB, 3)}
            else:
                summary[name] = {"error": m.error}
        if "liger_ops" in summary and "median_ms" in summary["liger_ops"]:
            lig = summary["liger_ops"]
            for name, s in summary.items():
                if "median_ms" in s:
                    s["time_vs_liger_ops"] = round(s["median_ms"] / lig["median_ms"], 3)
                    s["extra_peak_vs_liger_ops"] = round(s["extra_peak_GiB"] / lig["extra_peak_GiB"], 3)
                    s["workspace_vs_liger_ops"] = round(s["workspace_GiB"] / max(lig["workspace_GiB"], 1e-9), 3)
        print(setting, "summary:", json.dumps(summary, indent=1), flush=True)
        cmp.meta["summary"] = summary
        comparisons.append(cmp)
        del xs, ws
    return comparisons, checks, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--chunks", default="256:256,384:768,512:1536,1024:1024",
                    help="extra chunk_size:grad_chunk_size pairs of ours to sweep (comma list, may be empty)")
    ap.add_argument("--kernel-configs", default="", help="row-kernel BLOCK:warps pairs to sweep, e.g. 4096:16,2048:4")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--out", default=None,
                    help="JSON results (default on CUDA benchmarks/results/distill.json; on the CPU none unless given)")
    ap.add_argument("--device", default="cuda",
                    help="'cpu' runs the same shapes: give small ones to smoke-test the script "
                         "(e.g. --tokens 64 --hidden 64 --vocab 256)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/distill.py needs a CUDA GPU")
    chunks = [tuple(int(v) for v in c.split(":")) for c in args.chunks.split(",") if c]
    comparisons, checks, peak = run(args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype), chunks, args.skip_eager, args.device,
                                   [tuple(int(v) for v in c.split(":")) for c in args.kernel_configs.split(",") if c])
    out = args.out or ("benchmarks/results/distill.json" if args.device == "cuda" else None)
    if out is None:  # a CPU smoke run does not overwrite the GPU results
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    path = save_results(out, comparisons, meta={"checks": checks, "bf16_matmul_peak": peak, "device": device})
    print("wrote", path)


if __name__ == "__main__":
    main()
