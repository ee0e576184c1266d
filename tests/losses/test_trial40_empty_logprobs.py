"""token_logprobs / sequence_logprobs on a batch with no tokens stay differentiable (an empty
micro-batch must not break ``loss.backward()``)."""

import torch

from alignlab.losses.logprobs import sequence_logprobs, token_logprobs


def test_token_logprobs_of_zero_rows_keeps_the_graph():
    logits = torch.randn(0, 5, requires_grad=True)
    out = token_logprobs(logits, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.requires_grad
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == (0, 5)


def test_sequence_logprobs_of_empty_sequences_backward_gives_zero_grads():
    logits = torch.randn(2, 0, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    for average in (False, True):
        seq = sequence_logprobs(logits, labels, average=average)
        assert torch.equal(seq, torch.zeros(2, dtype=torch.float64)) and seq.requires_grad
        (seq * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
        assert logits.grad.shape == (2, 0, 7)
