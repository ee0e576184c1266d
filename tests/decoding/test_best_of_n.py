import pytest
import torch
from conftest import make_tiny_llama
from transformers import LogitsProcessorList

from alignlab.decoding import BestOfNOutput, ContrastiveDecodingLogitsProcessor, best_of_n, rerank


def test_rerank_any_candidates():
    best, idx, scores = rerank(["a", "bbb", "cc", "bbb"], lambda xs: [len(x) for x in xs])
    assert (best, idx, scores) == ("bbb", 1, [1.0, 3.0, 2.0, 3.0])
    assert rerank([1, 2], lambda xs: torch.tensor([0.5, -1.0]))[1] == 0
    with pytest.raises(ValueError, match="candidates"):
        rerank([], len)
    with pytest.raises(ValueError, match="score_fn"):
        rerank(["a"], lambda xs: [1, 2])


def test_best_of_n_with_generate():
    model = make_tiny_llama(seed=0, vocab_size=64)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([[0, 4, 5], [7, 8, 9]])
    mask = (ids != 0).long()

    def score_fn(seqs):  # number of generated tokens below 20
        return (seqs[:, 3:] < 20).sum(1).float()

    torch.manual_seed(0)
    out = best_of_n(model, ids, score_fn, n=5, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert isinstance(out, BestOfNOutput)
    assert out.candidates.shape == (2, 5, 9) and out.scores.shape == (2, 5) and out.sequences.shape == (2, 9)
    for b in range(2):
        # every candidate continues its own prompt
        assert out.candidates[b, :, :3].eq(ids[b]).all()
        recomputed = score_fn(out.candidates[b])
        torch.testing.assert_close(out.scores[b], recomputed)
        assert out.best_index[b] == int(recomputed.argmax())
        assert out.scores[b, out.best_index[b]] == recomputed.max()
        assert torch.equal(out.sequences[b], out.candidates[b, out.best_index[b]])
    assert len({tuple(c.tolist()) for c in out.candidates[1]}) > 1  # really sampled
    with pytest.raises(ValueError, match="score_fn"):
        best_of_n(model, ids, lambda s: torch.zeros(3), n=2, max_new_tokens=1, pad_token_id=0)
    with pytest.raises(ValueError, match="n"):
        best_of_n(model, ids, score_fn, n=0)


def test_processors_compose_in_a_logits_processor_list():
    model = make_tiny_llama(seed=0, vocab_size=64)
    model.generation_config.eos_token_id = None
    amateur = make_tiny_llama(seed=1, vocab_size=64, num_layers=1)
    procs = LogitsProcessorList([ContrastiveDecodingLogitsProcessor(amateur)])
    out = best_of_n(model, torch.tensor([[3, 4]]), lambda s: s[:, -1].float(), n=3, max_new_tokens=3,
                    do_sample=False, num_beams=3, logits_processor=procs)
    assert out.candidates.shape == (1, 3, 5)


NAN = float("nan")


class _FixedGenerator(torch.nn.Module):
    """``generate`` returns ``n`` fixed candidates per prompt: candidate ``j`` ends with token ``j``."""

    def generate(self, input_ids, attention_mask=None, num_return_sequences=1, **kwargs):
        rows = input_ids.repeat_interleave(num_return_sequences, 0)
        last = torch.arange(num_return_sequences).repeat(input_ids.shape[0])[:, None]
        return torch.cat([rows, last], 1)


def _reference_best(scores):
    """First index of the largest non-NaN score (written out independently of the library)."""
    finite = [(s, -i) for i, s in enumerate(scores) if s == s]
    return -max(finite)[1]


@pytest.mark.parametrize(
    "scores",
    [[1.0, NAN, 0.5, 0.2], [NAN, 1.0, 0.0], [NAN, float("-inf")], [0.3, NAN, NAN, 0.3],
     [float("-inf"), NAN, float("-inf")]],
)
def test_nan_scores_never_win(scores):
    best, idx, got = rerank(list("abcd")[: len(scores)], lambda xs: torch.tensor(scores))
    assert idx == _reference_best(scores) and best == "abcd"[idx]
    assert [s != s for s in got] == [s != s for s in scores]  # the scores come back as given
    batch = 3
    out = best_of_n(_FixedGenerator(), torch.zeros(batch, 2, dtype=torch.long),
                    lambda seqs: torch.tensor(scores)[seqs[:, -1]], n=len(scores))
    assert out.best_index.tolist() == [_reference_best(scores)] * batch
    assert out.sequences[:, -1].tolist() == [_reference_best(scores)] * batch


def test_nan_raise_option_and_all_nan_rows():
    with pytest.raises(ValueError, match="score_fn: NaN"):
        rerank(["a", "b"], lambda xs: [1.0, NAN], nan="raise")
    with pytest.raises(ValueError, match=r"score_fn: NaN scores at \(prompt, candidate\) \[\(1, 0\)\]"):
        best_of_n(_FixedGenerator(), torch.zeros(2, 1, dtype=torch.long),
                  lambda seqs: torch.tensor([0.0, 1.0, NAN, 1.0]), n=2, nan="raise")
    assert rerank(["a", "b"], lambda xs: [0.0, 1.0], nan="raise")[1] == 1
    with pytest.raises(ValueError, match="nan: expected 'lose' or 'raise'"):
        rerank(["a"], lambda xs: [1.0], nan="ignore")
    with pytest.warns(RuntimeWarning, match=r"prompt\(s\) \[1\]"):
        out = best_of_n(_FixedGenerator(), torch.zeros(2, 1, dtype=torch.long),
                        lambda seqs: torch.tensor([0.0, 1.0, NAN, NAN]), n=2)
    assert out.best_index.tolist() == [1, 0]


def test_unparsable_judge_reply_loses_in_rerank():
    from alignlab.data import parse_judge_score

    replies = {"x": "Score: 2", "y": "I cannot rate this.", "z": "Score: 4"}
    best, idx, scores = rerank(["y", "x", "z"], lambda xs: [parse_judge_score(replies[c]) for c in xs])
    assert (best, idx) == ("z", 2) and scores[0] != scores[0]
    best, idx, _ = rerank(["y", "x"], lambda xs: [parse_judge_score(replies[c]) for c in xs])
    assert (best, idx) == ("x", 1)


def test_documented_reward_recipe_scores_candidates_without_their_left_padding():
    # generate's sequences of a batch keep the prompts' left padding; a reward model fed those rows
    # as they are (reward_scores(rm, seqs), the old docs recipe) attends to the pads and scores a
    # padded prompt's candidates differently. reward_model_fn strips the padding first.
    transformers = pytest.importorskip("transformers")
    from alignlab.decoding import reward_model_fn
    from alignlab.eval import reward_scores

    policy = make_tiny_llama(seed=0, vocab_size=64)
    policy.generation_config.eos_token_id = None
    torch.manual_seed(5)
    rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0)).eval()
    ids = torch.tensor([[0, 0, 0, 12, 30], [5, 6, 7, 8, 9]])
    torch.manual_seed(0)
    out = best_of_n(policy, ids, reward_model_fn(rm, pad_token_id=0), n=3, attention_mask=(ids != 0).long(),
                    max_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        alone = torch.stack([torch.stack([rm(input_ids=c[3 if b == 0 else 0:][None]).logits[0, 0] for c in row])
                             for b, row in enumerate(out.candidates)])
    torch.testing.assert_close(out.scores, alone)
    padded = reward_scores(rm, out.candidates.flatten(0, 1)).view(2, 3)
    assert not torch.allclose(padded[0], alone[0])  # what the old recipe computed for the padded prompt


def test_rerank_accepts_a_column_of_scores():
    # A reward head returns (n, 1); the docstring promises one score per candidate.
    col = rerank(["a", "b", "c"], lambda xs: torch.tensor([[0.1], [0.9], [0.3]]))
    flat = rerank(["a", "b", "c"], lambda xs: torch.tensor([0.1, 0.9, 0.3]))
    assert col[:2] == flat[:2] == ("b", 1)
    assert col[2] == pytest.approx(flat[2])
    assert rerank(["a", "b"], lambda xs: [[2.0], [1.0]])[1] == 0


def test_rerank_bad_score_shapes_name_score_fn():
    for raw in (torch.zeros(2, 2), torch.zeros(2, 1, 1), torch.tensor(1.0), [[1.0, 2.0], [3.0, 4.0]], ["x", "y"]):
        with pytest.raises(ValueError, match=r"score_fn: expected 2 scores, shape \(2,\) or \(2, 1\)"):
            rerank(["a", "b"], lambda xs, raw=raw: raw)


class _CountingGenerate(torch.nn.Module):
    """generate() that returns the prompt plus the candidate index, to check how many were asked for."""

    def generate(self, input_ids, attention_mask=None, num_return_sequences=1, **kwargs):
        rows = input_ids.repeat_interleave(num_return_sequences, 0)
        index = torch.arange(num_return_sequences).repeat(input_ids.shape[0])[:, None]
        return torch.cat([rows, index], 1)


def test_best_of_n_count_is_an_int_numpy_included_bool_refused():
    """n=True was taken as one candidate; n=np.int64(4) from a sweep was refused."""
    np = pytest.importorskip("numpy")
    ids = torch.tensor([[5, 6]])
    out = best_of_n(_CountingGenerate(), ids, lambda s: s[:, -1].float(), n=np.int64(4))
    assert out.candidates.shape == (1, 4, 3) and int(out.best_index[0]) == 3
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        best_of_n(_CountingGenerate(), ids, lambda s: s[:, -1].float(), n=True)


def test_best_of_n_keeps_float64_scores_apart_as_rerank_does():
    """Scores were cast to float32, so float64 rewards 1e-9 apart tied and the first candidate won."""
    ids = torch.tensor([[5, 6]])
    close = [1.0, 1.0 + 1e-9, 1.0 - 1e-9]
    for score_fn in (lambda s: torch.tensor(close, dtype=torch.float64), lambda s: list(close)):
        out = best_of_n(_CountingGenerate(), ids, score_fn, n=3)
        assert int(out.best_index[0]) == 1 == rerank([0, 1, 2], lambda c: close)[1]
        assert out.scores.dtype == torch.float64
    half = best_of_n(_CountingGenerate(), ids, lambda s: torch.tensor([1.0, 3.0, 2.0], dtype=torch.bfloat16), n=3)
    assert half.scores.dtype == torch.float32 and int(half.best_index[0]) == 1


def test_best_of_n_accepts_a_column_of_scores_as_rerank_does():
    """``lambda s: rm(s).logits`` gives (batch * n, 1): rerank took that shape, best_of_n refused it."""
    values = torch.tensor([0.2, 0.9, 0.1, 0.4, 0.3, 0.8])  # 2 prompts x 3 candidates, by the candidate's last token
    col = best_of_n(_FixedGenerator(), torch.zeros(2, 2, dtype=torch.long),
                    lambda seqs: values.view(2, 3)[torch.arange(6) // 3, seqs[:, -1]][:, None], n=3)
    assert col.best_index.tolist() == [1, 2] and col.scores.shape == (2, 3)
    for bad in (torch.zeros(6, 2), torch.zeros(3, 1), torch.zeros(6, 1, 1)):
        with pytest.raises(ValueError, match=r"score_fn: expected 6 scores, shape \(6,\) or \(6, 1\)"):
            best_of_n(_FixedGenerator(), torch.zeros(2, 2, dtype=torch.long), lambda seqs, bad=bad: bad, n=3)


def test_best_of_n_names_bad_input_ids_and_a_second_num_return_sequences():
    """A list input_ids failed with AttributeError ('list' object has no attribute 'dim'), and a
    num_return_sequences among the generate arguments with generate's "multiple values" TypeError."""
    score = lambda s: s[:, -1].float()  # noqa: E731
    for bad in ([[5, 6]], torch.tensor([[5.0, 6.0]]), torch.tensor([5, 6])):
        with pytest.raises(ValueError, match="input_ids: expected an integer tensor of shape"):
            best_of_n(_CountingGenerate(), bad, score, n=2)
    with pytest.raises(ValueError, match="num_return_sequences: best_of_n sets it to n"):
        best_of_n(_CountingGenerate(), torch.tensor([[5, 6]]), score, n=2, num_return_sequences=2)
