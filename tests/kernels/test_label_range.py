"""Labels outside [0, vocab) given straight to the chunk-level entry points (chunk_softmax_grad_ and its two
implementations, linear_chunked_pass): the Triton kernel read z[y] one past the row (another row's logit, or
memory past the buffer) and returned a made-up log-prob; the reference's gather raised an unnamed RuntimeError (a
device assert on CUDA). Now a ValueError naming labels and [0, vocab), with one host read per call as the losses'
own checks; the losses, which check once, do not pay it again per chunk."""

import inspect

import pytest
import torch

import alignlab.kernels.linear_logprobs as lk
import alignlab.losses.logprobs as lp
from alignlab.losses import fused_linear_dpo, fused_linear_grpo, linear_cross_entropy, linear_logprobs

V = 7
BAD = [V, V + 100, -1, -100]


def _chunk(device, bad):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.tensor([0, 3, bad, 6], device=device)
    return logits, labels


@pytest.mark.parametrize("bad", BAD)
def test_chunk_softmax_grad_refuses_an_out_of_range_label(kernel_device, kernel_mode, bad):
    logits, labels = _chunk(kernel_device, bad)
    for kw in ({}, {"grad_scale": torch.ones(4, device=kernel_device)}):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\), got {bad}"):
            lk.chunk_softmax_grad_(logits.clone(), labels, **kw)


@pytest.mark.parametrize("impl", ["chunk_softmax_grad_triton_", "chunk_softmax_grad_reference_"])
@pytest.mark.parametrize("bad", [V, -1])
def test_both_implementations_refuse_it_when_called_directly(kernel_device, impl, bad):
    pytest.importorskip("triton")
    logits, labels = _chunk(kernel_device, bad)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\)"):
        getattr(lk, impl)(logits.clone(), labels.to(torch.int32))


@pytest.mark.parametrize("bad", [V, -100])
def test_linear_chunked_pass_refuses_an_out_of_range_label(kernel_device, kernel_mode, bad):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 3, generator=g).to(kernel_device), torch.randn(V, 3, generator=g).to(kernel_device)
    labels = torch.tensor([0, bad, 2, 1], device=kernel_device)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\)"):
        lp.linear_chunked_pass(hidden, weight, labels, chunk_size=1, grad_scale=torch.ones(4, device=kernel_device))


def test_labels_checked_skips_the_check_and_the_kernel_stays_in_its_row(kernel_device):
    """A caller that checked the labels itself skips the host read; the kernel then never reads past the row (a
    NaN target, not a neighbour's logit)."""
    pytest.importorskip("triton")
    logits, labels = _chunk(kernel_device, V)
    st = lk.chunk_softmax_grad_triton_(logits.clone(), labels, labels_checked=True)
    assert torch.isnan(st.target[2]) and torch.isfinite(st.target[[0, 1, 3]]).all()
    torch.testing.assert_close(st.target[[0, 1, 3]], logits[[0, 1, 3], labels[[0, 1, 3]]])


def test_in_range_labels_are_unchanged(kernel_device, kernel_mode):
    logits, labels = _chunk(kernel_device, 5)
    st = lk.chunk_softmax_grad_(logits.clone(), labels)
    torch.testing.assert_close(st.target, logits.gather(1, labels[:, None]).squeeze(1))
    torch.testing.assert_close(st.lse, torch.logsumexp(logits, 1))


def test_losses_check_the_labels_once_per_call_not_per_chunk(kernel_device, kernel_mode, monkeypatch):
    """The losses check their labels once (select_scored_rows / fused_linear_grpo); their chunks pass
    labels_checked, so no extra host read (a CUDA stall) per chunk or per pass from the chunk-level checks."""
    calls = []

    def counting(labels, vocab, *args, **kwargs):
        calls.append(inspect.stack()[1].function)

    monkeypatch.setattr(lk, "check_label_range", counting)
    monkeypatch.setattr(lp, "check_label_range", counting)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 3, generator=g).to(kernel_device).requires_grad_(True)
    weight = torch.randn(V, 3, generator=g).to(kernel_device).requires_grad_(True)
    labels = torch.randint(0, V, (2, 5), generator=g).to(kernel_device)
    labels[0, 1] = -100
    for red in ("mean", "none"):
        out = linear_cross_entropy(hidden, weight, labels, reduction=red, chunk_size=1)
        torch.autograd.grad(out.loss.sum(), (hidden, weight))
    torch.autograd.grad(linear_logprobs(hidden, weight, labels, chunk_size=1).sum(), (hidden, weight))
    pair = torch.cat([labels, labels.flip(0)])
    h4 = torch.cat([hidden, hidden.flip(0)]).detach().requires_grad_(True)
    for eager in (True, False):
        loss, _ = fused_linear_dpo(h4, weight, pair, ref_chosen_logps=torch.zeros(2, device=kernel_device),
                                   ref_rejected_logps=torch.zeros(2, device=kernel_device), chunk_size=1, eager=eager)
        torch.autograd.grad(loss, (h4, weight))
    loss, _ = fused_linear_grpo(hidden, weight, labels.clamp(min=0), torch.ones(2, device=kernel_device),
                                chunk_size=1, entropy_coef=0.01)
    torch.autograd.grad(loss, (hidden, weight))
    assert "select_scored_rows" in calls  # the losses' own check, once per call
    assert not {"_check", "linear_chunked_pass"} & set(calls)  # the chunk-level ones never
