import math

import pytest
import torch
from conftest import make_tiny_llama

from alignlab.eval import negative_log_likelihood, perplexity


_CACHE = {}


def _token_nll(model, ids: torch.Tensor, t: int, begin: int = 0) -> float:
    """-log p(ids[t] | ids[begin:t]) from an unbatched, unpadded forward pass.

    A causal model's logits at position t-1 of ids[begin:] depend only on
    ids[begin:t], so one pass per (sequence, begin) serves every t.
    """
    key = (id(model), tuple(ids.tolist()), begin)
    if key not in _CACHE:
        with torch.no_grad():
            logits = model(input_ids=ids[begin:][None]).logits[0].double()
        _CACHE[key] = -torch.log_softmax(logits, -1)
    return float(_CACHE[key][t - begin - 1, ids[t]])


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0, vocab_size=64)


def _sequences(lengths, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def _pad(seqs, left=False):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_padded_batches_match_direct_token_weighted_computation(model, left):
    seqs = _sequences([7, 3, 12, 1, 9])
    direct = [_token_nll(model, s, t) for s in seqs for t in range(1, len(s))]
    expected = math.exp(sum(direct) / len(direct))  # token-weighted, not per-sequence mean
    ids, mask = _pad(seqs, left=left)
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    total, count = negative_log_likelihood(model, batches)
    assert count == len(direct) == sum(len(s) - 1 for s in seqs)
    assert total == pytest.approx(sum(direct), rel=1e-5)
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-5)
    per_seq_mean = sum(math.exp(sum(_token_nll(model, s, t) for t in range(1, len(s))) / (len(s) - 1))
                       for s in seqs if len(s) > 1) / 4
    assert abs(expected - per_seq_mean) > 1e-3  # the two definitions really differ here


def test_labels_mask_prompt_tokens(model):
    (s,) = _sequences([10], seed=1)
    labels = s.clone()
    labels[:4] = -100
    direct = [_token_nll(model, s, t) for t in range(4, 10)]
    total, count = negative_log_likelihood(model, [{"input_ids": s[None], "labels": labels[None]}])
    assert count == 6
    assert total == pytest.approx(sum(direct), rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(4, 3), (5, 2), (6, 1), (40, None)])
def test_strided_windows_match_per_token_context_definition(model, max_length, stride):
    seqs = _sequences([13, 5, 9], seed=2)
    step = max_length - 1 if stride is None else stride
    direct = []
    for s in seqs:
        for t in range(1, len(s)):
            # token t is scored by the first window [k*step, k*step + max_length) that contains it
            begin = next(k * step for k in range(len(s)) if k * step + max_length > t)
            assert begin < t
            direct.append(_token_nll(model, s, t, begin))
    ids, mask = _pad(seqs)
    total, count = negative_log_likelihood(
        model, [{"input_ids": ids, "attention_mask": mask}], max_length=max_length, stride=stride
    )
    assert count == len(direct)
    assert total == pytest.approx(sum(direct), rel=1e-5)


def test_plain_tensor_batches_and_training_mode_restored(model):
    ids = torch.stack(_sequences([6, 6], seed=3))
    model.train()
    try:
        ppl = perplexity(model, [ids])
        assert model.training
    finally:
        model.eval()
    direct = [_token_nll(model, s, t) for s in ids for t in range(1, 6)]
    assert ppl == pytest.approx(math.exp(sum(direct) / len(direct)), rel=1e-5)


def test_bad_input(model):
    ids = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [ids], max_length=4, stride=4)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [ids], stride=2)
    with pytest.raises(ValueError, match="max_length"):
        perplexity(model, [ids], max_length=1)
    with pytest.raises(ValueError, match="no token"):
        perplexity(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        perplexity(model, [torch.ones(5, dtype=torch.long)])
    with pytest.raises(TypeError, match="batches"):
        perplexity(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask"):
        perplexity(model, [{"input_ids": ids, "attention_mask": torch.ones(1, 4)}])


def test_bf16_model_close_to_fp32_and_empty_rows_skipped(model):
    seqs = _sequences([9, 4], seed=4)
    ids, mask = _pad(seqs)
    fp32 = perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    bf16_model = make_tiny_llama(seed=0, vocab_size=64).to(torch.bfloat16)
    bf16 = perplexity(bf16_model, [{"input_ids": ids, "attention_mask": mask}])
    assert bf16 == pytest.approx(fp32, rel=0.03)
    # an all-padding row and an empty batch contribute nothing
    ids2, mask2 = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)]), torch.cat([mask, torch.zeros(1, 9, dtype=torch.long)])
    empty = {"input_ids": torch.zeros(0, 9, dtype=torch.long)}
    assert perplexity(model, [{"input_ids": ids2, "attention_mask": mask2}, empty]) == pytest.approx(fp32, rel=1e-6)


