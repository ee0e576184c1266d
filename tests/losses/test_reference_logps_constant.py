"""Reference log-probs are constants on every path: no gradient reaches them, whether they come precomputed (and
require grad), from ``ref_hidden``, unfused or fused, on the lazy or the eager schedule.

The lazy fused schedule (and the unfused ``dpo_loss`` / ``kto_loss`` / ``una_loss``) used to backpropagate into
precomputed reference log-probs that required grad, while the eager schedule and ``ref_hidden`` gave them none:
one loss, two gradients, depending on a schedule flag. TRL computes them under ``torch.no_grad()``.
"""

from __future__ import annotations

import pytest
import torch

from alignlab.losses import dpo_loss, kto_loss, una_loss
from alignlab.losses.fused_preference import fused_linear_dpo, fused_linear_kto

B, T, H, V = 3, 6, 8, 13
SCHEDULES = {"lazy": {}, "eager-resident": dict(eager=True), "eager-recompute": dict(eager=True, resident_bytes=0)}


def _vec(seed, n=B):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(n, generator=g, dtype=torch.float64) * 5).requires_grad_(True)


def _grad(loss, *ts):
    return torch.autograd.grad(loss, ts, allow_unused=True, retain_graph=True)


def test_dpo_loss_reference_gets_no_gradient():
    pc, pr, rc, rr = _vec(0), _vec(1), _vec(2), _vec(3)
    for lt in ("sigmoid", "ipo", "apo_zero", "bco_pair"):
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=lt)
        want, _ = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.3, loss_type=lt)
        gpc, gpr, grc, grr = _grad(loss, pc, pr, rc, rr)
        assert grc is None and grr is None, lt
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close((gpc, gpr), _grad(want, pc, pr))


def test_kto_and_una_reference_gets_no_gradient():
    pi, ref, kl_pi, kl_ref = _vec(0, 4), _vec(1, 4), _vec(2, 4), _vec(3, 4)
    desirable = torch.tensor([True, False, True, False])
    loss, _ = kto_loss(pi, ref, desirable, kl_pi, kl_ref, beta=0.2)
    _, g_ref, g_kl_pi, g_kl_ref = _grad(loss, pi, ref, kl_pi, kl_ref)
    assert g_ref is None and g_kl_pi is None and g_kl_ref is None
    loss, _ = una_loss(pi, ref, torch.rand(4, dtype=torch.float64), beta=0.2)
    assert _grad(loss, ref)[0] is None


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).requires_grad_(True)
    ref_hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    return hidden, weight, ref_hidden, labels


def _ref_seq(ref_hidden, weight, labels):
    logp = torch.log_softmax(ref_hidden @ weight.t(), dim=-1)
    keep = labels != -100
    return (logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1) * keep).sum(1)


def test_fused_dpo_every_path_agrees_and_leaves_the_reference_alone():
    hidden, weight, ref_hidden, labels = _batch(0)
    ref = _ref_seq(ref_hidden, weight, labels)  # requires grad, through ref_hidden and weight
    results = {}
    for name, sched in SCHEDULES.items():
        loss, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], beta=0.2, nll_alpha=0.5, chunk_size=4,
                                   **sched)
        results[name] = (loss, *_grad(loss, hidden, weight, ref_hidden))
        loss, _ = fused_linear_dpo(hidden, weight, labels, ref_hidden=ref_hidden, beta=0.2, nll_alpha=0.5,
                                   chunk_size=4, **sched)
        results[name + "/ref_hidden"] = (loss, *_grad(loss, hidden, weight, ref_hidden))
    want, wh, ww, wref = results["eager-recompute/ref_hidden"]
    assert wref is None
    for name, (loss, gh, gw, gref) in results.items():
        assert gref is None, name
        torch.testing.assert_close(loss, want, msg=name)
        torch.testing.assert_close((gh, gw), (wh, ww), msg=name)


def test_fused_kto_every_path_agrees_and_leaves_the_reference_alone():
    hidden, weight, ref_hidden, labels = _batch(1)
    ref = _ref_seq(ref_hidden, weight, labels)
    desirable = torch.tensor([True, False, True, True, False, False])
    results = {}
    for name, sched in SCHEDULES.items():
        loss, _ = fused_linear_kto(hidden, weight, labels, desirable, ref, kl=0.1, beta=0.2, chunk_size=4, **sched)
        results[name] = (loss, *_grad(loss, hidden, weight, ref_hidden))
        loss, _ = fused_linear_kto(hidden, weight, labels, desirable, ref_hidden=ref_hidden, kl=0.1, beta=0.2,
                                   chunk_size=4, **sched)
        results[name + "/ref_hidden"] = (loss, *_grad(loss, hidden, weight, ref_hidden))
    want, wh, ww, _ = results["eager-recompute/ref_hidden"]
    for name, (loss, gh, gw, gref) in results.items():
        assert gref is None, name
        torch.testing.assert_close(loss, want, msg=name)
        torch.testing.assert_close((gh, gw), (wh, ww), msg=name)
