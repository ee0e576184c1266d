import re

import numpy as np
import pytest

from alignlab.eval import (
    PairwiseJudgement,
    bootstrap_ci,
    judge_pairwise,
    judge_single,
    pairwise_prompt,
    parse_pairwise_verdict,
    parse_rating,
    single_answer_prompt,
    win_rate,
    win_rate_ci,
)


def test_templates_fill_every_field():
    p = pairwise_prompt("Q?", "first answer", "second answer")
    assert "Q?" in p and p.index("first answer") < p.index("second answer") and "[[C]]" in p
    s = single_answer_prompt("Q?", "ans", reference="ref")
    assert "ans" in s and "ref" in s and "[[5]]" in s
    assert "Reference" not in single_answer_prompt("Q?", "ans")
    assert "{" not in p and "{" not in s


def test_parsers():
    assert parse_pairwise_verdict("Final verdict: [[B]]") == "B"
    assert parse_pairwise_verdict("[[C]]") == "tie"
    assert parse_pairwise_verdict("A is better") is None
    assert parse_rating("Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [[7.5]]") == 7.5
    assert parse_rating("[[11]]") is None and parse_rating("no rating") is None


def _positional_judge(prefer: str):
    """A judge that always prefers a position, whatever the answers."""
    return lambda prompt: f"... [[{prefer}]]"


def _content_judge(good: str):
    """A judge that prefers the answer containing `good`, wherever it is shown."""

    def judge(prompt):
        a = prompt.split("[Answer A]")[1].split("[End of answer A]")[0]
        return "[[A]]" if good in a else "[[B]]"

    return judge


def test_position_swap_debiasing():
    # a purely positional judge is inconsistent across the swap -> tie
    for prefer in "AB":
        j = judge_pairwise(_positional_judge(prefer), "q", "x", "y")
        assert j.winner == "tie" and not j.consistent
    # a content judge is consistent, whichever side holds the good answer
    assert judge_pairwise(_content_judge("good"), "q", "good", "bad").winner == "a"
    j = judge_pairwise(_content_judge("good"), "q", "bad", "good")
    assert j == PairwiseJudgement(winner="b", verdicts=("b", "b"), consistent=True)
    # without swap, the single verdict is taken as is
    assert judge_pairwise(_positional_judge("A"), "q", "x", "y", swap=False).winner == "a"
    # unparsable replies never decide
    assert judge_pairwise(lambda p: "no verdict", "q", "x", "y").winner == "tie"
    calls = []
    judge_pairwise(lambda p: calls.append(p) or "[[C]]", "q", "x", "y")
    assert len(calls) == 2 and calls[0] != calls[1]


def test_judge_single_and_errors():
    assert judge_single(lambda p: "ok. Rating: [[8]]", "q", "a") == 8.0
    with pytest.raises(TypeError, match="judge"):
        judge_pairwise("not callable", "q", "a", "b")
    with pytest.raises(TypeError, match="reply"):
        judge_single(lambda p: 3, "q", "a")


def test_win_rate_with_ties():
    outcomes = ["a", "a", "b", "tie", "a", "tie"]
    assert win_rate(outcomes) == pytest.approx((3 + 0.5 * 2) / 6)
    assert win_rate(outcomes, ties="exclude") == pytest.approx(3 / 4)
    assert win_rate([1, 0, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outcomes"):
        win_rate(["x"])
    with pytest.raises(ValueError, match="outcomes"):
        win_rate([])
    with pytest.raises(ValueError, match="tie"):
        win_rate(["tie"], ties="exclude")
    with pytest.raises(ValueError, match="ties"):
        win_rate(["a"], ties="zero")


def test_bootstrap_ci_seeded_and_close_to_normal_approximation():
    rng = np.random.default_rng(123)
    values = (rng.random(400) < 0.6).astype(float)
    p = values.mean()
    low, high = bootstrap_ci(values, n_resamples=4000, seed=7)
    assert bootstrap_ci(values, n_resamples=4000, seed=7) == (low, high)
    normal = rng.normal(size=50)  # continuous data: a new seed moves the interval
    assert bootstrap_ci(normal, seed=1) == bootstrap_ci(normal, seed=1) != bootstrap_ci(normal, seed=2)
    half = 1.959964 * np.sqrt(p * (1 - p) / values.size)  # Wald interval of a proportion
    assert low == pytest.approx(p - half, abs=0.01)
    assert high == pytest.approx(p + half, abs=0.01)
    assert low < p < high


def test_bootstrap_ci_statistics_and_errors():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    # a statistic without an axis keyword falls back to a loop and gives the same interval
    vals = np.arange(30.0)
    vec = bootstrap_ci(vals, statistic=np.median, n_resamples=500, seed=1)
    loop = bootstrap_ci(vals, statistic=lambda x: float(np.median(x)), n_resamples=500, seed=1)
    assert vec == pytest.approx(loop)
    rate, low, high = win_rate_ci(["a"] * 30 + ["b"] * 10 + ["tie"] * 10, seed=0)
    assert rate == pytest.approx(35 / 50) and low < rate < high
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0], n_resamples=0)


