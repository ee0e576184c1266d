"""Contrastive decoding: expert log-probs minus amateur log-probs, among plausible tokens.

From "Contrastive Decoding: Open-ended Text Generation as Optimization"
(Li et al., 2023, arXiv:2210.15097). With expert :math:`p_E` (large model)
and amateur :math:`p_A` (small model) over the same vocabulary,

.. math::

    \\mathcal{V}_{head} = \\{v : p_E(v \\mid x) \\ge \\alpha \\max_w p_E(w \\mid x)\\}, \\qquad
    s(v) = \\begin{cases}
        \\log p_E(v \\mid x) - \\log p_A(v \\mid x) & v \\in \\mathcal{V}_{head} \\\\
        -\\infty & \\text{otherwise}
    \\end{cases}

The plausibility constraint keeps the amateur's low probabilities from
promoting implausible tokens. The amateur's logits may be divided by a
temperature :math:`\\tau` first (the paper uses :math:`\\tau \\in [0.5, 1]`).
Decode greedily (or with beam search) over :math:`s`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from alignlab.decoding.companion import CompanionLM, check_logits, common_vocab, pad_vocab

__all__ = ["ContrastiveDecodingLogitsProcessor", "contrastive_logits"]


def _check_real(value, name: str) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is a real number (NumPy scalars are; bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")


def _check_alpha(alpha: float) -> None:
    _check_real(alpha, "alpha")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha: expected a plausibility threshold in (0, 1], got {alpha!r}")


def _check_temperature(amateur_temperature: float) -> None:
    _check_real(amateur_temperature, "amateur_temperature")
    if not amateur_temperature > 0:
        raise ValueError(f"amateur_temperature: expected > 0, got {amateur_temperature!r}")


def contrastive_logits(
    expert_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    amateur_temperature: float = 1.0,
) -> torch.Tensor:
    """Contrastive-decoding scores from one step of logits.

    Args:
        expert_logits: ``(batch, vocab)`` (any leading shape) logits of the expert.
        amateur_logits: logits of the amateur, same leading shape. When the
            vocabulary sizes differ (embedding padding), only the shared ids
            are scored; the rest get ``-inf``.
        alpha: plausibility threshold in ``(0, 1]``; 1 keeps only the expert's
            argmax.
        amateur_temperature: divides the amateur logits (> 0).

    Returns:
        float32 scores, ``-inf`` outside the plausible set; the shape of
        ``expert_logits``.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1]``, ``amateur_temperature <= 0`` (or NaN), or leading shapes differ.
        TypeError: ``alpha`` or ``amateur_temperature`` is not a real number (a bool is not), or logits that are
            not floating-point tensors.
    """
    _check_alpha(alpha)
    _check_temperature(amateur_temperature)
    check_logits(expert_logits=expert_logits, amateur_logits=amateur_logits)
    if expert_logits.shape[:-1] != amateur_logits.shape[:-1]:
        raise ValueError(
            f"expert_logits/amateur_logits: leading shapes differ: {tuple(expert_logits.shape)} vs "
            f"{tuple(amateur_logits.shape)}"
        )
    vocab = expert_logits.shape[-1]
    expert_lp = torch.log_softmax(expert_logits.float(), -1)
    amateur_lp = torch.log_softmax(amateur_logits.float() / amateur_temperature, -1)
    # Vocabularies padded to different sizes: compare on the shared ids only.
    (expert_lp, amateur_lp), _ = common_vocab(expert_lp, amateur_lp)
    # p >= alpha * max p, compared in log space
    plausible = expert_lp >= expert_lp.max(-1, keepdim=True).values + math.log(alpha)
    scores = torch.where(plausible, expert_lp - amateur_lp, torch.full_like(expert_lp, float("-inf")))
    return pad_vocab(scores, vocab)


class ContrastiveDecodingLogitsProcessor:
    """HF logits processor: the generating model is the expert, ``amateur`` a smaller LM.

    Use as ``model.generate(..., logits_processor=LogitsProcessorList([proc]))``,
    greedy or beam search as in the paper. ``generate`` runs its own logits
    processors (repetition penalty, ...) *before* custom ones and its sampling
    warpers (temperature, top-k, ...) *after* them, so with sampling those act
    on the contrastive scores.

    Args:
        amateur: causal LM sharing the expert's tokenizer.
        alpha: plausibility threshold in ``(0, 1]``.
        amateur_temperature: divides the amateur logits.
        pad_token_id: the left-padding id of batched prompts (see
            :class:`~alignlab.decoding.companion.CompanionLM`).

    ``__call__(input_ids (batch, seq), scores (batch, vocab)) -> (batch, vocab)``.
    Raises ``ValueError`` when ``input_ids`` hold an id beyond the amateur's
    vocabulary (a prompt token a smaller amateur cannot embed); the check reads
    the largest id back from the device, one sync per step.
    """

    def __init__(
        self,
        amateur: nn.Module,
        *,
        alpha: float = 0.1,
        amateur_temperature: float = 1.0,
        pad_token_id: int | None = None,
    ) -> None:
        _check_alpha(alpha)
        _check_temperature(amateur_temperature)
        self.amateur = CompanionLM(amateur, pad_token_id=pad_token_id, name="amateur")
        self.amateur_vocab = self.amateur.vocab_size
        self.alpha = alpha
        self.amateur_temperature = amateur_temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        amateur_logits = self.amateur(input_ids)
        return contrastive_logits(
            scores, amateur_logits, alpha=self.alpha, amateur_temperature=self.amateur_temperature
        ).to(scores.dtype)
