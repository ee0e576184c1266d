"""First-order gradients under create_graph=True (MAML-style inner loops, gradient penalties elsewhere in the
model): linear_logprobs and the fused distillation loss crashed in their backward ("mm(): functions with
out=... arguments don't support automatic differentiation"); now they give the gradient, as the cross-entropy
already did, and only differentiating it again is refused."""

import pytest
import torch

from alignlab.losses.distill import fused_linear_distill_loss
from alignlab.losses.logprobs import linear_logprobs


@pytest.mark.parametrize("entry", ["logprobs", "distill"])
def test_create_graph_gives_the_first_order_gradient(kernel_mode, entry):
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(3, 4, generator=g), torch.randn(9, 4, generator=g)
    labels, teacher = torch.tensor([1, 8, 0]), torch.randn(3, 9, generator=g)

    def loss(h, w):
        if entry == "logprobs":
            return linear_logprobs(h, w, labels).sum()
        return fused_linear_distill_loss(h, w, teacher, reduction="none").sum()

    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    want = torch.autograd.grad(loss(h, w), (h, w))
    got = torch.autograd.grad(loss(h, w), (h, w), create_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError):  # no second derivative: refused, not silently wrong
        got[0].sum().backward()
