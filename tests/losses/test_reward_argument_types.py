"""The reward / RL losses' arguments of the wrong kind (a str, None, a plain object, a list where a tensor goes)
raised ValueError ("must be a torch.Tensor", "gamma must lie in [0, 1], got 'x'"); the library's convention
(alignlab._checks.check_finite_number, center_coef and margin here) is a TypeError naming the argument, and a
ValueError for a number out of range. Also: dr_grpo on a batch of width 0."""

import pytest
import torch

from alignlab.losses import reward

B, S = 4, 3
D = torch.float64


def _calls():
    t1 = torch.randn(B, dtype=D)
    t2 = torch.randn(B, S, dtype=D)
    return {
        "bradley_terry_loss": dict(chosen_rewards=t1, rejected_rewards=t1),
        "kl_penalty": dict(logprobs=t2, ref_logprobs=t2, mask=t2 > 0),
        "masked_mean": dict(values=t2, mask=t2 > 0),
        "whiten": dict(values=t2, mask=t2 > -9),
        "gae": dict(rewards=t2, values=t2, mask=t2 > -9, gamma=1.0, lam=0.95, last_values=t1),
        "ppo_policy_loss": dict(logprobs=t2, old_logprobs=t2, advantages=t1, mask=t2 > 0, clip_range=0.2,
                                clip_range_high=0.3, dual_clip=3.0),
        "ppo_value_loss": dict(values=t2, old_values=t2, returns=t2, mask=t2 > 0, clip_range_value=0.2),
        "group_advantages": dict(rewards=t1, group_size=2),
        "rloo_advantages": dict(rewards=t1, group_size=2),
        "grpo_loss": dict(logprobs=t2, advantages=t1, mask=t2 > 0, old_logprobs=t2, ref_logprobs=t2, beta=0.1,
                          max_completion_length=8, entropy=t2, sampling_logprobs=t2),
    }


# None is a valid value (the default) of these
_OPTIONAL = {"mask", "last_values", "old_logprobs", "ref_logprobs", "entropy", "sampling_logprobs", "dual_clip",
             "clip_range_high", "clip_range_value",
             "max_completion_length"}
_BAD = {"str": "x", "None": None, "object": object(), "list": [1.0] * B}
CASES = [(fn, arg, bad) for fn, kw in _calls().items() for arg in kw for bad in _BAD
         if not (bad == "None" and arg in _OPTIONAL)]


@pytest.mark.parametrize("fn, arg, bad", CASES, ids=[f"{fn}.{arg}={bad}" for fn, arg, bad in CASES])
def test_an_argument_of_the_wrong_kind_is_a_type_error_naming_it(fn, arg, bad):
    kw = _calls()[fn]
    getattr(reward, fn)(**kw)  # the call itself is fine
    with pytest.raises(TypeError, match=arg):
        getattr(reward, fn)(**dict(kw, **{arg: _BAD[bad]}))


def test_numbers_out_of_range_stay_value_errors():
    t1, t2 = torch.randn(B, dtype=D), torch.randn(B, S, dtype=D)
    for call in (lambda: reward.gae(t2, t2, gamma=1.5), lambda: reward.ppo_policy_loss(t2, t2, t1, clip_range=0),
                 lambda: reward.ppo_policy_loss(t2, t2, t1, dual_clip=0.5),
                 lambda: reward.ppo_value_loss(t2, t2, t2, clip_range_value=-1.0),
                 lambda: reward.group_advantages(t1, 2.5), lambda: reward.rloo_advantages(t1, 1),
                 lambda: reward.grpo_loss(t2, t1, max_completion_length=0),
                 lambda: reward.kl_penalty(t2, t2, mask=torch.ones(B, S + 1))):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
def test_dr_grpo_on_a_batch_of_width_zero_is_zero(importance_sampling_level):
    """With no max_completion_length, dr_grpo divides by the batch's width: a width of 0 (no completion token)
    was refused as "max_completion_length must be a positive int, got None", an argument nobody passed; every
    other loss type gives 0 there."""
    lp = torch.zeros(2, 0, dtype=D, requires_grad=True)
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        loss, _ = reward.grpo_loss(lp, torch.randn(2, dtype=D), loss_type=loss_type,
                                   importance_sampling_level=importance_sampling_level)
        assert loss.item() == 0.0
        loss.backward()

