import pytest
import torch
from conftest import make_tiny_llama

from alignlab.decoding import RewardGuidedLogitsProcessor, reward_guided_logits, reward_model_fn

transformers = pytest.importorskip("transformers")


def test_hand_built_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = reward_guided_logits(logits, torch.tensor([[1, 2]]), torch.tensor([[0.0, 5.0]]), weight=0.5)
    inf = float("inf")
    torch.testing.assert_close(out, torch.tensor([[-inf, 3.0, 4.5, -inf]]))
    with pytest.raises(ValueError, match="candidate"):
        reward_guided_logits(logits, torch.tensor([[1, 2]]), torch.tensor([[0.0]]), weight=1.0)


def test_processor_scores_every_top_k_extension():
    seen = []

    def reward_fn(ids):
        seen.append(ids.clone())
        return (ids[:, -1] % 3).float()  # depends on the candidate token

    scores = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0, 6.0]])
    prefix = torch.tensor([[7, 8], [9, 10]])
    out = RewardGuidedLogitsProcessor(reward_fn, weight=2.0, top_k=3)(prefix, scores)
    ext = seen[0]
    assert ext.shape == (6, 3) and ext[:3, :2].eq(prefix[0]).all() and ext[3:, :2].eq(prefix[1]).all()
    inf = float("inf")
    # row 0: top-3 = 1, 2, 3 -> 4 + 2*1, 3 + 2*2, 2 + 2*0 ; row 1: top-3 = 4, 0, then the first zero (id 1)
    expected = torch.tensor([[-inf, 6.0, 7.0, 2.0, -inf], [5.0, 2.0, -inf, -inf, 8.0]])
    assert torch.isinf(out).sum() == 4
    torch.testing.assert_close(out[0], expected[0])
    assert out[1, 0] == 5.0 and out[1, 4] == 8.0
    with pytest.raises(ValueError, match="top_k"):
        RewardGuidedLogitsProcessor(reward_fn, top_k=0)
    with pytest.raises(ValueError, match="weight"):
        RewardGuidedLogitsProcessor(reward_fn, weight=-1.0)
    with pytest.raises(TypeError, match="reward_fn"):
        RewardGuidedLogitsProcessor(3)
    with pytest.raises(ValueError, match="rewards"):
        RewardGuidedLogitsProcessor(lambda ids: torch.zeros(1), top_k=2)(prefix, scores)


def _reward_model():
    torch.manual_seed(5)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config).eval()


def test_generate_matches_args_greedy_oracle_with_a_reward_model():
    policy = make_tiny_llama(seed=0, vocab_size=64)
    policy.generation_config.eos_token_id = None
    rm = _reward_model()
    ids = torch.tensor([[0, 0, 12, 30], [5, 6, 7, 8]])
    weight, k, steps = 3.0, 4, 4
    reward_fn = reward_model_fn(rm, pad_token_id=0, batch_size=5)
    proc = RewardGuidedLogitsProcessor(reward_fn, weight=weight, top_k=k)
    out = policy.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0, logits_processor=[proc])
    plain = policy.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=steps, do_sample=False,
                            pad_token_id=0)
    assert not torch.equal(out, plain)
    with torch.no_grad():
        for row, prompt in zip(out, ([12, 30], [5, 6, 7, 8])):
            seq = torch.tensor(prompt)
            for _ in range(steps):
                logits = policy(input_ids=seq[None]).logits[0, -1]
                best, best_score = None, -float("inf")
                for v in logits.topk(k).indices.tolist():
                    r = rm(input_ids=torch.cat([seq, torch.tensor([v])])[None]).logits[0, 0]
                    if logits[v] + weight * r > best_score:
                        best, best_score = v, logits[v] + weight * r
                seq = torch.cat([seq, torch.tensor([best])])
            assert row[-len(seq):].tolist() == seq.tolist()


