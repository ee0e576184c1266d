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
  Per-example F-measure (best over references), averaged; 0-1. rouge-score's
  default tokenizer keeps only ``[a-z0-9]`` runs, so Chinese, Japanese, Thai,
  Cyrillic or Arabic text scores 0 unless a ``tokenizer`` is given.

References are given per prediction: one string or a sequence of strings
(any number per example).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alignlab._checks import ArgumentTypeError, as_bool

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
    if len(predictions) == 0:  # len: a NumPy array or pandas column has no truth value
        raise ValueError("predictions: expected at least one example")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r or not all(isinstance(x, str) for x in r) for r in refs):
        kind = ArgumentTypeError if any(not isinstance(x, str) for r in refs for x in r) else ValueError
        raise kind("references: every example needs at least one reference string")
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
        TypeError: a reference that is not a string (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
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
        TypeError: a reference that is not a string (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    refs = _per_example_refs(predictions, references)
    metrics = _require("sacrebleu.metrics", "sacrebleu")
    return float(metrics.CHRF(**kwargs).corpus_score(list(predictions), _reference_streams(refs)).score)


class _TokenizerAdapter:
    """rouge-score's tokenizer interface (``.tokenize(text) -> list[str]``) over a callable or object."""

    def __init__(self, tokenize: Callable[[str], Sequence[str]]):
        self._tokenize = tokenize

    def tokenize(self, text: str) -> list[str]:
        tokens = self._tokenize(text)
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise TypeError(f"tokenizer: expected a list of str tokens, got {tokens!r:.80}")
        return list(tokens)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool | None = None,
    tokenizer: Callable[[str], Sequence[str]] | Any | None = None,
) -> dict[str, float]:
    """Mean ROUGE F-measure per type (0-1), best reference per example.

    Args:
        predictions: one string per example.
        references: per example, one string or several.
        rouge_types: any types rouge-score knows (``rouge1``, ``rouge2``,
            ``rougeL``, ``rougeLsum``, ...).
        use_stemmer: Porter stemming in rouge-score's default tokenizer, as in
            the original ROUGE-1.5.5 ``-m``; ``None`` means on without a
            ``tokenizer``. With a ``tokenizer`` it must stay ``None``/``False``
            (rouge-score would silently ignore it; stem inside your tokenizer).
        tokenizer: replaces rouge-score's English-only default tokenizer
            (lower-case, ``[a-z0-9]`` runs): a callable ``str -> list[str]``
            such as ``lambda s: [c for c in s if not c.isspace()]``
            (characters, for Chinese/Japanese) or ``jieba.lcut``, or an
            object with a ``tokenize(text)`` method (rouge-score's
            ``tokenizers.Tokenizer`` interface, an HF tokenizer). Tokens are
            compared as given: no lower-casing, no stemming.

    Returns:
        ``{rouge_type: mean F-measure}``.

    Raises:
        ImportError: rouge-score is missing (``pip install alignlab[eval]``).
        ValueError: mismatched lengths, an example without references, no
            ``rouge_types``, or ``use_stemmer=True`` with a ``tokenizer``.
        TypeError: ``tokenizer`` is neither callable nor has ``tokenize``, or
            returns something other than a list of strings; ``use_stemmer`` is
            neither ``None`` nor a bool; a reference that is not a string, or one
            name as ``rouge_types`` (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    refs = _per_example_refs(predictions, references)
    if use_stemmer is not None:  # "no" would switch stemming on
        use_stemmer = as_bool(use_stemmer, "use_stemmer")
    if isinstance(rouge_types, str) or len(rouge_types) == 0:
        kind = ArgumentTypeError if isinstance(rouge_types, str) else ValueError  # one name is no sequence of them
        raise kind(f"rouge_types: expected a non-empty sequence of names, got {rouge_types!r}")
    if tokenizer is not None:
        if use_stemmer:
            raise ValueError("use_stemmer: rouge-score ignores it when a tokenizer is given; stem inside the tokenizer")
        if callable(getattr(tokenizer, "tokenize", None)):
            tokenizer = _TokenizerAdapter(tokenizer.tokenize)
        elif callable(tokenizer):
            tokenizer = _TokenizerAdapter(tokenizer)
        else:
            raise TypeError(
                "tokenizer: expected a callable str -> list[str] or an object with .tokenize, "
                f"got {type(tokenizer).__name__}"
            )
    scorer_module = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = scorer_module.RougeScorer(
        list(rouge_types), use_stemmer=True if use_stemmer is None else bool(use_stemmer), tokenizer=tokenizer
    )
    totals = dict.fromkeys(rouge_types, 0.0)
    for prediction, example_refs in zip(predictions, refs):
        scores = scorer.score_multi(example_refs, prediction)
        for name in rouge_types:
            totals[name] += scores[name].fmeasure
    return {name: total / len(refs) for name, total in totals.items()}
