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
