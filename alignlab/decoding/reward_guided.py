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

A NaN reward never wins: with ``nan="lose"`` (default) that candidate gets
:math:`s(v) = -\\infty`; if all :math:`k` rewards of a row are NaN the row
keeps the plain top-:math:`k` logits (the reward says nothing there) and a
``RuntimeWarning`` is issued; ``nan="raise"`` raises ``ValueError`` instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from alignlab._checks import check_count, check_token_id, is_real
from alignlab.eval.reward import _text_config, reward_scores

__all__ = ["RewardGuidedLogitsProcessor", "reward_guided_logits", "reward_model_fn"]


def _check_weight(weight, expected: str, minimum: float | None = None) -> None:
    """``TypeError`` naming ``weight`` unless it is a real number (a bool, a str or None is not), ``ValueError``
    unless it is finite (and >= ``minimum``)."""
    if not is_real(weight):
        raise TypeError(f"weight: expected {expected}, got {weight!r}")
    if not math.isfinite(weight) or (minimum is not None and weight < minimum):
        raise ValueError(f"weight: expected {expected}, got {weight!r}")


def reward_guided_logits(
    logits: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_rewards: torch.Tensor,
    *,
    weight: float,
    nan: Literal["lose", "raise"] = "lose",
) -> torch.Tensor:
    """ARGS scores from one step.

    Args:
        logits: ``(batch, vocab)``.
        candidate_ids: ``(batch, k)`` token ids to keep.
        candidate_rewards: ``(batch, k)`` reward of the prefix extended by each candidate.
        weight: reward weight :math:`w`, a finite real number (0 ignores the rewards, NaN included).
        nan: ``"lose"``: a NaN reward makes its candidate ``-inf`` (a row of
            only NaN rewards keeps its plain logits, with a ``RuntimeWarning``);
            ``"raise"``: a NaN reward is a ``ValueError``.

    Returns:
        float32 ``(batch, vocab)``: ``logit + weight * reward`` at the
        candidates, ``-inf`` elsewhere.

    Raises:
        ValueError: shapes do not line up, a candidate id outside the vocabulary, a NaN reward with
            ``nan="raise"``, an unknown ``nan``, or a NaN or infinite ``weight``.
        TypeError: a ``weight`` that is no real number (a str, None, a bool); ``candidate_ids`` not an integer
            tensor.
    """
    if nan not in ("lose", "raise"):
        raise ValueError(f"nan: expected 'lose' or 'raise', got {nan!r}")
    _check_weight(weight, "a finite number")
    if not isinstance(candidate_ids, torch.Tensor) or candidate_ids.dtype not in (torch.int64, torch.int32,
                                                                                 torch.int16, torch.uint8):
        got = candidate_ids.dtype if isinstance(candidate_ids, torch.Tensor) else type(candidate_ids).__name__
        raise TypeError(f"candidate_ids must be an integer tensor of token ids, got {got}")
    if logits.dim() != 2 or candidate_ids.shape != candidate_rewards.shape or candidate_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            "logits/candidate_ids/candidate_rewards: expected (batch, vocab), (batch, k), (batch, k); got "
            f"{tuple(logits.shape)}, {tuple(candidate_ids.shape)}, {tuple(candidate_rewards.shape)}"
        )
    candidate_ids = candidate_ids.long()
    if candidate_ids.numel() and bool(((candidate_ids < 0) | (candidate_ids >= logits.shape[1])).any()):
        raise ValueError(f"candidate_ids must be token ids in [0, {logits.shape[1]}) (the vocabulary of logits), "
                         f"got values in [{int(candidate_ids.min())}, {int(candidate_ids.max())}]")
    logits = logits.float()
    picked = logits.gather(1, candidate_ids)
    if weight != 0:
        rewards = candidate_rewards.to(logits.device).float()
        is_nan = rewards.isnan()
        if is_nan.any():
            if nan == "raise":
                rows = is_nan.any(1).nonzero().flatten().tolist()
                raise ValueError(f"candidate_rewards: NaN rewards in row(s) {rows}")
            hopeless = is_nan.all(1, keepdim=True)
            if hopeless.any():
                warnings.warn(
                    f"candidate_rewards: every reward of row(s) {hopeless.flatten().nonzero().flatten().tolist()} "
                    "is NaN; those rows keep the plain top-k logits",
                    RuntimeWarning,
                    stacklevel=2,
                )
            rewards = rewards.masked_fill(is_nan, 0.0)
            picked = picked.masked_fill(is_nan & ~hopeless, float("-inf"))
        picked = picked + weight * rewards
    return torch.full_like(logits, float("-inf")).scatter(1, candidate_ids, picked)


def _eos_ids(eos_token_id) -> frozenset[int]:
    """``eos_token_id`` (None, an id, or a sequence of ids) as a set of ids; ``ValueError`` otherwise."""
    if eos_token_id is None:
        return frozenset()
    ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
    for i in ids:
        check_token_id(i, "eos_token_id")
    return frozenset(int(i) for i in ids)


