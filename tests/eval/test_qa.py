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
