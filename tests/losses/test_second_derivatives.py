"""What docs/losses-logprobs.md says of second derivatives, checked: the logits-level functions are exact under
create_graph=True (gradgradcheck in float64), the fused linear losses are first order (right first derivatives,
no graph of their own, so a Hessian-vector product through them is zero)."""

import torch

from alignlab.losses import linear_cross_entropy, token_logprobs
from alignlab.losses.distill import distill_loss

D = torch.float64


def _data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, dtype=D, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=D, generator=g, requires_grad=True)
    y = torch.tensor([1, 6, -100, 0, 3])
    return h, w, y


def test_logits_level_functions_have_exact_second_derivatives():
    h, w, y = _data()
    weights = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=D)
    assert torch.autograd.gradgradcheck(lambda z: (token_logprobs(z, y) * weights).sum(), (h @ w.T,))
    teacher = torch.randn(5, 7, dtype=D, generator=torch.Generator().manual_seed(1))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert torch.autograd.gradgradcheck(lambda z, kind=kind: distill_loss(z, teacher, kind=kind), (h @ w.T,))


def test_fused_linear_cross_entropy_is_first_order_under_create_graph():
    h, w, y = _data()
    loss = linear_cross_entropy(h, w, y).loss
    gh, = torch.autograd.grad(loss, h, create_graph=True)
    want = torch.nn.functional.cross_entropy(h @ w.T, y)
    wh, = torch.autograd.grad(want, h, create_graph=True)
    torch.testing.assert_close(gh, wh)  # the first derivative is right
    assert not gh.requires_grad  # but has no graph: what the docs warn of
    v = torch.ones_like(h)
    hvp, = torch.autograd.grad((wh * v).sum(), h)
    assert hvp.abs().max() > 0  # the unfused form's Hessian-vector product is not zero