def test_nan_rewards_lose_or_raise():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    ids = torch.tensor([[1, 2], [1, 2], [1, 2]])
    rewards = torch.tensor([[nan, -5.0], [0.0, 1.0], [nan, nan]])
    with pytest.warns(RuntimeWarning, match=r"row\(s\) \[2\]"):
        out = reward_guided_logits(logits, ids, rewards, weight=0.5)
    # row 0: the NaN candidate loses even to a much worse reward; row 2: only NaN, plain logits kept
    expected = torch.tensor([[-inf, -inf, -0.5, -inf], [-inf, 3.0, 2.5, -inf], [-inf, 3.0, 2.0, -inf]])
    torch.testing.assert_close(out, expected)
    assert not out.isnan().any() and out.argmax(1).tolist() == [2, 1, 1]
    torch.testing.assert_close(reward_guided_logits(logits, ids, rewards, weight=0.0),
                               torch.tensor([[-inf, 3.0, 2.0, -inf]] * 3))  # weight 0 ignores rewards
    with pytest.raises(ValueError, match=r"candidate_rewards: NaN rewards in row\(s\) \[0, 2\]"):
        reward_guided_logits(logits, ids, rewards, weight=0.5, nan="raise")
    with pytest.raises(ValueError, match="nan: expected"):
        reward_guided_logits(logits, ids, rewards, weight=0.5, nan="skip")

    proc = RewardGuidedLogitsProcessor(lambda ext: torch.where(ext[:, -1] == 1, nan, 0.0), weight=1.0, top_k=2)
    out = proc(torch.tensor([[7]]), logits[:1])
    assert out.argmax(1).tolist() == [2]  # token 1 has the best logit but a NaN reward
    with pytest.raises(ValueError, match="NaN rewards"):
        RewardGuidedLogitsProcessor(lambda ext: torch.full((ext.shape[0],), nan), top_k=2, nan="raise")(
            torch.tensor([[7]]), logits[:1])
    for bad in (nan, inf):
        with pytest.raises(ValueError, match="weight"):
            RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), weight=bad)
    with pytest.raises(TypeError, match="weight"):  # no number at all
        RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), weight="1")
    with pytest.raises(ValueError, match="nan"):
        RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), nan="zero")


def test_function_weight_must_be_a_finite_number():
    # the processor refuses a NaN/inf weight; the plain function gave all-NaN scores for NaN
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    ids, rewards = torch.tensor([[1, 2]]), torch.tensor([[0.0, 5.0]])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight: expected a finite number"):
            reward_guided_logits(logits, ids, rewards, weight=bad)
    for bad in ("1", None, True):  # no real number at all: TypeError naming it
        with pytest.raises(TypeError, match="weight: expected a finite number"):
            reward_guided_logits(logits, ids, rewards, weight=bad)
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(reward_guided_logits(logits, ids, rewards, weight=np.float32(0.5)),
                               reward_guided_logits(logits, ids, rewards, weight=0.5))


def test_processor_refuses_bool_top_k_and_weight():
    for kwargs in ({"top_k": True}, {"weight": True}):  # a bool is no number here: TypeError naming it
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), **kwargs)


@pytest.mark.parametrize("own_pad", [63, None])
def test_reward_model_fn_right_pads_with_the_reward_models_own_pad_id(own_pad):
    # The generating pad id (here 0) strips the left padding; the reward model finds its last real
    # token through *its* config.pad_token_id, so right padding must use that id. Padding with 0
    # made it read a padded position: a silently wrong reward for every shorter row of a batch.
    # A reward model without a pad id (None): the docs' fallback to the policy's pad id raised transformers'
    # "Cannot handle batch sizes > 1 if no padding token is defined"; it is now lent one per batched call.
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=own_pad, num_labels=1)
    torch.manual_seed(0)
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    rows = [torch.tensor([5, 6, 7, 8, 9, 10, 11]), torch.tensor([12, 13, 14, 15])]
    with torch.no_grad():
        want = torch.stack([rm(input_ids=r[None]).logits[0, 0] for r in rows])
    left_padded = torch.zeros(2, 7, dtype=torch.long)
    left_padded[0], left_padded[1, 3:] = rows[0], rows[1]
    torch.testing.assert_close(reward_model_fn(rm, pad_token_id=0)(left_padded), want, rtol=1e-5, atol=1e-5)
    assert rm.config.pad_token_id == own_pad


