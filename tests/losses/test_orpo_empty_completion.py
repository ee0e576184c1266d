"""ORPO on a pair whose chosen or rejected completion has no scored token.

Its per-token average log-prob is 0/0: ``sequence_logprobs(average=True)`` writes 0 there, which ORPO reads as
probability 1, so the odds are infinite and the loss was inf (rejected side) or NaN (both sides); TRL divides by
the empty mask and gets NaN. Given the completion lengths, such a pair adds 0 to the odds-ratio term and is left
out of its mean: every other pair's loss and gradients are those of the batch without it.
"""

from __future__ import annotations

import pytest
import torch

from alignlab.losses import fused_linear_orpo, orpo_loss, sequence_logprobs

B, T, H, V = 4, 6, 8, 11
EMPTY_REJECTED, EMPTY_CHOSEN = 1, 2
KEEP = [0, 3]


def _pairs():
    g = torch.Generator().manual_seed(0)
    pc = (-torch.rand(B, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    pr = (-torch.rand(B, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    len_c = torch.tensor([3.0, 4.0, 0.0, 2.0], dtype=torch.float64)
    len_r = torch.tensor([5.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    with torch.no_grad():  # what average=True writes for an empty completion
        pr[EMPTY_REJECTED] = 0.0
        pc[EMPTY_CHOSEN] = 0.0
    return pc, pr, len_c, len_r


def test_empty_completion_gives_inf_without_lengths():
    # the gap itself: the averaged log-prob of an empty completion reads as probability 1
    pc, pr, _, _ = _pairs()
    loss, _ = orpo_loss(pc, pr, beta=0.5)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_pairs_add_nothing_and_drop_from_the_mean(reduction):
    pc, pr, len_c, len_r = _pairs()
    nll = torch.tensor(0.7, dtype=torch.float64)
    loss, metrics = orpo_loss(pc, pr, nll, beta=0.5, reduction=reduction, chosen_lengths=len_c, rejected_lengths=len_r)
    assert torch.isfinite(loss).all()
    kept_c, kept_r = pc.detach()[KEEP].requires_grad_(True), pr.detach()[KEEP].requires_grad_(True)
    want, want_metrics = orpo_loss(kept_c, kept_r, nll, beta=0.5, reduction=reduction)
    if reduction == "none":
        torch.testing.assert_close(loss[KEEP], want)
        assert (loss[[EMPTY_REJECTED, EMPTY_CHOSEN]] == 0).all()
        loss, want = loss.sum(), want.sum()
    torch.testing.assert_close(loss, want)
    gc, gr = torch.autograd.grad(loss, (pc, pr))
    wc, wr = torch.autograd.grad(want, (kept_c, kept_r))
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    torch.testing.assert_close(gc[KEEP], wc)
    torch.testing.assert_close(gr[KEEP], wr)
    assert (gc[[EMPTY_REJECTED, EMPTY_CHOSEN]] == 0).all() and (gr[[EMPTY_REJECTED, EMPTY_CHOSEN]] == 0).all()
    for key in ("log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/margins", "logps/rejected"):
        torch.testing.assert_close(metrics[key], want_metrics[key])


def test_all_pairs_empty_gives_zero_and_num_items_counts_the_rest():
    pc, pr, len_c, len_r = _pairs()
    zero = torch.zeros(B, dtype=torch.float64)
    loss, _ = orpo_loss(pc, pr, beta=0.5, chosen_lengths=zero, rejected_lengths=len_r)
    (grad,) = torch.autograd.grad(loss, pc)
    assert loss == 0 and (grad == 0).all()
    # with num_items the caller counts the step's non-empty pairs; each batch adds its non-empty pairs' sum
    loss, _ = orpo_loss(pc, pr, beta=0.5, num_items=5, chosen_lengths=len_c, rejected_lengths=len_r)
    want, _ = orpo_loss(pc.detach()[KEEP], pr.detach()[KEEP], beta=0.5, reduction="sum")
    torch.testing.assert_close(loss, want / 5)


def test_lengths_checked():
    pc, pr, len_c, len_r = _pairs()
    with pytest.raises(ValueError, match=r"chosen_lengths must have shape \(4,\)"):
        orpo_loss(pc, pr, chosen_lengths=len_c[:3], rejected_lengths=len_r)
    with pytest.raises(ValueError, match="rejected_lengths .*both"):
        orpo_loss(pc, pr, chosen_lengths=len_c)


def test_from_sequence_logprobs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[B + EMPTY_REJECTED] = -100
    labels[EMPTY_CHOSEN] = -100
    avg = sequence_logprobs(logits, labels, average=True)
    counts = (labels != -100).sum(1)
    loss, _ = orpo_loss(avg[:B], avg[B:], beta=0.2, chosen_lengths=counts[:B], rejected_lengths=counts[B:])
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def _fused_batch(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("eager", [False, True])
def test_fused_orpo_empty_chosen_is_as_dropped(eager):
    hidden, weight, labels = _fused_batch(7)
    labels[EMPTY_CHOSEN] = -100  # an empty chosen completion: no NLL tokens, no odds
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = fused_linear_orpo(h, w, labels, beta=0.3, chunk_size=4, eager=eager)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rows = [i for i in range(B) if i != EMPTY_CHOSEN]
    rows = rows + [B + i for i in rows]
    h2, w2 = hidden[rows].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want, _ = fused_linear_orpo(h2, w2, labels[rows], beta=0.3, chunk_size=4, eager=eager)
    wh, ww = torch.autograd.grad(want, (h2, w2))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gh[rows], wh)
    torch.testing.assert_close(gw, ww)
    assert torch.isfinite(gh).all() and (gh[[EMPTY_CHOSEN, B + EMPTY_CHOSEN]] == 0).all()


@pytest.mark.parametrize("eager", [False, True])
def test_fused_orpo_empty_rejected_keeps_its_chosen_nll(eager):
    hidden, weight, labels = _fused_batch(8)
    labels[B + EMPTY_REJECTED] = -100
    h = hidden.clone().requires_grad_(True)
    loss, metrics = fused_linear_orpo(h, weight, labels, beta=0.3, chunk_size=4, eager=eager)
    (gh,) = torch.autograd.grad(loss, h)
    assert torch.isfinite(loss) and torch.isfinite(gh).all()
    assert (gh[EMPTY_REJECTED] != 0).any()  # its chosen completion still trains through the NLL term
