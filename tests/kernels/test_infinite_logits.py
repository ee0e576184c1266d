"""Infinite logits (a huge lm_head row overflowing the matmul, a -inf bias that bans a token): the Triton kernel
and the PyTorch reference of chunk_softmax_grad_ now give the same numbers, those of ``z_y - torch.logsumexp(z)``
(the library's log-prob, token_logprobs' too) and of autograd through it.

Before: the kernel's online log-sum-exp shifted by the running max, so a +inf logit gave exp(inf - inf) = NaN and
lse = NaN (the reference: +inf), a row of -inf gave NaN (the reference: -inf); linear_logprobs then returned NaN
on the Triton path where the torch path gave -inf. Both paths also multiplied 0 * lse for the z-loss (NaN for an
infinite lse) over the whole row's gradient, and 0 * -inf in the entropy (a -inf logit has p = 0 and contributes
nothing): NaN entropy and gradient on both.
"""

import os

import pytest
import torch

from alignlab.kernels.linear_logprobs import chunk_softmax_grad_reference_, chunk_softmax_grad_triton_
from alignlab.losses.logprobs import linear_logprobs, token_logprobs

pytest.importorskip("triton")

INF = float("inf")


def _rows(device):
    # +inf at one label / another label, a row of -inf, a -inf logit among finite ones, two +inf, all finite
    z = torch.tensor(
        [
            [INF, 0.0, 1.0, 2.0, -1.0],
            [INF, 0.0, 1.0, 2.0, -1.0],
            [-INF, -INF, -INF, -INF, -INF],
            [-INF, 0.5, 1.0, 2.0, -1.0],
            [INF, INF, 1.0, 2.0, -1.0],
            [0.25, 0.5, 1.0, 2.0, -1.0],
            [0.25, 0.5, 1.0, 2.0, INF],  # +inf in the last block: the running sum rescaled across blocks
        ],
        device=device,
    )
    y = torch.tensor([0, 1, 2, 3, 2, 4, 1], device=device)
    return z, y


def _close(a, b):
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6)


# None: the default launch; blocks of 2 columns (3 blocks a row), with the scalar and the per-lane log-sum-exp
@pytest.mark.parametrize("config", [None, (2, 1, 0, False), (2, 1, 0, True)], ids=["default", "scalar", "lanes"])
@pytest.mark.parametrize("cfg", ["plain", "entropy", "smoothing", "z_loss"])
def test_kernel_matches_reference_on_infinite_logits(kernel_device, cfg, config):
    z, y = _rows(kernel_device)
    kw = {"entropy": dict(want_entropy=True), "smoothing": dict(smoothing=0.1, want_mean=True),
          "z_loss": dict(z_loss=1e-3), "plain": {}}[cfg]
    st_t = chunk_softmax_grad_triton_(z.clone(), y, _config=config, **kw)
    st_r = chunk_softmax_grad_reference_(z.clone(), y, **kw)
    # what torch.logsumexp gives: +inf with a +inf logit, -inf for a row of -inf
    _close(st_r.lse, torch.logsumexp(z, dim=1))
    for a, b in zip(st_t, st_r):
        if b is None:
            assert a is None
        else:
            _close(a, b)
    g = torch.linspace(0.5, 1.5, z.shape[0], device=kernel_device)
    gkw = {k: v for k, v in kw.items() if k != "want_entropy" and k != "want_mean"}
    if cfg == "entropy":
        gkw.update(expected=st_r.expected, entropy_grad=torch.full_like(g, 0.3))
    dz_t, dz_r = z.clone(), z.clone()
    chunk_softmax_grad_triton_(dz_t, y, lse=st_r.lse, grad_scale=g, _config=config, **gkw)
    chunk_softmax_grad_reference_(dz_r, y, lse=st_r.lse, grad_scale=g, **gkw)
    _close(dz_t, dz_r)


def _logp(z, y):
    """The library's log-prob: ``z_y - logsumexp(z)`` (-inf, not F.log_softmax's NaN, beside a +inf logit)."""
    return z.gather(-1, y[..., None]).squeeze(-1) - torch.logsumexp(z, -1)


def test_infinite_logit_gradient_is_nan_only_where_autograd_puts_it(kernel_device):
    """Without a z-loss the gradient of a row with a +inf logit is NaN at that logit only (p there is
    exp(inf - inf)), as autograd through z_y - logsumexp(z) gives it; 0 * inf of the unused z-loss spread it over
    the row (and so over every row of dL/dW)."""
    z, y = _rows(kernel_device)
    leaf = z.clone().requires_grad_(True)
    g = torch.linspace(0.5, 1.5, z.shape[0], device=kernel_device)
    (-_logp(leaf, y) * g).sum().backward()
    for fn in (chunk_softmax_grad_triton_, chunk_softmax_grad_reference_):
        dz = z.clone()
        st = fn(z.clone(), y)
        fn(dz, y, lse=st.lse, grad_scale=g)
        # every row: exactly autograd's numbers, NaN where it has NaN (a +inf logit, a row of -inf)
        for r in range(z.shape[0]):
            _close(dz[r], leaf.grad[r])


