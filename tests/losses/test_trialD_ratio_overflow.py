"""The clipped surrogate with an overflowing importance ratio. Where A >= 0, PPO's objective
min(rho A, clip(rho, 1 - eps, 1 + eps_hi) A) takes the clipped term for every rho above 1 + eps_hi: the loss is
the same and the ratio gets no gradient, whatever rho is. An old log-prob far below the current one
(log rho > 88 in float32) made rho = inf, and inf * 0 gave a NaN loss for A = 0 and a NaN gradient for A >= 0
(exp's backward multiplies by rho), which poisoned every parameter of the step; TRL's GRPOTrainer has the same
expression. The reference here is the same loss with that token's ratio at a moderate value above the clip
(e^5), which the objective cannot tell apart."""

import pytest
import torch

from alignlab.losses.fused_rl import fused_linear_grpo
from alignlab.losses.reward import grpo_loss, ppo_policy_loss

FAR, NEAR = 95.0, 5.0  # log-ratio of the odd token: overflowing in float32, and a finite one beyond the clip


def _inputs(adv_value, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 6, generator=g, dtype=dtype)
    old = lp + 0.1 * torch.randn(3, 6, generator=g, dtype=dtype)
    adv = torch.tensor([adv_value, 0.7, -0.4], dtype=dtype)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    return lp, old, adv, mask


def _with_odd_token(old, lp, log_ratio):
    old = old.clone()
    old[0, 2] = lp[0, 2] - log_ratio
    return old


def _assert_far_equals_near(lp, old, run):
    """``run(x, old_logprobs) -> (loss, metric)`` with the odd token's ratio overflowing (FAR) and just beyond the
    clip (NEAR): finite loss and gradient at FAR, and loss, gradient and metric equal to NEAR's."""
    results = []
    for lr in (FAR, NEAR):
        x = lp.clone().requires_grad_(True)
        loss, metric = run(x, _with_odd_token(old, lp, lr))
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad, metric))
    (loss, grad, metric), (want, want_grad, want_metric) = results
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(metric, want_metric)


@pytest.mark.parametrize("adv0", [0.0, 1.3])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_loss_finite_and_unchanged_beyond_the_clip(adv0, loss_type):
    lp, old, adv, mask = _inputs(adv0)

    def run(x, old_lp):
        loss, metrics = grpo_loss(x, adv, mask, old_lp, ref_logprobs=lp - 0.05, beta=0.04, epsilon=0.2,
                                  epsilon_high=0.28, loss_type=loss_type)
        return loss, metrics["clip_ratio/high_mean"]

    _assert_far_equals_near(lp, old, run)


def test_ppo_policy_loss_finite_and_unchanged_beyond_the_clip():
    for adv0 in (0.0, 1.3):
        lp, old, adv, mask = _inputs(adv0)

        def run(x, old_lp):
            loss, metrics = ppo_policy_loss(x, old_lp, adv, mask, clip_range=0.2, clip_range_high=0.28,
                                            dual_clip=3.0)
            return loss, metrics["clipfrac"]

        _assert_far_equals_near(lp, old, run)


def test_ppo_values_and_clipfrac_match_the_formula():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    old = lp + 0.4 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x = lp.clone().requires_grad_(True)
    loss, metrics = ppo_policy_loss(x, old, adv, clip_range=0.2, clip_range_high=0.3)
    rho = torch.exp(x - old)
    unclipped, clipped = -rho * adv, -rho.clamp(0.8, 1.3) * adv
    want = torch.maximum(unclipped, clipped).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])
    torch.testing.assert_close(metrics["clipfrac"], (clipped > unclipped).double().mean())


