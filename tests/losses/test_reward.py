"""Reward-model and RL losses against hand-computed values and straightforward loops written in the test."""

from __future__ import annotations

import math

import pytest
import torch

# The oracle drives TRL's private loss methods, whose signatures changed across releases: checked on 1.16;
# older TRL (the declared floor is 0.26) skips these tests with pytest's version reason.
TRL_INTERNALS = "1.16"

from alignlab.losses.reward import (
    bradley_terry_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def softplus(x):
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------------------------
# Bradley–Terry
# ------------------------------------------------------------------------------------------------------------------
def test_bradley_terry_hand_values():
    rc, rr = t(2.0, 0.5), t(1.0, 1.5)
    loss, m = bradley_terry_loss(rc, rr)
    # -log sigmoid(1) and -log sigmoid(-1)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(1.0)) / 2)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(0.0)
    loss, _ = bradley_terry_loss(rc, rr, margin=t(0.5, 0.25), center_coef=0.01)
    want = (softplus(-(1.0 - 0.5)) + softplus(-(-1.0 - 0.25))) / 2 + 0.01 * ((3.0**2 + 2.0**2) / 2)
    assert loss.item() == pytest.approx(want)
    per_pair, _ = bradley_terry_loss(rc, rr, margin=0.5, reduction="none")
    torch.testing.assert_close(per_pair, t(softplus(-0.5), softplus(1.5)))


def test_bradley_terry_gradcheck_and_errors():
    rc = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    rr = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b, margin=0.3, center_coef=0.1)[0], (rc, rr))
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="floating"):
        bradley_terry_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), center_coef=-1.0)


# ------------------------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values_and_mask():
    lp = t([-1.0, -2.0, float("nan")])
    ref = t([-1.5, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 0]])
    # delta = 0.5, -1.0
    torch.testing.assert_close(kl_penalty(lp, ref, "k1", mask), t([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2", mask), t([0.125, 0.5, 0.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3", mask), t([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]))


def test_kl_estimators_are_unbiased_or_not():
    # two categorical distributions; sample tokens from p, average the estimators, compare with the exact KL
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=D)
    exact = (p * (p / q).log()).sum()
    # the exact expectations of each estimator under p (no sampling noise)
    lp, lq = p.log()[None], q.log()[None]
    e_k1 = (p * kl_penalty(lp, lq, "k1")[0]).sum()
    e_k3 = (p * kl_penalty(lp, lq, "k3")[0]).sum()
    e_k2 = (p * kl_penalty(lp, lq, "k2")[0]).sum()
    torch.testing.assert_close(e_k1, exact)
    torch.testing.assert_close(e_k3, exact)
    assert abs(e_k2.item() - exact.item()) > 1e-3  # k2 is biased


def test_kl_errors():
    with pytest.raises(ValueError, match="valid estimators are"):
        kl_penalty(torch.zeros(2, 2), torch.zeros(2, 2), "k4")


# ------------------------------------------------------------------------------------------------------------------
# masked statistics
# ------------------------------------------------------------------------------------------------------------------
def test_masked_mean_and_whiten():
    x = t([1.0, 2.0, 100.0], [3.0, float("inf"), 5.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t(1.5, 4.0))
    w = whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=D)
    want = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(w[mask.bool()], want)
    assert w[0, 2].item() == 0.0 and w[1, 1].item() == 0.0
    ws = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(ws[mask.bool()], want + vals.mean())
    # one unmasked value is its own mean: 0 (tests/losses/test_whiten_few_tokens.py has the rest)
    assert whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]])).abs().sum().item() == 0.0


