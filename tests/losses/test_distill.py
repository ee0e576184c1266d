"""Distillation losses against divergences written out by hand in float64, gradcheck, and the
fused chunked form against the unfused one (torch reference path)."""

import math

import pytest
import torch

from alignlab.losses.distill import (
    distill_loss,
    forward_kl,
    fused_linear_distill_loss,
    generalized_jsd,
    reverse_kl,
    sequence_divergence,
    sequence_kd_labels,
    sequence_kd_loss,
    total_variation,
)

KINDS = ["forward_kl", "reverse_kl", "jsd", "tv"]


def _probs(z, tau):
    """softmax written out element by element in float64."""
    z = z.double() / tau
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _oracle(s, t, kind, beta=0.5, tau=1.0):
    """Per-token divergence straight from the textbook definitions."""
    p, q = _probs(t, tau), _probs(s, tau)  # p: teacher, q: student

    def kl(a, b):
        return (a * (torch.log(a) - torch.log(b))).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * (q - p).abs().sum(-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 13, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 5, 13, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, 5, generator=g) > 0.3
    return s, t, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_divergence_matches_formula(logits, kind, tau, reduction):
    s, t, mask = logits
    per_tok = _oracle(s, t, kind, 0.3, tau)
    w = mask.double()
    want = {"none": per_tok * w, "sum": (per_tok * w).sum(), "mean": (per_tok * w).sum() / w.sum()}[reduction]
    got = distill_loss(s, t, kind, beta=0.3, temperature=tau, mask=mask, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_named_wrappers_and_beta_endpoints(logits):
    s, t, _ = logits
    torch.testing.assert_close(forward_kl(s, t), _oracle(s, t, "forward_kl").mean())
    torch.testing.assert_close(reverse_kl(s, t), _oracle(s, t, "reverse_kl").mean())
    torch.testing.assert_close(total_variation(s, t), _oracle(s, t, "tv").mean())
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # JSD(beta) with student and teacher swapped is JSD(1 - beta).
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.2), generalized_jsd(t, s, beta=0.8))
    # The symmetric JSD is bounded by log 2 and TV by 1.
    assert distill_loss(s, t, "jsd", reduction="none").max() <= math.log(2)
    assert distill_loss(s, t, "tv", reduction="none").max() <= 1.0