def test_fused_grpo_gradient_finite_with_an_overflowing_ratio():
    g = torch.Generator().manual_seed(2)
    n, t, h, v = 2, 4, 5, 9
    hidden = torch.randn(n, t, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, (n, t), generator=g)
    lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    adv = torch.tensor([0.0, 1.0])
    grads = []
    for lr in (FAR, NEAR):
        old = lp.clone()
        old[:, 1] = lp[:, 1] - lr
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, _ = fused_linear_grpo(hh, ww, ids, adv, old_logprobs=old)
        loss.backward()
        grads.append((loss.detach(), hh.grad, ww.grad))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_ppo_dual_clip_gradient_finite_where_a_negative_advantage_ratio_overflows():
    """With dual_clip the loss of a negative-advantage token is capped at -cA, so a ratio beyond c has neither
    value nor gradient; torch.where still sent the untaken branch's 0 · exp(100) = NaN into the log-prob (a
    helper's find: loss 1.0, gradient [[nan, -0.5]]). Same loss and gradient as a finite ratio beyond c."""
    lp, old, adv, mask = _inputs(-1.3)

    def run(x, old_lp):
        loss, metrics = ppo_policy_loss(x, old_lp, adv, mask, clip_range=0.2, dual_clip=3.0)
        return loss, metrics["clipfrac"]

    _assert_far_equals_near(lp, old, run)  # NEAR = e^5 > c = 3: the capped loss too
    x = torch.tensor([[100.0, 0.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(x, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3.0 - 1.0) / 2) and x.grad[0, 0] == 0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("is_mode", ["token_mask", "sequence_mask"])
def test_a_token_of_importance_weight_zero_adds_exactly_nothing_even_when_its_ratio_overflows(is_mode):
    """grpo_loss (and the fused GRPO) multiplied the surrogate by the importance weight: a token (or sequence) that
    the mask mode drops, or whose sampler log-prob is NaN, has weight 0, but an overflowing ratio at a negative
    advantage made its surrogate inf, and inf · 0 = NaN in the loss and every gradient. Now exactly 0: the same
    loss and gradient as with that token's ratio at 1."""
    lp = torch.tensor([[-1.0, -1.0, -2.0], [-0.5, -1.5, -1.0]])
    adv = torch.tensor([-1.0, 0.5])
    samp = lp.clone()
    samp[0, 1] = -300.0 if is_mode == "token_mask" else samp[0, 1]  # weight e^299: outside [is_min, is_max]
    samp[1, 2] = float("nan")  # unknown ratio: weight 0

    def run(old, sampling):
        x = lp.clone().requires_grad_(True)
        loss, _ = grpo_loss(x, adv, None, old, sampling_logprobs=sampling, is_mode=is_mode, is_min=0.5, is_max=2.0)
        return (loss, *torch.autograd.grad(loss, x))

    far = lp.clone()
    far[0, 1] = -200.0  # log-ratio 199: exp overflows in float32
    if is_mode == "sequence_mask":
        far[0, 1], samp[0, 1] = -200.0, -200.0  # the old policy's log-prob far down, the sequence's weight 1
        samp[0, 0] = -300.0  # ...times e^299 from its first token: the sequence is masked out
    got = run(far, samp)
    assert all(torch.isfinite(t).all() for t in got)
    near = far.clone()
    near[0, 1] = lp[0, 1]  # that token's ratio 1: the dropped token (or sequence) counts nothing either way
    samp_near = samp.clone()
    if is_mode == "token_mask":
        samp_near[0, 1] = -300.0
    want = run(near, samp_near)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fused_grpo_weights_in_float64_match_grpo_loss_with_float32_sampler_log_probs():
    """The fused GRPO computed its importance weights in the side inputs' float32 while grpo_loss widens them to
    the float64 log-probs first: gradients 3e-8 apart where float64 agrees to 1e-15 (a helper's find)."""
    g = torch.Generator().manual_seed(3)
    n, t, h, v = 2, 5, 6, 11
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (n, t), generator=g)
    adv = torch.tensor([0.7, -0.4], dtype=torch.float64)
    lp64 = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (lp64 + 0.05 * torch.randn(n, t, generator=g, dtype=torch.float64)).float()
    samp = (old.double() + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)).float()
    hh = hidden.clone().requires_grad_(True)
    loss, _ = fused_linear_grpo(hh, weight, ids, adv, old_logprobs=old, sampling_logprobs=samp,
                                is_mode="token_truncate", is_max=1.5)
    (got,) = torch.autograd.grad(loss, hh)
    hr = hidden.clone().requires_grad_(True)
    lp = torch.log_softmax(hr @ weight.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    want_loss, _ = grpo_loss(lp, adv, None, old, sampling_logprobs=samp, is_mode="token_truncate", is_max=1.5)
    (want,) = torch.autograd.grad(want_loss, hr)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
