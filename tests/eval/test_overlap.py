import sys

import pytest

from alignlab.eval import bleu, chrf, rouge

# The example of sacrebleu's README, with the scores it publishes:
# BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ...), chrF2 = 59.73
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REF_STREAMS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
PER_EXAMPLE = [list(r) for r in zip(*REF_STREAMS)]


def test_sacrebleu_readme_example():
    assert bleu(SYS, PER_EXAMPLE) == pytest.approx(48.53, abs=5e-3)
    assert chrf(SYS, PER_EXAMPLE) == pytest.approx(59.73, abs=5e-3)


def test_bleu_single_reference_and_variable_reference_counts():
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    # a missing second reference must not change a perfect match nor crash
    assert bleu(["a b c d e", "f g h i j"], [["a b c d e", "x"], "f g h i j"]) == pytest.approx(100.0)
    assert chrf(["a b c d e"], [["zzz", "a b c d e"]]) == pytest.approx(100.0)


def test_rouge_hand_computed_on_rouge_score_readme_pair():
    # rouge-score README pair; with the Porter stemmer:
    # target     the quick brown fox jump over the lazi dog   (9 tokens)
    # prediction the quick brown dog jump on the log          (8 tokens)
    # unigram overlap: the x2, quick, brown, dog, jump = 6
    # bigram overlap: "the quick", "quick brown" = 2 of 8 (target) and 7 (prediction)
    # LCS: the quick brown jump the = 5
    def f(p, r):
        return 2 * p * r / (p + r)

    out = rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert out["rouge1"] == pytest.approx(f(6 / 8, 6 / 9))
    assert out["rouge2"] == pytest.approx(f(2 / 7, 2 / 8))
    assert out["rougeL"] == pytest.approx(f(5 / 8, 5 / 9))


def test_rouge_mean_over_examples_and_best_reference():
    out = rouge(["a b c", "x y"], [["q r s", "a b c"], "x z"], rouge_types=["rouge1"])
    assert out["rouge1"] == pytest.approx((1.0 + 0.5) / 2)


def test_errors_and_missing_extra(monkeypatch):
    with pytest.raises(ValueError, match="equal lengths"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="reference"):
        rouge(["a"], [[]])
    with pytest.raises(TypeError, match="bare string"):
        chrf("abc", "abc")
    with pytest.raises(ValueError, match="rouge_types"):
        rouge(["a"], ["a"], rouge_types="rouge1")

    # A None entry in sys.modules makes the import fail, as if the extra were not installed.
    for mod in ["sacrebleu", "sacrebleu.metrics", "rouge_score", "rouge_score.rouge_scorer"]:
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"alignlab\[eval\]"):
        bleu(["a"], ["a"])
    with pytest.raises(ImportError, match=r"alignlab\[eval\]"):
        rouge(["a"], ["a"])


def _chars(text):
    return [c for c in text if not c.isspace()]


def test_rouge_with_a_tokenizer_scores_non_latin_text():
    pytest.importorskip("rouge_score")

    def f(p, r):
        return 2 * p * r / (p + r)

    pred, ref = "我 喜欢 吃 苹果", "我们 喜欢 吃 香蕉 和 苹果"
    # characters: pred 我喜欢吃苹果 (6), ref 我们喜欢吃香蕉和苹果 (10)
    # unigram overlap 我 喜 欢 吃 苹 果 = 6; bigrams pred 5, ref 9, shared 喜欢 欢吃 苹果 = 3
    # LCS 我喜欢吃苹果 = 6
    expected = {"rouge1": f(6 / 6, 6 / 10), "rouge2": f(3 / 5, 3 / 9), "rougeL": f(6 / 6, 6 / 10)}
    assert rouge([pred], [ref]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}  # the default drops CJK
    assert rouge([pred], [ref], tokenizer=_chars) == pytest.approx(expected)

    class WordTokenizer:  # rouge-score's interface: an object with .tokenize
        def tokenize(self, text):
            return text.split()

    # words: pred 我 喜欢 吃 苹果 (4), ref 6 words; shared 我? no (我们); 喜欢 吃 苹果 = 3; LCS 3
    words = rouge([pred], [ref], tokenizer=WordTokenizer(), rouge_types=["rouge1", "rougeL"])
    assert words == pytest.approx({"rouge1": f(3 / 4, 3 / 6), "rougeL": f(3 / 4, 3 / 6)})


def test_rouge_tokenizer_matches_rouge_score_default_and_errors():
    tokenizers = pytest.importorskip("rouge_score.tokenizers")
    preds, refs = ["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"]
    assert rouge(preds, refs, tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True)) == rouge(preds, refs)
    assert rouge(preds, refs, tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False)) == rouge(
        preds, refs, use_stemmer=False
    )
    with pytest.raises(ValueError, match="use_stemmer"):
        rouge(preds, refs, tokenizer=_chars, use_stemmer=True)
    with pytest.raises(TypeError, match="tokenizer: expected a callable"):
        rouge(preds, refs, tokenizer=3)
    with pytest.raises(TypeError, match="tokenizer: expected a list of str"):
        rouge(preds, refs, tokenizer=lambda s: s)
    with pytest.raises(TypeError, match="tokenizer: expected a list of str"):
        rouge(preds, refs, tokenizer=lambda s: [len(s)])


@pytest.mark.parametrize("flag", ["no", 0, "False"])
def test_rouge_use_stemmer_must_be_a_bool(flag):
    """use_stemmer="no" was read as bool("no") = True: stemming on."""
    pytest.importorskip("rouge_score")
    with pytest.raises(TypeError, match="use_stemmer must be a bool"):
        rouge(["running dogs"], ["run dog"], use_stemmer=flag)


def test_rouge_use_stemmer_false_and_numpy_bool():
    pytest.importorskip("rouge_score")
    np = pytest.importorskip("numpy")
    plain = rouge(["running dogs"], ["run dog"], rouge_types=["rouge1"], use_stemmer=False)
    assert plain == rouge(["running dogs"], ["run dog"], rouge_types=["rouge1"], use_stemmer=np.bool_(False))
    assert plain["rouge1"] == 0.0
    assert rouge(["running dogs"], ["run dog"], rouge_types=["rouge1"])["rouge1"] == 1.0  # stemmed by default


def test_numpy_string_arrays_are_sequences():
    """A NumPy (or pandas) column of predictions failed on the array's truth value; so did rouge_types."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    np = pytest.importorskip("numpy")
    preds, refs = ["the cat sat on the mat", "a dog ran"], ["the cat sat on a mat", "the dog ran"]
    assert bleu(np.array(preds), np.array(refs)) == bleu(preds, refs)
    assert rouge(np.array(preds), np.array(refs), rouge_types=np.array(["rouge1", "rougeL"])) == rouge(
        preds, refs, rouge_types=["rouge1", "rougeL"])
