import pytest
import torch

from alignlab.eval import reward_scores

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config).eval()


def _seqs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=g) for n in [5, 9, 2, 7, 9, 3, 1]]


def test_batched_scores_match_one_by_one(reward_model):
    seqs = _seqs()
    with torch.no_grad():
        expected = torch.stack([reward_model(input_ids=s[None]).logits[0, 0] for s in seqs])
    for batch_size in (1, 3, 16):
        got = reward_scores(reward_model, seqs, batch_size=batch_size)
        assert got.shape == (len(seqs),)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    as_lists = reward_scores(reward_model, [s.tolist() for s in seqs], batch_size=4)
    torch.testing.assert_close(as_lists, expected, rtol=1e-5, atol=1e-5)


def test_texts_through_a_tokenizer_and_plain_callables():
    vocab = {w: i + 1 for i, w in enumerate("good bad fine the movie was".split())}

    def tokenizer(text):
        return {"input_ids": [vocab[w] for w in text.split()]}

    good_id = vocab["good"]

    def count_good(input_ids, attention_mask):
        return ((input_ids == good_id) & attention_mask.bool()).sum(1).float()

    texts = ["the movie was good good", "bad", "good"]
    scores = reward_scores(count_good, texts, tokenizer=tokenizer, pad_token_id=0, batch_size=2)
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.0, 1.0]))


def test_multi_label_and_errors(reward_model):
    def two_heads(input_ids, attention_mask):
        return torch.stack([attention_mask.sum(1).float(), -attention_mask.sum(1).float()], 1)

    seqs = [[1, 2, 3], [4]]
    torch.testing.assert_close(reward_scores(two_heads, seqs, pad_token_id=0, label_index=1), torch.tensor([-3.0, -1.0]))
    with pytest.raises(ValueError, match="label_index"):
        reward_scores(two_heads, seqs, pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        reward_scores(two_heads, seqs, label_index=0)
    with pytest.raises(ValueError, match="tokenizer"):
        reward_scores(reward_model, ["text"])
    with pytest.raises(ValueError, match="empty"):
        reward_scores(reward_model, [[]])
    with pytest.raises(ValueError, match="batch_size"):
        reward_scores(reward_model, [[1]], batch_size=0)
    with pytest.raises(TypeError, match="single string"):
        reward_scores(reward_model, "text")
    assert reward_scores(reward_model, []).shape == (0,)


def _two_heads(input_ids, attention_mask):
    return torch.stack([attention_mask.sum(1).float(), -attention_mask.sum(1).float()], 1)


@pytest.mark.parametrize("label_index, error", [(True, TypeError), (1.0, ValueError), ("1", TypeError)])
def test_label_index_must_be_an_int(label_index, error):
    """label_index=True silently picked column 1. No number at all (a bool, a str) is a TypeError, a number that
    is no int a ValueError."""
    with pytest.raises(error, match="label_index: expected None or an int"):
        reward_scores(_two_heads, [[1, 2, 3], [4]], pad_token_id=0, label_index=label_index)


def test_label_index_out_of_range_names_it():
    """An out-of-range column was a bare IndexError from the indexing."""
    with pytest.raises(ValueError, match="label_index: 2 is out of range for the model's 2 scores"):
        reward_scores(_two_heads, [[1, 2, 3], [4]], pad_token_id=0, label_index=2)
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(reward_scores(_two_heads, [[1, 2, 3], [4]], pad_token_id=0, label_index=np.int64(-1)),
                               torch.tensor([-3.0, -1.0]))


@pytest.mark.parametrize("pad", [1.5, True, -1, "0"])
def test_pad_token_id_must_be_a_non_negative_int(pad):
    """pad_token_id=1.5 was written into the long batch as 1 (a real token id) without a word."""
    with pytest.raises(ValueError, match="pad_token_id: expected None or a non-negative int"):
        reward_scores(_two_heads, [[1, 2, 3], [4]], pad_token_id=pad, label_index=0)


def test_reward_scores_leaves_every_submodule_in_its_own_mode(reward_model):
    """As perplexity: model.train(was_training) put a submodule the caller kept in eval back into train mode."""
    reward_model.train()
    reward_model.model.layers[0].eval()
    before = {name: m.training for name, m in reward_model.named_modules()}
    try:
        reward_scores(reward_model, [[1, 2, 3], [4, 5]], batch_size=2)
        assert {name: m.training for name, m in reward_model.named_modules()} == before
    finally:
        reward_model.eval()


def test_a_pad_id_other_than_the_models_own_is_refused(reward_model):
    """The HF classifier finds each row's last real token through model.config.pad_token_id; rows right-padded
    with another id (a policy tokenizer's pad, say) were scored at their last pad: wrong rewards for every row
    shorter than its batch's longest, without a word."""
    import numpy as np

    seqs = _seqs()
    with pytest.raises(ValueError, match="pad_token_id: 3 differs from the reward model's own"):
        reward_scores(reward_model, seqs, batch_size=4, pad_token_id=3)
    torch.testing.assert_close(reward_scores(reward_model, seqs, batch_size=4, pad_token_id=np.int64(0)),
                               reward_scores(reward_model, seqs, batch_size=4))


@pytest.mark.parametrize("bad, error", [("8", TypeError), (None, TypeError), (True, TypeError), (0, ValueError),
                                        (2.5, ValueError)])
def test_batch_size_of_the_wrong_kind_is_a_type_error(bad, error):
    """batch_size "8" or None was a ValueError like batch_size=0; no number at all is a TypeError naming it."""
    with pytest.raises(error, match="batch_size"):
        reward_scores(_two_heads, [[1, 2, 3], [4]], pad_token_id=0, label_index=0, batch_size=bad)


def _padless_classifier():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("pad_token_id", [0, 7, None])
def test_a_classifier_without_a_pad_id_is_lent_one_per_batch(pad_token_id):
    """HF classifiers whose config has pad_token_id=None refuse batches of more than one row ("Cannot handle batch
    sizes > 1 if no padding token is defined"): the documented fallback to the given pad id failed for every batch.
    Each batched call now lends them a pad id that no row of the batch ends in (7 and 0 end rows here), and every
    row scores as it does alone; the config holds None again afterwards."""
    rm = _padless_classifier()
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12], [3, 0], [4, 4, 4, 4, 7], [9], [1, 2, 0]]
    with torch.no_grad():
        alone = torch.stack([rm(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
    got = reward_scores(rm, seqs, pad_token_id=pad_token_id, batch_size=4)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    assert rm.config.pad_token_id is None


def test_the_lent_pad_id_is_taken_back_when_the_model_raises():
    rm = _padless_classifier()
    with pytest.raises(IndexError):  # id 99 is outside the 64-token vocabulary
        reward_scores(rm, [[1, 2, 3], [4, 99]], pad_token_id=0, batch_size=2)
    assert rm.config.pad_token_id is None


@pytest.mark.parametrize("bad, error", [([1.7, 2], TypeError), ([True, 2], TypeError), ([-1, 2], ValueError),
                                        ([torch.tensor(1.0), 2], TypeError)])
def test_token_ids_that_are_no_token_ids_are_refused_by_position(reward_model, bad, error):
    """int() read 1.7 (and True) as token 1, scoring another sequence without a word; -1 failed inside the
    embedding with an IndexError that named nothing."""
    with pytest.raises(error, match=r"sequences\[1\]"):
        reward_scores(reward_model, [[1, 2], bad])
    import numpy as np
    ok = reward_scores(reward_model, [[1, 2], [np.int64(3), torch.tensor(2)]])
    torch.testing.assert_close(ok, reward_scores(reward_model, [[1, 2], [3, 2]]))