def test_processor_takes_a_numpy_top_k():
    np = pytest.importorskip("numpy")
    proc = RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), top_k=np.int64(2))
    assert proc.top_k == 2 and type(proc.top_k) is int
    out = proc(torch.tensor([[1]]), torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    assert torch.isfinite(out).sum() == 2


@pytest.mark.parametrize("kwargs", [{"pad_token_id": 1.5}, {"pad_token_id": True}, {"pad_token_id": -1},
                                    {"batch_size": 0}, {"batch_size": 2.5},
                                    {"eos_token_id": 1.5}, {"eos_token_id": [2, -1]}])
def test_reward_model_fn_checks_its_arguments_when_made(kwargs):
    """pad_token_id=1.5 matched no token, so the left padding was scored; a bad batch_size surfaced only
    at the first generation step."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        reward_model_fn(lambda input_ids, attention_mask: attention_mask.sum(1).float(), **kwargs)


def _classifier(pad_token_id: int, eos_token_id: int | None = None):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id,
                                   eos_token_id=eos_token_id, num_labels=1)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def _alone(rows: torch.Tensor, prompt_len: int, pad: int, eos: set[int]) -> list[torch.Tensor]:
    """Each row as it would be generated alone: no left padding, cut right after its first generated eos."""
    out = []
    for row in rows:
        start = int((row != pad).nonzero()[0])
        new = row[prompt_len:].tolist()
        end = next((prompt_len + i + 1 for i, t in enumerate(new) if t in eos), row.numel())
        out.append(row[start:end])
    return out


@pytest.mark.parametrize("pad", [0, 2])  # a pad id of its own; the pad id that is also the eos
def test_reward_model_fn_scores_a_finished_candidate_without_the_pads_generate_appends(pad):
    """generate fills a row that ended early with pad_token_id up to the batch's longest; the reward
    model (whose own pad id differs) read those pads as text and scored the last of them, so
    best-of-N ranked every candidate that stopped early by a wrong reward."""
    from alignlab.decoding import best_of_n

    eos = [2, 9, 17, 33, 41, 50]
    policy = make_tiny_llama(seed=0, vocab_size=64)
    rm = _classifier(pad_token_id=63, eos_token_id=eos)
    ids = torch.tensor([[pad, pad, 12, 30], [5, 6, 7, 8]])
    torch.manual_seed(1)
    out = best_of_n(policy, ids, reward_model_fn(rm, pad_token_id=pad), n=4, attention_mask=(ids != pad).long(),
                    max_new_tokens=8, pad_token_id=pad, eos_token_id=eos)
    rows = out.candidates.flatten(0, 1)
    alone = _alone(rows, 4, pad, set(eos))
    assert any(r.numel() < rows.shape[1] - 2 for r in alone)  # some candidates really stopped early
    with torch.no_grad():
        want = torch.stack([rm(input_ids=r[None]).logits[0, 0] for r in alone])
    torch.testing.assert_close(out.scores.flatten(), want)


def test_reward_model_fn_trailing_pads_with_pad_as_eos_keep_the_generated_eos():
    seen = []

    def recorder(input_ids, attention_mask):
        seen.extend(r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask))
        return attention_mask.sum(1).float()

    rows = torch.tensor([[2, 5, 6, 2, 2], [5, 6, 7, 9, 2], [2, 2, 5, 6, 7], [5, 6, 7, 8, 2]])
    reward_model_fn(recorder, pad_token_id=2, eos_token_id=[2, 9])(rows)
    # the pad that ended row 0 is its eos; row 1 ended on 9; row 3 generated the pad id 2 as its eos
    assert sorted(seen) == sorted([[5, 6, 2], [5, 6, 7, 9], [5, 6, 7], [5, 6, 7, 8, 2]])  # any batching order
    seen.clear()
    reward_model_fn(recorder, pad_token_id=0, eos_token_id=9)(torch.tensor([[0, 5, 9, 0, 0], [5, 6, 7, 8, 9]]))
    assert sorted(seen) == [[5, 6, 7, 8, 9], [5, 9]]


@pytest.mark.parametrize("bad", ["3", None, object(), True])
def test_counts_of_the_wrong_kind_are_type_errors_naming_them(bad):
    """top_k and batch_size that are no number at all were ValueErrors; the convention is TypeError (a number that
    is no count, 0 or 2.5, stays a ValueError)."""
    with pytest.raises(TypeError, match="top_k"):
        RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), top_k=bad)
    with pytest.raises(TypeError, match="batch_size"):
        reward_model_fn(lambda input_ids, attention_mask: input_ids.sum(1).float(), batch_size=bad)
    for number in (0, 2.5):
        with pytest.raises(ValueError, match="top_k"):
            RewardGuidedLogitsProcessor(lambda ext: ext[:, -1].float(), top_k=number)
        with pytest.raises(ValueError, match="batch_size"):
            reward_model_fn(lambda input_ids, attention_mask: input_ids.sum(1).float(), batch_size=number)



def test_candidate_ids_outside_the_vocabulary_or_not_integers_are_refused():
    """An id past the vocabulary raised gather's RuntimeError (index out of bounds); float ids gather's dtype error."""
    logits = torch.randn(2, 64)
    rewards = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"candidate_ids must be token ids in \[0, 64\).*\[1, 100\]"):
        reward_guided_logits(logits, torch.tensor([[100, 1, 2], [3, 4, 5]]), rewards, weight=1.0)
    with pytest.raises(ValueError, match="candidate_ids must be token ids"):
        reward_guided_logits(logits, torch.tensor([[-1, 1, 2], [3, 4, 5]]), rewards, weight=1.0)
    with pytest.raises(TypeError, match="candidate_ids must be an integer tensor"):
        reward_guided_logits(logits, torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]), rewards, weight=1.0)
    with pytest.raises(TypeError, match="candidate_ids must be an integer tensor"):
        reward_guided_logits(logits, [[1, 2, 3], [3, 4, 5]], rewards, weight=1.0)
    out = reward_guided_logits(logits, torch.tensor([[63, 0, 2], [3, 4, 5]], dtype=torch.int32), rewards, weight=1.0)
    assert torch.isfinite(out[0, 63]) and out[0, 1] == -float("inf")
