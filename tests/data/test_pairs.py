"""Preference pair builders and collation."""

import math

import pytest
import torch

from alignlab.data.pairs import (
    collate_preference,
    counterfactual_pairs,
    llm_judge,
    online_feedback_pairs,
    pairs_from_scores,
    parse_judge_score,
    self_rewarding_pairs,
    spin_pairs,
    tokenize_preference,
)
from alignlab.data.sft import IGNORE_INDEX


class RecordingGenerator:
    """A fake sampler: answers from the system prompt + the last user message, records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append(batch)
        out = []
        for msgs in batch:
            system = next((m["content"] for m in msgs if m["role"] == "system"), "plain")
            out.append(f"{system} answer to {msgs[-1]['content']}")
        return out


def test_counterfactual_pairs_streaming_and_prompts():
    gen = RecordingGenerator()
    prompts = (f"q{i}" for i in range(5))  # a generator
    pairs = list(counterfactual_pairs(prompts, gen, "be nice", "be rude", batch_size=2))
    assert len(pairs) == 5 and len(gen.calls) == 6  # 3 batches x (desired, undesired)
    assert [len(c) for c in gen.calls] == [2, 2, 2, 2, 1, 1]
    assert pairs[3] == {"prompt": [{"role": "user", "content": "q3"}], "chosen": "be nice answer to q3",
                        "rejected": "be rude answer to q3"}
    # the steering prompts were used for generation, not in the training prompt
    assert gen.calls[0][0][0] == {"role": "system", "content": "be nice"}
    # "discourage" variant: no system prompt for chosen, an existing system message is replaced
    gen2 = RecordingGenerator()
    p = list(counterfactual_pairs([[{"role": "system", "content": "old"}, {"role": "user", "content": "x"}]],
                                  gen2, None, "be rude", train_system="be helpful"))
    assert p[0]["chosen"] == "plain answer to x" and p[0]["rejected"] == "be rude answer to x"
    assert p[0]["prompt"][0] == {"role": "system", "content": "be helpful"} and len(p[0]["prompt"]) == 2
    with pytest.raises(ValueError, match="differ"):
        list(counterfactual_pairs(["x"], gen, "a", "a"))
    with pytest.raises(ValueError, match="generate returned"):
        list(counterfactual_pairs(["x"], lambda b: [], "a", "b"))


def test_spin_pairs():
    data = [
        {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "truth0"}]},
        {"prompt": "q1", "response": "truth1"},
        {"prompt": "q2", "response": "plain answer to q2"},  # model already matches: dropped
    ]
    pairs = list(spin_pairs(iter(data), RecordingGenerator(), batch_size=2))
    assert pairs == [
        {"prompt": [{"role": "user", "content": "q0"}], "chosen": "truth0", "rejected": "plain answer to q0"},
        {"prompt": [{"role": "user", "content": "q1"}], "chosen": "truth1", "rejected": "plain answer to q1"},
    ]
    assert len(list(spin_pairs(data, RecordingGenerator(), skip_identical=False))) == 3
    with pytest.raises(ValueError, match="examples\\[0\\]"):
        list(spin_pairs([{"text": "x"}], RecordingGenerator()))
    with pytest.raises(ValueError, match="assistant"):
        list(spin_pairs([{"messages": [{"role": "user", "content": "q"}]}], RecordingGenerator()))


def test_pairs_from_scores():
    c = ["a", "b", "c", "d"]
    assert pairs_from_scores("q", c, [3, 5, 1, 5]) == [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "b", "rejected": "c"}]
    assert pairs_from_scores("q", c, [3, 5, 1, 5]) == pairs_from_scores("q", c, [3, 5, 1, 4])  # first best wins
    assert pairs_from_scores("q", c, [3, 0, 0, 5])[0]["rejected"] == "b"  # and the first worst
    assert pairs_from_scores("q", c, [2, 2, 2, 2]) == []  # no preference signal
    assert pairs_from_scores("q", c, [3, 4, 1, 5], min_margin=4) == []
    got = {(p["chosen"], p["rejected"]) for p in pairs_from_scores("q", c, [3, math.nan, 1, 5], strategy="all")}
    assert got == {("a", "c"), ("d", "a"), ("d", "c")}
    assert pairs_from_scores("q", c, [math.nan, 1, math.nan, math.nan]) == []
    assert pairs_from_scores("q", c, [3, None, 1, 5]) == pairs_from_scores("q", c, [3, math.nan, 1, 5])
    # NumPy and one-element tensor scores are numbers; a judge's raw text, a bool, a vector are not
    import numpy as np
    assert pairs_from_scores("q", c, [np.float32(3), torch.tensor(5.0), np.int64(1), 5]) == \
        pairs_from_scores("q", c, [3, 5, 1, 5])
    for i, bad in ((1, "x"), (0, "4"), (2, True), (3, torch.ones(2)), (1, [1.0])):
        scores = [1.0, 2.0, 3.0, 4.0]
        scores[i] = bad
        with pytest.raises(TypeError, match=rf"scores\[{i}\]: expected a real number or None"):
            pairs_from_scores("q", c, scores)
    with pytest.raises(ValueError, match="differ in length"):
        pairs_from_scores("q", c, [1, 2])
    recs = [{"prompt": "q", "candidates": ["x", "y"], "scores": [1, 2]}, {"prompt": "r", "candidates": ["z", "w"],
                                                                          "scores": [1, 1]}]
    assert [p["chosen"] for p in self_rewarding_pairs(recs)] == ["y"]
    with pytest.raises(ValueError, match="missing"):
        list(self_rewarding_pairs([{"prompt": "q"}]))


def test_pairs_from_scores_ties_at_infinity_and_identical_texts():
    """Two +inf (or -inf) scores gave inf - inf = NaN, which passed the `<= min_margin` test: a candidate was paired
    with itself; and two samples of one text, scored differently by a sampled judge, made a pair (or, with "all",
    contradictory ones) where the other builders skip identical answers."""
    inf = math.inf
    assert pairs_from_scores("q", ["a", "b"], [inf, inf]) == []
    assert pairs_from_scores("q", ["a", "b"], [-inf, -inf], min_margin=5) == []
    assert pairs_from_scores("q", ["a", "b"], [inf, inf], strategy="all") == []
    got = pairs_from_scores("q", ["a", "b", "c"], [inf, -inf, 1.0])  # unequal infinities still order
    assert (got[0]["chosen"], got[0]["rejected"]) == ("a", "b")
    # identical texts (after stripping)
    assert pairs_from_scores("q", ["x", "x ", "y"], [3, 1, 2]) == []
    assert pairs_from_scores("q", ["x", "x ", "y"], [3, 1, 2], skip_identical=False)[0]["rejected"] == "x "
    got = {(p["chosen"], p["rejected"]) for p in pairs_from_scores("q", ["x", "x", "y"], [3, 1, 2], strategy="all")}
    assert got == {("x", "y"), ("y", "x")}  # the judge's own contradiction; no pair of one text with itself
    with pytest.raises(TypeError, match="skip_identical must be a bool"):
        pairs_from_scores("q", ["x", "y"], [1, 2], skip_identical="no")
    recs = [{"prompt": "q", "candidates": ["s", "s"], "scores": [1, 2]}]
    assert list(self_rewarding_pairs(recs)) == []
    assert len(list(self_rewarding_pairs(recs, skip_identical=False))) == 1

    scores = iter([[0.0, 1.0, 2.0]] * 2)
    pairs = list(online_feedback_pairs(["q"], lambda b: ["same answer"] * len(b), lambda m, c: next(scores),
                                       num_candidates=3))
    assert pairs == []
    pairs = list(online_feedback_pairs(["q"], lambda b: ["same answer"] * len(b), lambda m, c: next(scores),
                                       num_candidates=3, skip_identical=False))
    assert len(pairs) == 1
    with pytest.raises(TypeError, match="skip_identical must be a bool"):
        list(online_feedback_pairs(["q"], lambda b: ["a"] * len(b), lambda m, c: [1, 2], skip_identical=1))


def test_judge_parsing_and_online_feedback():
    assert parse_judge_score("Good answer.\nScore: 4") == 4.0
    assert parse_judge_score("score=2.5 ... final Score: 3") == 3.0
    assert math.isnan(parse_judge_score("no number here"))
    assert math.isnan(parse_judge_score("Score: 9", max_score=5))

    counter = {"n": 0}

    def sampler(batch):  # different samples on each call
        counter["n"] += 1
        return [f"draft{counter['n']} for {m[-1]['content']}" for m in batch]

    def judge_llm(batch):  # reads the candidate out of the judge prompt, scores by draft number
        return [f"Fine. Score: {int(m[0]['content'].split('draft')[1][0])}" for m in batch]

    judge = llm_judge(judge_llm)
    assert judge([{"role": "user", "content": "q"}], ["draft1 x", "draft3 y"]) == [1.0, 3.0]
    pairs = list(online_feedback_pairs(["q0", "q1"], sampler, judge, num_candidates=3))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("draft3 for q0", "draft1 for q0"),
                                                             ("draft3 for q1", "draft1 for q1")]
    with pytest.raises(ValueError, match="num_candidates"):
        list(online_feedback_pairs(["q"], sampler, judge, num_candidates=1))


def test_tokenize_and_collate_preference(chat_tokenizer):
    tok = chat_tokenizer
    pair = {"prompt": [{"role": "user", "content": "what is the capital of france ?"}],
            "chosen": "paris", "rejected": "the capital of france is a dog"}
    ex = tokenize_preference(pair, tok)
    for side in ("chosen", "rejected"):
        sup = [t for t, lab in zip(ex[f"{side}_input_ids"], ex[f"{side}_labels"]) if lab != IGNORE_INDEX]
        assert sup == tok(pair[side] + " <|end|>", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id
    batch = collate_preference([ex, ex], pad_token_id=pad)
    n_c, n_r = len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])
    assert batch["input_ids"].shape == (4, max(n_c, n_r))
    assert batch["attention_mask"].sum(1).tolist() == [n_c, n_c, n_r, n_r]
    assert batch["input_ids"][0, :n_c].tolist() == ex["chosen_input_ids"]
    assert batch["input_ids"][2, :n_r].tolist() == ex["rejected_input_ids"]
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    with pytest.raises(ValueError, match="missing"):
        tokenize_preference({"prompt": "x"}, tok)
    with pytest.raises(ValueError, match="empty"):
        collate_preference([], pad)
    with pytest.raises(ValueError, match="rejected_input_ids"):
        collate_preference([{"chosen_input_ids": [1], "chosen_labels": [1]}], pad)


@pytest.mark.parametrize("margin", [-1.0, math.nan, math.inf])
def test_min_margin_must_be_a_finite_non_negative_number(margin):
    """min_margin=-1 paired every candidate with itself and tied candidates both ways round ('all'),
    and NaN kept every best/worst pair while dropping every 'all' pair."""
    with pytest.raises(ValueError, match="min_margin must be a finite number >= 0"):
        pairs_from_scores("q", ["a", "b"], [1.0, 1.0], strategy="all", min_margin=margin)
    with pytest.raises(ValueError, match="min_margin"):
        pairs_from_scores("q", ["a", "b"], [1.0, 2.0], min_margin=margin)
    calls = []

    def sampler(batch):
        calls.append(batch)
        return ["x" for _ in batch]

    with pytest.raises(ValueError, match="min_margin"):
        list(online_feedback_pairs(["q"], sampler, lambda m, c: [1.0] * len(c), min_margin=margin))
    assert not calls  # refused before any sampling


def test_min_margin_takes_numpy_and_python_numbers():
    np = pytest.importorskip("numpy")
    c, s = ["a", "b", "c"], [1.0, 2.0, 4.0]
    assert pairs_from_scores("q", c, s, "all", min_margin=np.float32(1.5)) == pairs_from_scores(
        "q", c, s, "all", min_margin=1.5)
    with pytest.raises(TypeError, match="min_margin"):
        pairs_from_scores("q", c, s, min_margin="1")


@pytest.mark.parametrize("count", [2.5, "3", True, None])
def test_num_candidates_must_be_an_int_of_at_least_two(count):
    """2.5 failed inside range() and "3" in a bare comparison, TypeErrors naming no argument."""
    with pytest.raises(ValueError, match="num_candidates must be an int >= 2"):
        list(online_feedback_pairs(["q"], lambda b: ["x" for _ in b], lambda m, c: [1.0] * len(c),
                                   num_candidates=count))


@pytest.mark.parametrize("flag", ["false", 0, None])
def test_skip_identical_must_be_a_bool(flag):
    """skip_identical="false" was truthy and silently dropped the pairs with equal answers."""
    same = lambda b: ["same" for _ in b]  # noqa: E731
    with pytest.raises(TypeError, match="skip_identical must be a bool"):
        list(counterfactual_pairs(["q"], same, "good", "bad", skip_identical=flag))
    with pytest.raises(TypeError, match="skip_identical must be a bool"):
        list(spin_pairs([{"prompt": "q", "response": "same"}], same, skip_identical=flag))


def test_skip_identical_false_keeps_equal_answers():
    np = pytest.importorskip("numpy")
    same = lambda b: ["same" for _ in b]  # noqa: E731
    assert len(list(counterfactual_pairs(["q"], same, "good", "bad", skip_identical=np.bool_(False)))) == 1
    assert len(list(spin_pairs([{"prompt": "q", "response": "same"}], same, skip_identical=False))) == 1


@pytest.mark.parametrize("max_score", [math.nan, -5, 0, "5", True])
def test_max_score_must_be_a_positive_finite_number(max_score):
    """max_score=NaN made every parsed score NaN (so no pair, silently); "5" failed in a bare comparison."""
    with pytest.raises(ValueError, match="max_score must be a finite number > 0"):
        parse_judge_score("Score: 3", max_score=max_score)
    with pytest.raises(ValueError, match="max_score"):
        llm_judge(lambda b: ["Score: 3" for _ in b], max_score=max_score)


def test_numpy_max_score():
    np = pytest.importorskip("numpy")
    assert parse_judge_score("Score: 7", max_score=np.float32(10)) == 7.0


def test_llm_judge_refuses_a_template_that_would_drop_the_response():
    """str.format ignores unused keywords: a custom rubric without {response} asked the judge to score a
    response it never saw (scores of the request alone), without a word."""
    from alignlab.data.pairs import llm_judge

    asked = []
    with pytest.raises(ValueError, match=r"\{response\}"):
        llm_judge(lambda batch: asked.append(batch) or ["Score: 3"] * len(batch),
                  template="Rate this answer to {prompt} from 0 to {max_score}. Score: <points>")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        llm_judge(lambda batch: ["Score: 3"] * len(batch), template="Rate {response}.")
    assert asked == []
    judge = llm_judge(lambda batch: ["Score: 4"] * len(batch), template="{prompt} / {response}")  # max_score optional
    assert judge([{"role": "user", "content": "q"}], ["a", "b"]) == [4.0, 4.0]


def test_tokenize_preference_takes_trl_conversational_answers(chat_tokenizer):
    """TRL's conversational preference rows hold ``chosen``/``rejected`` as message lists. They used to become
    the content of one assistant turn: the template printed the list's repr (here <unk> tokens), supervised."""
    tok = chat_tokenizer
    prompt = [{"role": "user", "content": "what is the capital of france ?"}]
    as_text = tokenize_preference({"prompt": prompt, "chosen": "paris", "rejected": "a dog"}, tok)
    as_messages = tokenize_preference({"prompt": prompt, "chosen": [{"role": "assistant", "content": "paris"}],
                                       "rejected": [{"role": "assistant", "content": "a dog"}]}, tok)
    assert as_messages == as_text
    assert tok.unk_token_id not in as_messages["chosen_input_ids"]
    with pytest.raises(ValueError, match="rejected must be a non-empty list"):
        tokenize_preference({"prompt": prompt, "chosen": "paris", "rejected": None}, tok)
    with pytest.raises(TypeError, match=r"rejected\[0\]\['content'\]"):
        tokenize_preference({"prompt": prompt, "chosen": "paris", "rejected": [{"role": "assistant", "content": 3}]},
                            tok)
    with pytest.raises(ValueError, match="chosen"):
        tokenize_preference({"prompt": prompt, "chosen": ["paris"], "rejected": "a dog"}, tok)
