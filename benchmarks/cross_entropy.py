"""Fused linear cross-entropy (issue 11): naive vs Liger-Kernel vs alignlab, one run, one GPU.

Forward + backward of mean token cross-entropy from the last hidden state
``(T, H)`` and an lm_head ``(V, H)``, grads to both, bf16 (default shape of the
issue: T=8192, H=4096, V=128256). For each contestant: median time (CUDA events,
after warm-up), extra peak memory above the inputs (including the two gradients
it returns) and the "workspace" (extra peak minus those gradients), and
the relative error of loss and grads against a float32 reference.

The floor is the three matmuls (logits, dL/dh, dL/dW), ``3 * 2 T H V`` FLOP, at
the bf16 rate measured in the same run on a large square matmul.

Also: a sweep of our chunk size (time vs workspace), the row kernel alone
against the copy bandwidth, and ``linear_logprobs`` (any upstream gradient,
four matmuls) against full-logits log_softmax.

    python benchmarks/cross_entropy.py [--tokens 8192 --hidden 4096 --vocab 128256]
        [--out benchmarks/results/cross_entropy.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics

import torch
import torch.nn.functional as F

import alignlab.kernels.linear_logprobs as lk
from alignlab.bench import write_json
from alignlab.losses.cross_entropy import linear_cross_entropy
from alignlab.losses.logprobs import linear_logprobs

GiB = 2**30


def cuda_median_ms(fn, setup=None, warmup: int = 3, reps: int = 15) -> tuple[float, list[float]]:
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times), times


def row_kernel(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor, config) -> None:
    """One timed launch of the row kernel on a chunk, in place. The labels are drawn in range, so the launcher's
    label check is skipped: its host read (a stream sync per call) is no part of the kernel's time."""
    lk.chunk_softmax_grad_triton_(logits, labels, grad_scale=grad_scale, labels_checked=True, _config=config)