# ------------------------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------------------------
def test_gae_hand_computed():
    r = t([0.0, 0.0, 1.0])
    v = t([0.5, 0.6, 0.7])
    gamma, lam = 0.9, 0.8
    # t=2: delta = 1 - 0.7 = 0.3, A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03, A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04, A0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = gae(r, v, gamma=gamma, lam=lam, whiten_advantages=False)
    torch.testing.assert_close(adv, t([0.21712, 0.246, 0.3]))
    torch.testing.assert_close(ret, t([0.71712, 0.846, 1.0]))
    adv, _ = gae(r, v, gamma=gamma, lam=lam, last_values=t(2.0), whiten_advantages=False)
    # t=2: delta = 1 + 0.9*2 - 0.7 = 2.1
    assert adv[0, 2].item() == pytest.approx(2.1)


def test_gae_padding_and_holes_equal_compacted():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(3, 5, dtype=D, generator=g)
    v = torch.randn(3, 5, dtype=D, generator=g)
    # left padding, right padding, a hole in the middle
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    r_pad = torch.where(mask, r, torch.full_like(r, float("nan")))  # padding content must not matter
    v_pad = torch.where(mask, v, torch.full_like(v, 1e6))
    adv, ret = gae(r_pad, v_pad, mask, gamma=0.95, lam=0.9, whiten_advantages=False)
    for i in range(3):
        idx = mask[i].nonzero().squeeze(1)
        a_c, r_c = gae(r[i, idx][None], v[i, idx][None], gamma=0.95, lam=0.9, whiten_advantages=False)
        torch.testing.assert_close(adv[i, idx], a_c[0])
        torch.testing.assert_close(ret[i, idx], r_c[0])
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())
    adv_w, _ = gae(r_pad, v_pad, mask, gamma=0.95, lam=0.9)
    vals = adv[mask]
    torch.testing.assert_close(adv_w[mask], (vals - vals.mean()) / torch.sqrt(vals.var() + 1e-8))


