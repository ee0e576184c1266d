"""distill_loss (logits form) keeps no fp32 copy of the logits: it upcast the whole student and teacher logits and
autograd kept several fp32 (tokens, vocab) tensors (both log-softmaxes, their exponentials, the mixture) for the
backward. It now works a chunk of rows at a time and the backward recomputes each chunk from the saved logits.
Values and gradients still equal the divergences of docs/distillation.md written out in fp64."""

import pytest
import torch

from conftest import LargestOutput, saved_numels

from alignlab.losses.distill import distill_loss

VOCAB = 11
BETA, TAU = 0.3, 1.5


def _inputs(dtype=torch.float32, shape=(2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(*shape, VOCAB, generator=g)).to(dtype).requires_grad_()
    t = (3 * torch.randn(*shape, VOCAB, generator=g)).to(dtype)
    return s, t


def _formula(s, t, kind):
    """Per token, in fp64: KL(p_t||p_s), KL(p_s||p_t), beta KL(p_t||m) + (1-beta) KL(p_s||m) or 1/2 sum |p_s - p_t|."""
    ls, lt = torch.log_softmax(s.double() / TAU, -1), torch.log_softmax(t.double() / TAU, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward_kl":
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse_kl":
        return (ps * (ls - lt)).sum(-1)
    if kind == "jsd":
        lm = (BETA * pt + (1 - BETA) * ps).log()
        return BETA * (pt * (lt - lm)).sum(-1) + (1 - BETA) * (ps * (ls - lm)).sum(-1)
    return 0.5 * (ps - pt).abs().sum(-1)


def _reduce(per_token, w, reduction):
    if reduction == "none":
        return per_token * w
    total = (per_token * w).sum()
    if reduction == "sum" or not w.sum():  # a mean over no weight at all is 0
        return total
    return total / w.sum()


LAYOUTS = {
    "batch_seq": lambda s, t: (s, t),
    "shifted_student": lambda s, t: (s[:, :-1], t[:, 1:].contiguous()),  # no flat view of the student
    "flat_rows": lambda s, t: (s.reshape(-1, VOCAB), t.reshape(-1, VOCAB)),
    "one_row": lambda s, t: (s[1, 3], t[1, 3]),
}


def _mask(kind, shape):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(shape, generator=g, dtype=torch.float64)
    weights.view(-1)[:2] = 0
    return weights > 0.3 if kind == "bool" else weights


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_and_gradients_equal_the_formula(kind, reduction, dtype, mask, layout):
    base, teacher = _inputs(dtype)
    s, t = LAYOUTS[layout](base, teacher)
    m = _mask(mask, s.shape[:-1])
    got = distill_loss(s, t, kind, beta=BETA, temperature=TAU, mask=m, reduction=reduction)
    assert got.dtype == torch.float32
    w = torch.ones(s.shape[:-1], dtype=torch.float64) if m is None else m.double()
    want = _reduce(_formula(s, t, kind), w, reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    upstream = torch.linspace(0.5, 2.0, max(1, want.numel()), dtype=torch.float64).view(want.shape)
    (g_got,) = torch.autograd.grad(got, base, upstream.float())
    (g_want,) = torch.autograd.grad(want, base, upstream)
    assert g_got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the gradient is rounded to the logits' dtype
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_fp64_values_gradients_and_second_derivative(small_chunks, kind):
    s, t = _inputs(torch.float64)
    got = distill_loss(s, t, kind, beta=BETA, temperature=TAU, reduction="sum")
    assert got.dtype == torch.float64
    want = _formula(s, t, kind).sum()
    torch.testing.assert_close(got, want)
    # the backward is made of ops on the saved logits, so create_graph gives the true second derivative
    (g,) = torch.autograd.grad(got, s, create_graph=True)
    (g_want,) = torch.autograd.grad(want, s, create_graph=True)
    torch.testing.assert_close(g, g_want)
    if kind == "tv":
        return  # piecewise linear in p_s: sign() has no useful second derivative on either side
    v = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad((g * v).sum(), s)[0], torch.autograd.grad((g_want * v).sum(), s)[0])


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_no_fp32_copy_of_the_logits_is_made_or_kept(small_chunks, kind):
    s, t = _inputs(torch.bfloat16, shape=(3, 12))
    s, t = s[:, :-1], t[:, 1:]
    full = s.numel()
    with saved_numels(lambda x: x.dtype != torch.bfloat16 and x.is_floating_point()) as saved, \
            LargestOutput() as forward:
        loss = distill_loss(s, t, kind, beta=BETA, temperature=TAU, mask=torch.ones(s.shape[:-1], dtype=torch.bool))
    assert forward.largest <= small_chunks * VOCAB  # one chunk of rows
    assert sum(saved) < full // 4  # the bf16 logits and O(rows) statistics, no fp32 upcast
    with LargestOutput() as backward:
        loss.backward()
    # the gradient (bf16, the student's shape; autograd's slice backward then widens it) is the largest tensor
    assert backward.largest == s._base.numel()
    assert s._base.grad.dtype == torch.bfloat16