def extra_peak_bytes(fn, setup=None) -> int:
    if setup is not None:
        setup()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bf16_matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = cuda_median_ms(lambda: a @ b, warmup=5, reps=30)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(nbytes: int = 2 * GiB) -> float:
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms, _ = cuda_median_ms(lambda: y.copy_(x), warmup=3, reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunks", default="256,1024,2048,4096,8192", help="our chunk sizes (rows) to sweep")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--kernel-config", choices=["default", "best"], default="default",
                    help="row-kernel launch config: the library default, or the fastest of the sweep")
    ap.add_argument("--out", default="benchmarks/results/cross_entropy.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    T, H, V = args.tokens, args.hidden, args.vocab
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)

    tflops = bf16_matmul_tflops()
    gbps = copy_gbps()
    flop3 = 3 * 2 * T * H * V
    floor_ms = flop3 / (tflops * 1e12) * 1e3

    hidden = (torch.randn(T, H, device=dev) * 1.0).to(dt).requires_grad_()
    weight = (torch.randn(V, H, device=dev) / H**0.5).to(dt).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()

    # the three matmuls of the problem at full size, cuBLAS, for reference
    with torch.no_grad():
        z_full = hidden @ weight.T
        mm = [
            cuda_median_ms(lambda: hidden @ weight.T, reps=5)[0],
            cuda_median_ms(lambda: z_full @ weight, reps=5)[0],
            cuda_median_ms(lambda: z_full.T @ hidden, reps=5)[0],
        ]
        del z_full

    # row kernel alone on one chunk: 2 reads + 1 write of the chunk
    kern = []
    chunk = torch.randn(1024, V, device=dev).to(dt)
    lab = labels[:1024].contiguous()
    gs = torch.full((1024,), 1.0 / T, device=dev)
    configs = [lk._launch_config(V)] + [
        (4096, 8, 0, False), (16384, 16, 0, False), (32768, 32, 0, False), (16384, 32, 2, False),
    ]
    for cfg in configs:
        work = chunk.clone()
        ms, _ = cuda_median_ms(
            lambda cfg=cfg: row_kernel(work, lab, gs, cfg), setup=lambda: work.copy_(chunk), reps=30,
        )
        kern.append(dict(config=list(cfg), ms=ms, pct_copy_bw=100 * 3 * chunk.nbytes / (ms * 1e-3) / 1e9 / gbps))
    del chunk, work
    if args.kernel_config == "best":
        best = tuple(min(kern, key=lambda k: k["ms"])["config"])
        lk._launch_config = lambda vocab, best=best: best  # benchmark-only override
    used_config = list(lk._launch_config(V))

    def clear():
        hidden.grad = None
        weight.grad = None

    # float32 reference of loss and grads
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref_loss = F.cross_entropy(h32 @ w32.T, labels)
    ref_loss.backward()
    ref = (ref_loss.detach(), h32.grad, w32.grad)
    del h32, w32, ref_loss
    gc.collect()
    torch.cuda.empty_cache()

    def naive():
        F.cross_entropy((hidden @ weight.T).float(), labels).backward()

    contestants = {"naive (torch)": naive}
    liger_error = None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss()
        contestants["liger FLCE"] = lambda: liger_loss(weight, hidden, labels).backward()
    except Exception as exc:  # report, do not abort the others
        liger_error = f"{type(exc).__name__}: {exc}"
    contestants["alignlab (default chunk)"] = lambda: linear_cross_entropy(hidden, weight, labels).loss.backward()
    for c in [int(x) for x in args.chunks.split(",") if x]:
        contestants[f"alignlab chunk={c}"] = (
            lambda c=c: linear_cross_entropy(hidden, weight, labels, chunk_size=c).loss.backward()
        )

    rows = []
    for name, fn in contestants.items():
        clear()
        # one call for the numbers: loss via a hook-free re-run on the same inputs
        fn()
        torch.cuda.synchronize()
        errs = {"grad_hidden_rel": rel(hidden.grad, ref[1]), "grad_weight_rel": rel(weight.grad, ref[2])}
        peak = extra_peak_bytes(fn, clear)
        ms, times = cuda_median_ms(fn, clear, reps=args.reps)
        rows.append(dict(name=name, median_ms=ms, times_ms=times, extra_peak_bytes=peak,
                         workspace_bytes=peak - grad_bytes, x_floor=ms / floor_ms, **errs))
        clear()
        gc.collect()
        torch.cuda.empty_cache()

    # loss values (forward only, no grad) for the same-loss check
    with torch.no_grad():
        losses = {"naive (torch)": F.cross_entropy((hidden @ weight.T).float(), labels).item()}
        if "liger FLCE" in contestants:
            h_ng = hidden.detach()
            losses["liger FLCE"] = liger_loss(weight.detach(), h_ng, labels).item()
        losses["alignlab"] = linear_cross_entropy(hidden, weight, labels).loss.item()
    losses["float32 reference"] = ref[0].item()

    # where the time goes, per chunk size: the three matmuls and the row kernel of one chunk
    phases = []
    with torch.no_grad():
        gw = torch.empty_like(weight)
        for c in (1024, 2048, 4096):
            hc = hidden[:c].detach()
            z = torch.empty(c, V, device=dev, dtype=dt)
            gh = torch.empty(c, H, device=dev, dtype=dt)
            p = dict(rows=c, n_chunks=T // c)
            p["mm_logits"] = cuda_median_ms(lambda: torch.mm(hc, weight.T, out=z), reps=10)[0]
            z.normal_()
            p["mm_dh"] = cuda_median_ms(lambda: torch.mm(z, weight, out=gh), reps=10)[0]
            p["mm_dw_first"] = cuda_median_ms(lambda: torch.mm(z.T, hc, out=gw), reps=10)[0]
            p["mm_dw_accum"] = cuda_median_ms(lambda: gw.addmm_(z.T, hc), reps=10)[0]
            p["per_step_total_ms"] = (p["mm_logits"] + p["mm_dh"] + p["mm_dw_accum"]) * (T // c)
            phases.append(p)
            del z, gh
        del gw
    gc.collect()
    torch.cuda.empty_cache()

    # linear_logprobs with an arbitrary upstream gradient (4 matmuls) vs full-logits log_softmax
    up = torch.randn(T, device=dev)

    def lp_ours(chunk=None):
        (linear_logprobs(hidden, weight, labels, chunk_size=chunk) * up).sum().backward()

    def lp_naive():
        lp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
        (lp * up).sum().backward()

    lp_rows = []
    for name, fn in (("naive log_softmax", lp_naive), ("alignlab linear_logprobs", lp_ours),
                     ("alignlab linear_logprobs 4096", lambda: lp_ours(4096))):
        peak = extra_peak_bytes(fn, clear)
        ms, _ = cuda_median_ms(fn, clear, reps=args.reps)
        lp_rows.append(dict(name=name, median_ms=ms, extra_peak_bytes=peak, x_floor4=ms / (floor_ms * 4 / 3)))
        clear()

    result = dict(
        benchmark="cross_entropy",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(),
        versions={"torch": torch.__version__, "triton": __import__("triton").__version__,
                  "liger_kernel": _version("liger_kernel")},
        shape=dict(tokens=T, hidden=H, vocab=V, dtype="bfloat16"),
        bf16_matmul_tflops=tflops,
        copy_gbps=gbps,
        floor_ms=floor_ms,
        full_size_matmuls_ms=mm,
        grad_bytes=grad_bytes,
        liger_error=liger_error,
        losses=losses,
        results=rows,
        row_kernel=kern,
        row_kernel_config_used=used_config,
        phases=phases,
        linear_logprobs=lp_rows,
    )
    write_json(args.out, result)
    if os.environ.get("OUT"):
        write_json(os.path.join(os.environ["OUT"], "cross_entropy.json"), result)

    print(f"\n{result['device']} | bf16 matmul {tflops:.0f} TFLOP/s | copy {gbps:.0f} GB/s | "
          f"floor (3 matmuls) {floor_ms:.1f} ms | cuBLAS full-size matmuls {sum(mm):.1f} ms {[round(x, 1) for x in mm]}")
    print(f"T={T} H={H} V={V} bf16, fwd+bwd, grads {grad_bytes / GiB:.2f} GiB")
    print(f"{'contestant':28s} {'ms':>7s} {'x floor':>8s} {'extra GiB':>10s} {'workspace GiB':>14s} "
          f"{'dh rel':>8s} {'dW rel':>8s}")
    for r in rows:
        print(f"{r['name']:28s} {r['median_ms']:7.2f} {r['x_floor']:8.3f} {r['extra_peak_bytes'] / GiB:10.3f} "
              f"{r['workspace_bytes'] / GiB:14.3f} {r['grad_hidden_rel']:8.2e} {r['grad_weight_rel']:8.2e}")
    if liger_error:
        print("liger:", liger_error)
    print("losses:", {k: round(v, 6) for k, v in losses.items()})
    print("row kernel (1024 x V chunk) [(BLOCK_V, warps, per_sm, per-lane lse), ms, % copy BW]:",
          [(k["config"], round(k["ms"], 3), round(k["pct_copy_bw"], 1)) for k in kern], "used:", used_config)
    for p in phases:
        print("phases", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()})
    for r in lp_rows:
        print(f"{r['name']:28s} {r['median_ms']:7.2f} ms  x floor(4 mm) {r['x_floor4']:.3f}  "
              f"extra {r['extra_peak_bytes'] / GiB:.3f} GiB")


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        try:
            from importlib.metadata import version

            return version(mod.replace("_", "-"))
        except Exception:
            return None


if __name__ == "__main__":
    main()
