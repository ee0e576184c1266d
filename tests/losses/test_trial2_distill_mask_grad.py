"""fused_linear_distill_loss with float token weights (``mask``) that require grad: distill_loss differentiates
through them, the fused form used to return no gradient for them at all (silently)."""

import pytest
import torch

from alignlab.losses import distill_loss, fused_linear_distill_loss


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(7, 4, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(2, 3, 7, dtype=torch.float64, generator=g)
    m = torch.rand(2, 3, dtype=torch.float64, generator=g)
    m[0, 1] = 0.0
    return x, w, t, m.requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("need_xw", [True, False])
def test_mask_gradient_matches_distill_loss(kernel_mode, reduction, teacher, need_xw):
    x, w, t, m = _inputs()
    if not need_xw:
        x, w = x.detach(), w.detach()
    th = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tw = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = dict(teacher_logits=t) if teacher == "logits" else dict(teacher_hidden=th, teacher_weight=tw)
    t_logits = t if teacher == "logits" else th @ tw.T
    got = fused_linear_distill_loss(x, w, kind="jsd", beta=0.3, temperature=1.5, mask=m, reduction=reduction,
                                    chunk_size=2, **kw)
    want = distill_loss(x @ w.T, t_logits, "jsd", beta=0.3, temperature=1.5, mask=m, reduction=reduction)
    up = torch.linspace(0.5, 2.0, want.numel(), dtype=torch.float64).view(want.shape)
    (g_got,) = torch.autograd.grad((got * up).sum(), [m])
    (g_want,) = torch.autograd.grad((want * up).sum(), [m])
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_with_mask(kernel_mode, reduction):
    x, w, t, m = _inputs()
    m = m.detach().clamp(min=0.05).requires_grad_()  # finite differences must stay on valid (>= 0) weights
    assert torch.autograd.gradcheck(
        lambda x, w, m: fused_linear_distill_loss(x, w, t, kind="forward_kl", mask=m, reduction=reduction,
                                                  chunk_size=2),
        (x, w, m),
    )


def test_all_zero_mask_gradient(kernel_mode):
    x, w, t, _ = _inputs()
    m = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    got = fused_linear_distill_loss(x, w, t, mask=m)
    want = distill_loss(x @ w.T, t, mask=m)
    torch.testing.assert_close(torch.autograd.grad(got, [m])[0], torch.autograd.grad(want, [m])[0])


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_nan_upstream_gradients_at_masked_rows_leave_the_weight_gradient_finite(kernel_mode, teacher):
    """reduction="none" with a NaN upstream gradient at masked tokens (advantages undefined on padding): the
    teacher-logits path and distill_loss drop those rows, but with a teacher hidden state no row mask reached the
    chunk, so NaN · 0 went into dz and dW = dz^T x was NaN everywhere (a helper's find)."""
    g = torch.Generator().manual_seed(0)
    b, t, h, v, th = 2, 4, 8, 20, 5
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 2:] = False
    up = torch.randn(b, t, generator=g)
    up[~mask] = float("nan")
    t_hidden, t_weight = torch.randn(b, t, th, generator=g), torch.randn(v, th, generator=g)
    kw = (dict(teacher_logits=t_hidden @ t_weight.T) if teacher == "logits"
          else dict(teacher_hidden=t_hidden, teacher_weight=t_weight))
    out = fused_linear_distill_loss(hidden, weight, mask=mask, reduction="none", **kw)
    gh, gw = torch.autograd.grad(out, (hidden, weight), grad_outputs=up)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    # the same as the upstream gradient with 0 at the masked rows
    want = torch.autograd.grad(fused_linear_distill_loss(hidden, weight, mask=mask, reduction="none", **kw),
                               (hidden, weight), grad_outputs=torch.where(mask, up, 0.0))
    torch.testing.assert_close(gh, want[0])
    torch.testing.assert_close(gw, want[1])
