"""DiscoPOP (arXiv 2406.08414, eq. 5) for a strongly dispreferred pair. The per-pair loss
(1 - g)(-log sigma(z)) + g e^{-z}, g = sigma(z / tau), is finite for every z (about -z as z -> -inf, since the
gate decays as e^{z / tau}). Formed as written in float32 (the compute dtype of float32 and half inputs), e^{-z}
overflows for z < -88 and inf times the gate's 0 made the loss and all gradients NaN (TRL's DPOTrainer writes the
same expression). The reference is the paper's expression in float64, where e^{-z} stays finite on this range."""

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses.preference import dpo_loss


def _paper(z, tau):
    gate = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - gate) + torch.exp(-z) * gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_finite_for_large_negative_logits(dtype, tau):
    beta = 0.1
    z64 = torch.cat([torch.linspace(-150.0, 150.0, 61, dtype=torch.float64), torch.tensor([-1e3, -0.02, 0.03])])
    pc = (z64 / beta).to(dtype).requires_grad_(True)  # z = beta * (pc - 0)
    zero = torch.zeros_like(pc.detach())
    loss, _ = dpo_loss(pc, zero, zero, zero, beta=beta, loss_type="discopop", discopop_tau=tau, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()

    pc64 = pc.detach().double().requires_grad_(True)
    want = _paper(beta * pc64, tau)
    (want_grad,) = torch.autograd.grad(want.sum(), pc64)
    finite = torch.isfinite(want)  # e^{1000} overflows even in float64: there the limit -z is the reference
    want = torch.where(finite, want, -beta * pc64.detach())
    want_grad = torch.where(finite, want_grad, torch.full_like(want_grad, -beta))
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad.to(dtype).double(), rtol=1e-2 if dtype == torch.bfloat16
                               else 1e-5, atol=1e-6)


def test_discopop_mean_over_a_batch_with_one_far_pair_is_not_nan():
    pc = torch.tensor([-2.0, -1500.0, 0.5], requires_grad=True)
    zero = torch.zeros(3)
    loss, _ = dpo_loss(pc, zero, zero, zero, beta=0.1, loss_type="discopop")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all()