def test_int32_ids_and_labels_score_as_int64(model):
    """Arrow/NumPy datasets hand over int32 ids; cross_entropy wants int64 targets (it raised deep inside)."""
    ids = _sequences([7, 7], seed=3)
    ids = torch.stack(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    expected = negative_log_likelihood(model, [{"input_ids": ids, "labels": labels}])
    for batch in ({"input_ids": ids.int(), "labels": labels.int()}, {"input_ids": ids.int(), "labels": labels}):
        total, count = negative_log_likelihood(model, [batch])
        assert count == expected[1] == 2 * 4
        assert total == pytest.approx(expected[0], rel=1e-6)
    assert perplexity(model, [ids.int()]) == pytest.approx(perplexity(model, [ids]), rel=1e-6)


def test_float_labels_are_refused_naming_labels(model):
    ids = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="'labels' must be an integer tensor"):
        perplexity(model, [{"input_ids": ids, "labels": ids.float()}])


@pytest.mark.parametrize("bad", [1.5, "x", None, True])
def test_ignore_index_must_be_an_int(model, bad):
    """ignore_index=1.5 was written into the labels as 1 but compared as 1.5: padding was scored as token 1."""
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        negative_log_likelihood(model, [batch], ignore_index=bad)
    assert negative_log_likelihood(model, [batch], ignore_index=-1) == negative_log_likelihood(model, [batch])


def test_one_batch_instead_of_an_iterable_of_batches_says_so(model):
    """perplexity(model, ids) iterated the rows and complained that 'input_ids' were not (batch, seq);
    perplexity(model, {"input_ids": ids}) iterated the keys."""
    ids = torch.ones(2, 5, dtype=torch.long)
    for one in (ids, {"input_ids": ids}):
        with pytest.raises(TypeError, match="wrap it in a list"):
            perplexity(model, one)
    assert perplexity(model, [ids]) == perplexity(model, [{"input_ids": ids}])


def test_perplexity_leaves_every_submodule_in_its_own_mode():
    """perplexity ran the model in eval mode and then called model.train(was_training), which put every
    submodule in train mode: a block the caller kept in eval (a frozen part, dropout switched off) came back
    training. Each submodule's mode is restored as it was."""
    model = make_tiny_llama().train()
    model.model.layers[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    perplexity(model, [{"input_ids": torch.randint(0, 128, (1, 8))}])
    assert {name: m.training for name, m in model.named_modules()} == before


@pytest.mark.parametrize("max_length", [None, 4])
def test_packed_batches_score_as_their_samples_alone(model, max_length):
    """A padding-free row (collate_padding_free) had its position_ids dropped: it was scored as one long
    sequence, every sample reading the samples before it (a silently different perplexity); collate_packed's
    4-D mask was refused as a shape mismatch. Both now split at the position resets and score each sample
    alone, as they are trained; with windows, each sample is windowed on its own."""
    from alignlab.data import collate_packed, collate_padding_free, pack_examples

    seqs = _sequences([7, 3, 12, 1, 9, 5], seed=6)
    step = None if max_length is None else max_length - 1
    direct = []
    for s in seqs:
        for t in range(1, len(s)):
            begin = 0 if step is None else next(k * step for k in range(len(s)) if k * step + max_length > t)
            direct.append(_token_nll(model, s, t, begin))
    examples = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs]
    flat = collate_padding_free(examples)
    rows = list(pack_examples(examples, max_length=16))
    assert len(rows) > 1 and any(len(r["seq_lens"]) > 1 for r in rows)
    packed = {kind: collate_packed(rows, 0, length=18, mask_dtype=dtype)
              for kind, dtype in (("bool", torch.bool), ("additive", torch.float32))}
    for batch in (flat, packed["bool"], packed["additive"]):
        total, count = negative_log_likelihood(model, [batch], max_length=max_length)
        assert count == len(direct)
        assert total == pytest.approx(sum(direct), rel=1e-5)
    # the same rows left-padded with generate's position ids (pads clamped to 0) and a 2-D mask
    ids, mask = _pad([torch.tensor(r["input_ids"]) for r in rows], left=True)
    pos = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        pos[b, ids.shape[1] - len(r["position_ids"]):] = torch.tensor(r["position_ids"])
    labels = torch.full_like(ids, -100)
    labels[mask.bool()] = torch.cat([torch.tensor(r["labels"]) for r in rows])
    total, count = negative_log_likelihood(
        model, [{"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}],
        max_length=max_length)
    assert count == len(direct)
    assert total == pytest.approx(sum(direct), rel=1e-5)


def test_packed_batches_refuse_masks_and_positions_that_disagree(model):
    from alignlab.data import collate_packed, pack_examples

    seqs = _sequences([5, 4], seed=7)
    rows = list(pack_examples([{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs], max_length=9))
    batch = collate_packed(rows, 0, mask_dtype=torch.bool)
    with pytest.raises(ValueError, match="position_ids"):  # a 4-D mask alone: no samples to read
        negative_log_likelihood(model, [{k: v for k, v in batch.items() if k != "position_ids"}])
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    with pytest.raises(ValueError, match="block-diagonal"):  # plain causal: the samples would see each other
        negative_log_likelihood(model, [dict(batch, attention_mask=causal)])
    with pytest.raises(ValueError, match="position_ids"):
        negative_log_likelihood(model, [dict(batch, position_ids=batch["position_ids"] + 1)])
    with pytest.raises(ValueError, match="position_ids"):
        negative_log_likelihood(model, [dict(batch, position_ids=batch["position_ids"][:, :4])])