def test_minus_inf_logit_adds_nothing_to_the_entropy(kernel_device):
    """p_v = 0 at a -inf logit: the entropy and its gradient are those of the finite logits alone."""
    z = torch.tensor([[-INF, 0.5, 1.0, 2.0, -1.0, -INF]], device=kernel_device)
    y = torch.tensor([2], device=kernel_device)
    fin = z[:, 1:5]
    p = torch.softmax(fin, 1)
    want_ent = -(p * torch.log_softmax(fin, 1)).sum(1)
    for fn in (chunk_softmax_grad_triton_, chunk_softmax_grad_reference_):
        st = fn(z.clone(), y, want_entropy=True)
        torch.testing.assert_close(st.entropy, want_ent)
        dz = z.clone()
        fn(dz, y, lse=st.lse, grad_scale=torch.zeros(1, device=kernel_device), expected=st.expected,
           entropy_grad=torch.ones(1, device=kernel_device))
        leaf = fin.clone().requires_grad_(True)
        q = torch.softmax(leaf, 1)
        (-(q * torch.log_softmax(leaf, 1)).sum()).backward()
        assert torch.isfinite(dz).all()
        torch.testing.assert_close(dz[:, 1:5], leaf.grad)
        assert (dz[:, [0, 5]] == 0).all()


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_linear_logprobs_with_an_overflowing_weight_row_matches_the_reference(kernel_device, monkeypatch, mode):
    """A huge lm_head row gives a +inf logit in the chunk's fp32 matmul: the Triton path returned NaN for every
    log-prob of those rows where the torch path (and token_logprobs) give -inf; the label at the infinite logit
    is inf - inf = NaN on every path."""
    if mode == "triton" and kernel_device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
    g = torch.Generator().manual_seed(0)
    hidden = torch.rand(2, 3, 4, generator=g).to(kernel_device) + 0.5  # positive: the big row's logit is +inf
    weight = torch.randn(6, 4, generator=g).to(kernel_device)
    weight[4] = 3e38
    labels = torch.tensor([[0, 4, 1], [2, 3, 5]], device=kernel_device)
    logits = hidden @ weight.T
    assert torch.isposinf(logits[..., 4]).all()
    want = _logp(logits, labels)
    got = linear_logprobs(hidden, weight, labels)
    _close(got, want)
    _close(token_logprobs(logits, labels), want)
    assert torch.isneginf(got[labels != 4]).all() and torch.isnan(got[labels == 4]).all()


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_linear_logprobs_with_a_banned_token_bias_keeps_finite_logprobs(kernel_device, monkeypatch, mode):
    """A -inf bias entry (a banned token) is a -inf logit: the other labels' log-probs and gradients are those of
    the remaining vocabulary, on both paths."""
    monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=g).to(kernel_device).requires_grad_(True)
    weight = torch.randn(6, 4, generator=g).to(kernel_device).requires_grad_(True)
    bias = torch.zeros(6, device=kernel_device)
    bias[5] = -INF
    labels = torch.tensor([[0, 4, 1], [2, 3, 0]], device=kernel_device)
    got = linear_logprobs(hidden, weight, labels, bias)
    want = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    up = torch.randn(got.shape, generator=g).to(kernel_device)
    gh, gw = torch.autograd.grad(got, (hidden, weight), up)
    wh, ww = torch.autograd.grad(want, (hidden, weight), up)
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_grpo_entropy_with_a_banned_token_bias_is_that_of_the_other_tokens(kernel_device, monkeypatch, mode):
    """fused_linear_grpo's entropy (metric and bonus gradient) with a -inf bias entry was NaN on both paths
    (0 * -inf in sum_v p_v z_v); it is the entropy over the tokens that can be sampled."""
    from alignlab.losses.fused_rl import fused_linear_grpo

    monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 4, generator=g).to(kernel_device).requires_grad_(True)
    weight = torch.randn(6, 4, generator=g).to(kernel_device)
    bias = torch.zeros(6, device=kernel_device)
    bias[5] = -INF
    ids = torch.tensor([[0, 4, 1], [2, 3, 0]], device=kernel_device)
    loss, metrics = fused_linear_grpo(hidden, weight, ids, torch.tensor([1.0, -1.0], device=kernel_device),
                                      bias=bias, entropy_coef=0.1)
    logits = (hidden @ weight.T)[..., :5]  # the banned token has p = 0: the entropy of the other five
    ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(metrics["entropy"], ent.mean())
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(grad).all()
    (want,) = torch.autograd.grad(-0.1 * ent.mean(), hidden, retain_graph=True)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    (want_pg,) = torch.autograd.grad(-(lp * torch.tensor([[1.0], [-1.0]], device=kernel_device)).mean(1).mean(),
                                     hidden)
    torch.testing.assert_close(grad, want + want_pg)