def test_win_rate_refuses_bools():
    # The documented inputs are 'a'/'b'/'tie' or 1/0/0.5; a bool says nothing about ties or sides.
    for bad in (True, False, np.bool_(True)):
        with pytest.raises(ValueError, match=r"outcomes\[1\]"):
            win_rate(["a", bad])


def test_win_rate_numpy_scalars_match_python_numbers():
    outcomes = [np.float32(1.0), np.int64(0), np.float64(0.5), np.float32(1)]
    assert win_rate(outcomes) == win_rate([1, 0, 0.5, 1]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match=r"outcomes\[0\]"):
        win_rate([np.float32("nan")])


@pytest.mark.parametrize("values", [[1.0, float("nan"), 0.5], [1.0, float("inf"), 0.5], ["1", "0"], [None, 1.0]])
def test_bootstrap_ci_refuses_non_finite_or_non_numeric_values(values):
    """A NaN gave the interval (nan, nan) and an inf (0.5, nan) silently; strings were read as numbers."""
    with pytest.raises(ValueError, match="values: expected"):
        bootstrap_ci(values)


def test_bootstrap_ci_confidence_must_be_a_number():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 0.5], confidence="0.9")
    assert bootstrap_ci([True, False, True], seed=0) == bootstrap_ci([1.0, 0.0, 1.0], seed=0)
    assert bootstrap_ci([1.0, 0.0], confidence=np.float32(0.9)) == bootstrap_ci([1.0, 0.0], confidence=0.9)


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_judge_pairwise_swap_must_be_a_bool(flag):
    """swap="no" was truthy: the judge was asked twice and a positional judge's verdict became a tie."""
    calls = []
    with pytest.raises(TypeError, match="swap must be a bool"):
        judge_pairwise(lambda p: calls.append(p) or "[[A]]", "q", "x", "y", swap=flag)
    assert not calls
    assert judge_pairwise(lambda p: "[[A]]", "q", "x", "y", swap=np.bool_(False)).winner == "a"


@pytest.mark.parametrize("low, high", [(10, 1), (float("nan"), 10), (1, float("inf")), ("1", 10)])
def test_parse_rating_range_must_be_finite_and_ordered(low, high):
    """low=10, high=1 (or a NaN bound) turned every rating into None without a word."""
    with pytest.raises(ValueError, match="low/high"):
        parse_rating("Rating: [[5]]", low=low, high=high)
    assert parse_rating("Rating: [[5]]", low=np.float32(1), high=np.int64(5)) == 5.0


def test_a_template_without_a_placeholder_is_refused_not_filled_without_the_text():
    """str.format ignores a keyword the template has no field for: a custom single-answer template without
    {reference_block} (MT-Bench's reference prompts use other names) dropped the reference without a word, and
    one without {answer_b} showed the judge a single answer."""
    mt_bench_style = "[Question]\n{question}\n[Reference]\n{ref_answer_1}\n[Answer]\n{answer}\nRate [[1-10]]."
    with pytest.raises(ValueError, match=r"\{reference_block\}"):
        single_answer_prompt("Q?", "ans", reference="ref", template="Q: {question}\nA: {answer}")
    with pytest.raises(KeyError):  # a field we do not fill is still str.format's KeyError
        single_answer_prompt("Q?", "ans", template=mt_bench_style)
    assert single_answer_prompt("Q?", "ans", template="Q: {question}\nA: {answer}") == "Q: Q?\nA: ans"
    with pytest.raises(ValueError, match=r"\{answer_b\}"):
        pairwise_prompt("Q?", "one", "two", template="{question}\nA: {answer_a}\nverdict [[A]]/[[B]]")
    calls = []
    with pytest.raises(ValueError, match=r"\{answer_b\}"):  # before the judge is asked anything
        judge_pairwise(lambda p: calls.append(p) or "[[A]]", "Q?", "one", "two", template="{question} {answer_a}")
    assert calls == []
    with pytest.raises(ValueError, match=r"\{question\}"):
        judge_single(lambda p: "[[5]]", "Q?", "ans", template="{answer}")
    doubled = "{question} {{literal}} {answer_a} {answer_b}"
    assert pairwise_prompt("Q", "a", "b", template=doubled) == "Q {literal} a b"


# MT-Bench's reference judge (FastChat llm_judge) reads a single-answer rating like this, restated: the first
# "[[number]]"; failing that, the first "[number]"; a number is digits, an optional point, optional digits; no
# match is -1. The value is kept whatever it is.
def _mt_bench_rating(reply):
    number = r"(\d+\.?\d*)"
    found = re.search(r"\[\[" + number + r"\]\]", reply) or re.search(r"\[" + number + r"\]", reply)
    return float(found.group(1)) if found else -1


