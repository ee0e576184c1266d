"""token_logprobs / sequence_logprobs keep no fp32 copy of the logits for the backward: the forward upcast a chunk
of rows at a time, but autograd kept every chunk's fp32 copy (for logsumexp and gather), one full fp32
(tokens, vocab) tensor in all. The backward now recomputes each chunk from the saved logits. Values and gradients
still equal log_softmax(z)[y] written out in fp64, for every layout the functions take."""

import pytest
import torch

from conftest import LargestOutput, saved_numels

from alignlab.losses.logprobs import sequence_logprobs, token_logprobs

IGNORE = -100
VOCAB = 11


def _inputs(dtype=torch.float32, shape=(2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, VOCAB, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels.view(-1)[:3] = IGNORE  # a prompt
    labels.view(-1)[-1] = IGNORE  # padding
    return logits, labels


def _formula(logits, labels):
    """log_softmax(z)[y] in fp64, 0 where y is ignored."""
    keep = labels != IGNORE
    picked = torch.log_softmax(logits.double(), -1).gather(-1, torch.where(keep, labels, 0)[..., None]).squeeze(-1)
    return torch.where(keep, picked, 0.0)


LAYOUTS = {
    "batch_seq": lambda z, y: (z, y),
    "shifted": lambda z, y: (z[:, :-1], y[:, 1:]),  # no flat view
    "flat_rows": lambda z, y: (z.reshape(-1, VOCAB), y.reshape(-1)),
    "four_dims": lambda z, y: (z.view(2, 1, 7, VOCAB)[..., :-1, :], y.view(2, 1, 7)[..., 1:]),
    "one_row": lambda z, y: (z[0, 4], y[0, 4]),
}


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_values_and_gradients_equal_the_formula(layout, dtype):
    base, labels = _inputs(dtype)
    z, y = LAYOUTS[layout](base, labels)
    got = token_logprobs(z, y)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == y.shape
    want = _formula(z, y)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    upstream = torch.linspace(0.5, 2.0, max(1, y.numel()), dtype=torch.float64).view(y.shape)
    (g_got,) = torch.autograd.grad(got, base, upstream.to(got.dtype))
    (g_want,) = torch.autograd.grad(want, base, upstream)
    assert g_got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # the gradient is rounded to the logits' dtype
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=tol, atol=tol)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logprobs_with_a_mask_equals_the_formula(average, dtype):
    logits, labels = _inputs(dtype, shape=(3, 7))
    z, y = logits[:, :-1], labels[:, 1:]
    mask = torch.ones_like(y)
    mask[1, 2:4] = 0
    got = sequence_logprobs(z, y, mask=mask, average=average)
    keep = (y != IGNORE) & mask.bool()
    want = (_formula(z, y) * keep).sum(-1)
    if average:
        want = want / keep.sum(-1).clamp_min(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    upstream = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    (g_got,) = torch.autograd.grad(got, logits, upstream.float() if dtype != torch.float64 else upstream)
    (g_want,) = torch.autograd.grad(want, logits, upstream)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=tol, atol=tol)


def test_nan_logits_at_ignored_positions_reach_neither_pass(small_chunks):
    logits, labels = _inputs()
    with torch.no_grad():
        logits[0, 1] = float("nan")  # labels[0, 1] is ignored
    got = token_logprobs(logits, labels)
    assert got[0, 1] == 0 and torch.isfinite(got).all()
    got.sum().backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad[0, 1].any()


def test_second_derivative_is_the_true_one(small_chunks):
    logits, labels = _inputs(torch.float64)
    z, y = logits[:, :-1], labels[:, 1:]
    (g,) = torch.autograd.grad(token_logprobs(z, y).sum(), logits, create_graph=True)
    (g_want,) = torch.autograd.grad(_formula(z, y).sum(), logits, create_graph=True)
    v = torch.randn_like(logits)
    torch.testing.assert_close(torch.autograd.grad((g * v).sum(), logits)[0],
                               torch.autograd.grad((g_want * v).sum(), logits)[0])


@pytest.mark.parametrize("fn", [token_logprobs, sequence_logprobs])
def test_no_fp32_copy_of_the_logits_is_made_or_kept(small_chunks, fn):
    logits, labels = _inputs(torch.bfloat16, shape=(3, 12))
    z, y = logits[:, :-1], labels[:, 1:]
    full = z.numel()
    with saved_numels(lambda t: t.dtype != torch.bfloat16 and t.is_floating_point()) as saved, \
            LargestOutput() as forward:
        out = fn(z, y)
    assert forward.largest <= small_chunks * VOCAB  # one chunk of rows
    assert sum(saved) < full // 4  # the bf16 logits and O(rows) statistics, no fp32 upcast
    with LargestOutput() as backward:
        out.sum().backward()
    # the gradient itself (bf16, the logits' shape) is the only full-size tensor of the backward
    assert backward.largest == logits.numel() and logits.grad.dtype == torch.bfloat16
