"""Fused losses that compute their gradients in the forward pass (linear_cross_entropy "mean"/"sum",
fused_linear_distill_loss "mean"/"sum", the eager fused preference / GRPO schedule) and only scale them by the
upstream gradient in backward.

* That scale was first rounded to the gradient's dtype: a loss scale of 2**16 (torch.amp.GradScaler's default
  init_scale) is inf in float16, so every gradient came back inf/NaN although the true ones fit float16 with room
  to spare; in bfloat16 a scale such as 1/3 was rounded to 8 bits, shifting the whole gradient by one bias.
* float16 gradients were stored after multiplying by 1/N (the mean's normaliser), then multiplied by the loss
  scale: for a mean over a few thousand tokens 1/N made them subnormal and the loss scale could not bring the lost
  bits back (dL/dh 1% off where fp16 holds it to 0.05%).
Each is compared with the float64 gradient times the scale, rounded once to the input dtype.
"""

import pytest
import torch

from alignlab.losses import fused_linear_distill_loss, fused_linear_preference, linear_cross_entropy


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _problem(n, vocab=24, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    y = torch.randint(0, vocab, (n,), generator=g)
    t = torch.randn(n, vocab, generator=g)
    return h, w, y, t


def _ce(h, w, y, t, reduction):
    return linear_cross_entropy(h, w, y, reduction=reduction).loss


def _kd(h, w, y, t, reduction):
    return fused_linear_distill_loss(h, w, t.to(h.dtype), reduction=reduction, kind="jsd")


def _grads(fn, h, w, y, t, dtype, reduction, scale):
    hh, ww = h.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
    (fn(hh, ww, y, t, reduction) * scale).backward()
    return hh.grad, ww.grad


def _check(fn, n, dtype, reduction, scale, slack):
    h, w, y, t = _problem(n)
    # the oracle sees the inputs as rounded to dtype, computes in float64, rounds the scaled gradient once
    want = _grads(fn, h.to(dtype).double(), w.to(dtype).double(), y, t.to(dtype), torch.float64, reduction, 1.0)
    got = _grads(fn, h, w, y, t, dtype, reduction, scale)
    for a, b in zip(got, want):
        b = b * scale
        assert torch.isfinite(b.to(dtype)).all()  # the true scaled gradient fits the dtype
        assert torch.isfinite(a).all()
        floor = _rel(b.to(dtype), b)
        assert _rel(a, b) < slack * floor + 1e-4, (_rel(a, b), floor)


@pytest.mark.parametrize("fn", [_ce, _kd], ids=["cross_entropy", "distill"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp16_grad_scaler_default_scale_does_not_overflow(kernel_mode, fn, reduction):
    # the mean's gradients are O(1/N), the sum's O(1): 2**16 and 2**12 keep both true gradients in fp16's range
    _check(fn, 16, torch.float16, reduction, 2.0**16 if reduction == "mean" else 2.0**12, slack=4)


@pytest.mark.parametrize("fn", [_ce, _kd], ids=["cross_entropy", "distill"])
def test_fp16_mean_over_many_tokens_under_a_loss_scale(fn):
    _check(fn, 4096, torch.float16, "mean", 2.0**10, slack=4)


@pytest.mark.parametrize("fn", [_ce, _kd], ids=["cross_entropy", "distill"])
@pytest.mark.parametrize("scale", [1 / 3, 3.1, 1e-3])
def test_bf16_upstream_scale_is_not_rounded_to_bf16_first(fn, scale):
    # the gradient for a unit upstream, multiplied by the upstream in float32 and rounded once, is what comes back
    h, w, y, t = _problem(32)
    unit = _grads(fn, h, w, y, t, torch.bfloat16, "mean", 1.0)
    got = _grads(fn, h, w, y, t, torch.bfloat16, "mean", scale)
    for a, b in zip(got, unit):
        assert torch.equal(a, (b.float() * scale).to(torch.bfloat16))


def test_hand_over_grads_fp16_scale_of_2_16():
    # the eager fused preference schedule hands its forward-computed gradients over the same way
    h, w, y, _ = _problem(6, vocab=40)
    labels = y.view(2, 3)

    def grads(dtype, scale):
        hh = h.view(2, 3, -1).to(dtype).requires_grad_(True)
        ww = w.to(dtype).requires_grad_(True)
        loss, _ = fused_linear_preference(hh, ww, labels, lambda tok: (tok.sum() * 0.01, {}), eager=True)
        (loss * scale).backward()
        return hh.grad, ww.grad

    want = [g * 2.0**16 for g in grads(torch.float64, 1.0)]
    for a, b in zip(grads(torch.float16, 2.0**16), want):
        assert torch.isfinite(b.half()).all()
        assert _rel(a, b) < 4 * _rel(b.half(), b) + 1e-3
