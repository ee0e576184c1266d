"""Proxy-tuning: steer a large base model with the logit difference of a small tuned/untuned pair.

From "Tuning Language Models by Proxy" (Liu et al., 2024, arXiv:2401.08565).
With a large base model :math:`M`, a small tuned expert :math:`M^+` and its
untuned version, the anti-expert :math:`M^-` (same vocabulary),

.. math::

    s(v) = \\log p_M(v \\mid x) + \\alpha\\,\\big(\\log p_{M^+}(v \\mid x) - \\log p_{M^-}(v \\mid x)\\big),
    \\qquad p(v \\mid x) \\propto p_M(v \\mid x) \\Big(\\frac{p_{M^+}(v \\mid x)}{p_{M^-}(v \\mid x)}\\Big)^{\\alpha}

The paper writes the sum on logits; log-probabilities differ from logits by
a per-row constant, so after the softmax both give the same distribution
(log-probs keep the numbers in a sane range). :math:`\\alpha = 1` is the
paper's setting; it is also the general "logit arithmetic" of combining models.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from alignlab.decoding.companion import CompanionLM, check_logits, common_vocab, pad_vocab

__all__ = ["ProxyTuningLogitsProcessor", "proxy_tuning_logits"]


def _check_alpha(alpha: float) -> float:
    # numbers.Real admits NumPy scalars (np.float32 is no float subclass); a bool is no strength
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha: expected a real number (the steering strength), got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite steering strength, got {alpha!r}")
    return float(alpha)


def proxy_tuning_logits(
    base_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    antiexpert_logits: torch.Tensor,
    *,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Proxy-tuned scores ``log p_base + alpha * (log p_expert - log p_antiexpert)``.

    Args:
        base_logits: ``(batch, vocab)`` (any leading shape) of the large base model.
        expert_logits: same leading shape, the small tuned model.
        antiexpert_logits: same leading shape, the small untuned model.
        alpha: strength of the steering (0 = base model alone).

    Returns:
        float32 scores with the shape of ``base_logits``. When the vocabulary
        sizes differ (embedding padding), only the shared ids are scored; the
        rest get ``-inf``. A token the base rules out (``-inf``, e.g. banned by a logits processor) stays
        ``-inf``; where both small models rule a token out, the steering term is 0 (``-inf - -inf``, which
        would be NaN, and which ``argmax`` picks as the largest score).

    Raises:
        ValueError: leading shapes differ, or ``alpha`` is NaN or infinite.
        TypeError: ``alpha`` is not a real number, or logits that are not floating-point tensors.
    """
    alpha = _check_alpha(alpha)
    check_logits(base_logits=base_logits, expert_logits=expert_logits, antiexpert_logits=antiexpert_logits)
    if not (base_logits.shape[:-1] == expert_logits.shape[:-1] == antiexpert_logits.shape[:-1]):
        raise ValueError(
            "base_logits/expert_logits/antiexpert_logits: leading shapes differ: "
            f"{tuple(base_logits.shape)}, {tuple(expert_logits.shape)}, {tuple(antiexpert_logits.shape)}"
        )
    vocab = base_logits.shape[-1]
    logps = [torch.log_softmax(t.float(), -1) for t in (base_logits, expert_logits, antiexpert_logits)]
    (base, expert, anti), _ = common_vocab(*logps)
    steer = expert - anti
    steer = torch.where(torch.isnan(steer), 0.0, steer)  # both small models at -inf: no steering
    scores = base + alpha * steer if alpha != 0.0 else base  # (0 · inf is NaN)
    return pad_vocab(torch.where(base == float("-inf"), base, scores), vocab)


class ProxyTuningLogitsProcessor:
    """HF logits processor: the generating model is the large base, steered by ``expert - antiexpert``.

    Args:
        expert: small tuned causal LM.
        antiexpert: the same small model before tuning.
        alpha: steering strength, a finite real number (``ValueError``/``TypeError`` otherwise).
        pad_token_id: the left-padding id of batched prompts.

    ``__call__(input_ids (batch, seq), scores (batch, vocab)) -> (batch, vocab)``.
    Raises ``ValueError`` when ``input_ids`` hold an id beyond the expert's or the
    anti-expert's vocabulary (a prompt token a smaller model cannot embed).
    Place it first among custom processors; ``generate`` applies its own logits
    processors (repetition penalty, ...) before custom ones and its sampling
    warpers (temperature, top-k, ...) after them, on the proxy-tuned scores.
    """

    def __init__(
        self, expert: nn.Module, antiexpert: nn.Module, *, alpha: float = 1.0, pad_token_id: int | None = None
    ) -> None:
        self.alpha = _check_alpha(alpha)
        self.expert = CompanionLM(expert, pad_token_id=pad_token_id, name="expert")
        self.antiexpert = CompanionLM(antiexpert, pad_token_id=pad_token_id, name="antiexpert")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return proxy_tuning_logits(
            scores, self.expert(input_ids), self.antiexpert(input_ids), alpha=self.alpha
        ).to(scores.dtype)
