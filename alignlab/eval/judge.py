"""LLM-as-a-judge helpers: prompts, position-swap debiasing, win rates, bootstrap CIs.

Follows the protocol of "Judging LLM-as-a-Judge with MT-Bench and Chatbot
Arena" (Zheng et al., 2023, arXiv:2306.05685):

- *Pairwise comparison*: the judge sees a question and two answers and ends
  with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).
- *Single-answer grading*: the judge rates one answer and ends with
  ``[[rating]]`` on a 1-10 scale.
- *Position-swap debiasing*: judges prefer one position. Each pair is judged
  twice, in both orders; a side wins only if it wins both times, any
  disagreement counts as a tie (the "conservative" rule of the paper).

The judge is any callable ``judge(prompt: str) -> str`` (an API client, a
local ``model.generate`` wrapper, a human at a terminal).

Win rate of A over B with ties counted as half a win (the AlpacaEval and
Arena convention):

.. math::

    \\mathrm{WR} = \\frac{W + \\tfrac12 T}{W + L + T}

and its percentile bootstrap confidence interval ("Bootstrap Methods: Another
Look at the Jackknife", Efron, 1979): resample the per-pair outcomes with
replacement ``n_resamples`` times from a seeded generator and take the
``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles of the statistic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from alignlab._checks import (ArgumentTypeError, as_bool, check_count, check_number_in_range, check_template_fields,
                              is_finite_real, is_real)

__all__ = [
    "PAIRWISE_TEMPLATE",
    "SINGLE_ANSWER_TEMPLATE",
    "PairwiseJudgement",
    "bootstrap_ci",
    "judge_pairwise",
    "judge_single",
    "pairwise_prompt",
    "parse_pairwise_verdict",
    "parse_rating",
    "single_answer_prompt",
    "win_rate",
    "win_rate_ci",
]

PAIRWISE_TEMPLATE = """You are an impartial judge. Compare the two AI assistant answers to the user question below and decide which one answers it better.
Weigh helpfulness, correctness, relevance, depth and clarity. The order in which the answers appear and their length must not affect your decision, and neither must the assistants' names.
First explain your comparison briefly. Then give your verdict on the last line in exactly this format: "[[A]]" if answer A is better, "[[B]]" if answer B is better, "[[C]]" for a tie.

[User question]
{question}

[Answer A]
{answer_a}
[End of answer A]

[Answer B]
{answer_b}
[End of answer B]"""

SINGLE_ANSWER_TEMPLATE = """You are an impartial judge. Rate the AI assistant's answer to the user question below.
Weigh helpfulness, correctness, relevance, depth and clarity.{reference_block}
First explain your assessment briefly. Then give a rating from 1 (worst) to 10 (best) on the last line in exactly this format: "Rating: [[5]]".

[User question]
{question}