def test_gae_errors():
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), gamma=1.5)
    with pytest.raises(ValueError, match="shape"):
        gae(torch.zeros(1, 3), torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------------------------------
def test_ppo_policy_loss_hand_values():
    # ratios: e^0.5 = 1.6487 (clipped at 1.2 for A>0), e^-0.5 = 0.6065 (clipped at 0.8 for A<0), 1.1, masked
    lp = t([0.5, -0.5, math.log(1.1), 9.0])
    old = t([0.0, 0.0, 0.0, 0.0])
    adv = t([2.0, -1.0, 1.0, 5.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = ppo_policy_loss(lp, old, adv, mask, clip_range=0.2)
    # per token: max(-r A, -clip(r) A): -min(1.6487*2, 1.2*2) = -2.4 ; max(0.6065, 0.8) = 0.8 ; -1.1
    want = (-2.4 + 0.8 - 1.1) / 3
    assert loss.item() == pytest.approx(want)
    assert m["clipfrac"].item() == pytest.approx(2 / 3)
    assert m["approx_kl"].item() == pytest.approx((0.125 + 0.125 + 0.5 * math.log(1.1) ** 2) / 3)
    # asymmetric clip: 1 + 0.3 upper bound
    loss_hi, _ = ppo_policy_loss(lp, old, adv, mask, clip_range=0.2, clip_range_high=0.3)
    assert loss_hi.item() == pytest.approx((-2.6 + 0.8 - 1.1) / 3)
    # dual clip c=3 caps the A<0 token at -c*A = 3 (not binding here); with a large ratio it binds
    lp2, adv2 = t([2.0]), t([-1.0])
    l2, _ = ppo_policy_loss(lp2, t([0.0]), adv2, dual_clip=3.0)
    assert l2.item() == pytest.approx(3.0)  # instead of e^2 = 7.39
    # gradient: only the unclipped token (index 2) moves, d/dlp(-r A) = -r A = -1.1
    lp_g = lp.clone().requires_grad_(True)
    ppo_policy_loss(lp_g, old, adv, mask)[0].backward()
    torch.testing.assert_close(lp_g.grad, t([0.0, 0.0, -1.1 / 3, 0.0]))


def test_ppo_policy_loss_sequence_aggregation():
    lp = t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    adv = t(1.0, 3.0)  # per-sequence, broadcast
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    tok, _ = ppo_policy_loss(lp, lp, adv, mask, aggregation="token")
    seq, _ = ppo_policy_loss(lp, lp, adv, mask, aggregation="sequence")
    assert tok.item() == pytest.approx(-(1 + 3 * 3) / 4)
    assert seq.item() == pytest.approx(-(1 + 3) / 2)


def test_ppo_value_loss_hand_values():
    v = t([1.0, 2.0, 0.0])
    old = t([0.5, 2.0, 0.0])
    ret = t([2.0, 1.0, 7.0])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = ppo_value_loss(v, old, ret, mask, clip_range_value=0.2)
    # token 0: (1-2)^2 = 1 ; clipped v = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 ; max = 1.69
    # token 1: (2-1)^2 = 1 ; clipped = 2 -> 1 ; max = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)
    plain, _ = ppo_value_loss(v, old, ret, mask, clip_range_value=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


# ------------------------------------------------------------------------------------------------------------------
# GRPO / RLOO
# ------------------------------------------------------------------------------------------------------------------
def test_group_advantages_hand_values():
    r = t(1.0, 0.0, 0.0, 1.0, 2.0, 4.0)
    a = group_advantages(r, 3)
    # group 1: mean 1/3, unbiased std sqrt(1/3)
    s1 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    # group 2: mean 7/3
    s2 = math.sqrt(((4 / 3) ** 2 + (1 / 3) ** 2 + (5 / 3) ** 2) / 2)
    want = [2 / 3 / (s1 + 1e-4), -1 / 3 / (s1 + 1e-4), -1 / 3 / (s1 + 1e-4), -4 / 3 / (s2 + 1e-4), -1 / 3 / (s2 + 1e-4), 5 / 3 / (s2 + 1e-4)]
    torch.testing.assert_close(a, torch.tensor(want, dtype=D))
    torch.testing.assert_close(group_advantages(r, 3, scale="none"), t(2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3))
    sb = r.std().item()
    torch.testing.assert_close(group_advantages(r, 3, scale="batch"), t(2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3) / (sb + 1e-4))
    # identical rewards in a group: zero advantage, no NaN
    torch.testing.assert_close(group_advantages(t(1.0, 1.0), 2), t(0.0, 0.0))


def test_rloo_hand_values():
    r = t(1.0, 2.0, 6.0, 0.0)
    a = rloo_advantages(r, 2)
    torch.testing.assert_close(a, t(-1.0, 1.0, 6.0, -6.0))
    a3 = rloo_advantages(t(3.0, 0.0, 0.0), 3)
    torch.testing.assert_close(a3, t(3.0, -1.5, -1.5))
    n = rloo_advantages(r, 2, normalize=True)
    torch.testing.assert_close(n, (a - a.mean()) / (a.std() + 1e-4))
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(r, 3)


def _grpo_batch():
    lp = t([-1.0, -2.0, -0.5, 0.0], [-0.3, -0.1, 0.0, 0.0])
    old = t([-1.0, -2.3, -0.2, 0.0], [-0.3, -0.5, 0.0, 0.0])
    ref = t([-1.2, -2.0, -0.5, 0.0], [-0.1, -0.1, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = t(1.0, -0.5)
    return lp, old, ref, mask, adv


def _grpo_per_token_by_hand(beta):
    lp, old, ref, mask, adv = _grpo_batch()
    out = torch.zeros(2, 4, dtype=D)
    for i in range(2):
        for j in range(4):
            if not mask[i, j]:
                continue
            r = math.exp(lp[i, j].item() - old[i, j].item())
            a = adv[i].item()
            loss = -min(r * a, min(max(r, 0.8), 1.28) * a)
            d = lp[i, j].item() - ref[i, j].item()
            loss += beta * (math.exp(-d) - 1 + d)
            out[i, j] = loss
    return out, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_aggregations_hand_computed(loss_type):
    lp, old, ref, mask, adv = _grpo_batch()
    per_tok, _ = _grpo_per_token_by_hand(beta=0.04)
    if loss_type == "grpo":
        want = (per_tok[0].sum() / 3 + per_tok[1].sum() / 2) / 2
    elif loss_type in ("bnpo", "dapo"):
        want = per_tok.sum() / 5
    else:
        want = per_tok.sum() / (2 * 16)
    got, m = grpo_loss(
        lp, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04, epsilon=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_completion_length=16,
    )
    assert got.item() == pytest.approx(want.item())
    assert "kl" in m and 0.0 <= m["clip_ratio"].item() <= 1.0
    if loss_type == "dapo":  # global token count from gradient accumulation
        got2, _ = grpo_loss(lp, adv, mask, old, ref, 0.04, 0.2, epsilon_high=0.28, loss_type="dapo", num_items=20)
        assert got2.item() == pytest.approx(per_tok.sum().item() / 20)


def test_grpo_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    # with old = current (ratio 1) and beta = 0, d loss / d logp_t = -A / (len * batch) for grpo
    lp, _, _, mask, adv = _grpo_batch()
    lp = lp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, adv, mask)
    loss.backward()
    want = torch.zeros(2, 4, dtype=D)
    want[0, :3] = -1.0 / 3 / 2
    want[1, :2] = 0.5 / 2 / 2
    torch.testing.assert_close(lp.grad, want)


def test_grpo_gradcheck_and_errors():
    lp, old, ref, mask, adv = _grpo_batch()
    leaf = lp.clone().requires_grad_(True)
    for lt in ("grpo", "bnpo", "dapo", "dr_grpo"):
        assert torch.autograd.gradcheck(lambda x: grpo_loss(x, adv, mask, old, ref, 0.1, loss_type=lt)[0], (leaf,))
    with pytest.raises(ValueError, match="valid loss types are"):
        grpo_loss(lp, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, t(1.0, 2.0, 3.0), mask)


def test_rl_losses_bf16_inputs_compute_in_float32():
    lp, old, ref, mask, adv = _grpo_batch()
    got, _ = grpo_loss(lp.bfloat16(), adv.bfloat16(), mask, old.bfloat16(), ref.bfloat16(), 0.04)
    assert got.dtype == torch.float32
    want, _ = grpo_loss(lp.bfloat16().double(), adv.bfloat16().double(), mask, old.bfloat16().double(), ref.bfloat16().double(), 0.04)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# GRPO against TRL 1.16's GRPOTrainer._compute_loss, driven on plain tensors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_matches_trl(loss_type, beta):
    pytest.importorskip("trl", minversion=TRL_INTERNALS)
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(7)
    n, T = 6, 5
    mask = torch.ones(n, T, dtype=torch.long)
    for i, length in enumerate([5, 3, 1, 4, 2, 5]):
        mask[i, length:] = 0
    lp = (-torch.rand(n, T, generator=g, dtype=D) * 2).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(n, T, generator=g, dtype=D)
    ref = lp.detach() + 0.2 * torch.randn(n, T, generator=g, dtype=D)
    adv = group_advantages(torch.rand(n, generator=g, dtype=D), 3)

    ident = lambda x, **_: x  # noqa: E731
    trainer = object.__new__(GRPOTrainer)
    for k, v in dict(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=8, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(gather=ident, reduce=ident, gather_for_metrics=ident, num_processes=1),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    ).items():
        setattr(trainer, k, v)
    inputs = dict(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.zeros(n, T, dtype=torch.long), completion_mask=mask, advantages=adv,
        old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum().to(D),
    )
    want = trainer._compute_loss(None, inputs)
    (want_grad,) = torch.autograd.grad(want, lp)
    got, _ = grpo_loss(
        lp, adv, mask, old_logprobs=old, ref_logprobs=ref if beta else None, beta=beta, epsilon=0.2,
        epsilon_high=0.28, loss_type=loss_type, max_completion_length=8,
    )
    (got_grad,) = torch.autograd.grad(got, lp)
    torch.testing.assert_close(got, want.to(got.dtype))
    torch.testing.assert_close(got_grad, want_grad)


def test_rl_flags_must_be_bools():
    """A truthy string ("no") switched whitening or normalisation on."""
    x = torch.rand(2, 3, dtype=D)
    with pytest.raises(TypeError, match="shift_mean"):
        whiten(x, shift_mean="no")
    with pytest.raises(TypeError, match="whiten_advantages"):
        gae(x, x, whiten_advantages="no")
    with pytest.raises(TypeError, match="normalize"):
        rloo_advantages(x.reshape(-1), 2, normalize=1)


def test_grpo_numbers_are_checked_by_name():
    """NaN entropy_coef / is_max reached the loss as NaN, is_min > is_max zeroed or clamped every weight to a
    point silently, and a string beta failed inside a comparison that named nothing."""
    lp, adv = torch.rand(2, 3, dtype=D), torch.rand(2, dtype=D)
    ent = torch.rand(2, 3, dtype=D)
    nan = float("nan")
    for kw, name in ((dict(entropy=ent, entropy_coef=nan), "entropy_coef"),
                     (dict(sampling_logprobs=lp, is_max=nan), "is_max"),
                     (dict(sampling_logprobs=lp, is_min=nan), "is_min"),
                     (dict(sampling_logprobs=lp, is_min=5.0, is_max=3.0), "is_min"),
                     (dict(beta=float("inf"), ref_logprobs=lp), "beta"),
                     (dict(epsilon_high=nan), "epsilon_high")):
        with pytest.raises(ValueError, match=name):
            grpo_loss(lp, adv, None, lp, **kw)
    for kw, name in ((dict(beta="0.1", ref_logprobs=lp), "beta"), (dict(epsilon="0.2"), "epsilon"),
                     (dict(entropy=ent, entropy_coef="1"), "entropy_coef")):
        with pytest.raises(TypeError, match=name):
            grpo_loss(lp, adv, None, lp, **kw)


def test_rl_numbers_are_checked_by_name():
    """NaN eps / margin reached every output as NaN, a negative whitening eps could take the root of a
    negative number, and string options failed in a bare comparison that named nothing."""
    x, r = torch.rand(2, 3, dtype=D), torch.rand(4, dtype=D)
    nan = float("nan")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, 2, eps=nan)
    with pytest.raises(ValueError, match="eps"):
        rloo_advantages(r, 2, normalize=True, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        whiten(x, eps=-1.0)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(r, r, margin=nan)
    with pytest.raises(TypeError, match="center_coef"):
        bradley_terry_loss(r, r, center_coef="0.01")
    # a string is no number: TypeError naming the argument (the library's convention), as center_coef above
    with pytest.raises(TypeError, match="gamma"):
        gae(x, x, gamma="0.99")
    with pytest.raises(TypeError, match="clip_range"):
        ppo_policy_loss(x, x, r[:2], clip_range="0.2")
    with pytest.raises(TypeError, match="dual_clip"):
        ppo_policy_loss(x, x, r[:2], dual_clip="3")
    with pytest.raises(TypeError, match="clip_range_value"):
        ppo_value_loss(x, x, x, clip_range_value="0.2")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_whiten_half_precision_computes_in_float32(dtype):
    """In float16 the sum of squares of 4096 advantages of scale 12 overflows: the variance was inf and every
    whitened value 0; bf16 lost the unit variance to its rounding."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 512, generator=g) * 12).to(dtype)
    mask = torch.rand(8, 512, generator=g) > 0.1
    got = whiten(x, mask)
    assert got.dtype == dtype
    torch.testing.assert_close(got, whiten(x.float(), mask).to(dtype), rtol=0, atol=0)
    assert got.float()[mask].std().item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("bad", [torch.tensor([[1, 2, 0]]), torch.tensor([[1.0, 0.5, 0.0]]),
                                 torch.tensor([[1.0, float("nan"), 0.0]]), torch.tensor([[1, -1, 0]])],
                         ids=["int-2", "float-half", "nan", "int-minus-1"])
def test_masks_hold_bools_or_exactly_0_1(bad):
    """A mask selects tokens: an int 2 used to count as True while a float 0.5 was refused; both are refused now,
    as is NaN, naming the argument; bool, int and float 0/1 masks give the same numbers."""
    lp, old = t([-1.0, -2.0, -0.5]), t([-1.2, -1.5, -0.4])
    adv = t(1.0)
    for fn in (lambda m: masked_mean(lp, m), lambda m: kl_penalty(lp, old, "k3", m),
               lambda m: ppo_policy_loss(lp, old, adv, m)[0], lambda m: grpo_loss(lp, adv, m, old)[0],
               lambda m: gae(lp, old, m, whiten_advantages=False)[0]):
        with pytest.raises(ValueError, match="mask must hold bools or exactly 0/1"):
            fn(bad)
        want = fn(torch.tensor([[True, False, True]]))
        for ok in (torch.tensor([[1, 0, 1]]), torch.tensor([[1.0, 0.0, 1.0]]),
                   torch.tensor([[1, 0, 1]], dtype=torch.uint8)):
            torch.testing.assert_close(fn(ok), want, rtol=0, atol=0)


def _gspo_clip_metrics_by_hand(lp, old, adv_tok, mask, eps, eps_hi):
    """Each sequence: one ratio exp(mean log-ratio); a token is low-clipped when that ratio < 1 - eps and the
    token's own advantage < 0 (high: > 1 + eps_hi and > 0); the metric is the mean over sequences of each
    sequence's clipped fraction (0 for a sequence with no token)."""
    low, high, region = [], [], []
    for i in range(lp.shape[0]):
        idx = [j for j in range(lp.shape[1]) if mask[i, j]]
        if not idx:
            low.append(0.0), high.append(0.0), region.append(0.0)
            continue
        r = math.exp(sum(lp[i, j].item() - old[i, j].item() for j in idx) / len(idx))
        lo = [r < 1 - eps and adv_tok[i, j].item() < 0 for j in idx]
        hi = [r > 1 + eps_hi and adv_tok[i, j].item() > 0 for j in idx]
        low.append(sum(lo) / len(idx))
        high.append(sum(hi) / len(idx))
        region.append(sum(a or b for a, b in zip(lo, hi)) / len(idx))
    n = lp.shape[0]
    return sum(low) / n, sum(high) / n, sum(region) / n


def test_gspo_clip_metrics_use_each_tokens_own_advantage():
    """At sequence level the clip metrics read advantages[:, :1], the first column's advantage, for the whole
    sequence: wrong for per-token advantages and for left padding (the first column is not a token)."""
    lp = t([0.0, -1.0, -1.2, -0.8], [-0.2, -0.1, -0.3, 0.0], [-0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    old = t([0.0, -0.5, -0.6, -0.4], [-0.6, -0.5, -0.7, 0.0], [-0.5, -0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    # row 0 left-padded, ratio e^-0.5: low side; row 1 ratio e^0.4: high side; row 2 ratio ~1; row 3 empty
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv = t([5.0, -1.0, 2.0, -0.5], [-1.0, 0.5, 1.5, 9.0], [-2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    _, m = grpo_loss(lp, adv, mask, old, importance_sampling_level="sequence", epsilon=0.2, epsilon_high=0.28)
    low, high, region = _gspo_clip_metrics_by_hand(lp, old, adv, mask, 0.2, 0.28)
    assert (low, high) == (pytest.approx((2 / 3) / 4), pytest.approx((2 / 3) / 4))  # the hand values, checked
    assert m["clip_ratio/low_mean"].item() == pytest.approx(low)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(high)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(region)
    assert m["clip_ratio"].item() == pytest.approx(region)
    # (batch,) advantages: TRL's per-sequence indicator, unchanged
    adv_seq = t(-1.0, 1.0, 1.0, 1.0)
    _, m = grpo_loss(lp, adv_seq, mask, old, importance_sampling_level="sequence", epsilon=0.2, epsilon_high=0.28)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 4)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 4)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 4)


# ------------------------------------------------------------------------------------------------------------------
# unscorable completions (NaN rewards) as TRL 1.16's GRPOTrainer / RLOOTrainer treat them
# ------------------------------------------------------------------------------------------------------------------
def _trl_nanstd(t, dim=None):
    """TRL's trainer.utils.nanstd written out: unbiased std over the non-NaN entries, NaN below two of them."""
    mean = torch.nanmean(t, dim=dim, keepdim=True)
    count = (~torch.isnan(t)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt() if dim is None else var.sqrt().squeeze(dim)


NAN_REWARDS = torch.tensor([1.0, float("nan"), 0.0, 2.0, 0.5, float("nan"), float("nan"), float("nan"), 3.0],
                           dtype=D)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_leave_nan_rewards_out_as_trl(scale):
    """A NaN reward (a completion no reward function could score: TRL's None) made every advantage of its group
    NaN, and with scale="batch" of the whole batch, so the GRPO loss and every gradient were NaN. TRL 1.16
    leaves it out of the group statistics (nanmean / nanstd) and gives it advantage 0."""
    r, k = NAN_REWARDS, 3
    g = r.view(-1, k)
    mean = torch.nanmean(g, dim=1).repeat_interleave(k)
    if scale == "group":
        std = _trl_nanstd(g, dim=1).repeat_interleave(k)
    else:
        std = _trl_nanstd(r).expand_as(r)
    want = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    got = group_advantages(r, k, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(group_advantages(r[~torch.isnan(r)][:2], 2, scale=scale),
                               group_advantages(torch.tensor([1.0, 0.0], dtype=D), 2, scale=scale))


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_leave_nan_rewards_out_as_trl(normalize):
    """As above for RLOO: TRL's leave-one-out baseline averages the scorable siblings only (nansum over
    count - 1), normalises with nanmean / nanstd, then zeroes the NaN advantages."""
    r, k = NAN_REWARDS, 3
    g = r.view(-1, k)
    count = (~torch.isnan(g)).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(g, dim=1, keepdim=True) - g) / (count - 1)
    want = r - baseline.reshape(-1)
    if normalize:
        want = (want - torch.nanmean(want)) / (_trl_nanstd(want) + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    got = rloo_advantages(r, k, normalize=normalize)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    lp = torch.zeros(r.shape[0], 2, dtype=D, requires_grad=True)
    loss, _ = grpo_loss(lp, got)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_numpy_float32_numbers_give_the_python_float_results():
    """gae multiplied NumPy float32 gamma and lam in float32 (gamma * lam rounded) and ppo_policy_loss formed its
    clip bounds 1 - eps, 1 + eps in float32, so float64 losses and advantages moved by 1e-8 to 1e-10 with the type
    of a sweep's number; grpo_loss, which converts its numbers, already agreed."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 6, generator=g, dtype=D), torch.randn(4, 6, generator=g, dtype=D)
    lp = -torch.rand(4, 6, generator=g, dtype=D)
    old = lp + 0.3 * torch.randn(4, 6, generator=g, dtype=D)
    adv = torch.randn(4, 6, generator=g, dtype=D)
    gamma, lam, eps, hi, dual = (np.float32(x) for x in (0.9, 0.95, 0.2, 0.28, 1.3))
    for whiten_advantages in (False, True):
        got = gae(r, v, gamma=gamma, lam=lam, whiten_advantages=whiten_advantages)
        want = gae(r, v, gamma=float(gamma), lam=float(lam), whiten_advantages=whiten_advantages)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    got, _ = ppo_policy_loss(lp, old, adv, clip_range=eps, clip_range_high=hi, dual_clip=dual)
    want, _ = ppo_policy_loss(lp, old, adv, clip_range=float(eps), clip_range_high=float(hi), dual_clip=float(dual))
    assert torch.equal(got, want)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_max_completion_length_is_checked_for_every_loss_type(loss_type):
    """Only dr_grpo read max_completion_length, so 0, -3 or "512" passed silently for the other loss types (a
    config error surfacing only when the loss type changed)."""
    lp = -torch.rand(2, 3, dtype=D)
    adv = torch.randn(2, dtype=D)
    for bad in (0, -3, 8.0):
        with pytest.raises(ValueError, match="max_completion_length"):
            grpo_loss(lp, adv, loss_type=loss_type, max_completion_length=bad)
    for bad in ("512", True):  # no number at all: TypeError naming it
        with pytest.raises(TypeError, match="max_completion_length"):
            grpo_loss(lp, adv, loss_type=loss_type, max_completion_length=bad)
    grpo_loss(lp, adv, loss_type=loss_type, max_completion_length=8)


def test_whiten_integer_values_come_back_as_floats():
    """whiten cast its result back to the input's dtype, so integer scores (0/1 rewards, counts) were whitened
    and then truncated: [1, 2, 3, 4] came back as [-1, 0, 0, 1]."""
    for values, mask in ((torch.tensor([1, 2, 3, 4]), None), (torch.tensor([[0, 1, 1], [1, 0, 5]]),
                                                               torch.tensor([[1, 1, 1], [1, 1, 0]]))):
        got = whiten(values, mask)
        want = whiten(values.to(torch.float32), mask)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
        x = values.double()[mask.bool()] if mask is not None else values.double()
        z = (x - x.mean()) / torch.sqrt(x.var() + 1e-8)  # unbiased variance, as TRL's masked_whiten
        torch.testing.assert_close(got[mask.bool()] if mask is not None else got, z.float())


def test_masked_mean_and_whiten_name_values_that_are_not_tensors():
    """A list of rewards failed inside torch.ones_like ("argument 'input' (position 1) must be Tensor"), naming
    neither the function's argument nor what it expects."""
    for fn in (masked_mean, whiten):
        with pytest.raises(TypeError, match="values must be a torch.Tensor"):
            fn([1.0, 2.0, 3.0])
        with pytest.raises(TypeError, match="values must be a real tensor"):
            fn(torch.ones(3, dtype=torch.complex64))
    assert masked_mean(torch.tensor([1, 2])).item() == 1.5  # integer tensors still count


def test_group_and_rloo_advantages_take_integer_and_bool_rewards():
    """A verifier's 0/1 rewards often come as int64 or bool: they were refused ("must be a floating-point
    tensor"); they are the same numbers as float32 rewards."""
    for rewards in (torch.tensor([1, 0, 1, 1, 0, 0]), torch.tensor([True, False, True, True, False, False])):
        want = rewards.float()
        for scale in ("group", "batch", "none"):
            got = group_advantages(rewards, 3, scale=scale)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, group_advantages(want, 3, scale=scale), rtol=0, atol=0)
        torch.testing.assert_close(rloo_advantages(rewards, 3), rloo_advantages(want, 3), rtol=0, atol=0)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        group_advantages([1.0, 0.0], 2)


@pytest.mark.parametrize("dim, error", [("0", TypeError), (1.0, TypeError), (True, TypeError), (5, ValueError),
                                        (-3, ValueError)])
def test_masked_mean_names_a_bad_dim(dim, error):
    """dim="0" raised torch's own TypeError and dim=5 a bare IndexError, neither naming dim."""
    x = torch.arange(6.0).view(2, 3)
    with pytest.raises(error, match="dim must be None or an int"):
        masked_mean(x, None, dim)
    torch.testing.assert_close(masked_mean(x, None, -1), x.mean(-1))
    torch.testing.assert_close(masked_mean(x, None, 0), x.mean(0))
