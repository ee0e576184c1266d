"""Packing: a packed forward of a tiny Llama equals the unpadded per-sample forward."""

import pytest
import torch

from alignlab.data.packing import (
    collate_packed,
    collate_padded,
    collate_padding_free,
    cu_seq_lens_from_position_ids,
    pack_examples,
    packed_attention_mask,
)
from alignlab.data.sft import IGNORE_INDEX

LENGTHS = [5, 9, 1, 7, 12, 3]


def make_examples(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = [t if i >= n // 2 else IGNORE_INDEX for i, t in enumerate(ids)]  # completion = 2nd half
        out.append({"input_ids": ids, "labels": labels})
    return out


def per_sample(model, examples):
    """Oracle: each sample alone, no padding, default positions and mask."""
    logits, losses = [], []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        out = model(ids).logits[0]
        logits.append(out)
        lab = torch.tensor(e["labels"])
        lab[0] = IGNORE_INDEX
        losses.append(torch.nn.functional.cross_entropy(out[:-1], lab[1:], ignore_index=IGNORE_INDEX,
                                                        reduction="sum"))
    return logits, torch.stack(losses).sum()


def packed_loss_sum(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def test_pack_examples_layout():
    rows = list(pack_examples(iter(make_examples()), max_length=16))
    assert [r["seq_lens"] for r in rows] == [[5, 9, 1], [7], [12, 3]]
    for r in rows:
        assert r["position_ids"] == [p for n in r["seq_lens"] for p in range(n)]
        starts = [sum(r["seq_lens"][:k]) for k in range(len(r["seq_lens"]))]
        assert all(r["labels"][s] == IGNORE_INDEX for s in starts)
    with pytest.raises(ValueError, match="longer than max_length=10"):
        list(pack_examples(make_examples(), max_length=10))
    assert [r["seq_lens"] for r in pack_examples(make_examples(), 10, overflow="skip")] == [[5], [9, 1], [7, 3]]


def test_packed_mask_written_out():
    m = packed_attention_mask([[2, 3], [4]], length=6)[:, 0]
    expect = torch.zeros(2, 6, 6, dtype=torch.bool)
    for b, segs in enumerate([[(0, 2), (2, 5), (5, 6)], [(0, 4), (4, 5), (5, 6)]]):
        for s, e in segs:
            for i in range(s, e):
                for j in range(s, i + 1):
                    expect[b, i, j] = True
    assert torch.equal(m, expect)
    pos = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]])
    assert torch.equal(packed_attention_mask(pos)[:, 0], expect)
    add = packed_attention_mask([[2, 3]], dtype=torch.float32)
    assert add.dtype == torch.float32 and add.max() == 0 and add.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_equal_per_sample(attn):
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=3, vocab_size=64, hidden_size=32, num_layers=2)
    model.set_attn_implementation(attn)
    examples = make_examples()
    rows = list(pack_examples(examples, max_length=16))
    batch = collate_packed(rows, pad_token_id=0, length=16, mask_dtype=torch.float32)
    mask = batch["attention_mask"]
    assert torch.equal(packed_attention_mask(batch["position_ids"], dtype=torch.float32), mask)
    # the mask of the attention in use, with no dtype given: additive for eager, bool for SDPA
    auto = collate_packed(rows, pad_token_id=0, length=16, attn_implementation=model.config._attn_implementation)
    assert auto["attention_mask"].dtype == (torch.float32 if attn == "eager" else torch.bool)
    assert torch.equal(auto["attention_mask"] == 0 if attn == "eager" else auto["attention_mask"], mask == 0)
    with torch.no_grad():
        ref_logits, ref_loss = per_sample(model, examples)
        out = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        out_auto = model(**{k: auto[k] for k in ("input_ids", "position_ids", "attention_mask")}).logits
    torch.testing.assert_close(out_auto, out, rtol=1e-5, atol=1e-5)
    k = 0
    for b, r in enumerate(rows):
        start = 0
        for n in r["seq_lens"]:
            torch.testing.assert_close(out[b, start:start + n], ref_logits[k], rtol=1e-5, atol=1e-5)
            start, k = start + n, k + 1
    torch.testing.assert_close(packed_loss_sum(out, batch["labels"]), ref_loss, rtol=1e-5, atol=1e-5)


