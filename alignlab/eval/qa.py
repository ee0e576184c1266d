"""Exact match and token F1 with SQuAD answer normalisation.

Normalisation (as in the official SQuAD v1.1/v2.0 evaluation scripts of
"SQuAD: 100,000+ Questions for Machine Comprehension of Text",
arXiv:1606.05250): lower-case, drop ASCII punctuation, drop the articles
*a/an/the*, collapse whitespace.

For a prediction :math:`p` and a reference :math:`g` with normalised token
bags :math:`P, G`:

.. math::

    \\mathrm{EM} = [\\mathrm{norm}(p) = \\mathrm{norm}(g)], \\qquad
    \\mathrm{F1} = \\frac{2\\,\\mathrm{prec}\\cdot\\mathrm{rec}}{\\mathrm{prec}+\\mathrm{rec}},\\;
    \\mathrm{prec} = \\frac{|P \\cap G|}{|P|},\\; \\mathrm{rec} = \\frac{|P \\cap G|}{|G|}

(bag intersection counts repeats). With several references the best score is
taken. When either side normalises to no tokens, F1 is 1 if both do and 0
otherwise (the v2.0 rule for unanswerable questions). Scores are in
``[0, 1]``; the SQuAD scripts report them times 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from alignlab._checks import ArgumentTypeError

__all__ = ["exact_match", "normalize_answer", "squad_scores", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace (SQuAD)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        kind = ArgumentTypeError if refs else ValueError  # a reference that is no string is the wrong kind
        raise kind("references: expected a string or a non-empty sequence of strings")
    return refs


def _f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(r) for r in _references(references)))


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 of the prediction against the references."""
    return max(_f1(prediction, r) for r in _references(references))


def squad_scores(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Mean exact match and F1 over a dataset.

    Args:
        predictions: one string per example.
        references: per example, one string or a sequence of accepted strings.

    Returns:
        ``{"exact_match": ..., "f1": ...}`` in ``[0, 1]``.

    Raises:
        ValueError: lengths differ or the dataset is empty.
        TypeError: ``predictions`` or ``references`` is a bare string.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        # a bare string is a sequence of characters: "ab" vs "ab" would score two one-letter examples
        raise TypeError("predictions/references: expected sequences (one entry per example), got a bare string")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions/references: expected equal lengths, got {len(predictions)} and {len(references)}"
        )
    if len(predictions) == 0:  # len: a NumPy array or pandas column has no truth value
        raise ValueError("predictions: expected at least one example")
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references))
    return {"exact_match": em / len(predictions), "f1": f1 / len(predictions)}
