"""The fused losses through the Triton row kernel when the vocabulary spans several blocks and the last one is
partial (300 = 256 + 44 under the interpreter), with a sequence that has no scored token and one with a single
one: values and gradients against plain float64 PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses import fused_linear_dpo, fused_linear_grpo, linear_cross_entropy
from alignlab.losses.reward import grpo_loss

V, H = 300, 8


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 3, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 3
    labels = torch.randint(0, V, (4, 3), generator=g)
    labels[:, 0] = -100
    labels[1] = -100  # nothing scored
    labels[2, 1] = -100  # one token scored
    return hidden, weight, labels, g


def _leaves(*ts, dtype):
    return [t.detach().clone().to(dtype).requires_grad_() for t in ts]


def _logp(hidden, weight, labels):
    logp = torch.log_softmax(hidden @ weight.T, -1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)


def _close(got, want, tol=2e-5):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_cross_entropy_none_with_weights_and_upstream(kernel_mode):
    hidden, weight, labels, g = _problem()
    tw = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(4, 3, generator=g, dtype=torch.float64)
    h, w, t = _leaves(hidden, weight, tw, dtype=torch.float32)
    out = linear_cross_entropy(h, w, labels, token_weights=t, reduction="none", label_smoothing=0.1, chunk_size=2)
    (out.loss * up.float()).sum().backward()
    h64, w64, t64 = _leaves(hidden, weight, tw, dtype=torch.float64)
    per = F.cross_entropy((h64 @ w64.T).reshape(-1, V), labels.reshape(-1), reduction="none", label_smoothing=0.1)
    ref = per.view(4, 3) * t64
    (ref * up).sum().backward()
    _close([out.loss, h.grad, w.grad, t.grad], [ref.detach(), h64.grad, w64.grad, t64.grad])


@pytest.mark.parametrize("eager", [False, True])
def test_dpo_with_an_empty_and_a_one_token_sequence(kernel_mode, eager):
    hidden, weight, labels, _ = _problem(1)
    h, w = _leaves(hidden, weight, dtype=torch.float32)
    loss, _ = fused_linear_dpo(h, w, labels, reference_free=True, beta=0.5, nll_alpha=0.3, eager=eager, chunk_size=2)
    loss.backward()
    h64, w64 = _leaves(hidden, weight, dtype=torch.float64)
    tok = _logp(h64, w64, labels)
    seq = tok.sum(1)
    counts = (labels != -100).sum(1)
    want = -F.logsigmoid(0.5 * (seq[:2] - seq[2:])).mean() + 0.3 * (-tok[:2].sum() / counts[:2].sum())
    want.backward()
    _close([loss, h.grad, w.grad], [want.detach(), h64.grad, w64.grad])


def test_grpo_entropy_bonus_with_an_empty_completion(kernel_mode):
    hidden, weight, labels, g = _problem(2)
    mask = labels != -100
    ids = labels.clamp(min=0)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    h, w = _leaves(hidden, weight, dtype=torch.float32)
    loss, _ = fused_linear_grpo(h, w, ids, adv, mask, loss_type="dapo", entropy_coef=0.05, temperature=0.8,
                                chunk_size=2)
    loss.backward()
    h64, w64 = _leaves(hidden, weight, dtype=torch.float64)
    logp_all = torch.log_softmax(h64 @ w64.T / 0.8, -1)
    lp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    want, _ = grpo_loss(lp, adv, mask, loss_type="dapo", entropy=ent, entropy_coef=0.05)
    want.backward()
    _close([loss, h.grad, w.grad], [want.detach(), h64.grad, w64.grad])
