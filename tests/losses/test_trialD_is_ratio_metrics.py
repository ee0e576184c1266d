"""The sampler importance-weight metrics of ``grpo_loss`` (and so of ``fused_linear_grpo``) against TRL's
definition. TRL builds these weights and their statistics inside ``GRPOTrainer._generate_and_score_completions``
(no callable of its own), so its formula is written out here: in the ``sequence_*`` modes the weight is one
number per sequence, and min/mean/max run over those numbers. alignlab's mean used to be a token mean of the
broadcast weight, i.e. each sequence's weight counted once per completion token."""

import math

import pytest
import torch

from alignlab.losses.fused_rl import fused_linear_grpo
from alignlab.losses.reward import grpo_loss

D = torch.float64
NAMES = ("min", "mean", "max")


def _inputs(lengths, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    mask = torch.arange(t).expand(n, t) < torch.tensor(lengths).unsqueeze(1)
    lp = -torch.rand(n, t, generator=g, dtype=D)
    old = lp + 0.1 * torch.randn(n, t, generator=g, dtype=D)
    samp = old + 0.5 * torch.randn(n, t, generator=g, dtype=D)
    adv = torch.randn(n, generator=g, dtype=D)
    return lp, old, samp, adv, mask


def _trl_is_stats(old, samp, mask, mode, cap):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions: the vLLM importance-sampling ratio and its logged
    min / mean / max (``flat_is_ratio``)."""
    diff = torch.nan_to_num((old - samp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    ratio = ratio.clamp(max=cap) if mode.endswith("truncate") else ratio.masked_fill(ratio > cap, 0.0)
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask]
    return flat.min(), flat.mean(), flat.max()


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask", "token_truncate", "token_mask"])
def test_importance_sampling_metrics_match_trl(mode):
    lp, old, samp, adv, mask = _inputs([5, 1, 3, 2])  # uneven lengths: a token mean weighs sequences unevenly
    _, metrics = grpo_loss(lp, adv, mask, old, sampling_logprobs=samp, is_mode=mode, is_max=1.3)
    want = _trl_is_stats(old, samp, mask, mode, 1.3)
    for name, w in zip(NAMES, want):
        torch.testing.assert_close(metrics[f"sampling/importance_sampling_ratio/{name}"], w, msg=name)


def test_sequence_mode_metrics_skip_a_sequence_without_tokens():
    # a row with no completion token has no weight to report (TRL would log exp(0) = 1 for it)
    lp, old, samp, adv, mask = _inputs([5, 0, 3, 2])
    _, metrics = grpo_loss(lp, adv, mask, old, sampling_logprobs=samp, is_mode="sequence_truncate", is_max=None)
    keep = mask.any(dim=1)
    want = _trl_is_stats(old[keep], samp[keep], mask[keep], "sequence_truncate", float("inf"))
    for name, w in zip(NAMES, want):
        torch.testing.assert_close(metrics[f"sampling/importance_sampling_ratio/{name}"], w, msg=name)


def test_fused_grpo_reports_the_same_sequence_mode_metrics():
    g = torch.Generator().manual_seed(1)
    lengths, t, h, v = [4, 1, 3], 4, 6, 11
    n = len(lengths)
    mask = torch.arange(t).expand(n, t) < torch.tensor(lengths).unsqueeze(1)
    hidden = torch.randn(n, t, h, generator=g, dtype=D)
    weight = torch.randn(v, h, generator=g, dtype=D)
    ids = torch.randint(0, v, (n, t), generator=g)
    lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.1 * torch.randn(n, t, generator=g, dtype=D)
    samp = old + 0.5 * torch.randn(n, t, generator=g, dtype=D)
    adv = torch.randn(n, generator=g, dtype=D)
    _, metrics = fused_linear_grpo(hidden, weight, ids, adv, mask, old_logprobs=old, sampling_logprobs=samp,
                                   is_mode="sequence_mask", is_max=2.0)
    want = _trl_is_stats(old, samp, mask, "sequence_mask", 2.0)
    for name, w in zip(NAMES, want):
        torch.testing.assert_close(metrics[f"sampling/importance_sampling_ratio/{name}"], w, msg=name)



@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask", "token_truncate", "token_mask"])
def test_a_nan_sampler_logprob_drops_its_token_or_sequence(mode):
    """A NaN sampler log-prob at an unmasked token gives its token (sequence modes: its sequence) weight 0 -- the
    ratio is unknown -- where TRL's ``nan_to_num`` of the log-ratio gave weight 1, as if sampler and policy agreed
    (``fused_linear_grpo`` takes the same weights). The loss is the formula over the other tokens."""
    lp, old, samp, adv, mask = _inputs([5, 4], seed=3)
    samp = samp.clone()
    samp[0, 1] = float("nan")
    samp[1, 4] = float("nan")  # masked: no effect
    cap = 2.0
    diff = torch.where(mask, old - samp, torch.zeros((), dtype=D))
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True)
    w = torch.exp(diff)
    w = w.clamp(max=cap) if mode.endswith("truncate") else w.masked_fill(w > cap, 0.0)
    w = torch.nan_to_num(w, nan=0.0)  # the NaN token's (or sequence's) weight, and only it, is 0
    assert (w[0] == 0).all() if mode.startswith("sequence") else (w[0, 1] == 0 and w[1].isfinite().all())
    got = grpo_loss(lp, adv, mask, old_logprobs=old, sampling_logprobs=samp, is_mode=mode, is_max=cap,
                    loss_type="bnpo")
    ratio = torch.exp(lp - old)
    per = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * w
    want = (per * mask).sum() / mask.sum()
    torch.testing.assert_close(got[0], want)


def test_equal_infinite_logprobs_give_weight_one():
    from alignlab.losses.reward import is_weights

    old = torch.tensor([[-float("inf"), -1.0, -2.0]], dtype=D)
    samp = torch.tensor([[-float("inf"), -1.5, -float("inf")]], dtype=D)
    w = is_weights(old, samp, torch.ones_like(old, dtype=torch.bool), "token_truncate", None, None)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), float("inf")]], dtype=D))