def reward_model_fn(
    model: nn.Module | Callable[..., torch.Tensor],
    *,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 32,
) -> Callable[[torch.LongTensor], torch.Tensor]:
    """Wrap a reward model as ``reward_fn(input_ids (n, seq)) -> (n,)`` for :class:`RewardGuidedLogitsProcessor`.

    Each row is scored as the sequence it stands for: the leading ``pad_token_id``
    tokens (left padding of batched prompts, the id given to ``generate``) are
    dropped, and so is the trailing run of them (``generate`` fills a row that
    has finished with that id up to the batch's longest row), except that one is
    kept when ``pad_token_id`` is itself an end-of-sequence id and no other eos
    precedes the run (that one is then the eos that ended the row). ``eos_token_id`` (an id or a list of ids) defaults
    to the reward model's ``config.eos_token_id``: the reward model shares the
    policy's tokenizer.

    Scoring goes through :func:`alignlab.eval.reward_scores` (right padding,
    batches of ``batch_size``) with the reward model's own
    ``config.pad_token_id`` as the right-padding id (``pad_token_id`` only when
    it has none): HF sequence classifiers find the last real token through their
    own id, and one that has none is lent one for each batched call. Raises
    ``ValueError`` for a ``pad_token_id`` that is neither ``None`` nor a
    non-negative int, an ``eos_token_id`` that is not one or a list of them, or a
    number ``batch_size`` that is not an int >= 1, and ``TypeError`` for one that
    is no number (a str, None, a bool); both checked here, before any step.
    """
    # 1.5 matched no token: the prompts' left padding was scored by the reward model
    check_token_id(pad_token_id, "pad_token_id", allow_none=True)
    batch_size = check_count(batch_size, "batch_size")
    config = getattr(model, "config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    eos_ids = _eos_ids(eos_token_id)
    # pad == eos: the first of a finished row's trailing pads is the eos it generated (unless another eos ended it)
    pad_ends_rows = pad_token_id is not None and pad_token_id in eos_ids
    # the id an HF classifier finds each row's last real token through; reward_scores lends one to a model without
    own_pad = getattr(_text_config(model), "pad_token_id", None)
    right_pad = own_pad if own_pad is not None else pad_token_id

    def reward_fn(input_ids: torch.LongTensor) -> torch.Tensor:
        rows = []
        for row in input_ids:
            if pad_token_id is not None:
                real = (row != pad_token_id).nonzero()
                if real.numel():
                    end = int(real[-1]) + 1
                    if pad_ends_rows and end < row.numel() and int(row[end - 1]) not in eos_ids:
                        end += 1
                    row = row[int(real[0]) : end]
                else:
                    row = row[-1:]
            rows.append(row)
        return reward_scores(model, rows, pad_token_id=right_pad, batch_size=batch_size)

    return reward_fn


class RewardGuidedLogitsProcessor:
    """HF logits processor for ARGS.

    Args:
        reward_fn: maps ``(n, seq + 1)`` candidate sequences (prefix + one
            candidate token) to ``(n,)`` rewards; see :func:`reward_model_fn`.
        weight: reward weight :math:`w` (finite, >= 0; 0 = plain top-k of the model).
        top_k: candidates per step (>= 1).
        nan: what a NaN reward does, as in :func:`reward_guided_logits`
            (``"lose"`` or ``"raise"``).

    ``__call__(input_ids (batch, seq), scores (batch, vocab)) -> (batch, vocab)``.
    """

    def __init__(
        self,
        reward_fn: Callable[[torch.LongTensor], torch.Tensor],
        *,
        weight: float = 1.0,
        top_k: int = 10,
        nan: Literal["lose", "raise"] = "lose",
    ):
        if not callable(reward_fn):
            raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
        top_k = check_count(top_k, "top_k")  # NumPy ints too; a bool is no count
        _check_weight(weight, "a finite number >= 0", minimum=0)
        if nan not in ("lose", "raise"):
            raise ValueError(f"nan: expected 'lose' or 'raise', got {nan!r}")
        self.reward_fn = reward_fn
        self.weight = weight
        self.top_k = top_k
        self.nan = nan

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, vocab = scores.shape
        k = min(self.top_k, vocab)
        candidates = scores.topk(k, dim=-1).indices  # (batch, k)
        extended = torch.cat([input_ids.repeat_interleave(k, 0), candidates.reshape(-1, 1)], 1)
        rewards = torch.as_tensor(self.reward_fn(extended), dtype=torch.float32)
        if rewards.shape != (batch * k,):
            raise ValueError(f"reward_fn: expected {batch * k} rewards, got shape {tuple(rewards.shape)}")
        out = reward_guided_logits(scores, candidates, rewards.view(batch, k), weight=self.weight, nan=self.nan)
        return out.to(scores.dtype)