[Answer]
{answer}
[End of answer]"""

_REFERENCE_BLOCK = "\nA reference answer is given; use it to check correctness.\n\n[Reference answer]\n{reference}\n[End of reference answer]\n"

# Substring checks in this order, as MT-Bench's reference judge (FastChat llm_judge) makes them: the order, not
# where a token stands in the reply, decides a reply that holds several
_VERDICT_TOKENS = (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"))
# MT-Bench's reading of a rating (FastChat llm_judge): the first "[[number]]", else the first "[number]"; no spaces
# inside the brackets, and a number is digits with an optional point and optional decimals ("7", "7.5", "7.")
_RATING = re.compile(r"\[\[(\d+(?:\.\d*)?)\]\]")
_RATING_ONE_BRACKET = re.compile(r"\[(\d+(?:\.\d*)?)\]")


def pairwise_prompt(question: str, answer_a: str, answer_b: str, *, template: str = PAIRWISE_TEMPLATE) -> str:
    """Fill a pairwise template (placeholders ``{question}``, ``{answer_a}``, ``{answer_b}``).

    Raises ``ValueError`` if ``template`` lacks one of them (that text would be left out of the prompt)."""
    check_template_fields(template, ("question", "answer_a", "answer_b"))
    return template.format(question=question, answer_a=answer_a, answer_b=answer_b)


def single_answer_prompt(
    question: str, answer: str, *, reference: str | None = None, template: str = SINGLE_ANSWER_TEMPLATE
) -> str:
    """Fill a single-answer template; ``reference`` adds a reference answer (math, coding) at the template's
    ``{reference_block}``.

    Raises ``ValueError`` if ``template`` lacks ``{question}`` or ``{answer}``, or lacks ``{reference_block}``
    while a ``reference`` is given (it was dropped without a word)."""
    check_template_fields(template, ("question", "answer") + (() if reference is None else ("reference_block",)))
    block = "" if reference is None else _REFERENCE_BLOCK.format(reference=reference)
    return template.format(question=question, answer=answer, reference_block=block)


def parse_pairwise_verdict(text: str) -> str | None:
    """The verdict in a judge reply, read as MT-Bench reads it: ``"A"``, ``"B"``, ``"tie"``, or ``None`` if absent.

    The rule of the reference judge (FastChat ``llm_judge``, arXiv:2306.05685, the same for its single- and
    multi-turn, general and math pairwise prompts): ``"A"`` if ``[[A]]`` occurs anywhere in the reply, else
    ``"B"`` if ``[[B]]`` does, else ``"tie"`` if ``[[C]]`` does, else no verdict (the reference's ``"error"``).
    So a reply holding several verdicts is decided by that order, not by which comes last (``"[[B]] ... [[A]]"``
    and ``"[[A]] ... [[B]]"`` are both ``"A"``), and only the exact text counts: ``[[a]]``, ``[[ A ]]`` and
    ``[A]`` are no verdict.

    Raises an :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, when ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(f"text: expected the judge reply as a str, got {type(text).__name__}")
    for token, verdict in _VERDICT_TOKENS:
        if token in text:
            return verdict
    return None


def parse_rating(text: str, *, low: float = 1.0, high: float = 10.0) -> float | None:
    """The rating in a judge reply, read as MT-Bench reads it; ``None`` if absent or outside ``[low, high]``.

    The rule of the reference judge (FastChat ``llm_judge``, arXiv:2306.05685): the **first** ``[[number]]``
    in the reply; if there is none, the first ``[number]``. The brackets hold only the number (``[[ 7 ]]`` is
    no rating), which is digits with an optional decimal part (``7``, ``7.5``, ``7.``). The reference keeps
    any value and marks a missing one ``-1``; here a value outside ``[low, high]`` and a missing one are both
    ``None`` (pass a wider range to keep every value).

    Raises ``ValueError`` unless ``low`` and ``high`` are finite numbers with ``low <= high``
    (a reversed or NaN range turned every rating into ``None``); for one that is no number at all it is an
    :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, and so it is when ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(f"text: expected the judge reply as a str, got {type(text).__name__}")
    if not (is_finite_real(low) and is_finite_real(high) and low <= high):
        kind = ValueError if is_real(low) and is_real(high) else ArgumentTypeError
        raise kind(f"low/high: expected finite numbers with low <= high, got {low!r} and {high!r}")
    found = _RATING.search(text) or _RATING_ONE_BRACKET.search(text)
    if found is None:
        return None
    value = float(found.group(1))
    return value if low <= value <= high else None


@dataclass(frozen=True)
class PairwiseJudgement:
    """Result of one debiased pairwise comparison of the caller's answers ``a`` and ``b``.

    Attributes:
        winner: ``"a"``, ``"b"`` or ``"tie"``.
        verdicts: the verdict of each judge call, mapped to the caller's labels
            (``"a"``, ``"b"``, ``"tie"``, or ``None`` when unparsable); the
            second entry is the swapped-order call.
        consistent: every call agreed.
    """

    winner: str
    verdicts: tuple[str | None, ...]
    consistent: bool


def judge_pairwise(
    judge: Callable[[str], str],
    question: str,
    answer_a: str,
    answer_b: str,
    *,
    swap: bool = True,
    template: str = PAIRWISE_TEMPLATE,
) -> PairwiseJudgement:
    """Ask ``judge`` which answer is better, in both orders when ``swap``.

    Each reply is read by :func:`parse_pairwise_verdict` (MT-Bench's rule) and mapped to the caller's labels.
    The winner is the side every call agrees on; disagreement or an unparsable reply gives ``"tie"`` (MT-Bench
    instead drops a pair with an unparsable reply from its win rates: keep only judgements without ``None`` in
    ``verdicts`` for its numbers).

    Raises:
        TypeError: ``judge`` is not callable or returns a non-string, or ``swap`` is not a bool (a
            string such as ``"no"`` would switch it on).
    """
    if not callable(judge):
        raise TypeError(f"judge: expected a callable prompt -> reply, got {type(judge).__name__}")
    swap = as_bool(swap, "swap")
    orders = [(answer_a, answer_b, {"A": "a", "B": "b"})]
    if swap:
        orders.append((answer_b, answer_a, {"A": "b", "B": "a"}))
    verdicts = []
    for first, second, labels in orders:
        reply = judge(pairwise_prompt(question, first, second, template=template))
        if not isinstance(reply, str):
            raise TypeError(f"judge: expected the reply to be a str, got {type(reply).__name__}")
        verdict = parse_pairwise_verdict(reply)
        verdicts.append(labels.get(verdict, verdict))
    consistent = len(set(verdicts)) == 1 and verdicts[0] is not None
    winner = verdicts[0] if consistent else "tie"
    return PairwiseJudgement(winner=winner, verdicts=tuple(verdicts), consistent=consistent)


def judge_single(
    judge: Callable[[str], str],
    question: str,
    answer: str,
    *,
    reference: str | None = None,
    template: str = SINGLE_ANSWER_TEMPLATE,
) -> float | None:
    """Ask ``judge`` for a 1-10 rating of one answer; ``None`` if the reply has none."""
    if not callable(judge):
        raise TypeError(f"judge: expected a callable prompt -> reply, got {type(judge).__name__}")
    reply = judge(single_answer_prompt(question, answer, reference=reference, template=template))
    if not isinstance(reply, str):
        raise TypeError(f"judge: expected the reply to be a str, got {type(reply).__name__}")
    return parse_rating(reply)


_OUTCOME_VALUE = {"a": 1.0, "b": 0.0, "tie": 0.5}


def _outcome_values(outcomes: Sequence[str | float | PairwiseJudgement]) -> np.ndarray:
    values = []
    for i, o in enumerate(outcomes):
        if isinstance(o, PairwiseJudgement):
            o = o.winner
        if isinstance(o, str):
            if o.lower() not in _OUTCOME_VALUE:
                raise ValueError(f"outcomes[{i}]: expected 'a', 'b' or 'tie', got {o!r}")
            values.append(_OUTCOME_VALUE[o.lower()])
        elif is_real(o) and float(o) in (0.0, 0.5, 1.0):  # a bool is no outcome: which side, and ties?
            values.append(float(o))
        else:
            raise ValueError(f"outcomes[{i}]: expected 'a'/'b'/'tie' or 1/0/0.5, got {o!r}")
    return np.asarray(values, dtype=np.float64)


def win_rate(outcomes: Sequence[str | float | PairwiseJudgement], *, ties: str = "half") -> float:
    """Win rate of side ``a``.

    Args:
        outcomes: per pair ``"a"``/``"b"``/``"tie"`` (or the numbers 1/0/0.5, Python or NumPy,
            or :class:`PairwiseJudgement`). A bool is refused: ``True`` cannot say tie.
        ties: ``"half"`` counts a tie as half a win; ``"exclude"`` drops ties
            from numerator and denominator.

    Raises:
        ValueError: empty outcomes, unknown outcome (a bool included), unknown ``ties``, or only
            ties with ``ties="exclude"``.
    """
    values = _outcome_values(outcomes)
    if values.size == 0:
        raise ValueError("outcomes: expected at least one comparison")
    if ties == "half":
        return float(values.mean())
    if ties == "exclude":
        decided = values[values != 0.5]
        if decided.size == 0:
            raise ValueError("outcomes: every comparison is a tie, the win rate excluding ties is undefined")
        return float(decided.mean())
    raise ValueError(f"ties: expected 'half' or 'exclude', got {ties!r}")


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic(values)``.

    Args:
        values: per-item scores, shape ``(n,)`` (e.g. 1/0/0.5 pairwise outcomes,
            per-example F1).
        statistic: maps a resample ``(n,)`` to a number; must accept an
            ``axis=-1`` keyword to be vectorised, else it is called per resample.
        n_resamples: bootstrap draws.
        confidence: in ``(0, 1)``.
        seed: seeds ``numpy.random.default_rng``; same seed, same interval.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: empty ``values``, values that are not finite numbers (NaN,
            inf, strings), ``n_resamples < 1`` or ``confidence`` not a number in ``(0, 1)`` (an
            :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, for an ``n_resamples`` that is no int or a
            ``confidence`` that is no number).
    """
    raw = np.asarray(values)
    if raw.dtype.kind not in "biuf":  # np.asarray(..., float64) would read "1" as 1.0
        raise ValueError(f"values: expected numbers, got an array of dtype {raw.dtype}")
    data = raw.astype(np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"values: expected a non-empty 1-d sequence, got shape {data.shape}")
    if not np.isfinite(data).all():  # one NaN made the interval (nan, nan) without a word
        bad = np.flatnonzero(~np.isfinite(data))[:5].tolist()
        raise ValueError(f"values: expected finite numbers, got NaN or inf at index {bad}")
    n_resamples = check_count(n_resamples, "n_resamples")
    confidence = check_number_in_range(confidence, "confidence", 0, 1, low_open=True, high_open=True)
    rng = np.random.default_rng(seed)
    resamples = data[rng.integers(0, data.size, size=(n_resamples, data.size))]
    try:
        stats = np.asarray(statistic(resamples, axis=-1), dtype=np.float64)
    except TypeError:
        stats = np.asarray([statistic(r) for r in resamples], dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def win_rate_ci(
    outcomes: Sequence[str | float | PairwiseJudgement],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Win rate of ``a`` (ties = half) with its percentile bootstrap interval: ``(rate, low, high)``."""
    values = _outcome_values(outcomes)
    rate = win_rate(values.tolist())
    low, high = bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return rate, low, high
