"""Dense-weight DoRA reductions: both paths refuse non-float inputs by name, and a float64 weight keeps
float64 row norms on the kernel path as on the reference (the kernel reduces in fp32)."""

import pytest
import torch

from alignlab.kernels.dora import dora_norm_and_scales, dora_row_norm, magnitude_grad


def _factors(out_f=5, in_f=7, r=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(out_f, in_f, generator=g), torch.randn(r, in_f, generator=g),
            torch.randn(out_f, r, generator=g))


def test_float64_weight_keeps_float64_norms(kernel_mode):
    w, a, b = _factors()
    w = w.double()
    want = (w + 0.5 * b.double() @ a.double()).norm(dim=1)
    norm = dora_row_norm(w, a, b, 0.5)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=1e-6)
    m = torch.rand(5, dtype=torch.float64) + 0.5
    out = dora_norm_and_scales(w, a, b, 0.5, m, b, torch.float32)
    assert out[0].dtype == torch.float64
    torch.testing.assert_close(out[1], m / want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["weight", "a", "magnitude", "b_master", "dtype"])
def test_norm_and_scales_refuse_non_float_inputs(kernel_mode, bad):
    w, a, b = _factors()
    args = dict(weight=w, a=a, b=b, scale=1.0, magnitude=torch.ones(5), b_master=b, dtype=torch.float32)
    args[bad] = torch.int32 if bad == "dtype" else args[bad].round().to(torch.int64)
    if bad == "a":
        args["b"] = args["b"].round().to(torch.int64)
    with pytest.raises(TypeError, match=bad):
        dora_norm_and_scales(**args)
    if bad in ("weight", "a"):
        with pytest.raises(TypeError, match=bad):
            dora_row_norm(args["weight"], args["a"], args["b"], 1.0)


def test_row_norm_names_a_weight_that_is_not_2d(kernel_mode):
    _, a, b = _factors()
    with pytest.raises(ValueError, match="weight"):
        dora_row_norm(torch.randn(7), a, b, 1.0)


@pytest.mark.parametrize("bad", ["gy", "y", "magnitude", "bias"])
def test_magnitude_grad_refuses_non_float_inputs(kernel_mode, bad):
    args = dict(gy=torch.randn(3, 4), y=torch.randn(3, 4), bias=torch.randn(4), magnitude=torch.full((4,), 2.0))
    args[bad] = args[bad].round().to(torch.int64)  # an int magnitude came back truncated to int
    with pytest.raises(TypeError, match=bad):
        magnitude_grad(**args)


@pytest.mark.parametrize("splits", [0, -1, 1.5, "2", True])
def test_bad_splits_is_named_on_both_paths(kernel_mode, splits):
    from alignlab.kernels.dora import column_dot

    gy, y = torch.randn(10, 5), torch.randn(10, 5)
    with pytest.raises(ValueError, match="splits"):
        magnitude_grad(gy, y, None, torch.ones(5), splits=splits)
    with pytest.raises(ValueError, match="splits"):
        column_dot(gy, y, splits=splits)
