"""N-gram overlap metrics: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score).

These are thin, uniform wrappers: the maintained libraries own the metric
definitions (tokenisation, smoothing, stemming), so scores are comparable
with published numbers. Both libraries are the optional ``eval`` extra
(``pip install alignlab[eval]``) and are imported only when called.

- BLEU: "BLEU: a Method for Automatic Evaluation of Machine Translation"
  (Papineni et al., 2002), via "A Call for Clarity in Reporting BLEU Scores"
  (Post, 2018, arXiv:1804.08771). Corpus level, 0-100,
  :math:`\\mathrm{BP}\\cdot\\exp(\\tfrac14\\sum_{n=1}^4 \\log p_n)`.
- chrF: "chrF: character n-gram F-score for automatic MT evaluation"
  (Popović, 2015). Corpus level, 0-100, character 6-grams, :math:`\\beta=2`.
- ROUGE: "ROUGE: A Package for Automatic Evaluation of Summaries" (Lin, 2004).
  Per-example F-measure (best over references), averaged; 0-1.

References are given per prediction: one string or a sequence of strings
(any number per example).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bleu", "chrf", "rouge"]


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{package} is needed for this metric: install the eval extra with `pip install alignlab[eval]`"
        ) from err


def _per_example_refs(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions/references: expected sequences (one entry per example), got a bare string")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions/references: expected equal lengths, got {len(predictions)} and {len(references)}"
        )
    if not predictions:
        raise ValueError("predictions: expected at least one example")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r or not all(isinstance(x, str) for x in r) for r in refs):
        raise ValueError("references: every example needs at least one reference string")
    return refs


def _reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's per-position streams (``None`` = missing)."""
    width = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], **kwargs) -> float:
    """Corpus BLEU (0-100) from sacrebleu; ``kwargs`` go to ``sacrebleu.metrics.BLEU``.

    Raises:
        ImportError: sacrebleu is missing (``pip install alignlab[eval]``).
        ValueError: mismatched lengths or an example without references.
    """
    refs = _per_example_refs(predictions, references)
    metrics = _require("sacrebleu.metrics", "sacrebleu")
    return float(metrics.BLEU(**kwargs).corpus_score(list(predictions), _reference_streams(refs)).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]], **kwargs) -> float:
    """Corpus chrF (0-100) from sacrebleu; ``kwargs`` go to ``sacrebleu.metrics.CHRF``
    (``word_order=2`` gives chrF++).

    Raises:
        ImportError: sacrebleu is missing (``pip install alignlab[eval]``).
        ValueError: mismatched lengths or an example without references.
    """
    refs = _per_example_refs(predictions, references)
    metrics = _require("sacrebleu.metrics", "sacrebleu")
    return float(metrics.CHRF(**kwargs).corpus_score(list(predictions), _reference_streams(refs)).score)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F-measure per type (0-1), best reference per example.

    Args:
        predictions: one string per example.
        references: per example, one string or several.
        rouge_types: any types rouge-score knows (``rouge1``, ``rouge2``,
            ``rougeL``, ``rougeLsum``, ...).
        use_stemmer: Porter stemming, as in the original ROUGE-1.5.5 ``-m``.

    Returns:
        ``{rouge_type: mean F-measure}``.

    Raises:
        ImportError: rouge-score is missing (``pip install alignlab[eval]``).
        ValueError: mismatched lengths, an example without references, or
            no ``rouge_types``.
    """
    refs = _per_example_refs(predictions, references)
    if isinstance(rouge_types, str) or not rouge_types:
        raise ValueError(f"rouge_types: expected a non-empty sequence of names, got {rouge_types!r}")
    scorer_module = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = scorer_module.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    for prediction, example_refs in zip(predictions, refs):
        scores = scorer.score_multi(example_refs, prediction)
        for name in rouge_types:
            totals[name] += scores[name].fmeasure
    return {name: total / len(refs) for name, total in totals.items()}
