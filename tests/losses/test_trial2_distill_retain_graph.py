"""fused_linear_distill_loss ("mean"/"sum") kept its forward-computed gradients as saved tensors and returned them
in every backward.  Autograd adopts dL/dx (a view, through the hidden state's reshape) as ``.grad``, so a later
backward accumulated into the saved gradient in place: a gradient returned earlier by ``torch.autograd.grad``
changed under the caller, and the next backward failed with "modified by an inplace operation" (also after
``zero_grad(set_to_none=False)``).  Now handed over once and recomputed for a further backward, as
linear_cross_entropy does."""

import pytest
import torch

from alignlab.losses import distill_loss, fused_linear_distill_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(4, 3, 7, dtype=torch.float64, generator=g)
    return x, w, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_repeated_backward_accumulates_exactly(kernel_mode, reduction):
    x, w, t = _inputs()
    loss = fused_linear_distill_loss(x, w, t, reduction=reduction, chunk_size=2)
    want = torch.autograd.grad(distill_loss(x @ w.T, t, reduction=reduction), [x, w])
    got = torch.autograd.grad(loss, [x, w], retain_graph=True)
    kept = [g.clone() for g in got]
    for k in range(1, 4):
        loss.backward(retain_graph=True)
        torch.testing.assert_close(x.grad, k * want[0])
        torch.testing.assert_close(w.grad, k * want[1])
    for g, c in zip(got, kept):  # the gradients handed out first were not changed behind the caller's back
        torch.testing.assert_close(g, c)


def test_backward_after_zero_grad_in_place(kernel_mode):
    x, w, t = _inputs()
    loss = fused_linear_distill_loss(x, w, t)
    loss.backward(retain_graph=True)
    first = [x.grad.clone(), w.grad.clone()]
    x.grad.zero_()
    w.grad.zero_()
    (loss * 2.0).backward()
    torch.testing.assert_close(x.grad, 2.0 * first[0])
    torch.testing.assert_close(w.grad, 2.0 * first[1])