def test_identical_distributions_give_zero(logits):
    s, _, _ = logits
    for kind in KINDS:
        assert distill_loss(s, s + 3.0, kind).abs().item() < 1e-12  # shift-invariant softmax


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_gradcheck(kind, reduction):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    f = lambda s_: distill_loss(s_, t, kind, beta=0.4, temperature=1.3, mask=w, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(f, (s,), fast_mode=True)


def test_teacher_gets_no_gradient_and_all_masked_is_zero(logits):
    s, t, _ = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss = distill_loss(s, t, "jsd", mask=torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and t.grad is None
    assert torch.all(s.grad == 0) and not torch.isnan(s.grad).any()


def test_bad_arguments(logits):
    s, t, mask = logits
    with pytest.raises(ValueError, match="kind"):
        distill_loss(s, t, "kl")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        distill_loss(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="must match"):
        distill_loss(s, t[..., :-1])
    with pytest.raises(ValueError, match="mask"):
        distill_loss(s, t, mask=mask[:, :-1])
    with pytest.raises(TypeError):
        distill_loss(s.tolist(), t)


# --------------------------------------------------------------------------- fused


def _problem(n_lead=(2, 5), hidden=8, vocab=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n_lead, hidden, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    th = torch.randn(*n_lead, 6, generator=g, dtype=dtype)
    tw = torch.randn(vocab, 6, generator=g, dtype=dtype) * 0.5
    mask = torch.rand(*n_lead, generator=g) > 0.3
    return x, w, th, tw, mask


@pytest.mark.usefixtures("torch_mode")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk,grad_chunk", [(1, 1), (2, 7), (64, None)])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_fused_matches_unfused_float64(kind, reduction, chunk, grad_chunk, teacher_form):
    x, w, th, tw, mask = _problem()
    t_logits = th @ tw.T
    kw = dict(kind=kind, beta=0.3, temperature=1.7, mask=mask, reduction=reduction)
    if teacher_form == "logits":
        got = fused_linear_distill_loss(x, w, t_logits, chunk_size=chunk, grad_chunk_size=grad_chunk, **kw)
    else:
        got = fused_linear_distill_loss(
            x, w, teacher_hidden=th, teacher_weight=tw, chunk_size=chunk, grad_chunk_size=grad_chunk, **kw
        )
    want = distill_loss(x @ w.T, t_logits, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(want)  # per-token upstream gradients exercise reduction="none"
    g_got = torch.autograd.grad(got, (x, w), up)
    g_want = torch.autograd.grad(want, (x, w), up)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("torch_mode")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_gradcheck(kind, reduction):
    x, w, _, _, mask = _problem(n_lead=(5,), hidden=4, vocab=6)
    t = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f = lambda x_, w_: fused_linear_distill_loss(  # noqa: E731
        x_, w_, t, kind=kind, beta=0.4, temperature=0.8, mask=mask, reduction=reduction, chunk_size=2
    )
    assert torch.autograd.gradcheck(f, (x, w), fast_mode=True)


@pytest.mark.usefixtures("torch_mode")
def test_fused_frozen_weight_frozen_hidden_and_upstream_scale():
    x, w, th, tw, _ = _problem()
    t = th @ tw.T
    w_frozen = w.detach()
    loss = fused_linear_distill_loss(x, w_frozen, t, kind="reverse_kl", chunk_size=4) * 3.0
    (gx,) = torch.autograd.grad(loss, (x,))
    ref = distill_loss(x @ w_frozen.T, t, "reverse_kl") * 3.0
    torch.testing.assert_close(gx, torch.autograd.grad(ref, (x,))[0])
    x_frozen = x.detach()
    loss = fused_linear_distill_loss(x_frozen, w, t, kind="tv", chunk_size=4)
    (gw,) = torch.autograd.grad(loss, (w,))
    torch.testing.assert_close(gw, torch.autograd.grad(distill_loss(x_frozen @ w.T, t, "tv"), (w,))[0])
    with torch.no_grad():
        v = fused_linear_distill_loss(x, w, t)
    torch.testing.assert_close(v, distill_loss(x @ w.T, t).detach())


@pytest.mark.usefixtures("torch_mode")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_low_precision_close_to_float64(dtype):
    x, w, th, tw, mask = _problem(n_lead=(3, 7), hidden=16, vocab=37, dtype=torch.float64)
    xl = x.detach().to(dtype).requires_grad_(True)
    wl = w.detach().to(dtype).requires_grad_(True)
    got = fused_linear_distill_loss(
        xl, wl, teacher_hidden=th.to(dtype), teacher_weight=tw.to(dtype), mask=mask, chunk_size=5, grad_chunk_size=10
    )
    gx, gw = torch.autograd.grad(got, (xl, wl))
    assert got.dtype == torch.float32 and gx.dtype == dtype and gw.dtype == dtype
    x64, w64 = xl.detach().double().requires_grad_(True), wl.detach().double().requires_grad_(True)
    want = distill_loss(x64 @ w64.T, th.to(dtype).double() @ tw.to(dtype).double().T, mask=mask)
    rx, rw = torch.autograd.grad(want, (x64, w64))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    for a, b in ((gx, rx), (gw, rw)):
        assert ((a.double() - b).norm() / b.norm()).item() < tol


@pytest.mark.usefixtures("torch_mode")
def test_fused_empty_batch_and_all_masked():
    x, w, th, tw, _ = _problem()
    empty = x[:0].detach().requires_grad_(True)
    loss = fused_linear_distill_loss(empty, w, torch.zeros(0, 5, 11, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == empty.shape and torch.all(w.grad == 0)
    none = fused_linear_distill_loss(empty, w, torch.zeros(0, 5, 11, dtype=torch.float64), reduction="none")
    assert none.shape == (0, 5)
    zero_mask = torch.zeros(2, 5, dtype=torch.bool)
    loss = fused_linear_distill_loss(x, w, th @ tw.T, mask=zero_mask)
    gx, _ = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0 and torch.all(gx == 0)


@pytest.mark.usefixtures("torch_mode")
def test_fused_packed_equals_padded_and_single_token():
    x, w, th, tw, mask = _problem(n_lead=(3, 6))
    t = th @ tw.T
    padded = fused_linear_distill_loss(x, w, t, mask=mask, kind="reverse_kl", chunk_size=4)
    gx_pad, gw_pad = torch.autograd.grad(padded, (x, w))
    xp = x.detach()[mask].requires_grad_(True)  # packed: only the real tokens, (n_valid, hidden)
    packed = fused_linear_distill_loss(xp, w, t[mask], kind="reverse_kl", chunk_size=4)
    gx_pack, gw_pack = torch.autograd.grad(packed, (xp, w))
    torch.testing.assert_close(padded, packed)
    torch.testing.assert_close(gw_pad, gw_pack)
    torch.testing.assert_close(gx_pad[mask], gx_pack)
    assert torch.all(gx_pad[~mask] == 0)
    one = fused_linear_distill_loss(x[:1, :1], w, t[:1, :1], kind="tv", reduction="none")
    torch.testing.assert_close(one, distill_loss(x[:1, :1] @ w.T, t[:1, :1], "tv", reduction="none"))


def test_fused_bad_arguments():
    x, w, th, tw, mask = _problem()
    t = th @ tw.T
    with pytest.raises(ValueError, match="either teacher_logits"):
        fused_linear_distill_loss(x, w)
    with pytest.raises(ValueError, match="either teacher_logits"):
        fused_linear_distill_loss(x, w, t, teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(ValueError, match="either teacher_logits"):
        fused_linear_distill_loss(x, w, teacher_hidden=th)
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_distill_loss(x, w[:, :-1], t)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_linear_distill_loss(x, w, t[..., :-1])
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_distill_loss(x, w, teacher_hidden=th, teacher_weight=tw[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_distill_loss(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="grad_chunk_size"):
        fused_linear_distill_loss(x, w, t, grad_chunk_size=-1)
    with pytest.raises(ValueError, match="mask"):
        fused_linear_distill_loss(x, w, t, mask=mask[:1])
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_distill_loss(x, w.float(), t)


# --------------------------------------------------------------------------- sequence level


def test_sequence_kd_labels_by_hand():
    seqs = torch.tensor(
        [
            [5, 6, 7, 8, 2, 0, 0],  # prompt 2, generated 7 8 EOS(2), then pad(0)
            [5, 6, 7, 2, 9, 9, 9],  # prompt 3, generated EOS then junk after it
        ]
    )
    labels = sequence_kd_labels(seqs, [2, 3], pad_token_id=0, eos_token_id=2)
    want = torch.tensor([[-100, -100, 7, 8, 2, -100, -100], [-100, -100, -100, 2, -100, -100, -100]])
    assert torch.equal(labels, want)
    # pad == eos (common for Llama-style tokenizers): the first generated EOS stays a target.
    seqs = torch.tensor([[5, 6, 7, 2, 2, 2]])
    assert sequence_kd_labels(seqs, [2], pad_token_id=2, eos_token_id=2).tolist() == [[-100, -100, 7, 2, -100, -100]]
    with pytest.raises(ValueError, match="prompt_lengths"):
        sequence_kd_labels(seqs, [9])


def test_sequence_kd_labels_pad_ids_inside_a_generation_are_tokens():
    """Padding is the run of pad ids that ends a row: a pad id the teacher generated before other tokens stays a
    target (it was masked), with or without an EOS; a row stopped without EOS (a stop string) and padded loses its
    trailing pads."""
    seqs = torch.tensor([[5, 6, 0, 7, 2, 0],   # pad id generated, then 7, EOS, pad
                         [5, 6, 7, 0, 8, 9],   # no EOS, a pad id inside, none at the end
                         [5, 6, 7, 8, 0, 0]])  # no EOS, trailing padding
    labels = sequence_kd_labels(seqs, [2, 2, 2], pad_token_id=0, eos_token_id=2)
    assert labels.tolist() == [[-100, -100, 0, 7, 2, -100], [-100, -100, 7, 0, 8, 9], [-100, -100, 7, 8, -100, -100]]
    assert sequence_kd_labels(seqs, [2, 2, 2], pad_token_id=0).tolist() == labels.tolist()


def test_sequence_kd_loss_and_divergence_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 5, 0]])
    logp = torch.log_softmax(logits, -1)
    nll0 = -(logp[0, 0, 3] + logp[0, 1, 1])
    nll1 = -(logp[1, 1, 5] + logp[1, 2, 0])
    # float64 logits stay float64 (half precision is upcast to float32)
    torch.testing.assert_close(sequence_kd_loss(logits, labels, reduction="none"), torch.stack([nll0, nll1]))
    torch.testing.assert_close(sequence_kd_loss(logits, labels), (nll0 + nll1) / 4)
    assert sequence_kd_loss(logits.to(torch.bfloat16), labels).dtype == torch.float32
    tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(sequence_divergence(tok, m), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(sequence_divergence(tok, m, normalize=False), torch.tensor([3.0, 0.0]))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_trl_gkd(beta, monkeypatch):
    """The peer users know: TRL's GKD generalized_jsd_loss (token mean over label-masked positions)."""
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        pytest.skip("this trl version has no experimental GKD trainer")
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    want = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.7)
    got = distill_loss(s, t, "jsd", beta=beta, temperature=1.7, mask=labels != -100)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- -inf logits, masked garbage


def _oracle_support(s, t, kind, beta=0.5, tau=1.0):
    """Per-token divergence in float64 over the entries that carry probability only (0 log 0 = 0):
    entries of zero probability are dropped from each sum before any log is taken."""
    p, q = _probs(t, tau), _probs(s, tau)  # p: teacher, q: student

    def kl(a, b):
        out = []
        for ar, br in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
            sel = ar > 0
            out.append((ar[sel] * (ar[sel].log() - br[sel].log())).sum())
        return torch.stack(out).reshape(a.shape[:-1])

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * (q - p).abs().sum(-1)


def _minus_inf_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 10, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 10, generator=g, dtype=torch.float64) * 2
    top_k = t.topk(4, dim=-1).indices
    t_topk = torch.full_like(t, float("-inf")).scatter(-1, top_k, t.gather(-1, top_k))  # a top-4 teacher
    vocab_mask = torch.zeros(10, dtype=torch.bool)
    vocab_mask[[1, 6, 7]] = True  # entries outside the vocabulary: -inf in both
    return s, t_topk, s.masked_fill(vocab_mask, float("-inf")), t.masked_fill(vocab_mask, float("-inf"))


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_logits_give_the_finite_limit(kind):
    s, t_topk, s_vm, t_vm = _minus_inf_logits()
    cases = [(s_vm, t_vm)]  # the same entries -inf in both: every divergence is finite
    if kind != "reverse_kl":  # KL(p_s || top-k teacher) is +inf: the student has mass where the teacher has none
        cases.append((s, t_topk))
    for s_, t_ in cases:
        leaf = s_.clone().requires_grad_(True)
        got = distill_loss(leaf, t_, kind, beta=0.3, temperature=1.3, reduction="none")
        ref_leaf = s_.clone().requires_grad_(True)
        want = _oracle_support(ref_leaf, t_, kind, beta=0.3, tau=1.3)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        up = torch.randn_like(want)
        (g_got,) = torch.autograd.grad(got, leaf, up)
        (g_want,) = torch.autograd.grad(want, ref_leaf, up)
        assert torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    if kind == "reverse_kl":
        assert distill_loss(s, t_topk, kind, reduction="none").eq(float("inf")).all()


def _garbage_at_masked(s, t, mask):
    """Copies of s and t whose masked-out tokens hold NaN, +inf and an all -inf row."""
    s, t = s.clone(), t.clone()
    idx = (~mask).nonzero().tolist()
    assert len(idx) >= 3
    s[tuple(idx[0])] = float("nan")
    t[tuple(idx[1])] = float("inf")
    t[tuple(idx[2])] = float("-inf")
    s[tuple(idx[2])][0] = float("inf")
    return s, t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_tokens_holding_inf_or_nan_do_not_leak(kind, reduction):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    s_bad, t_bad = _garbage_at_masked(s, t, mask)
    for m in (mask, mask.double() * 1.5):
        leaf = s_bad.clone().requires_grad_(True)
        got = distill_loss(leaf, t_bad, kind, mask=m, reduction=reduction)
        kept = s[mask].clone().requires_grad_(True)  # oracle: the masked tokens dropped altogether
        per = _oracle(kept, t[mask], kind) * m[mask]
        want = {"none": torch.zeros(3, 4, dtype=torch.float64).masked_scatter(mask, per), "sum": per.sum(),
                "mean": per.sum() / m[mask].sum()}[reduction]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        up = torch.randn_like(got)
        (g_got,) = torch.autograd.grad(got, leaf, up)
        (g_kept,) = torch.autograd.grad(want, kept, up)
        assert torch.isfinite(g_got).all() and torch.all(g_got[~mask] == 0)
        torch.testing.assert_close(g_got[mask], g_kept, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_mask_weights_must_be_finite_and_non_negative(logits, bad):
    s, t, mask = logits
    w = mask.double()
    w[0, 0] = bad
    with pytest.raises(ValueError, match="mask weights must be finite and >= 0"):
        distill_loss(s, t, mask=w)
    with pytest.raises(ValueError, match="mask weights must be finite and >= 0"):
        fused_linear_distill_loss(torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(13, 4, dtype=torch.float64),
                                  t, mask=w)
    with pytest.raises(ValueError, match="mask weights"):
        sequence_divergence(torch.ones(2, 5), w)
    if bad == -1.0:
        with pytest.raises(ValueError, match="mask weights"):
            distill_loss(s, t, mask=w.long())


def _fused_edge_case(kind, teacher_form, seed=4):
    """Inputs of the fused form with masked rows holding NaN/inf in every input and, except for
    reverse KL (which is +inf then), a teacher whose entries 2 and 5 are -inf; and the float64
    oracle's view of them (masked rows dropped, zero-probability entries dropped from the sums)."""
    x, w, th, tw, mask = _problem(n_lead=(2, 5), hidden=8, vocab=11, seed=seed)
    mask[0, 0] = mask[1, 1] = False
    t_logits = th @ tw.T
    if kind != "reverse_kl":
        t_logits = t_logits.index_fill(-1, torch.tensor([2, 5]), float("-inf"))
    x_bad = x.detach().clone()
    x_bad[~mask] = float("nan")
    if teacher_form == "logits":
        t_bad = t_logits.clone()
        t_bad[~mask] = float("nan")
        t_bad[0, 0, 3] = float("inf")
        teacher = dict(teacher_logits=t_bad)
    else:
        t_logits = th @ tw.T  # a hidden-state teacher has finite logits
        th_bad = th.clone()
        th_bad[~mask] = float("inf")
        teacher = dict(teacher_hidden=th_bad, teacher_weight=tw)
    return x_bad, w.detach(), teacher, t_logits, mask, x.detach()


@pytest.mark.usefixtures("torch_mode")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_fused_minus_inf_and_masked_garbage(kind, reduction, teacher_form):
    x_bad, w, teacher, t_logits, mask, x = _fused_edge_case(kind, teacher_form)
    x_leaf, w_leaf = x_bad.requires_grad_(True), w.clone().requires_grad_(True)
    got = fused_linear_distill_loss(x_leaf, w_leaf, **teacher, kind=kind, beta=0.3, temperature=1.2, mask=mask,
                                    reduction=reduction, chunk_size=3, grad_chunk_size=6)
    xk, wk = x[mask].clone().requires_grad_(True), w.clone().requires_grad_(True)
    per = _oracle_support(xk @ wk.T, t_logits[mask], kind, beta=0.3, tau=1.2)
    want = torch.zeros(2, 5, dtype=torch.float64).masked_scatter(mask, per) if reduction == "none" else per.mean()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    up = torch.randn_like(got)
    gx, gw = torch.autograd.grad(got, (x_leaf, w_leaf), up)
    rx, rw = torch.autograd.grad(want, (xk, wk), up)
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all() and torch.all(gx[~mask] == 0)
    torch.testing.assert_close(gx[mask], rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_trl_reductions_map_to_ours(monkeypatch):
    """docs/distillation.md's table: TRL's "batchmean" (with and without labels) and "mean"."""
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        pytest.skip("this trl version has no experimental GKD trainer")
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 4), generator=g)
    labels[1, 1:] = -100
    jsd = GKDTrainer.generalized_jsd_loss
    torch.testing.assert_close(distill_loss(s, t, "jsd", beta=0.4, mask=labels != -100),
                               jsd(s, t, labels=labels, beta=0.4, reduction="batchmean"))
    torch.testing.assert_close(distill_loss(s, t, "jsd", beta=0.4, reduction="sum") / 3,
                               jsd(s, t, beta=0.4, reduction="batchmean"))
    torch.testing.assert_close(distill_loss(s, t, "jsd", beta=0.4, reduction="sum") / (3 * 4 * 7),
                               jsd(s, t, beta=0.4, reduction="mean"))


def test_numpy_temperature_and_beta_match_python_numbers():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    want = distill_loss(s, t, beta=0.25, temperature=2.0)
    torch.testing.assert_close(distill_loss(s, t, beta=np.float32(0.25), temperature=np.float32(2)), want)
    torch.testing.assert_close(distill_loss(s, t, beta=np.float64(0.25), temperature=np.int64(2)), want)
    for kw in ({"beta": True}, {"beta": float("nan")}, {"temperature": True}, {"temperature": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            distill_loss(s, t, **kw)


def test_sequence_divergence_normalize_must_be_a_bool():
    with pytest.raises(TypeError, match="normalize"):
        sequence_divergence(torch.rand(2, 3), normalize="no")


def test_fused_refuses_integer_teacher():
    """distill_loss refused integer teacher logits; the fused form took them (and an integer teacher hidden
    state) and returned a number."""
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    teacher = torch.randint(-3, 3, (2, 3, 7))
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_loss(h @ w.T, teacher)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_linear_distill_loss(h, w, teacher)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_linear_distill_loss(h, w, teacher_hidden=h.long(), teacher_weight=w)
    with pytest.raises(TypeError, match="teacher_weight"):
        fused_linear_distill_loss(h, w, teacher_hidden=h, teacher_weight=w.tolist())


@pytest.mark.parametrize("mode", ["torch_mode", "triton_mode"])
def test_fused_teacher_hidden_keeps_the_teacher_dtype(mode, request):
    """A float32 teacher head (hidden + weight) with a bf16 student: its logits were formed after rounding both
    to bf16, which moved the loss by ~15% for a close student; they are formed in the teacher's dtype now,
    as from given float32 teacher logits and distill_loss."""
    request.getfixturevalue(mode)
    g = torch.Generator().manual_seed(3)
    n, hid, vocab = 8, 32, 48
    t_hidden = torch.randn(n, hid, generator=g)
    t_weight = torch.randn(vocab, hid, generator=g) / hid**0.5 * 4
    s_hidden = (t_hidden + 0.01 * torch.randn(n, hid, generator=g)).bfloat16().requires_grad_(True)
    s_weight = t_weight.bfloat16().requires_grad_(True)
    got = fused_linear_distill_loss(s_hidden, s_weight, teacher_hidden=t_hidden, teacher_weight=t_weight,
                                    kind="forward_kl", chunk_size=3)
    given = fused_linear_distill_loss(s_hidden, s_weight, t_hidden @ t_weight.T, kind="forward_kl", chunk_size=3)
    torch.testing.assert_close(got, given)
    grads = torch.autograd.grad(got, (s_hidden, s_weight))
    want = torch.autograd.grad(given, (s_hidden, s_weight))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
    rounded = distill_loss(s_hidden.detach() @ s_weight.detach().T, t_hidden.bfloat16() @ t_weight.bfloat16().T,
                           "forward_kl")
    assert abs(float(got) - float(rounded)) > 0.05 * float(got)  # the rounding moves it: the test can tell


def test_sequence_kd_loss_names_bad_dtypes():
    """Float labels failed inside F.cross_entropy ("expected target dtype to be Long") naming nothing."""
    logits = torch.randn(2, 3, 5)
    with pytest.raises(TypeError, match="labels"):
        sequence_kd_loss(logits, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="student_logits"):
        sequence_kd_loss(logits.long(), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.usefixtures("torch_mode")
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_float_token_weights_gradient_matches_closed_form(kind, reduction, fused):
    """Float per-token weights (not a 0/1 mask) and reduction="none" with per-token upstream gradients, against
    the KL gradients written out: with q = softmax(z / tau) (student), p the teacher's, and the coefficient c_t of
    token t's divergence (w_t / sum w for "mean", u_t w_t for "none" with upstream u),
    forward KL(p||q): dL/dz_t = c_t (q_t - p_t) / tau;
    reverse KL(q||p): dL/dz_t = c_t q_t (log q_t - log p_t - KL_t) / tau;
    dL/dx_t = dL/dz_t W, dL/dW = sum_t dL/dz_t x_t^T."""
    x, w, th, tw, _ = _problem(n_lead=(3, 4), hidden=5, vocab=9, seed=4)
    t = th @ tw.T
    tau = 1.7
    weights = torch.tensor([[0.5, 2.0, 0.0, 1.0], [0.25, 0.0, 3.0, 1.5], [1.0, 1.0, 0.75, 0.0]], dtype=torch.float64)
    if fused:
        got = fused_linear_distill_loss(x, w, t, kind=kind, temperature=tau, mask=weights, reduction=reduction,
                                        chunk_size=5, grad_chunk_size=3)
    else:
        got = distill_loss(x @ w.T, t, kind, temperature=tau, mask=weights, reduction=reduction)
    up = torch.linspace(-1.0, 2.0, weights.numel(), dtype=torch.float64).view(3, 4)
    gx, gw = torch.autograd.grad(got, (x, w), up if reduction == "none" else None)

    with torch.no_grad():
        q, p = _probs(x @ w.T, tau), _probs(t, tau)
        c = weights * up if reduction == "none" else weights / weights.sum()
        if kind == "forward_kl":
            dz = (q - p) / tau
        else:
            log_ratio = torch.log(q) - torch.log(p)
            dz = q * (log_ratio - (q * log_ratio).sum(-1, keepdim=True)) / tau
        dz = c[..., None] * dz
        want_gx = dz @ w
        want_gw = torch.einsum("btv,bth->vh", dz, x)
    torch.testing.assert_close(gx, want_gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, want_gw, rtol=1e-10, atol=1e-12)
    assert float(gx[weights == 0].abs().max()) == 0.0  # weight 0: no gradient at all


@pytest.mark.usefixtures("torch_mode")
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_float_weight_gradient_at_zero_is_the_token_divergence(kind, reduction, fused):
    """d/dw_i of sum_j w_j L_j is L_i at w_i = 0 too (as linear_cross_entropy's token_weights give it): a zero
    weight that requires grad is a point where the loss is differentiated, not a padding token. Learning to
    reweight (Ren et al., arXiv:1803.09050) starts its per-token weights at exactly 0 and reads this gradient;
    dropping the zero-weight tokens gave 0 there."""
    x, w, th, tw, _ = _problem(n_lead=(2, 3), hidden=5, vocab=9, seed=5)
    t = th @ tw.T
    weights = torch.tensor([[0.0, 1.5, 0.5], [2.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    if fused:
        got = fused_linear_distill_loss(x, w, t, kind=kind, beta=0.3, mask=weights, reduction=reduction, chunk_size=2)
    else:
        got = distill_loss(x @ w.T, t, kind, beta=0.3, mask=weights, reduction=reduction)
    up = torch.linspace(-1.0, 2.0, got.numel(), dtype=torch.float64).view(got.shape)
    (g,) = torch.autograd.grad((got * up).sum(), [weights])

    per_token = _oracle(x.detach() @ w.detach().T, t, kind, beta=0.3)
    with torch.no_grad():
        if reduction != "mean":  # "none": w_i L_i, "sum": sum_i w_i L_i
            want = up * per_token
        else:
            want = up * (per_token - (weights * per_token).sum() / weights.sum()) / weights.sum()
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
