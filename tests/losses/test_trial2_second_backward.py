"""A second backward through a loss whose gradients were computed in forward (``fused_linear_grpo``,
``fused_linear_*(eager=True)``) used to return no gradient at all, silently: the stored gradients had been
handed over by the first backward.  It now raises; the recomputing paths keep giving the same gradients."""

import pytest
import torch

from alignlab.losses import fused_linear_dpo, fused_linear_grpo, fused_linear_orpo, linear_cross_entropy


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 3, 5, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.randint(0, 7, (4, 3), generator=g)
    return h, w, y


def _grpo(h, w, y):
    return fused_linear_grpo(h, w, y, torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))[0]


def _dpo_eager(h, w, y):
    z = torch.zeros(2, dtype=torch.float64)
    return fused_linear_dpo(h, w, y, z, z, eager=True)[0]


def _orpo_eager(h, w, y):
    return fused_linear_orpo(h, w, y, eager=True)[0]


@pytest.mark.parametrize("loss_fn", [_grpo, _dpo_eager, _orpo_eager], ids=["grpo", "dpo_eager", "orpo_eager"])
def test_second_backward_raises_instead_of_dropping_gradients(kernel_mode, loss_fn):
    h, w, y = _inputs()
    loss = loss_fn(h, w, y)
    torch.autograd.grad(loss, [h], retain_graph=True)  # e.g. a gradient norm w.r.t. the hidden states
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()  # used to leave w.grad None without a word


@pytest.mark.parametrize("loss_fn", [_grpo, _dpo_eager, _orpo_eager], ids=["grpo", "dpo_eager", "orpo_eager"])
def test_single_backward_unchanged(kernel_mode, loss_fn):
    h, w, y = _inputs()
    gh, gw = torch.autograd.grad(loss_fn(h, w, y) * 3.0, [h, w])
    h2, w2, _ = _inputs()
    rh, rw = torch.autograd.grad(loss_fn(h2, w2, y), [h2, w2])
    torch.testing.assert_close(gh, 3.0 * rh)
    torch.testing.assert_close(gw, 3.0 * rw)


def test_recomputing_paths_still_allow_a_second_backward(kernel_mode):
    h, w, y = _inputs()
    z = torch.zeros(2, dtype=torch.float64)
    for loss in (linear_cross_entropy(h, w, y).loss, fused_linear_dpo(h, w, y, z, z)[0]):
        g1 = torch.autograd.grad(loss, [h, w], retain_graph=True)
        g2 = torch.autograd.grad(loss, [h, w])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
