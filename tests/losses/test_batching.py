"""Real batching for the losses of alignlab.losses: padding-free (packed) batches and gradient accumulation.

Packed = padded: a packed batch (sequences concatenated, boundaries in ``cu_seqlens``, as from reset
``position_ids``) must give the padded batch's loss and gradients.  Gradient accumulation: ``k`` uneven
micro-batches, each normalised by the step-wide count named in the loss's docstring, must sum to the big
batch's loss and gradients (the Unsloth #2055 / #3527 bug class: a mean of micro-batch means is not the mean).

Covered elsewhere: ``linear_cross_entropy`` (test_cross_entropy.py: packed, and ``count_tokens`` accumulation),
``linear_logprobs`` (test_logprobs.py: packed), ``fused_linear_distill_loss`` (test_distill.py: packed),
``fused_linear_grpo`` (test_fused_rl.py: packed, accumulation for every aggregation).
"""

import pytest
import torch
from conftest import spawn_ranks

from alignlab.data import cu_seq_lens_from_position_ids
from alignlab.losses import (
    fused_linear_cpo,
    fused_linear_distill_loss,
    fused_linear_dpo,
    fused_linear_kto,
    fused_linear_orpo,
    fused_linear_simpo,
    grpo_loss,
    packed_to_padded,
    ppo_policy_loss,
    rloo_advantages,
)

D = torch.float64
H, V = 12, 29
LENGTHS = [5, 2, 4, 3, 1, 4, 3, 2]  # 8 sequences, ragged