def test_padding_free_equals_per_sample_with_gradients():
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=4, vocab_size=64, hidden_size=32, num_layers=2)
    examples = make_examples(seed=1)
    batch = collate_padding_free(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["cu_seq_lens"].tolist() == [0, 5, 14, 15, 22, 34, 37]
    assert torch.equal(cu_seq_lens_from_position_ids(batch["position_ids"]), batch["cu_seq_lens"])
    assert batch["max_length"] == 12

    _, ref_loss = per_sample(model, examples)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # no attention_mask: transformers derives the block-diagonal mask from the position resets
    # (only without a KV cache, hence use_cache=False)
    out = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = packed_loss_sum(out, batch["labels"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # and the explicit mask gives the same logits
    with torch.no_grad():
        mask = packed_attention_mask(batch["position_ids"], dtype=torch.float32)
        torch.testing.assert_close(model(batch["input_ids"], position_ids=batch["position_ids"],
                                         attention_mask=mask).logits, out.detach(), rtol=1e-5, atol=1e-5)


def test_naive_concatenation_differs():
    """The test above can fail: without resets and block mask, samples leak into each other."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=4, vocab_size=64, hidden_size=32, num_layers=2)
    examples = make_examples(seed=1)
    batch = collate_padding_free(examples)
    with torch.no_grad():
        ref, _ = per_sample(model, examples)
        leaky = model(batch["input_ids"]).logits[0]
    assert not torch.allclose(leaky[5:14], ref[1], atol=1e-4)


def test_collate_padded_and_errors():
    ex = make_examples()[:2]
    right = collate_padded(ex, pad_token_id=0, pad_to_multiple_of=8)
    assert right["input_ids"].shape == (2, 16)
    assert right["attention_mask"].sum(1).tolist() == [5, 9]
    assert right["labels"][0, 5:].eq(IGNORE_INDEX).all() and right["input_ids"][0, 5:].eq(0).all()
    left = collate_padded(ex, pad_token_id=0, padding_side="left")
    assert left["input_ids"][0, -5:].tolist() == ex[0]["input_ids"]
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], 0)
    with pytest.raises(ValueError, match="empty"):
        collate_padding_free([])
    with pytest.raises(ValueError, match="differ in length"):
        list(pack_examples([{"input_ids": [1, 2], "labels": [1]}], 4))
    with pytest.raises(ValueError, match="max_length"):
        list(pack_examples([], 0))
    with pytest.raises(ValueError, match="shorter"):
        packed_attention_mask([[3, 3]], length=5)
    with pytest.raises(ValueError, match="start at 0"):
        cu_seq_lens_from_position_ids(torch.tensor([[1, 2]]))


def test_padding_free_matches_transformers_flattening_collator():
    transformers = pytest.importorskip("transformers")
    examples = make_examples(seed=2)
    peer = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples, return_tensors="pt")
    ours = collate_padding_free(examples)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], peer[key]), key
    assert torch.equal(ours["cu_seq_lens"].long(), peer["cu_seq_lens_q"].long())
    assert ours["max_length"] == int(peer["max_length_q"])


def test_collate_packed_bool_mask_trap_is_visible():
    """Eager attention adds the mask to the scores: a bool mask changes the logits (the trap), so the
    default bool mask warns and asks for the attention implementation."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=3, vocab_size=64, hidden_size=32, num_layers=2)
    model.set_attn_implementation("eager")
    rows = list(pack_examples(make_examples(), max_length=16))
    with pytest.warns(UserWarning, match="bool attention_mask.*eager"):
        plain = collate_packed(rows, pad_token_id=0, length=16)
    right = collate_packed(rows, pad_token_id=0, length=16, attn_implementation="eager")
    with torch.no_grad():
        wrong = model(plain["input_ids"], position_ids=plain["position_ids"], attention_mask=plain["attention_mask"])
        good = model(right["input_ids"], position_ids=right["position_ids"], attention_mask=right["attention_mask"])
    assert (wrong.logits - good.logits).abs().max() > 1e-2  # the trap is real
    with pytest.raises(ValueError, match="attn_implementation"):
        collate_packed(rows, pad_token_id=0, attn_implementation="flash_attention_2")


def test_padding_free_batch_carries_use_cache_false_and_names_an_empty_sample():
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=4, vocab_size=64, hidden_size=32, num_layers=2)
    examples = make_examples(seed=1)
    batch = collate_padding_free(examples)
    assert batch["use_cache"] is False and model.config.use_cache  # the model's default would build a cache
    with torch.no_grad():
        ref, _ = per_sample(model, examples)
        out = model(**batch).logits[0]  # extra keys (cu_seq_lens, max_length) are ignored by eager/SDPA
        cached = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(out[5:14], ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached[5:14], ref[1], atol=1e-4)  # with a cache the samples leak
    with pytest.raises(ValueError, match="example 0 is empty"):
        collate_padding_free([{"input_ids": [], "labels": []}])
    with pytest.raises(ValueError, match="example 1 is empty"):
        collate_padding_free([examples[0], {"input_ids": [], "labels": []}])


def test_bool_mask_dtype_gives_the_bool_mask_and_integer_dtypes_are_refused(recwarn):
    """mask_dtype=torch.bool (the SDPA kind) crashed in torch.finfo; an integer dtype did too, deep inside."""
    rows = list(pack_examples(make_examples(), max_length=16))
    bool_mask = packed_attention_mask([r["seq_lens"] for r in rows], 16)
    assert torch.equal(packed_attention_mask([r["seq_lens"] for r in rows], 16, dtype=torch.bool), bool_mask)
    batch = collate_packed(rows, pad_token_id=0, length=16, mask_dtype=torch.bool)
    assert batch["attention_mask"].dtype == torch.bool and torch.equal(batch["attention_mask"], bool_mask)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # the kind was chosen: no warning
    for dtype in (torch.long, torch.int32, torch.uint8):
        with pytest.raises(ValueError, match="dtype must be None, torch.bool or a floating-point dtype"):
            packed_attention_mask([[2, 1]], dtype=dtype)
        with pytest.raises(ValueError, match="mask_dtype"):
            collate_packed(rows, pad_token_id=0, mask_dtype=dtype)


@pytest.mark.parametrize("pad_token_id", [None, 1.5, True, -1, "0"])
def test_bad_pad_token_id_is_a_value_error_naming_it(pad_token_id):
    """None (a tokenizer without a pad token) crashed inside torch.full; 1.5 and True were read as 1."""
    ex = make_examples()[:2]
    with pytest.raises(ValueError, match="pad_token_id: expected a non-negative int"):
        collate_padded(ex, pad_token_id)
    with pytest.raises(ValueError, match="pad_token_id: expected a non-negative int"):
        collate_packed(list(pack_examples(ex, 16)), pad_token_id, mask_dtype=torch.float32)


@pytest.mark.parametrize("multiple", [0, -3, 2.5, True])
def test_bad_pad_to_multiple_of_is_a_value_error_naming_it(multiple):
    """-3 was silently ignored (length rounded to a multiple of -3 <= the longest row), 2.5 crashed in torch.full."""
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or a positive int"):
        collate_padded(make_examples()[:2], 0, pad_to_multiple_of=multiple)


def test_numpy_pad_arguments_are_accepted():
    np = pytest.importorskip("numpy")
    batch = collate_padded(make_examples()[:2], np.int64(0), pad_to_multiple_of=np.int64(8))
    assert batch["input_ids"].shape == (2, 16)


def test_packed_attention_mask_checks_lengths():
    """Float lengths crashed inside torch.zeros; a length given with position_ids was ignored silently."""
    with pytest.raises(ValueError, match="positive int lengths"):
        packed_attention_mask([[2.0, 1]])
    with pytest.raises(ValueError, match="length must be None or an int"):
        packed_attention_mask([[2, 1]], length=4.5)
    with pytest.raises(ValueError, match="differs from the position_ids' length 3"):
        packed_attention_mask(torch.tensor([[0, 1, 0]]), length=5)
    np = pytest.importorskip("numpy")
    want = packed_attention_mask([[2, 1]], length=4)
    assert torch.equal(packed_attention_mask([[np.int64(2), np.int64(1)]], length=np.int64(4)), want)
    assert torch.equal(packed_attention_mask(torch.tensor([[0, 1, 0, 0]]), length=4), want)


def test_collate_packed_length_must_be_an_int():
    """length=20.5 crashed inside torch.full."""
    rows = list(pack_examples(make_examples(), max_length=16))
    with pytest.raises(ValueError, match="length must be None or an int"):
        collate_packed(rows, pad_token_id=0, length=20.5, mask_dtype=torch.float32)


@pytest.mark.parametrize("bad", [{"input_ids": "abc", "labels": "abc"}, {"input_ids": [1.5, 2], "labels": [1, 2]}])
def test_non_integer_token_ids_are_a_value_error_naming_the_example(bad):
    """pack_examples packed the characters of "abc" (labels [-100, 'b', 'c']); 1.5 was truncated later."""
    with pytest.raises(ValueError, match="example 1: input_ids: expected (a sequence of )?integer token ids"):
        list(pack_examples([{"input_ids": [1, 2], "labels": [1, 2]}, bad], 16))
    with pytest.raises(ValueError, match="example 1"):
        collate_padded([{"input_ids": [1, 2], "labels": [1, 2]}, bad], 0)


def test_tensor_and_numpy_token_ids_pack_as_ints():
    np = pytest.importorskip("numpy")
    ex = [{"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor([-100, 4, 5])},
          {"input_ids": np.array([6, 7]), "labels": np.array([6, 7])}]
    (row,) = pack_examples(ex, 8)
    assert row["input_ids"] == [3, 4, 5, 6, 7] and all(type(t) is int for t in row["input_ids"] + row["labels"])
    assert torch.equal(collate_padding_free(ex)["input_ids"], torch.tensor([[3, 4, 5, 6, 7]]))


def test_cu_seq_lens_from_position_ids_takes_one_row_in_either_shape():
    row = torch.tensor([0, 1, 2, 0, 0, 1])
    for pos in (row, row[None], row.int()):
        assert cu_seq_lens_from_position_ids(pos).tolist() == [0, 3, 4, 6]
    assert cu_seq_lens_from_position_ids(row).dtype == torch.int32


@pytest.mark.parametrize("pos,match", [
    (torch.tensor([[0, 1, 3, 0]]), r"count 0, 1, 2, \.\.\. .* got 3 at index 2 after 1"),  # a gap
    (torch.tensor([[0, 1, 1, 2]]), r"got 1 at index 2 after 1"),  # a repeat
    (torch.tensor([[0, 1, -1, 0]]), r"got -1 at index 2"),  # negative
    (torch.tensor([[0, 2, 3]]), r"got 2 at index 1 after 0"),
    (torch.tensor([[-1, 0, 1]]), "start at 0"),
    (torch.tensor([[0.0, 1.0, 0.0]]), "integer tensor, got dtype torch.float32"),
    (torch.tensor([[True, False]]), "integer tensor, got dtype torch.bool"),
    (torch.tensor([[0, 1], [0, 1]]), r"\(1, total\) or \(total,\), got shape \(2, 2\)"),  # a batch, not one row
    (torch.zeros(1, 1, 3, dtype=torch.long), r"got shape \(1, 1, 3\)"),
    (torch.tensor(0), r"got shape \(\)"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
def test_cu_seq_lens_from_position_ids_refuses_malformed_positions(pos, match):
    """Only a (1, total) row of integer positions that restart at 0 and count up by one within a sample has
    boundaries; anything else used to come back as wrong boundaries (a gap or a repeat was one sample, a
    batch of two rows was read as one row, floats matched 0.0)."""
    with pytest.raises(ValueError, match=f"position_ids.*{match}"):
        cu_seq_lens_from_position_ids(pos)
    with pytest.raises(TypeError, match="position_ids must be a torch.Tensor, got list"):
        cu_seq_lens_from_position_ids([0, 1, 2])


def test_collate_packed_refuses_rows_that_disagree_with_their_seq_lens():
    """The mask comes from seq_lens, the positions from the row: a row cut by hand (seq_lens [5] for 3 tokens)
    was masked as if its tokens were one sample without a word; an unpacked sample was a bare KeyError."""
    row = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0], "seq_lens": [2, 1]}
    assert collate_packed([row], 0, mask_dtype=torch.bool)["attention_mask"].sum() == 4
    for bad in ({**row, "seq_lens": [3]}, {**row, "seq_lens": [2]}, {**row, "labels": [6, 7]},
                {**row, "position_ids": [0, 1, 2]}, {**row, "seq_lens": []}):
        with pytest.raises(ValueError, match=r"rows\[1\]: input_ids \(3\)"):
            collate_packed([row, bad], 0, mask_dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rows\[0\] must be a packed row.*collate_padded"):
        collate_packed([{"input_ids": [5, 6], "labels": [5, 6]}], 0, mask_dtype=torch.bool)


@pytest.mark.parametrize("bad", [[[]], [[3], []], []])
def test_packed_attention_mask_refuses_a_row_without_samples(bad):
    """A row with no sample lengths raised NotImplementedError from repeat_interleave on a float tensor."""
    with pytest.raises(ValueError, match="non-empty list of non-empty lists"):
        packed_attention_mask(bad)


def test_negative_input_ids_are_refused_naming_the_sample():
    """A negative token id (a padding sentinel left in, an off-by-one) is a ValueError naming the sample in every
    collator, not an index error deep in the embedding (or a silent wrap in a hand-written gather)."""
    good = {"input_ids": [3, 4, 5], "labels": [3, 4, 5]}
    bad = {"input_ids": [3, -1, 5], "labels": [-100, -100, 5]}  # -100 labels stay the ignore index
    assert list(pack_examples([good, {"input_ids": [1, 2], "labels": [-100, 2]}], max_length=8))
    for call in (lambda ex: list(pack_examples(ex, max_length=8)), lambda ex: collate_padded(ex, pad_token_id=0),
                 collate_padding_free):
        with pytest.raises(ValueError, match="example 1: input_ids must be token ids >= 0, got -1"):
            call([good, bad])


def test_bool_token_ids_and_float_position_ids_are_refused():
    """True passed as token id 1 (operator.index takes bools), and packed_attention_mask took float position_ids
    that cu_seq_lens_from_position_ids refuses."""
    good = {"input_ids": [3, 4, 5], "labels": [3, 4, 5]}
    for bad in ({"input_ids": [3, True, 5], "labels": [3, 4, 5]}, {"input_ids": [3, 4], "labels": [False, 4]},
                {"input_ids": [3, torch.tensor(True)], "labels": [3, 4]}):
        with pytest.raises(ValueError, match=r"example 1: (input_ids|labels): expected integer token ids, got .*bools"):
            list(pack_examples([good, bad], max_length=8))
    with pytest.raises(ValueError, match="position_ids must be an integer tensor, got dtype torch.float32"):
        packed_attention_mask(torch.tensor([[0.0, 1.0, 0.0]]))
    assert packed_attention_mask(torch.tensor([[0, 1, 0]])).shape[-1] == 3
