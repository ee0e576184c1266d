"""Fused GRPO from hidden states (issue 22): naive full logits vs Liger-Kernel vs alignlab, one run, one GPU.

The issue's shape: 8 completions x 2048 tokens (16k completion rows), hidden 4096, vocab 151936 (Qwen), bf16.
One call = the DAPO-aggregated GRPO loss (token-level clipped ratio, eps 0.2 / 0.28, beta 0.04 k3 KL) forward +
backward, gradients to the policy hidden states and the lm_head weight.  Two settings:

* ``with_ref``: the reference log-probs are computed in the call from reference hidden states through the
  same lm_head (no gradient): Liger's ``use_ref_model=True`` with ``ref_input``, our ``ref_hidden``;
* ``precomputed_ref``: the reference log-probs are given (``ref_per_token_logps`` / ``ref_logprobs``).

Contestants: ``naive`` (``hidden @ W.T`` -> float32 ``log_softmax`` -> gather -> ``grpo_loss`` -> autograd),
``liger`` (``LigerFusedLinearGRPOLoss``, its defaults: chunk of one completion, ``torch.compile``; skipped with
the reason printed when ``liger_kernel`` does not import) and ``fused_linear_grpo`` (3 policy matmuls in one
pass, plus one for the reference; once more with the entropy metric, which Liger does not compute).  For each:
median time (``alignlab.bench.compare``: CUDA events, interleaved rounds, L2 flushed), extra peak memory over
the inputs, ``workspace`` = extra peak minus the bytes of the returned gradients, and the relative error of
loss and gradients against a float32 reference of the same math.

Targets (issue 22): workspace <= 0.5x Liger's, time <= 0.85x Liger's, time <= 1.2x the matmul floor: 3 policy
matmuls (logits, dL/dh, dL/dW) plus 1 for the reference when it is computed in the call, ``2 N H V`` FLOP
each, timed as one cuBLAS ``(N, H) x (H, V)`` matmul in the same run.

    python benchmarks/grpo.py [--quick] [--completions 8 --seq 2048 --hidden 4096 --vocab 151936]
        [--out benchmarks/results/grpo.json]

``--quick`` runs a small shape (2 x 512, hidden 1024, vocab 32768) in seconds; ``--device cpu`` runs the shapes given,
so give tiny ones to smoke-test the script (``--completions 2 --seq 32 --hidden 64 --vocab 256 --no-liger``); CPU
runs write no JSON unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys

import torch
import torch.nn.functional as F

from alignlab.bench import compare, library_versions, write_json
from alignlab.losses.fused_rl import fused_linear_grpo
from alignlab.losses.reward import grpo_loss

GiB = 2**30
BETA, EPS_LO, EPS_HI = 0.04, 0.2, 0.28
QUICK = dict(completions=2, seq=512, hidden=1024, vocab=32768)
FULL = dict(completions=8, seq=2048, hidden=4096, vocab=151936)  # the shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in FULL.items():
        ap.add_argument(f"--{k}", type=int, default=None, help=f"default {v} (--quick: {QUICK[k]})")
    ap.add_argument("--quick", action="store_true", help=f"small shape {QUICK}; a size given as well wins")
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None,
                    help="JSON results (default on CUDA benchmarks/results/grpo.json; on the CPU none unless given)")
    ap.add_argument("--device", default="cuda",
                    help="'cpu' runs the shapes given: small ones smoke-test the script "
                         "(e.g. --completions 2 --seq 32 --hidden 64 --vocab 256 --no-liger)")
    ap.add_argument("--no-liger", action="store_true", help="leave Liger out (e.g. no compiler available)")
    ap.add_argument("--ragged", action="store_true",
                    help="completion lengths uniform in [seq/2, seq] (default: every completion is seq tokens, so "
                         "all 16k rows are scored and the floor counts them all)")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():  # --quick --seq 16 ran seq 512: the size given was dropped
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("completions", "seq", "hidden", "vocab", "rep"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1")
    return args


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def naive_token_logps(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def load_liger(skip: bool):
    """``(LigerFusedLinearGRPOLoss or None, reason it is absent or None)``."""
    if skip:
        return None, "--no-liger"
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:  # keep the others running
        return None, f"{type(exc).__name__}: {exc}"
    return LigerFusedLinearGRPOLoss, None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --device cpu for a smoke test)")
    B, T, H, V = args.completions, args.seq, args.hidden, args.vocab
    dev = args.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    cuda = dev == "cuda"
    torch.manual_seed(0)

    hidden = torch.randn(B, T, H, device=dev).to(dt).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.05 * torch.randn(B, T, H, device=dev)).to(dt)
    weight = (torch.randn(V, H, device=dev) / H**0.5).to(dt).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=dev)
    if args.ragged:  # masked rows cost us no matmul; the floor below still counts every row
        lengths = torch.randint(T // 2, T + 1, (B,), device=dev)
    else:
        lengths = torch.full((B,), T, device=dev)
    mask = torch.arange(T, device=dev)[None] < lengths[:, None]
    adv = torch.randn(B, device=dev)
    with torch.no_grad():
        lp0 = naive_token_logps(hidden.detach().float(), weight.detach().float(), ids)
    old = lp0 + 0.05 * torch.randn(B, T, device=dev)  # a step off-policy: both clip sides fire
    ref_lp = lp0 + 0.05 * torch.randn(B, T, device=dev)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    mm_flop = 2 * B * T * H * V
    with torch.no_grad():
        a = hidden.detach().reshape(-1, H)
        ms_mm = compare({"mm": lambda: a @ weight.detach().t()}, memory=False, rep=5, warmup=2,
                        device=dev).results["mm"].median_ms

    def reference(with_ref: bool):
        h32 = hidden.detach().float().requires_grad_()
        w32 = weight.detach().float().requires_grad_()
        lp = naive_token_logps(h32, w32, ids)
        if with_ref:
            with torch.no_grad():
                r = naive_token_logps(ref_hidden.float(), w32.detach(), ids)
        else:
            r = ref_lp
        loss, _ = grpo_loss(lp, adv, mask, old, r, BETA, EPS_LO, epsilon_high=EPS_HI, loss_type="dapo")
        gh, gw = torch.autograd.grad(loss, (h32, w32))
        return loss.detach(), gh.to(dt).float(), gw.to(dt).float()

    Liger, liger_reason = load_liger(args.no_liger)
    if Liger is None:
        print(f"liger row skipped: {liger_reason}", flush=True)
    report = {
        "issue": 22,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": library_versions(),
        "shape": dict(completions=B, seq=T, rows=B * T, scored_rows=int(mask.sum()), ragged=args.ragged, hidden=H,
                      vocab=V,
                      dtype=str(dt).replace("torch.", "")),
        "one_matmul_ms_cublas": ms_mm,
        "liger_skipped": liger_reason,
        "settings": {},
    }

    for setting in ("with_ref", "precomputed_ref"):
        with_ref = setting == "with_ref"
        ref = reference(with_ref)

        def naive():
            lp = naive_token_logps(hidden, weight, ids)
            if with_ref:
                with torch.no_grad():
                    r = naive_token_logps(ref_hidden, weight, ids)
            else:
                r = ref_lp
            loss, _ = grpo_loss(lp, adv, mask, old, r, BETA, EPS_LO, epsilon_high=EPS_HI, loss_type="dapo")
            return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

        contestants = {"naive (full logits) + grpo_loss": naive}
        if Liger is not None:
            # use_ref_model=True in both settings: without it Liger drops ref_per_token_logps (KL to itself)
            liger = Liger(beta=BETA, use_ref_model=True, epsilon_low=EPS_LO, epsilon_high=EPS_HI,
                          loss_type="dapo", compiled=cuda)

            def liger_fn():
                kw = dict(ref_input=ref_hidden, ref_weight=weight.detach()) if with_ref else \
                    dict(ref_per_token_logps=ref_lp)
                out = liger(hidden, weight, ids, mask.long(), adv, old_per_token_logps=old, **kw)
                loss = out[0] if isinstance(out, tuple) else out
                return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

            contestants["liger FusedLinearGRPO"] = liger_fn

        def ours(**kw):
            def fn():
                r = dict(ref_hidden=ref_hidden) if with_ref else dict(ref_logprobs=ref_lp)
                loss, _ = fused_linear_grpo(hidden, weight, ids, adv, mask, old_logprobs=old, beta=BETA,
                                            epsilon=EPS_LO, epsilon_high=EPS_HI, loss_type="dapo", **r, **kw)
                return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

            return fn

        contestants["alignlab fused_linear_grpo"] = ours()
        contestants["alignlab fused_linear_grpo +entropy"] = ours(compute_entropy=True)

        errors = {}
        for name, fn in contestants.items():  # numbers first, one call each
            try:
                loss, gh, gw = fn()
                errors[name] = dict(loss=loss.float().item(), loss_ref=ref[0].item(),
                                    loss_abs_err=abs(loss.float().item() - ref[0].item()),
                                    grad_hidden_rel=rel(gh, ref[1]), grad_weight_rel=rel(gw, ref[2]))
                del loss, gh, gw
            except Exception as exc:
                errors[name] = dict(error=f"{type(exc).__name__}: {exc}")
            gc.collect()
            torch.cuda.empty_cache() if cuda else None
        del ref

        n_mm = 4 if with_ref else 3
        cmp = compare(contestants, warmup=args.warmup, rep=args.rep, flops=n_mm * mm_flop, device=dev,
                      name=f"GRPO {setting}", meta=dict(setting=setting, floor_matmuls=n_mm))
        print(cmp.table(), flush=True)
        rows = []
        for name, m in cmp.results.items():
            peak = m.peak_bytes
            rows.append(dict(
                name=name, median_ms=m.median_ms if m.ok else None, extra_peak_bytes=peak,
                workspace_gib=None if peak is None else (peak - grad_bytes) / GiB,
                floor_ms=n_mm * ms_mm, x_floor=m.median_ms / (n_mm * ms_mm) if m.ok else None,
                run_error=m.error, **errors.get(name, {}),
            ))
        base = {r["name"]: r for r in rows}.get("liger FusedLinearGRPO")
        for r in rows:
            if base and base.get("median_ms") and r.get("median_ms"):
                r["time_vs_liger"] = r["median_ms"] / base["median_ms"]
            if base and base.get("workspace_gib") and r.get("workspace_gib") is not None:
                r["workspace_vs_liger"] = r["workspace_gib"] / base["workspace_gib"]
            if r["name"] == "alignlab fused_linear_grpo":
                r["targets"] = dict(
                    workspace_le_half_liger=None if "workspace_vs_liger" not in r else r["workspace_vs_liger"] <= 0.5,
                    time_le_085_liger=None if "time_vs_liger" not in r else r["time_vs_liger"] <= 0.85,
                    time_le_12_floor=None if r["x_floor"] is None else r["x_floor"] <= 1.2,
                )
        report["settings"][setting] = rows
        for r in rows:
            print(f"{r['name']:40s} {r.get('median_ms') or float('nan'):8.2f} ms  x floor {r.get('x_floor') or float('nan'):5.2f}"
                  f"  workspace {r['workspace_gib'] if r['workspace_gib'] is not None else float('nan'):6.3f} GiB"
                  f"  t/liger {r.get('time_vs_liger', float('nan')):5.2f}  ws/liger {r.get('workspace_vs_liger', float('nan')):5.2f}"
                  f"  dloss {r.get('loss_abs_err', float('nan')):.2e}  gh {r.get('grad_hidden_rel', float('nan')):.2e}"
                  f"  gw {r.get('grad_weight_rel', float('nan')):.2e}", flush=True)
        del cmp, contestants
        gc.collect()
        torch.cuda.empty_cache() if cuda else None

    out = args.out or ("benchmarks/results/grpo.json" if cuda else None)
    if out is not None:  # a CPU smoke run does not overwrite the GPU results
        write_json(out, report)
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
