"""token_logprobs / sequence_logprobs on the causally shifted ``logits[:, :-1]`` (the documented usage) do not
copy the logits: ``reshape(-1, vocab)`` of that view made a full ``(batch, seq - 1, vocab)`` copy, doubling
the largest tensor of the step."""

import torch

from conftest import LargestOutput

from alignlab.losses.logprobs import sequence_logprobs, token_logprobs


def test_shifted_logits_are_not_copied():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 50, generator=g)
    labels = torch.randint(0, 50, (3, 6), generator=g)
    labels[0, 2] = -100
    shifted, targets = logits[:, :-1], labels[:, 1:]
    with LargestOutput() as mode:
        got = token_logprobs(shifted, targets)
    assert mode.largest < shifted.numel() // 2  # one batch row of logits at a time, at most
    want = torch.log_softmax(shifted.double(), -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want * (targets != -100))
    seq = sequence_logprobs(shifted, targets)
    torch.testing.assert_close(seq.double(), (want * (targets != -100)).sum(-1))


def test_shifted_logits_gradient_matches_log_softmax():
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    token_logprobs(logits[:, :-1], labels[:, 1:]).sum().backward()
    want = torch.autograd.grad(
        torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:, None]).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, want)
