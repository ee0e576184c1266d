"""LoRA factor merging vs dense formulas (float64)."""

import math

import pytest
import torch

from alignlab.merging.lora import fold_lora, lora_cat, lora_delta, lora_linear, lora_svd


def _adapters(ranks=(4, 3, 5), out=23, inp=17, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, inp, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=dtype) for r in ranks]
    return As, Bs


def test_fold_and_delta():
    As, Bs = _adapters((4,))
    w = torch.randn(23, 17, dtype=torch.float64)
    torch.testing.assert_close(fold_lora(w, As[0], Bs[0], 0.5), w + 0.5 * Bs[0] @ As[0])
    torch.testing.assert_close(lora_delta(As[0], Bs[0], 2.0), 2.0 * Bs[0] @ As[0])
    wb = w.to(torch.bfloat16)
    out = fold_lora(wb, As[0].bfloat16(), Bs[0].bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16
    want = (wb.double() + 0.5 * Bs[0].bfloat16().double() @ As[0].bfloat16().double()).bfloat16()
    assert (out.double() - want.double()).abs().max() <= 2 ** -7 * want.double().abs().max()
    with pytest.raises(ValueError, match=r"weight has shape \(17, 23\)"):
        fold_lora(w.T, As[0], Bs[0])
    with pytest.raises(ValueError, match="rank mismatch"):
        fold_lora(w, As[0], Bs[0][:, :3])


def test_cat_is_exact():
    As, Bs = _adapters()
    w, s = [0.5, -1.0, 2.0], [2.0, 0.25, 1.0]
    a, b = lora_cat(As, Bs, w, s)
    assert a.shape == (12, 17) and b.shape == (23, 12)
    want = sum(wi * si * bi @ ai for wi, si, ai, bi in zip(w, s, As, Bs))
    torch.testing.assert_close(b @ a, want)


def test_linear_is_peft_factor_average():
    As, Bs = _adapters((4, 4))
    w, s = [0.7, -0.3], [2.0, 1.0]
    a, b = lora_linear(As, Bs, w, s)
    ra, rb = math.sqrt(0.7 * 2.0), math.sqrt(0.3 * 1.0)
    torch.testing.assert_close(a, ra * As[0] - rb * As[1])
    torch.testing.assert_close(b, ra * Bs[0] + rb * Bs[1])
    # shared B: no cross terms, so BA is the weighted sum of the deltas
    a, b = lora_linear(As, [Bs[0], Bs[0]], [0.5, 0.5])
    torch.testing.assert_close(b @ a, (0.5**0.5 * 2 * Bs[0]) @ (0.5**0.5 * (As[0] + As[1])))
    with pytest.raises(ValueError, match="equal rank"):
        lora_linear(*_adapters((4, 3)))


@pytest.mark.parametrize("rank", [1, 5, 12, 20])
def test_svd_is_best_low_rank(rank):
    As, Bs = _adapters()
    w = [0.5, -1.0, 2.0]
    dense = sum(wi * bi @ ai for wi, ai, bi in zip(w, As, Bs))
    u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, 12)
    best = (u[:, :k] * sv[:k]) @ vh[:k]
    a, b = lora_svd(As, Bs, rank, w)
    assert a.shape == (rank, 17) and b.shape == (23, rank)
    torch.testing.assert_close(b @ a, best, rtol=1e-9, atol=1e-9)
    # the two factors share the singular values evenly
    torch.testing.assert_close(a[:k].norm(dim=1), sv[:k].sqrt(), rtol=1e-9, atol=1e-9)


def test_float32_and_errors():
    As, Bs = _adapters(dtype=torch.float32)
    a, b = lora_svd(As, Bs, 12)
    dense = sum(bi @ ai for ai, bi in zip(As, Bs))
    torch.testing.assert_close(b @ a, dense, rtol=1e-4, atol=1e-4)
    assert a.dtype == torch.float32
    with pytest.raises(ValueError, match="positive integer"):
        lora_svd(As, Bs, 0)
    with pytest.raises(ValueError, match="adapter 1 maps 16 -> 23"):
        lora_cat([As[0], As[1][:, :16]], Bs[:2])
    with pytest.raises(ValueError, match="one entry per adapter"):
        lora_cat(As, Bs, [1.0])
    with pytest.raises(TypeError, match="floating"):
        lora_cat([As[0].long()], [Bs[0]])


def test_bad_scales_weights_and_ranks_are_refused():
    """A NaN scale or weight would reach every folded weight, a string weight was read character by
    character ("1" -> [1.0]), a bool passed as a weight or rank, an integer weight was truncated."""
    As, Bs = _adapters((4,))
    w = torch.randn(23, 17)
    nan = float("nan")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fold_lora(w, As[0], Bs[0], nan)
    with pytest.raises(TypeError, match="scale must be a real number"):
        lora_delta(As[0], Bs[0], "2")
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        fold_lora(w.to(torch.int32), As[0], Bs[0])
    for combine in (lora_cat, lora_linear):
        with pytest.raises(ValueError, match="weights must be finite"):
            combine(As, Bs, [nan])
        with pytest.raises(ValueError, match="scales must be finite"):
            combine(As, Bs, scales=[math.inf])
        with pytest.raises(TypeError, match="weights must be a number"):
            combine(As, Bs, "1")
        with pytest.raises(TypeError, match="not a bool"):
            combine(As, Bs, [True])
        with pytest.raises(TypeError, match="sequences of tensors"):
            combine(As[0], Bs[0])
    with pytest.raises(ValueError, match="positive integer"):
        lora_svd(As, Bs, True)
    with pytest.raises(ValueError, match="positive integer"):
        lora_svd(As, Bs, nan)
    # a scalar weight applies to every adapter
    a, b = lora_cat(As * 2, Bs * 2, 0.5)
    torch.testing.assert_close(b @ a, Bs[0] @ As[0])


def test_fold_into_float16_beyond_its_range_raises():
    """A float16 fold whose float32 sum leaves ±65504 was rounded to inf without a word (the merge methods
    refused the same overflow)."""
    w = torch.full((3, 4), 60000.0, dtype=torch.float16)
    a, b = torch.ones(1, 4), torch.full((3, 1), 10000.0)
    with pytest.raises(ValueError, match=r"fold_lora: 12 merged value\(s\) are beyond float16's largest finite "
                                         r"value 65504.*bfloat16"):
        fold_lora(w, a, b)
    want = torch.full((3, 4), 70000.0)
    assert torch.equal(fold_lora(w.bfloat16(), a, b), want.bfloat16())  # float32's range: fine
    assert torch.equal(fold_lora(w, a, b, scale=1.0 / 1000.0), (w.float() + 10.0).half())  # within range: no change
    w[0, 0] = float("inf")  # an inf already in the weight is passed through
    assert torch.isinf(fold_lora(w, a, b)[0, 0])


def test_factors_that_are_not_tensors_are_named():
    """(A, B) pairs passed as ``As`` (and a list as A) failed with "'tuple' object has no attribute 'dim'"."""
    As, Bs = _adapters((4, 2))
    for combine in (lora_cat, lora_linear, lambda a, b: lora_svd(a, b, 2)):
        with pytest.raises(TypeError, match="adapter 0: A and B must be tensors, got tuple and Tensor"):
            combine(list(zip(As, Bs)), Bs)
    with pytest.raises(TypeError, match="lora_delta: A and B must be tensors, got list and Tensor"):
        lora_delta(As[0].tolist(), Bs[0])
