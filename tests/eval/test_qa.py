import re
import string
from collections import Counter

import pytest

from alignlab.eval import exact_match, normalize_answer, squad_scores, token_f1


# The SQuAD v2.0 evaluation script's behaviour, restated step by step as the oracle.
def _official_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _official_f1(prediction, gold):
    pred_toks = _official_normalize(prediction).split()
    gold_toks = _official_normalize(gold).split()
    if len(pred_toks) == 0 or len(gold_toks) == 0:
        return int(pred_toks == gold_toks)
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


CASES = [
    ("The Eiffel Tower!", ["eiffel tower"]),
    ("in 1889, the tower", ["1889", "The year 1889"]),
    ("An apple a day", ["the apple day"]),
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos", "Broncos"]),
    ("the the the", ["the"]),  # normalises to empty on both sides
    ("", ["Paris"]),
    ("New  York\tCity", ["new york"]),
    ("theatre and anthem", ["the atre and an them"]),  # articles only as whole words
    ("Saint-Louis", ["saintlouis"]),  # punctuation is deleted, not split on
    ("dog dog cat", ["dog cat cat"]),  # bag intersection counts repeats
]


@pytest.mark.parametrize("prediction,refs", CASES)
def test_matches_official_squad_behaviour(prediction, refs):
    assert normalize_answer(prediction) == _official_normalize(prediction)
    assert exact_match(prediction, refs) == float(
        max(_official_normalize(prediction) == _official_normalize(r) for r in refs)
    )
    assert token_f1(prediction, refs) == pytest.approx(max(_official_f1(prediction, r) for r in refs))


def test_hand_computed_values():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    # pred {dog:2, cat:1}, gold {dog:1, cat:2}: overlap 2, P = R = 2/3
    assert token_f1("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)
    # pred [in, 1889, tower] vs gold [1889]: P = 1/3, R = 1 -> F1 = 0.5
    assert token_f1("in 1889, the tower", "1889") == pytest.approx(0.5)
    assert token_f1("the", "a") == 1.0 and token_f1("", "Paris") == 0.0


def test_squad_scores_means_and_errors():
    preds = [p for p, _ in CASES]
    refs = [r for _, r in CASES]
    out = squad_scores(preds, refs)
    assert out["exact_match"] == pytest.approx(sum(exact_match(p, r) for p, r in CASES) / len(CASES))
    assert out["f1"] == pytest.approx(sum(max(_official_f1(p, x) for x in r) for p, r in CASES) / len(CASES))
    with pytest.raises(ValueError, match="equal lengths"):
        squad_scores(["a"], [])
    with pytest.raises(ValueError, match="at least one"):
        squad_scores([], [])
    with pytest.raises(ValueError, match="references"):
        token_f1("a", [])
    with pytest.raises(TypeError, match="text"):
        normalize_answer(3)


@pytest.mark.parametrize("predictions, references", [("ab", "ab"), ("ab", ["a", "b"]), (["a", "b"], "ab")])
def test_squad_scores_refuses_a_bare_string_dataset(predictions, references):
    """A string is a sequence of characters: squad_scores("ab", "ab") scored two one-letter examples."""
    with pytest.raises(TypeError, match="bare string"):
        squad_scores(predictions, references)


def test_squad_scores_takes_numpy_string_arrays():
    """A NumPy (or pandas) column of predictions failed on the array's truth value."""
    np = pytest.importorskip("numpy")
    preds, refs = ["The cat", "a dog sat"], ["cat", "dog"]
    assert squad_scores(np.array(preds), np.array(refs)) == squad_scores(preds, refs)


# The v2.0 script's per-question step, restated: golds are the answer texts that normalise to something, [""] if
# none do (SQuAD v2.0 gives unanswerable questions an empty answer list); the score is the best over the golds.
def _official_v2_scores(prediction, answer_texts):
    golds = [a for a in answer_texts if _official_normalize(a)] or [""]
    exact = max(int(_official_normalize(g) == _official_normalize(prediction)) for g in golds)
    return exact, max(_official_f1(prediction, g) for g in golds)


V2_CASES = [
    ("", []),  # unanswerable, abstained: 1 / 1
    ("Paris", []),  # unanswerable, answered: 0 / 0
    ("the", []),  # a prediction that normalises to nothing is an abstention
    ("", ["", "the"]),  # every reference normalises to nothing: unanswerable too
    ("", ["the", "Paris"]),  # "the" is dropped, so abstaining is wrong here
    ("Paris", ["the", "Paris"]),
    ("in Paris", ["Paris", "the city of Paris"]),
]


@pytest.mark.parametrize("prediction,refs", V2_CASES)
def test_unanswerable_and_empty_references_follow_the_v2_script(prediction, refs):
    exact, f1 = _official_v2_scores(prediction, refs)
    assert squad_scores([prediction], [refs]) == pytest.approx({"exact_match": exact, "f1": f1})
    if refs:  # the one-example helpers apply the same filter
        assert exact_match(prediction, refs) == exact
        assert token_f1(prediction, refs) == pytest.approx(f1)


def test_squad_scores_on_a_mixed_v2_dataset():
    """SQuAD v2.0 marks an unanswerable question with answers["text"] == []; squad_scores refused those."""
    preds = ["", "Paris", "Denver Broncos", "", "1889"]
    refs = [[], [], ["Denver Broncos", "Broncos"], ("Paris",), ()]
    want = [_official_v2_scores(p, r) for p, r in zip(preds, refs)]
    out = squad_scores(preds, refs)
    assert out["exact_match"] == pytest.approx(sum(e for e, _ in want) / len(want))  # 1 + 0 + 1 + 0 + 0
    assert out["f1"] == pytest.approx(sum(f for _, f in want) / len(want))
    assert out == pytest.approx({"exact_match": 0.4, "f1": 0.4})


@pytest.mark.parametrize("bad", [None, 3, {"text": ["Paris"], "answer_start": [0]}, ["Paris", None], b"Paris"])
def test_squad_scores_names_a_reference_of_the_wrong_kind(bad):
    """A dict (a HF answers entry) would have been scored against its keys; None or 3 gave an unnamed error."""
    with pytest.raises(TypeError, match=r"references\[1\]"):
        squad_scores(["a", "b"], [["a"], bad])


def test_prediction_of_the_wrong_kind_is_named():
    with pytest.raises(TypeError, match=r"predictions\[0\]"):
        squad_scores([None], [[]])
    with pytest.raises(TypeError, match="prediction"):
        exact_match(None, ["a"])
    with pytest.raises(TypeError, match="prediction"):
        token_f1(3, ["a"])


def test_one_example_helpers_still_ask_for_a_reference():
    with pytest.raises(ValueError, match=r'references.*\[""\]'):
        exact_match("", [])
    assert exact_match("", [""]) == 1.0 and token_f1("x", [""]) == 0.0