def _packed(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = torch.randn(n, H, generator=g, dtype=D)
    ids = torch.randint(0, V, (n,), generator=g)
    position_ids = torch.cat([torch.arange(k) for k in lengths])[None]
    cu = cu_seq_lens_from_position_ids(position_ids)  # boundaries from the reset position_ids
    return hidden, ids, cu, g


def _padded_from(hidden, ids, cu, g):
    """The same sequences in a padded batch, with junk hidden states under the padding."""
    h_pad, mask = packed_to_padded(hidden, cu)
    h_pad = torch.where(mask[..., None], h_pad, torch.randn(h_pad.shape, generator=g, dtype=D) * 50)
    y_pad, _ = packed_to_padded(ids, cu, fill=-100)
    return h_pad, y_pad, mask


PREFERENCE = {
    "dpo": lambda h, w, y: fused_linear_dpo(h, w, y, torch.full((h.shape[0] // 2,), -3.0, dtype=D),
                                            torch.full((h.shape[0] // 2,), -4.0, dtype=D), chunk_size=5)[0],
    "dpo_eager": lambda h, w, y: fused_linear_dpo(h, w, y, reference_free=True, eager=True, chunk_size=5)[0],
    "orpo": lambda h, w, y: fused_linear_orpo(h, w, y, chunk_size=5)[0],
    "simpo": lambda h, w, y: fused_linear_simpo(h, w, y, chunk_size=5, eager=True)[0],
    "cpo": lambda h, w, y: fused_linear_cpo(h, w, y, chunk_size=5)[0],
    "kto": lambda h, w, y: fused_linear_kto(h, w, y, torch.arange(h.shape[0]) % 3 == 0,
                                            torch.full((h.shape[0],), -3.0, dtype=D), kl=0.1, chunk_size=5)[0],
}


@pytest.mark.parametrize("name", list(PREFERENCE))
def test_preference_packed_equals_padded(name, torch_mode):
    hidden, ids, cu, g = _packed()
    w = torch.randn(V, H, generator=g, dtype=D) * 0.3
    h_pad, y_pad, _ = _padded_from(hidden, ids, cu, g)
    # padded batch
    hp, wp = h_pad.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = PREFERENCE[name](hp, wp, y_pad)
    want.backward()
    # padding-free: the model ran on (1, total, hidden) with reset position_ids; the loss gets its
    # sequences back through packed_to_padded (a differentiable gather; rows of padding cost no matmul)
    hk, wk = hidden.clone()[None].requires_grad_(True), w.clone().requires_grad_(True)
    h_seq, mask = packed_to_padded(hk, cu)
    y_seq, _ = packed_to_padded(ids[None], cu, fill=-100)
    got = PREFERENCE[name](h_seq, wk, y_seq)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hk.grad[0], hp.grad[mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wk.grad, wp.grad, rtol=1e-10, atol=1e-12)
    assert float(hp.grad[~mask].abs().max()) == 0.0


# pair-mean losses: each micro-batch's mean is weighted by (its pairs / the step's pairs)
GA_PREFERENCE = {
    "dpo": lambda h, w, y, rc, rr: fused_linear_dpo(h, w, y, rc, rr, chunk_size=4, eager=True)[0],
    "dpo_sum": lambda h, w, y, rc, rr: fused_linear_dpo(h, w, y, rc, rr, chunk_size=4, reduction="sum")[0],
    "simpo": lambda h, w, y, rc, rr: fused_linear_simpo(h, w, y, chunk_size=4)[0],
    "cpo_no_nll": lambda h, w, y, rc, rr: fused_linear_cpo(h, w, y, cpo_alpha=0.0, chunk_size=4)[0],
    "kto_fixed_kl": lambda h, w, y, rc, rr: fused_linear_kto(  # desirable: the first half of the rows
        h, w, y, torch.arange(h.shape[0]) < h.shape[0] // 2, torch.cat([rc, rr]), kl=0.2, chunk_size=4)[0],
}


def _pairs_of(t, sl, half):
    return torch.cat([t[sl], t[half:][sl]])


@pytest.mark.parametrize("name", list(GA_PREFERENCE))
def test_preference_gradient_accumulation(name, torch_mode):
    g = torch.Generator().manual_seed(1)
    pairs, T = 5, 6
    h = torch.randn(2 * pairs, T, H, generator=g, dtype=D)
    w = torch.randn(V, H, generator=g, dtype=D) * 0.3
    y = torch.randint(0, V, (2 * pairs, T), generator=g)
    y[torch.rand(2 * pairs, T, generator=g) < 0.3] = -100
    y[:, 0] = torch.randint(0, V, (2 * pairs,), generator=g)  # every completion scores at least one token
    rc, rr = torch.randn(pairs, generator=g, dtype=D) - 5, torch.randn(pairs, generator=g, dtype=D) - 5
    fn = GA_PREFERENCE[name]
    hb, wb = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    big = fn(hb, wb, y, rc, rr)
    big.backward()
    hm, wm = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 5)):
        n = sl.stop - sl.start
        loss = fn(_pairs_of(hm, sl, pairs), wm, _pairs_of(y, sl, pairs), rc[sl], rr[sl])
        # the documented normalisation: "mean" losses × (micro-batch examples / step examples); "sum" losses
        # / step examples
        scale = 1.0 / pairs if name == "dpo_sum" else n / pairs
        (loss * scale).backward()
        total = total + loss.detach() * scale
    big_value = big.detach() / pairs if name == "dpo_sum" else big.detach()
    torch.testing.assert_close(total, big_value, rtol=1e-12, atol=1e-12)
    gscale = 1.0 / pairs if name == "dpo_sum" else 1.0
    torch.testing.assert_close(hm.grad, hb.grad * gscale, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(wm.grad, wb.grad * gscale, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_ppo_packed_and_accumulation(aggregation):
    g = torch.Generator().manual_seed(2)
    n = sum(LENGTHS)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    lp_packed = (-torch.rand(n, generator=g, dtype=D) * 3).requires_grad_(True)
    old_packed = lp_packed.detach() + 0.3 * torch.randn(n, generator=g, dtype=D)
    rewards = torch.rand(len(LENGTHS), generator=g, dtype=D)
    adv = rloo_advantages(rewards, group_size=4)  # on the whole generation batch, before any split
    lp, mask = packed_to_padded(lp_packed, cu)
    old, _ = packed_to_padded(old_packed, cu)
    big, _ = ppo_policy_loss(lp, old, adv, mask, aggregation=aggregation)
    (g_big,) = torch.autograd.grad(big, lp_packed, retain_graph=True)
    # packed = padded: the same sequences padded independently (junk under the padding)
    lp2 = torch.where(mask, lp, torch.full_like(lp, float("nan")))
    again, _ = ppo_policy_loss(lp2, old, adv, mask, aggregation=aggregation)
    torch.testing.assert_close(again, big)
    # accumulation over uneven micro-batches with the step-wide count
    n_items = int(mask.sum()) if aggregation == "token" else len(LENGTHS)
    total, g_sum = 0.0, torch.zeros_like(lp_packed)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 8)):
        loss, _ = ppo_policy_loss(lp[sl], old[sl], adv[sl], mask[sl], aggregation=aggregation, num_items=n_items)
        (gm,) = torch.autograd.grad(loss, lp_packed, retain_graph=True)
        total, g_sum = total + loss.detach(), g_sum + gm
    torch.testing.assert_close(total, big.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_sum, g_big, rtol=1e-12, atol=1e-14)
    # the bug class: a mean of micro-batch means is not the big-batch mean for ragged micro-batches
    naive = sum(ppo_policy_loss(lp[sl], old[sl], adv[sl], mask[sl], aggregation=aggregation)[0].detach()
                for sl in (slice(0, 3), slice(3, 4), slice(4, 8))) / 3
    assert abs(float(naive - big.detach())) > 1e-6


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_rloo_with_grpo_loss_accumulation(loss_type):
    g = torch.Generator().manual_seed(4)
    b, t = 8, 5
    lp = (-torch.rand(b, t, generator=g, dtype=D) * 3).requires_grad_(True)
    mask = torch.arange(t)[None] < torch.tensor(LENGTHS).clamp(max=t)[:, None]
    adv = rloo_advantages(torch.rand(b, generator=g, dtype=D), group_size=4)
    big, _ = grpo_loss(lp, adv, mask, lp.detach() + 0.1, loss_type=loss_type)
    (g_big,) = torch.autograd.grad(big, lp)
    n_items = b if loss_type == "grpo" else int(mask.sum())
    total, g_sum = 0.0, torch.zeros_like(lp)
    for sl in (slice(0, 4), slice(4, 8)):  # one group per micro-batch
        loss, _ = grpo_loss(lp[sl], adv[sl], mask[sl], lp.detach()[sl] + 0.1, loss_type=loss_type, num_items=n_items)
        (gm,) = torch.autograd.grad(loss, lp)
        total, g_sum = total + loss.detach(), g_sum + gm
    torch.testing.assert_close(total, big.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_sum, g_big, rtol=1e-12, atol=1e-14)


def test_distill_gradient_accumulation(torch_mode):
    # reduction="sum" per micro-batch / the step's (mask) token count = the big batch's "mean"
    g = torch.Generator().manual_seed(5)
    b, t = 5, 4
    x = torch.randn(b, t, H, generator=g, dtype=D)
    w = torch.randn(V, H, generator=g, dtype=D) * 0.3
    teacher = torch.randn(b, t, V, generator=g, dtype=D)
    mask = torch.rand(b, t, generator=g) < 0.7
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    big = fused_linear_distill_loss(xb, wb, teacher, kind="jsd", mask=mask, chunk_size=3)
    big.backward()
    xm, wm = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    n_step = mask.sum()
    total = 0.0
    for sl in (slice(0, 2), slice(2, 3), slice(3, 5)):
        loss = fused_linear_distill_loss(xm[sl], wm, teacher[sl], kind="jsd", mask=mask[sl], reduction="sum",
                                         chunk_size=3) / n_step
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, big.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xm.grad, xb.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(wm.grad, wb.grad, rtol=1e-10, atol=1e-13)


def test_grpo_accumulation_across_two_gloo_ranks(tmp_path, torch_mode):
    # two processes, uneven shards; num_items = all_reduce(SUM) of the local counts; DDP-style gradient
    # averaging with the loss scaled by the world size: equals the single-process big batch for every aggregation
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the worker by module name
    import grpo_rank_worker as w

    spawn_ranks(w.worker, str(tmp_path))
    got = torch.load(tmp_path / "grpo_ranks.pt", weights_only=False)
    hidden, weight, ids, mask, adv, old, ref = w.global_batch()
    for loss_type, (loss, grad) in got.items():
        wt = weight.clone().requires_grad_(True)
        big = w.local_loss(hidden, wt, ids, mask, adv, old, ref, loss_type, None)
        big.backward()
        torch.testing.assert_close(loss, big.detach(), rtol=1e-12, atol=1e-12, msg=loss_type)
        torch.testing.assert_close(grad, wt.grad, rtol=1e-10, atol=1e-13, msg=loss_type)


# ------------------------------------------------------------------------------------------------------------
# packed = padded for the losses on sequence log-probs / rewards: the model and the log-probs run padding-free,
# one segment sum per sequence gives the loss its (batch,) inputs
# ------------------------------------------------------------------------------------------------------------
def _lp(name):
    from alignlab.losses import bradley_terry_loss, cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss, una_loss

    def pairs(s):
        return s[: s.shape[0] // 2], s[s.shape[0] // 2:]

    fns = {
        "dpo_loss": lambda s, n, r: dpo_loss(*pairs(s), *pairs(s.detach() * 0.9), beta=0.5)[0],
        "kto_loss": lambda s, n, r: kto_loss(s, s.detach() * 0.9 - 0.1, torch.arange(s.shape[0]) % 2 == 0,
                                             kl=0.05)[0],
        "orpo_loss": lambda s, n, r: orpo_loss(*pairs(s / n), beta=0.3)[0],
        "simpo_loss": lambda s, n, r: simpo_loss(*pairs(s), chosen_lengths=pairs(n)[0],
                                                 rejected_lengths=pairs(n)[1])[0],
        "cpo_loss": lambda s, n, r: cpo_loss(*pairs(s), cpo_alpha=0.0)[0],
        "una_loss": lambda s, n, r: una_loss(s, s.detach() - 0.2, torch.linspace(0, 1, s.shape[0], dtype=D))[0],
        "bradley_terry_loss": lambda s, n, r: bradley_terry_loss(*pairs(r), center_coef=0.1)[0],
    }
    return fns[name]


@pytest.mark.parametrize("name", ["dpo_loss", "kto_loss", "orpo_loss", "simpo_loss", "cpo_loss", "una_loss",
                                  "bradley_terry_loss"])
def test_sequence_level_losses_packed_equals_padded(name, torch_mode):
    from alignlab.losses import linear_logprobs

    fn = _lp(name)
    hidden, ids, cu, g = _packed(seed=7)
    w = torch.randn(V, H, generator=g, dtype=D) * 0.3
    v_head = torch.randn(H, generator=g, dtype=D)  # a reward model's value head, for Bradley-Terry
    lengths = torch.tensor(LENGTHS, dtype=D)
    h_pad, y_pad, mask = _padded_from(hidden, ids, cu, g)

    def run(h, y, packed):
        wl = w.clone().requires_grad_(True)
        tok = linear_logprobs(h, wl, y, chunk_size=5)
        if packed:
            seq = packed_to_padded(tok[0], cu)[0].sum(dim=1)  # one segment sum per sequence
            last = h[0, cu[1:] - 1]
        else:
            seq = tok.sum(dim=1)
            last = h[torch.arange(h.shape[0]), lengths.long() - 1]
        loss = fn(seq, lengths, last @ v_head)
        return (loss, *torch.autograd.grad(loss, (h, wl), allow_unused=True))

    hp = h_pad.clone().requires_grad_(True)
    want, gh_pad, gw_pad = run(hp, y_pad, False)
    hk = hidden.clone()[None].requires_grad_(True)
    got, gh, gw = run(hk, ids[None], True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh[0], gh_pad[mask], rtol=1e-10, atol=1e-12)
    assert float(gh_pad[~mask].abs().max()) == 0.0
    if gw is not None:
        torch.testing.assert_close(gw, gw_pad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# packed = padded for the token-level losses that have no test elsewhere
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_distill_loss_packed_equals_padded(kind):
    from alignlab.losses import distill_loss, sequence_divergence

    g = torch.Generator().manual_seed(8)
    n = sum(LENGTHS)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    s_packed = torch.randn(1, n, V, generator=g, dtype=D, requires_grad=True)
    t_packed = torch.randn(1, n, V, generator=g, dtype=D)
    s_pad, mask = packed_to_padded(s_packed, cu)
    junk = torch.randn(s_pad.shape, generator=g, dtype=D) * 30
    s_pad2 = torch.where(mask[..., None], s_pad, junk)  # the padded batch holds junk under its padding
    t_pad, _ = packed_to_padded(t_packed, cu, fill=float("nan"))
    for reduction in ("mean", "sum"):
        got = distill_loss(s_packed, t_packed, kind, temperature=1.5, reduction=reduction)
        want = distill_loss(s_pad2, t_pad, kind, temperature=1.5, mask=mask, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (g1,) = torch.autograd.grad(got, s_packed, retain_graph=True)
        (g2,) = torch.autograd.grad(want, s_packed, retain_graph=True)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)
    # per-sequence values: token losses of the packed row, unpacked, give the padded batch's
    tok = distill_loss(s_packed, t_packed, kind, reduction="none")[0]
    got = sequence_divergence(*packed_to_padded(tok, cu))
    want = sequence_divergence(distill_loss(s_pad2, t_pad, kind, mask=mask, reduction="none"), mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sequence_kd_loss_packed_equals_padded():
    from alignlab.losses import sequence_kd_loss

    g = torch.Generator().manual_seed(9)
    n = sum(LENGTHS)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    logits = torch.randn(1, n, V, generator=g, dtype=D, requires_grad=True)
    labels = torch.randint(0, V, (1, n), generator=g)
    labels[torch.rand(1, n, generator=g) < 0.2] = -100
    l_pad, mask = packed_to_padded(logits, cu)
    l_pad = torch.where(mask[..., None], l_pad, torch.randn(l_pad.shape, generator=g, dtype=D) * 30)
    y_pad, _ = packed_to_padded(labels, cu, fill=-100)
    for reduction in ("mean", "sum", "none"):
        got = sequence_kd_loss(logits, labels, reduction=reduction, cu_seqlens=cu)
        want = sequence_kd_loss(l_pad, y_pad, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (g1,) = torch.autograd.grad(got.sum(), logits, retain_graph=True)
        (g2,) = torch.autograd.grad(want.sum(), logits, retain_graph=True)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)
    # without the boundaries the shift scores each sequence's first token from the previous sequence
    wrong = sequence_kd_loss(logits, labels, reduction="sum")
    assert abs(float(wrong - sequence_kd_loss(l_pad, y_pad, reduction="sum"))) > 1e-6
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_kd_loss(logits, labels, cu_seqlens=torch.tensor([0, 3, 2, n]))
    with pytest.raises(ValueError, match="packed"):
        sequence_kd_loss(l_pad, y_pad, cu_seqlens=cu)


def test_rl_token_losses_and_gae_packed_equal_padded():
    from alignlab.losses import gae, grpo_loss, kl_penalty, ppo_value_loss

    g = torch.Generator().manual_seed(10)
    n = sum(LENGTHS)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    lp_packed = (-torch.rand(n, generator=g, dtype=D) * 3).requires_grad_(True)
    old_p, ref_p, ent_p = (torch.rand(n, generator=g, dtype=D) * s for s in (-3, -3, 2))
    lp, mask = packed_to_padded(lp_packed, cu)
    nan = float("nan")
    old, ref, ent = (packed_to_padded(x, cu, fill=nan)[0] for x in (old_p, ref_p, ent_p))
    adv = torch.randn(len(LENGTHS), generator=g, dtype=D)
    junk = torch.where(mask, lp, torch.full_like(lp, nan))  # a padded batch with NaN under its padding
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        got, _ = grpo_loss(lp, adv, mask, old, ref, beta=0.1, loss_type=loss_type, entropy=ent, entropy_coef=0.2)
        want, _ = grpo_loss(junk, adv, mask, old, ref, beta=0.1, loss_type=loss_type, entropy=ent, entropy_coef=0.2)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(*(torch.autograd.grad(x, lp_packed, retain_graph=True)[0] for x in (got, want)))
    got, _ = ppo_value_loss(lp, old, ref, mask)
    want, _ = ppo_value_loss(junk, old, ref, mask)
    torch.testing.assert_close(got, want)
    # kl_penalty is per token: on the packed row directly
    torch.testing.assert_close(kl_penalty(lp_packed, ref_p)[None], kl_penalty(lp, ref, mask=mask)[mask][None])
    # GAE runs along each sequence: on the unpacked batch it equals a hand-padded one with junk under the padding,
    # and rows are independent of the batch they sit in unless the advantages are whitened
    rewards, values = (packed_to_padded(torch.randn(n, generator=g, dtype=D), cu)[0] for _ in range(2))
    a1, r1 = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a2, r2 = gae(torch.where(mask, rewards, 1e3), torch.where(mask, values, -1e3), mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)
    a_raw, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8, whiten_advantages=False)
    for sl in (slice(0, 3), slice(3, 8)):
        a_mb, _ = gae(rewards[sl], values[sl], mask[sl], gamma=0.9, lam=0.8, whiten_advantages=False)
        torch.testing.assert_close(a_mb, a_raw[sl], rtol=0, atol=0)
    # a packed row read as one sequence runs the recursion across the boundaries: not the same numbers
    wrong, _ = gae(rewards[mask][None], values[mask][None], gamma=0.9, lam=0.8, whiten_advantages=False)
    assert not torch.allclose(wrong[0], a_raw[mask])


def test_gae_whitening_across_ranks_with_all_reduced_moments():
    from alignlab.losses import gae, whiten

    g = torch.Generator().manual_seed(11)
    b, t = 7, 6
    rewards, values = torch.randn(b, t, generator=g, dtype=D), torch.randn(b, t, generator=g, dtype=D)
    mask = torch.arange(t)[None] < torch.tensor([6, 2, 5, 1, 4, 6, 3])[:, None]
    want, want_ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)  # one process holding the whole rollout
    shards = (slice(0, 2), slice(2, 7))  # two ranks, uneven
    local = [gae(rewards[s], values[s], mask[s], gamma=0.95, lam=0.9, whiten_advantages=False) for s in shards]
    moments = sum(torch.stack([mask[s].sum(), (a * mask[s]).sum(), (a * a * mask[s]).sum()]).to(D)
                  for s, (a, _) in zip(shards, local))  # all_reduce(SUM) of each rank's (n, sum, sum of squares)
    for s, (a, ret) in zip(shards, local):
        torch.testing.assert_close(whiten(a, mask[s], moments=moments), want[s], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ret, want_ret[s], rtol=0, atol=0)
        # whitening a rank's shard with its own statistics is not the whole rollout's whitening
        assert not torch.allclose(whiten(a, mask[s]), want[s])
    # moments of the values themselves reproduce the one-batch whitening, shift_mean=False included
    a_all = gae(rewards, values, mask, whiten_advantages=False)[0]
    mom = torch.stack([mask.sum(), (a_all * mask).sum(), (a_all * a_all * mask).sum()]).to(D)
    torch.testing.assert_close(whiten(a_all, mask, False, moments=mom), whiten(a_all, mask, False))
    with pytest.raises(ValueError, match="moments"):
        whiten(a_all, mask, moments=mom[:2])
    with pytest.raises(ValueError, match=r"moments count 1.0 is below the 27 unmasked values of this piece"):
        whiten(a_all, mask, moments=torch.tensor([1.0, 0.5, 0.25]))


def test_logprob_helpers_packed_equal_padded(torch_mode):
    from alignlab.losses import completion_logps, sequence_logprobs, token_logprobs

    hidden, ids, cu, g = _packed(seed=12)
    w = torch.randn(V, H, generator=g, dtype=D) * 0.3
    h_pad, y_pad, mask = _padded_from(hidden, ids, cu, g)
    logits_packed = (hidden @ w.T)[None]
    logits_pad = h_pad @ w.T
    # per token: the packed row needs no boundaries
    torch.testing.assert_close(token_logprobs(logits_packed, ids[None])[0], token_logprobs(logits_pad, y_pad)[mask])
    # per sequence: unpack, then the padded batch's numbers (sum and mean)
    for average in (False, True):
        unpacked = [packed_to_padded(x, cu, fill=f)[0] for x, f in ((logits_packed, 0.0), (ids[None], -100))]
        got = sequence_logprobs(*unpacked, average=average)
        torch.testing.assert_close(got, sequence_logprobs(logits_pad, y_pad, average=average))
    tok, seq, counts = completion_logps(packed_to_padded(hidden, cu)[0], w, packed_to_padded(ids, cu, fill=-100)[0])
    want_tok, want_seq, want_counts = completion_logps(h_pad, w, y_pad)
    torch.testing.assert_close(seq, want_seq)
    torch.testing.assert_close(counts, want_counts)
    torch.testing.assert_close(seq, packed_to_padded(token_logprobs(logits_packed, ids[None])[0], cu)[0].sum(1))
