"""sequence_kd_loss works a chunk of rows at a time: it upcast the whole shifted (batch, seq - 1, vocab) logits to
fp32 for F.cross_entropy (4 bytes x tokens x vocab, kept by autograd with the fp32 log-softmax for the backward).
Values and gradients still equal nll = logsumexp(z) - z_y written out in fp64, for every reduction."""

import pytest
import torch

from conftest import LargestOutput, saved_numels

from alignlab.losses.distill import sequence_kd_loss

IGNORE = -100
VOCAB = 11  # the chunk fixture (tests/losses/conftest.py) sizes its budget by it


def _inputs(dtype=torch.float32, batch=2, seq=7, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq, vocab, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[-1, -1] = IGNORE  # padding
    return logits, labels


def _formula(logits, labels, reduction):
    """Per shifted target: logsumexp(z_i) - z_i[y_{i+1}] in fp64, 0 where y is ignored."""
    z = logits[:, :-1].double()
    y = labels[:, 1:]
    keep = y != IGNORE
    picked = z.gather(-1, torch.where(keep, y, 0)[..., None]).squeeze(-1)
    nll = torch.where(keep, torch.logsumexp(z, -1) - picked, 0.0)
    if reduction == "none":
        return nll.sum(-1)
    return nll.sum() if reduction == "sum" else nll.sum() / keep.sum()


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_values_and_gradients_equal_the_formula(reduction, dtype):
    logits, labels = _inputs(dtype)
    upstream = torch.linspace(0.5, 2.0, 2) if reduction == "none" else torch.tensor(1.5)
    got = sequence_kd_loss(logits, labels, reduction=reduction)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (g_got,) = torch.autograd.grad(got, logits, upstream.to(got.dtype))
    want = _formula(logits, labels, reduction)
    (g_want,) = torch.autograd.grad(want, logits, upstream.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert g_got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # the gradient is rounded to the logits' dtype
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=tol, atol=tol)
    assert not g_got[:, -1].any()  # the last position predicts nothing


@pytest.mark.usefixtures("small_chunks")
def test_packed_batch_and_second_derivative():
    logits, labels = _inputs(torch.float64, batch=1, seq=9)
    cu = torch.tensor([0, 4, 9])
    got = sequence_kd_loss(logits, labels, reduction="none", cu_seqlens=cu)
    cut = labels.clone()
    cut[0, 4] = IGNORE  # the second sequence's first token is no target of the first's last position
    nll = _formula(logits[:, :4], cut[:, :4], "sum"), _formula(logits[:, 4:], cut[:, 4:], "sum")
    torch.testing.assert_close(got, torch.stack(nll))
    # the backward is made of ops on the saved logits, so create_graph gives the true second derivative
    (g,) = torch.autograd.grad(got.sum(), logits, create_graph=True)
    (g_want,) = torch.autograd.grad(_formula(logits, cut, "sum"), logits, create_graph=True)
    v = torch.randn_like(logits)
    torch.testing.assert_close(torch.autograd.grad((g * v).sum(), logits)[0],
                               torch.autograd.grad((g_want * v).sum(), logits)[0])


def test_no_fp32_copy_of_the_logits_is_made_or_kept(small_chunks):
    logits, labels = _inputs(torch.bfloat16, batch=3, seq=12)
    full = logits[:, :-1].numel()
    with saved_numels(lambda t: t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()) as saved, \
            LargestOutput() as forward:
        loss = sequence_kd_loss(logits, labels)
    assert forward.largest <= small_chunks * logits.shape[-1]  # one chunk of rows
    assert sum(saved) < full // 4  # autograd keeps the bf16 logits themselves, no upcast copy
    with LargestOutput() as backward:
        loss.backward()
    # the gradient itself (logits' shape and dtype) is the only full-size tensor of the backward
    assert backward.largest == logits.numel() and logits.grad.dtype == torch.bfloat16


def test_labels_outside_the_vocabulary_are_refused_naming_them():
    logits, labels = _inputs()
    labels[0, 4] = 11
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\) or ignore_index=-100, got 11"):
        sequence_kd_loss(logits, labels)
