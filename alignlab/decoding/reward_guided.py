"""Reward-guided decoding (ARGS): add a weighted reward of each candidate token to its logit.

From "ARGS: Alignment as Reward-Guided Search" (Khanov et al., 2024,
arXiv:2402.01694). At each step, for the top-:math:`k` tokens :math:`v` of
the language model,

.. math::

    s(v) = z(v \\mid x) + w \\cdot r([x, v]), \\qquad s(v) = -\\infty \\text{ outside the top-}k

where :math:`z` is the model's logit (log-probs give the same ranking and the
same softmax), :math:`r` a reward model scoring the prefix extended by
:math:`v`, and :math:`w` the weight. Greedy decoding over :math:`s` is
ARGS-greedy, sampling from :math:`\\mathrm{softmax}(s)` ARGS-stochastic. Cost:
:math:`k` reward evaluations of ``(seq + 1)`` tokens per step and sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from alignlab.eval.reward import reward_scores

__all__ = ["RewardGuidedLogitsProcessor", "reward_guided_logits", "reward_model_fn"]


def reward_guided_logits(
    logits: torch.Tensor, candidate_ids: torch.Tensor, candidate_rewards: torch.Tensor, *, weight: float
) -> torch.Tensor:
    """ARGS scores from one step.

    Args:
        logits: ``(batch, vocab)``.
        candidate_ids: ``(batch, k)`` token ids to keep.
        candidate_rewards: ``(batch, k)`` reward of the prefix extended by each candidate.
        weight: reward weight :math:`w`.

    Returns:
        float32 ``(batch, vocab)``: ``logit + weight * reward`` at the
        candidates, ``-inf`` elsewhere.

    Raises:
        ValueError: shapes do not line up.
    """
    if logits.dim() != 2 or candidate_ids.shape != candidate_rewards.shape or candidate_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            "logits/candidate_ids/candidate_rewards: expected (batch, vocab), (batch, k), (batch, k); got "
            f"{tuple(logits.shape)}, {tuple(candidate_ids.shape)}, {tuple(candidate_rewards.shape)}"
        )
    logits = logits.float()
    picked = logits.gather(1, candidate_ids) + weight * candidate_rewards.to(logits.device).float()
    return torch.full_like(logits, float("-inf")).scatter(1, candidate_ids, picked)


def reward_model_fn(
    model: nn.Module | Callable[..., torch.Tensor], *, pad_token_id: int | None = None, batch_size: int = 32
) -> Callable[[torch.LongTensor], torch.Tensor]:
    """Wrap a reward model as ``reward_fn(input_ids (n, seq)) -> (n,)`` for :class:`RewardGuidedLogitsProcessor`.

    Leading ``pad_token_id`` tokens (left padding of batched prompts) are
    dropped before scoring; scoring goes through
    :func:`alignlab.eval.reward_scores` (right padding, batches of
    ``batch_size``). The reward model must share the policy's tokenizer.
    """

    def reward_fn(input_ids: torch.LongTensor) -> torch.Tensor:
        rows = []
        for row in input_ids:
            if pad_token_id is not None:
                real = (row != pad_token_id).nonzero()
                row = row[int(real[0]) :] if real.numel() else row[-1:]
            rows.append(row)
        return reward_scores(model, rows, pad_token_id=pad_token_id, batch_size=batch_size)

    return reward_fn


class RewardGuidedLogitsProcessor:
    """HF logits processor for ARGS.

    Args:
        reward_fn: maps ``(n, seq + 1)`` candidate sequences (prefix + one
            candidate token) to ``(n,)`` rewards; see :func:`reward_model_fn`.
        weight: reward weight :math:`w` (>= 0; 0 = plain top-k of the model).
        top_k: candidates per step (>= 1).

    ``__call__(input_ids (batch, seq), scores (batch, vocab)) -> (batch, vocab)``.
    """

    def __init__(self, reward_fn: Callable[[torch.LongTensor], torch.Tensor], *, weight: float = 1.0, top_k: int = 10):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
        if weight < 0:
            raise ValueError(f"weight: expected >= 0, got {weight!r}")
        self.reward_fn = reward_fn
        self.weight = weight
        self.top_k = top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, vocab = scores.shape
        k = min(self.top_k, vocab)
        candidates = scores.topk(k, dim=-1).indices  # (batch, k)
        extended = torch.cat([input_ids.repeat_interleave(k, 0), candidates.reshape(-1, 1)], 1)
        rewards = torch.as_tensor(self.reward_fn(extended), dtype=torch.float32)
        if rewards.shape != (batch * k,):
            raise ValueError(f"reward_fn: expected {batch * k} rewards, got shape {tuple(rewards.shape)}")
        return reward_guided_logits(scores, candidates, rewards.view(batch, k), weight=self.weight).to(scores.dtype)