RATING_REPLIES = [
    "Rating: [[7]]",
    "Rating: [[7.5]]",
    "First draft [[3]], on reflection the final rating is [[8]]",  # the first one counts, not the last
    "Rating: [6]",  # one bracket: the fallback
    "Rating: [6] ... Final: [[9]]",  # a double-bracket rating anywhere wins over the fallback
    "Scores [2] and [5], no double brackets",
    "Rating: [[ 7 ]]",  # spaces inside: no rating in the reference
    "Rating: [[7.]]",
    "Rating: [[7/10]]",
    "Rating: [[11]] (typo) [[5]]",  # the first is out of range: None here, 11 in the reference
    "Rating: [[0]]",
    "no rating at all",
    "",
]


@pytest.mark.parametrize("reply", RATING_REPLIES)
def test_parse_rating_reads_a_reply_as_mt_bench_does(reply):
    ref = _mt_bench_rating(reply)
    assert parse_rating(reply) == (ref if 1 <= ref <= 10 else None)
    # with a range wide enough for every value, the numbers are the reference's own
    assert parse_rating(reply, low=0, high=1000) == (None if ref == -1 else ref)


def test_parse_rating_takes_the_first_rating_and_falls_back_to_one_bracket():
    assert parse_rating("[[3]] then [[8]]") == 3.0
    assert parse_rating("Rating: [4]") == 4.0
    assert parse_rating("[[ 7 ]]") is None


def test_parse_rating_names_a_reply_that_is_no_string():
    with pytest.raises(TypeError, match="text"):
        parse_rating(None)


# MT-Bench's reference judge (FastChat llm_judge, output format "[[A]]" of every pairwise prompt) reads a verdict
# like this, restated: "A" if the text "[[A]]" is in the reply; otherwise "B" if "[[B]]" is; otherwise "tie" if
# "[[C]]" is; otherwise "error".
def _mt_bench_verdict(reply):
    if "[[A]]" in reply:
        return "A"
    if "[[B]]" in reply:
        return "B"
    if "[[C]]" in reply:
        return "tie"
    return "error"


VERDICT_REPLIES = [
    "Assistant A is more accurate. [[A]]",
    "Final verdict: [[B]]",
    "Both are equally good. [[C]]",
    "At first [[A]] looked right, but the final verdict is [[B]]",  # several: A is checked first, not the last wins
    "[[B]] on style, yet [[A]] overall",
    "Not [[C]]: the verdict is [[B]]",  # B is checked before C wherever they stand
    "[[C]] ... [[A]] ... [[B]]",
    "My verdict: [[a]]",  # lowercase: no verdict in the reference
    "My verdict: [[ B ]]",  # spaces inside the brackets: no verdict either
    "Verdict: [A]",  # one bracket: no fallback for verdicts
    "Verdict: [[A ]] or rather [[C]]",
    "[[D]]",
    "Answer A is better overall.",
    "",
    "Verdicts like [[A]], [[B]] and [[C]] are allowed; I pick [[C]]",  # the echoed format line decides, as there
]


@pytest.mark.parametrize("reply", VERDICT_REPLIES)
def test_parse_pairwise_verdict_reads_a_reply_as_mt_bench_does(reply):
    ref = _mt_bench_verdict(reply)
    assert parse_pairwise_verdict(reply) == (None if ref == "error" else ref)


@pytest.mark.parametrize("reply", VERDICT_REPLIES)
def test_judge_pairwise_maps_reference_verdicts_to_the_callers_labels(reply):
    # the same reply in both orders: a side verdict flips labels across the swap (-> tie), a tie stays a tie
    j = judge_pairwise(lambda p: reply, "q", "x", "y")
    ref = _mt_bench_verdict(reply)
    first, second = {"A": ("a", "b"), "B": ("b", "a"), "tie": ("tie", "tie"), "error": (None, None)}[ref]
    assert j.verdicts == (first, second)
    assert j.winner == "tie" and j.consistent == (ref == "tie")
    assert judge_pairwise(lambda p: reply, "q", "x", "y", swap=False).winner == (first if first else "tie")


def test_parse_pairwise_verdict_checks_a_before_b_before_c():
    assert parse_pairwise_verdict("[[B]] then [[A]]") == "A"
    assert parse_pairwise_verdict("[[C]] then [[B]]") == "B"
    assert parse_pairwise_verdict("[[ A ]]") is None and parse_pairwise_verdict("[A]") is None


def test_parse_pairwise_verdict_names_a_reply_that_is_no_string():
    for reply in (None, b"[[A]]", ["[[A]]"]):
        with pytest.raises(TypeError, match="text"):
            parse_pairwise_verdict(reply)
