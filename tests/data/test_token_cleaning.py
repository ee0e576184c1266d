"""Token cleaning: per-token losses, influence ranking, fixed vs self-evolving modes."""

import math

import numpy
import pytest
import torch
from torch import nn

from alignlab.data.packing import collate_padding_free
from alignlab.data.sft import IGNORE_INDEX
from alignlab.data.token_cleaning import (
    TokenCleaner,
    clean_labels,
    influence_threshold,
    token_influence,
    token_losses,
)


class Bigram(nn.Module):
    """logits[t] = W[x_t] + bias: a model whose preferences we can set by hand."""

    def __init__(self, vocab=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.table[input_ids] + self.bias


def make_batch(vocab=16, seed=0, b=3, n=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # a shorter answer
    return ids, labels


def test_token_losses_match_written_out_nll():
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=1)
    ids, labels = make_batch(vocab=32)
    got = token_losses(model, ids, labels)
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if t == 0 or labels[b, t] == IGNORE_INDEX:
                assert math.isnan(got[b, t].item())
            else:
                assert got[b, t].item() == pytest.approx(-logp[b, t - 1, labels[b, t]].item(), rel=1e-5)


def test_packed_scores_equal_unpacked():
    from conftest import make_tiny_llama

    base = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=1)
    ref = make_tiny_llama(seed=1, vocab_size=32, hidden_size=32, num_layers=1)
    ids, labels = make_batch(vocab=32)
    examples = [{"input_ids": ids[b].tolist(), "labels": labels[b].tolist()} for b in range(3)]
    packed = collate_padding_free(examples)
    got = token_influence(base, ref, packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    want = token_influence(base, ref, ids, labels).flatten()
    torch.testing.assert_close(got.flatten(), want, rtol=1e-4, atol=1e-5, equal_nan=True)


def oracle_clean(labels, scores, ratio, scope):
    out = labels.clone()
    groups = [list(range(labels.numel()))] if scope == "batch" else [
        list(range(r * labels.shape[1], (r + 1) * labels.shape[1])) for r in range(labels.shape[0])]
    flat_l, flat_s = labels.flatten(), scores.flatten()
    for grp in groups:
        sup = [i for i in grp if flat_l[i] != IGNORE_INDEX and not math.isnan(flat_s[i])]
        k = math.ceil(len(sup) * ratio)
        kept = set(sorted(sup, key=lambda i: (-flat_s[i].item(), i))[:k])
        for i in grp:
            if i not in kept:
                out.view(-1)[i] = IGNORE_INDEX
    return out


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 1.0])
def test_clean_labels_matches_bruteforce(scope, ratio):
    ids, labels = make_batch(n=12)
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-3, 3, labels.shape, generator=g).float()  # ties
    scores[0, 5] = math.nan
    got = clean_labels(labels, scores, ratio, scope)
    assert torch.equal(got, oracle_clean(labels, scores, ratio, scope))
    assert torch.equal(labels, ids.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX))  # input untouched


def test_threshold_mode_and_global_threshold():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(2, 50, generator=g) for _ in range(4)]
    chunks[0][0, :10] = math.nan
    thr = influence_threshold(iter(chunks), keep_ratio=0.25)
    finite = torch.cat([c[torch.isfinite(c)] for c in chunks])
    assert int((finite >= thr).sum()) == math.ceil(0.25 * finite.numel())
    labels = torch.zeros(2, 50, dtype=torch.long)
    out = clean_labels(labels, chunks[1], threshold=thr)
    assert torch.equal(out != IGNORE_INDEX, chunks[1] >= thr)


def test_influence_finds_the_tokens_the_reference_learned():
    base, ref = Bigram(seed=0), Bigram(seed=0)
    with torch.no_grad():
        ref.bias[7] = 5.0  # the reference has learned to predict token 7
    ids, labels = make_batch(seed=3, n=40)
    target = labels == 7
    assert target.sum() >= 3
    scores = token_influence(base, ref, ids, labels)
    # written out: l_base - l_ref = (lse(z_base) - z_base[y]) - (lse(z_ref) - z_ref[y])
    zb, zr = base(ids)[:, :-1], ref(ids)[:, :-1]
    y = labels[:, 1:].clamp_min(0)[..., None]
    expect = (zb.logsumexp(-1) - zb.gather(-1, y)[..., 0]) - (zr.logsumexp(-1) - zr.gather(-1, y)[..., 0])
    sup = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(scores[:, 1:][sup], expect[sup].detach(), rtol=1e-5, atol=1e-5)
    sup_full = (labels != IGNORE_INDEX)
    sup_full[:, 0] = False
    ratio = (target & sup_full).sum().item() / sup_full.sum().item()
    cleaned = TokenCleaner(base, ref, keep_ratio=ratio)({"input_ids": ids, "labels": labels})
    assert torch.equal(cleaned != IGNORE_INDEX, target & sup_full)


