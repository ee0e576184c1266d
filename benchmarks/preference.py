"""Fused DPO from hidden states (issue 5): naive full logits vs Liger-Kernel vs alignlab, one run, one GPU.

The issue's shape: 2 chosen/rejected pairs (4 sequences) x 1024 tokens, hidden 4096, vocab 128256, bf16.
One call = DPO loss (sigmoid, beta=0.1) forward + backward with gradients to the policy hidden states and
the lm_head weight.  Two settings:

* ``with_ref``: the reference log-probs are computed in the call from reference hidden states through the
  same lm_head (no gradient), as Liger's ``use_ref_model=True`` does;
* ``precomputed_ref``: the reference log-probs are given (zeros here, which is what Liger's
  ``use_ref_model=False`` uses), so only the policy side is timed.

Contestants: ``naive`` (``hidden @ W.T`` -> float32 ``log_softmax`` -> gather -> ``dpo_loss`` -> autograd),
``liger`` (``LigerFusedLinearDPOLoss``, its default chunk of one pair, ``torch.compile`` on), and
``fused_linear_dpo`` in its lazy schedule (recompute in backward, 4 policy matmuls) and its eager schedule
with several ``resident_bytes`` budgets (3 matmuls for resident chunks).  For each: median time
(``alignlab.bench.compare``: CUDA events, interleaved rounds, L2 flushed), extra peak memory over the
inputs (the returned gradients included; ``workspace`` = extra peak minus the gradient bytes), and the
relative error of loss and gradients against a float32 reference of the same math.

The floor is the matmuls the problem cannot avoid: 3 policy matmuls (logits, dL/dh, dL/dW) plus 1 for the
reference, ``2 T H V`` FLOP each, at the bf16 rate measured in the same run.

    python benchmarks/preference.py [--pairs 2 --seq 1024 --hidden 4096 --vocab 128256]
        [--out benchmarks/results/preference.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch
import torch.nn.functional as F

from alignlab.bench import compare, library_versions, matmul_tflops, write_json
from alignlab.losses.fused_preference import fused_linear_dpo
from alignlab.losses.preference import dpo_loss

GiB = 2**30
MiB = 2**20


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def naive_seq_logps(hidden, weight, labels):
    logp = F.log_softmax((hidden @ weight.t()).float(), dim=-1)
    valid = labels != -100
    tok = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1) * valid
    return tok.sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--out", default=None,
                    help="JSON results (default on CUDA benchmarks/results/preference.json; "
                         "on the CPU none unless given)")
    ap.add_argument("--device", default="cuda",
                    help="'cpu' runs the shapes given: small ones smoke-test the script "
                         "(e.g. --pairs 1 --seq 32 --hidden 64 --vocab 256 --rep 2)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    P, T, H, V = args.pairs, args.seq, args.hidden, args.vocab
    N = 2 * P
    dev, dt = args.device, torch.bfloat16
    torch.manual_seed(0)
    beta = 0.1

    hidden = torch.randn(N, T, H, device=dev).to(dt).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.05 * torch.randn(N, T, H, device=dev)).to(dt)
    weight = (torch.randn(V, H, device=dev) / H**0.5).to(dt).requires_grad_()
    labels = torch.randint(0, V, (N, T), device=dev)
    labels[:, : min(64, T // 4)] = -100  # a prompt that is not scored
    zeros = torch.zeros(P, device=dev)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    tflops_val = matmul_tflops(dtype=dt)
    mm_flop = 2 * N * T * H * V
    with torch.no_grad():
        a = hidden.detach().reshape(-1, H)
        ms_mm = compare({"mm": lambda: a @ weight.detach().t()}, memory=False, rep=10).results["mm"].median_ms

    # float32 references
    def reference(with_ref: bool):
        h32 = hidden.detach().float().requires_grad_()
        w32 = weight.detach().float().requires_grad_()
        seq = naive_seq_logps(h32, w32, labels)
        if with_ref:
            with torch.no_grad():
                r = naive_seq_logps(ref_hidden.float(), w32.detach(), labels)
            rc, rr = r[:P], r[P:]
        else:
            rc = rr = zeros
        loss, _ = dpo_loss(seq[:P], seq[P:], rc, rr, beta=beta)
        gh, gw = torch.autograd.grad(loss, (h32, w32))
        out = (loss.detach(), gh.to(dt).float(), gw.to(dt).float())
        del h32, w32, seq
        return out

    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger_import_error = None
    except Exception as exc:  # keep the others running
        LigerFusedLinearDPOLoss = None
        liger_import_error = f"{type(exc).__name__}: {exc}"

    report = {
        "issue": 5,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "versions": library_versions(),
        "shape": dict(pairs=P, sequences=N, seq=T, hidden=H, vocab=V, dtype="bfloat16", scored_tokens=int((labels != -100).sum())),
        "bf16_matmul_tflops": float(tflops_val),
        "one_matmul_ms_cublas": ms_mm,
        "liger_import_error": liger_import_error,
        "settings": {},
    }

    for setting in ("with_ref", "precomputed_ref"):
        with_ref = setting == "with_ref"
        ref = reference(with_ref)
        gc.collect()
        torch.cuda.empty_cache() if dev == "cuda" else None

        def naive():
            seq = naive_seq_logps(hidden, weight, labels)
            if with_ref:
                with torch.no_grad():
                    r = naive_seq_logps(ref_hidden, weight, labels)
                rc, rr = r[:P], r[P:]
            else:
                rc = rr = zeros
            loss, _ = dpo_loss(seq[:P], seq[P:], rc, rr, beta=beta)
            return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

        contestants = {"naive (full logits)": naive}
        if LigerFusedLinearDPOLoss is not None:
            liger = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=with_ref, compiled=True)

            def liger_fn():
                if with_ref:
                    loss = liger(weight, hidden, labels, ref_input=ref_hidden, ref_weight=weight.detach())
                else:
                    loss = liger(weight, hidden, labels)
                loss = loss[0] if isinstance(loss, tuple) else loss
                return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

            contestants["liger FusedLinearDPO"] = liger_fn

        def ours(**kw):
            def fn():
                if with_ref:
                    loss, _ = fused_linear_dpo(hidden, weight, labels, ref_hidden=ref_hidden, beta=beta, **kw)
                else:
                    loss, _ = fused_linear_dpo(hidden, weight, labels, zeros, zeros, beta=beta, **kw)
                return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

            return fn

        contestants["alignlab lazy"] = ours()
        contestants["alignlab lazy chunk=512"] = ours(chunk_size=512)
        for mib in (0, 512, 768, 1024):
            contestants[f"alignlab eager resident={mib}MiB"] = ours(eager=True, resident_bytes=mib * MiB)
        contestants["alignlab eager resident=384MiB chunk=256"] = ours(eager=True, resident_bytes=384 * MiB, chunk_size=256)

        # numbers first (one call each), then the timed comparison
        errors = {}
        for name, fn in contestants.items():
            try:
                loss, gh, gw = fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
                errors[name] = dict(
                    loss=loss.float().item(), loss_ref=ref[0].item(), loss_abs_err=abs(loss.float().item() - ref[0].item()),
                    grad_hidden_rel=rel(gh, ref[1]), grad_weight_rel=rel(gw, ref[2]),
                )
                del loss, gh, gw
            except Exception as exc:
                errors[name] = dict(error=f"{type(exc).__name__}: {exc}")
            gc.collect()
            torch.cuda.empty_cache() if dev == "cuda" else None
        del ref
        gc.collect()
        torch.cuda.empty_cache() if dev == "cuda" else None

        n_mm = 4 if with_ref else 3
        cmp = compare(
            contestants, warmup=3, rep=args.rep, flops=n_mm * mm_flop, name=f"DPO {setting}",
            meta=dict(setting=setting, floor_matmuls=n_mm),
        )
        print(cmp.table(), flush=True)
        rows = []
        for name, m in cmp.results.items():
            d = m.to_dict()
            peak = m.peak_bytes
            rows.append(dict(
                name=name, median_ms=m.median_ms if m.ok else None, extra_peak_bytes=peak,
                extra_peak_gib=None if peak is None else peak / GiB,
                workspace_gib=None if peak is None else (peak - grad_bytes) / GiB,
                floor_ms=n_mm * ms_mm, x_floor=m.median_ms / (n_mm * ms_mm) if m.ok else None,
                run_error=m.error, **errors.get(name, {}), raw=d,
            ))
        base = {r["name"]: r for r in rows}.get("liger FusedLinearDPO")
        for r in rows:
            if base and base.get("median_ms") and r.get("median_ms"):
                r["time_vs_liger"] = r["median_ms"] / base["median_ms"]
            if base and base.get("extra_peak_bytes") and r.get("extra_peak_bytes"):
                r["peak_vs_liger"] = r["extra_peak_bytes"] / base["extra_peak_bytes"]
        report["settings"][setting] = rows
        for r in rows:
            print(f"{r['name']:45s} {r.get('median_ms') or float('nan'):8.2f} ms  peak {r.get('extra_peak_gib') or float('nan'):6.3f} GiB"
                  f"  t/liger {r.get('time_vs_liger', float('nan')):5.2f}  mem/liger {r.get('peak_vs_liger', float('nan')):5.2f}"
                  f"  dloss {r.get('loss_abs_err', float('nan')):.2e}  gh {r.get('grad_hidden_rel', float('nan')):.2e}"
                  f"  gw {r.get('grad_weight_rel', float('nan')):.2e}", flush=True)
        del cmp, contestants
        gc.collect()
        torch.cuda.empty_cache() if dev == "cuda" else None

    out = args.out or ("benchmarks/results/preference.json" if dev == "cuda" else None)
    if out is not None:  # a CPU smoke run does not overwrite the GPU results
        write_json(out, report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
