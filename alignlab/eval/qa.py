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
otherwise. Scores are in ``[0, 1]``; the SQuAD scripts report them times 100.

Unanswerable questions follow the v2.0 script ("Know What You Don't Know:
Unanswerable Questions for SQuAD", arXiv:1806.03822): references that
normalise to nothing are dropped, and when none is left (an empty list, as
SQuAD v2.0 gives for an unanswerable question, or only ``""``/``"the"``) the
gold answer is ``""``. An empty prediction then scores EM = F1 = 1 and any
other prediction 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

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


def _check_prediction(prediction, arg: str) -> str:
    if not isinstance(prediction, str):
        raise ArgumentTypeError(f"{arg}: expected str, got {type(prediction).__name__}")
    return prediction


def _gold_answers(references, arg: str, *, allow_empty: bool) -> list[str]:
    """The v2.0 script's gold list: the references that normalise to something, else ``[""]``."""
    # a dict (a HF `answers` column entry) iterates over its keys: "text", "answer_start" would be the references
    if isinstance(references, Mapping) or not isinstance(references, (str, Iterable)):
        raise ArgumentTypeError(
            f"{arg}: expected a string or a sequence of strings, got {type(references).__name__}"
            + (" (pass answers['text'])" if isinstance(references, Mapping) else "")
        )
    refs = [references] if isinstance(references, str) else list(references)
    for r in refs:
        if not isinstance(r, str):
            raise ArgumentTypeError(f"{arg}: expected strings, got an entry of type {type(r).__name__}")
    if not refs and not allow_empty:
        # one example's helper has no "unanswerable" convention of its own; squad_scores follows the v2.0 script
        raise ValueError(f'{arg}: expected at least one reference (an unanswerable question is [""], or use '
                         "squad_scores, which reads [] as one)")
    return [r for r in refs if normalize_answer(r)] or [""]


def _f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _exact(prediction: str, golds: list[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    References that normalise to nothing are dropped; if none is left the gold answer is ``""`` (SQuAD v2.0).

    Raises:
        TypeError: ``prediction`` is not a str, or ``references`` is not a string or a sequence of strings.
        ValueError: ``references`` is empty (pass ``[""]`` for an unanswerable question).
    """
    golds = _gold_answers(references, "references", allow_empty=False)
    return _exact(_check_prediction(prediction, "prediction"), golds)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 of the prediction against the references.

    References are filtered as in :func:`exact_match`; raises as it does.
    """
    golds = _gold_answers(references, "references", allow_empty=False)
    return max(_f1(_check_prediction(prediction, "prediction"), g) for g in golds)


def squad_scores(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Mean exact match and F1 over a dataset, as the official SQuAD v2.0 evaluation script computes them.

    Args:
        predictions: one string per example; ``""`` means "no answer".
        references: per example, one string or a sequence of accepted strings; an empty sequence marks an
            unanswerable question (SQuAD v2.0's ``answers["text"] == []``): only an empty prediction scores
            there, EM = F1 = 1.

    Returns:
        ``{"exact_match": ..., "f1": ...}`` in ``[0, 1]``.

    Raises:
        ValueError: lengths differ or the dataset is empty.
        TypeError: ``predictions`` or ``references`` is a bare string; ``predictions[i]`` is not a str;
            ``references[i]`` is not a string or a sequence of strings (a dict such as a HF ``answers`` entry
            is refused: pass its ``"text"`` list).
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
    em = f1 = 0.0
    for i, (p, r) in enumerate(zip(predictions, references)):
        p = _check_prediction(p, f"predictions[{i}]")
        golds = _gold_answers(r, f"references[{i}]", allow_empty=True)
        em += _exact(p, golds)
        f1 += max(_f1(p, g) for g in golds)
    return {"exact_match": em / len(predictions), "f1": f1 / len(predictions)}