def test_self_evolving_uses_current_model():
    base, ref = Bigram(seed=0), Bigram(seed=1)
    ids, labels = make_batch()
    batch = {"input_ids": ids, "labels": labels}
    fixed = TokenCleaner(base, ref, keep_ratio=0.5)(batch)
    evolving = TokenCleaner(base, mode="self_evolving", keep_ratio=0.5)
    ref.train()
    assert torch.equal(evolving(batch, ref), fixed)
    assert ref.training  # mode restored
    with torch.no_grad():
        ref.bias[3] = 4.0  # the current model moved on: the mask follows it
    assert not torch.equal(evolving(batch, ref), fixed)


def test_scoring_puts_back_each_submodules_own_mode():
    # model.train(was_training) would set the layer the caller kept in eval back to train
    from conftest import make_tiny_llama

    base = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=2)
    model = make_tiny_llama(seed=1, vocab_size=32, hidden_size=32, num_layers=2)
    model.train()
    model.model.layers[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    TokenCleaner(base, mode="self_evolving", keep_ratio=0.5)({"input_ids": ids, "labels": ids}, model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.model.layers[0].training and not any(m.training for m in base.modules())


def test_errors():
    base = Bigram()
    ids, labels = make_batch()
    with pytest.raises(ValueError, match="reference"):
        TokenCleaner(base)
    with pytest.raises(ValueError, match="self_evolving"):
        TokenCleaner(base, base, mode="self_evolving")
    with pytest.raises(ValueError, match="current model"):
        TokenCleaner(base, mode="self_evolving")({"input_ids": ids, "labels": labels})
    with pytest.raises(ValueError, match="exactly one"):
        clean_labels(labels, labels.float())
    with pytest.raises(ValueError, match="keep_ratio"):
        clean_labels(labels, labels.float(), 1.5)
    with pytest.raises(ValueError, match="shapes"):
        clean_labels(labels, labels[:, :3].float(), 0.5)
    with pytest.raises(ValueError, match="input_ids"):
        token_losses(base, ids, labels[:, :3])
    with pytest.raises(ValueError, match="finite"):
        influence_threshold([torch.tensor([math.nan])], 0.5)


def test_left_padding_never_scores_a_token_from_a_pad():
    # With left padding and labels -100 on the pads only, the first real token used to be scored from
    # the pad before it: a loss with no real context, then ranked by clean_labels like any other.
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=1)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, 32, (6,), generator=g)
    alone = token_losses(model, seq[None], seq[None])
    for pad in (0, 3):
        ids = torch.cat([torch.zeros(pad, dtype=torch.long), seq])[None]
        mask = (torch.arange(pad + 6) >= pad).long()[None]
        left = token_losses(model, ids, ids.masked_fill(mask == 0, IGNORE_INDEX), attention_mask=mask)
        assert left[:, :pad + 1].isnan().all()  # the pads and the first real token: no context
        torch.testing.assert_close(left[:, pad:], alone, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_left_and_right_padding_give_the_same_losses_under_absolute_positions():
    """GPT-2 adds a learned embedding of the absolute position: without position_ids a left-padded row's
    tokens were read at positions shifted by the padding, and their losses differed from the right-padded
    (and unpadded) row's. Positions now come from the attention mask when the caller gives none."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 32, (n,), generator=g) for n in (7, 4)]
    alone = [token_losses(model, s[None], s[None])[0] for s in seqs]
    batches = {}
    for side in ("left", "right"):
        ids = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros(2, 7, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(7 - len(s), 7)
            ids[b, sl], mask[b, sl] = s, 1
        got = token_losses(model, ids, ids.masked_fill(mask == 0, IGNORE_INDEX), attention_mask=mask)
        batches[side] = [got[b][mask[b].bool()] for b in range(2)]  # the real tokens' losses, in order
    for b in range(2):
        torch.testing.assert_close(batches["left"][b], batches["right"][b], rtol=1e-4, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(batches["left"][b], alone[b], rtol=1e-4, atol=1e-5, equal_nan=True)
    assert batches["left"][1][1:].isfinite().all()


def test_keep_ratio_numpy_scalar_matches_python_float():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    labels, scores = torch.randint(0, 50, (2, 8), generator=g), torch.randn(2, 8, generator=g)
    for ratio in (np.float32(0.5), np.float64(0.25), np.int64(1)):
        assert torch.equal(clean_labels(labels, scores, ratio), clean_labels(labels, scores, float(ratio)))
        assert influence_threshold([scores], ratio) == influence_threshold([scores], float(ratio))
    for bad in (True, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            clean_labels(labels, scores, bad)
        with pytest.raises(ValueError, match="keep_ratio"):
            influence_threshold([scores], bad)


def test_threshold_nan_refused_inf_kept():
    g = torch.Generator().manual_seed(0)
    labels, scores = torch.randint(0, 50, (2, 8), generator=g), torch.randn(2, 8, generator=g)
    for bad in (float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            clean_labels(labels, scores, threshold=bad)
    # influence_threshold returns inf when nothing is kept: still a valid threshold
    assert (clean_labels(labels, scores, threshold=math.inf) == IGNORE_INDEX).all()
    assert torch.equal(clean_labels(labels, scores, threshold=-math.inf), labels)
    np = pytest.importorskip("numpy")
    assert torch.equal(clean_labels(labels, scores, threshold=np.float32(0.25)), clean_labels(labels, scores, threshold=0.25))


def test_int32_labels_score_and_clean_like_int64():
    """int32 ids/labels (Arrow, NumPy datasets) crashed inside cross_entropy, which takes int64 targets only."""
    model, reference = Bigram(seed=0), Bigram(seed=1)
    ids, labels = make_batch()
    expected = token_losses(model, ids, labels)
    got = token_losses(model, ids.int(), labels.int())
    torch.testing.assert_close(got, expected, equal_nan=True)
    cleaner = TokenCleaner(model, reference, keep_ratio=0.5)
    cleaned = cleaner({"input_ids": ids.int(), "labels": labels.int()})
    assert torch.equal(cleaned.long(), cleaner({"input_ids": ids, "labels": labels}))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        token_losses(model, ids, labels.float())


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"keep_ratio": math.nan}, "keep_ratio"),
    ({"keep_ratio": None}, "keep_ratio or threshold"),
    ({"scope": "token"}, "scope"),
    ({"threshold": math.nan}, "threshold"),
    ({"threshold": "0.1"}, "threshold"),
])
def test_cleaner_checks_its_options_when_made(kwargs, match):
    """A bad keep_ratio/scope/threshold passed construction and failed only at the first call,
    after both models had run on a batch."""
    base = Bigram()
    with pytest.raises(ValueError, match=match):
        TokenCleaner(base, Bigram(seed=1), **kwargs)


def test_cleaner_stores_python_numbers():
    np = pytest.importorskip("numpy")
    cleaner = TokenCleaner(Bigram(), Bigram(seed=1), keep_ratio=np.float32(0.5))
    assert type(cleaner.keep_ratio) is float
    cleaner = TokenCleaner(Bigram(), Bigram(seed=1), threshold=np.float64(0.25), scope="ignored with a threshold")
    assert type(cleaner.threshold) is float and cleaner.keep_ratio is None


@pytest.mark.parametrize("ratio, kept", [(0.07, 7), (0.14, 14), (0.28, 28), (0.55, 55), (0.56, 56), (0.565, 57),
                                         (numpy.float32(0.6), 60), (numpy.float32(0.07), 7)])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_keep_ratio_of_100_tokens_keeps_exactly_ratio_times_100(ratio, kept, scope):
    """In floats 0.07 * 100 = 7.000000000000001, and its ceiling kept 8 tokens of 100 (0.56: 57 of 100); a NumPy
    float32 0.6 is 0.6000000238418579, and kept 61 (a helper's find; select_tokens kept 60)."""
    labels = torch.arange(100)[None]
    scores = torch.arange(100, dtype=torch.float32)[None]
    cleaned = clean_labels(labels, scores, ratio, scope)
    assert (cleaned != IGNORE_INDEX).sum() == kept
    assert torch.equal(cleaned[0, -kept:], labels[0, -kept:])  # the top-scored ones
    threshold = influence_threshold([scores[:, :50], scores[:, 50:]], ratio)
    assert (scores >= threshold).sum() == kept


@pytest.mark.parametrize("side", ["right", "left"])
def test_pads_are_never_scored_even_when_labelled(side):
    """labels = input_ids.clone() (what a tokenizer's padded batch gives) labels the pads too. With right
    padding the first pad of each row was scored from the row's last real token (its mask was not read, only
    the previous position's): a loss the unpadded row does not have, ranked by clean_labels and kept in its
    labels, and one more token in the batch's keep count than the same rows left-padded."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=1)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, 32, (n,), generator=g) for n in (7, 4, 2)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(7 - len(s), 7)
        ids[b, sl], mask[b, sl] = s, 1
    got = token_losses(model, ids, ids.clone(), attention_mask=mask)
    assert got[mask == 0].isnan().all()
    for b, s in enumerate(seqs):
        torch.testing.assert_close(got[b][mask[b].bool()], token_losses(model, s[None], s[None])[0],
                                   rtol=1e-4, atol=1e-5, equal_nan=True)
    assert int(got.isfinite().sum()) == sum(len(s) - 1 for s in seqs)
    cleaned = TokenCleaner(model, model, keep_ratio=1.0)({"input_ids": ids, "labels": ids.clone(),
                                                         "attention_mask": mask})
    assert (cleaned[mask == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_packed_batches_keep_the_tokens_their_samples_keep_unpacked(scope, ratio):
    """scope="sequence" ranked each packed *row*, several samples together, so a packed batch kept other tokens
    than the same samples padded (a long sample took the keep budget of the short one beside it). With the
    batch's position_ids each sample is ranked on its own; TokenCleaner passes them."""
    from conftest import make_tiny_llama

    from alignlab.data.packing import collate_packed, collate_padded, pack_examples

    base = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=1)
    ref = make_tiny_llama(seed=1, vocab_size=32, hidden_size=32, num_layers=1)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 32, (n,), generator=g).tolist() for n in (9, 5, 7, 3, 8)]
    examples = [{"input_ids": s, "labels": [IGNORE_INDEX] * 2 + s[2:]} for s in seqs]
    padded = collate_padded(examples, 0)
    rows = list(pack_examples(examples, max_length=16))
    assert any(len(r["seq_lens"]) > 1 for r in rows)
    packed = collate_packed(rows, 0, length=17, mask_dtype=torch.float32)
    flat = collate_padding_free(examples)
    cleaner = TokenCleaner(base, ref, keep_ratio=ratio, scope=scope)
    want = [cleaner(padded)[b, :len(s)].tolist() for b, s in enumerate(seqs)]
    got_packed, got_flat = cleaner(packed), cleaner(flat)[0].tolist()
    unpacked = [got_packed[r, sum(row["seq_lens"][:i]):sum(row["seq_lens"][:i + 1])].tolist()
                for r, row in enumerate(rows) for i in range(len(row["seq_lens"]))]
    starts = [sum(map(len, seqs[:i])) for i in range(len(seqs))]
    assert unpacked == want
    assert [got_flat[s:s + len(q)] for s, q in zip(starts, seqs)] == want
    # clean_labels itself against the brute force over each sample
    scores = cleaner.scores(flat)
    want_flat = torch.cat([oracle_clean(flat["labels"][:, s:s + len(q)], scores[:, s:s + len(q)], ratio, "batch")
                           for s, q in zip(starts, seqs)], dim=1)
    assert torch.equal(clean_labels(flat["labels"], scores, ratio, "sequence", position_ids=flat["position_ids"]),
                       want_flat)
    with pytest.raises(ValueError, match="position_ids"):
        clean_labels(flat["labels"], scores, ratio, "sequence", position_ids=flat["position_ids"][:, 1:])


def test_minus_inf_supervised_score_is_still_a_supervised_token():
    """Unsupervised positions rank as -inf inside clean_labels: an earlier prompt position took the slot of a
    supervised token scored -inf, so even keep_ratio=1 dropped it (a helper's find, 18 of 300 random cases)."""
    labels = torch.tensor([[-100, 7, 8], [5, -100, 6]])
    scores = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf, 2.0, 3.0]])
    for scope in ("batch", "sequence"):
        assert torch.equal(clean_labels(labels, scores, keep_ratio=1.0, scope=scope), labels)
    # 4 supervised tokens, keep 2: the best two (1.0 and 3.0)
    assert clean_labels(labels, scores, keep_ratio=0.5).tolist() == [[-100, -100, 8], [-100, -100, 6]]
