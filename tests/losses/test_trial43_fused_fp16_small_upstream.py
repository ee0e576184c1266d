"""float16 gradients of the fused losses that write dL/dZ into fp16 logits chunks themselves (the eager preference
schedule and the fused GRPO), under a small per-token gradient: with g ~ 1e-5 (a loss summed over a large step,
num_items) every g p_v of a 2000-entry vocabulary is below fp16's smallest subnormal and was flushed, so dL/dh
lost its softmax part. The chunked engine scales g first (test_trial40_fp16_small_upstream); these must too."""

import pytest
import torch

from alignlab.losses import fused_linear_grpo, fused_linear_preference


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _problem():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 3, 16, generator=g), torch.randn(2000, 16, generator=g) * 0.1
    labels = torch.randint(0, 2000, (2, 3), generator=g)
    return hidden, weight, labels, g


def _check(grads):
    want, got = grads(torch.float64), grads(torch.float16)
    for a, b in zip(got, want):
        floor = _rel(b.half(), b)  # the true gradient rounded to fp16
        assert _rel(a, b) < 2 * floor + 1e-3, (_rel(a, b), floor)


@pytest.mark.parametrize("resident_bytes", [0, 2**30])
def test_eager_preference(kernel_mode, resident_bytes):
    hidden, weight, labels, _ = _problem()

    def grads(dtype):
        h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        loss, _ = fused_linear_preference(h, w, labels, lambda tok: (tok.sum() * 1e-5, {}), eager=True,
                                          resident_bytes=resident_bytes)
        loss.backward()
        return h.grad, w.grad

    _check(grads)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_grpo(kernel_mode, level):
    hidden, weight, labels, g = _problem()
    adv = torch.randn(2, generator=g)

    def grads(dtype):
        h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        loss, _ = fused_linear_grpo(h, w, labels, adv.to(dtype), loss_type="dapo", num_items=100_000,
                                    importance_sampling_level=level)
        loss.backward()
        return h.grad, w.grad

    _check(grads)
