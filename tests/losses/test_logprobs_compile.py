"""token_logprobs / sequence_logprobs under torch.compile(fullgraph=True): the eager label range check read
two numbers back to the host, a graph break (found by helper-40). Compiled and eager now agree; an
out-of-range label is still refused there, by gather's own bounds check."""

import pytest
import torch

from alignlab.losses.logprobs import sequence_logprobs, token_logprobs


@pytest.mark.parametrize("fn", [token_logprobs, sequence_logprobs])
@pytest.mark.parametrize("shifted", [False, True])  # logits[:, :-1] (no flat view) takes the per-row walk
def test_fullgraph_compile_matches_eager(fn, shifted):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 2] = -100
    z, y = (logits[:, :-1], labels[:, 1:]) if shifted else (logits, labels)
    compiled = torch.compile(lambda z, y: fn(z, y), fullgraph=True, backend="eager")
    got, want = compiled(z, y), fn(z, y)
    torch.testing.assert_close(got, want)
    gy = torch.randn(got.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(got, logits, gy)[0], torch.autograd.grad(want, logits, gy)[0])


def test_compiled_call_still_refuses_an_out_of_range_label():
    compiled = torch.compile(lambda z, y: token_logprobs(z, y), fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(torch.randn(1, 3, 5), torch.tensor([[0, 5, 1]]))
