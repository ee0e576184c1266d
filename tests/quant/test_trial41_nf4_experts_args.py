"""NF4Experts' interface methods with bad arguments: refused naming the argument instead of a silently wrong
result (an integer dequantization dtype truncated the weights; offsets past x's rows or decreasing ones dropped
rows from the product)."""

import pytest
import torch

from conftest import make_experts

from alignlab.quant import NF4Experts


@pytest.fixture(scope="module")
def experts():
    return NF4Experts.from_experts(make_experts(), compute_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, "float32"])
def test_dequantize_experts_refuses_a_dtype_it_cannot_give(experts, dtype):
    with pytest.raises(TypeError, match="dtype must be one of"):
        experts.dequantize_experts("down_proj", dtype=dtype)


@pytest.mark.parametrize("offsets, message", [
    ([1, 2, 9], "offsets count 9 rows, more than x has \\(5\\)"),
    ([3, 1, 5], "offsets must be non-decreasing"),
    ([2, 5], "offsets must be \\(3,\\)"),
], ids=["past_the_rows", "decreasing", "wrong_length"])
def test_linear_sorted_refuses_offsets_that_do_not_describe_x(experts, offsets, message):
    x = torch.randn(5, 32)
    with pytest.raises(ValueError, match=message):
        experts.linear_sorted("down_proj", x, torch.tensor(offsets, dtype=torch.int32))


def test_linear_sorted_with_offsets_short_of_the_rows_gives_zeros_there(experts):
    """Rows past offsets[-1] (routed nowhere) stay allowed: zeros, as documented."""
    x = torch.randn(5, 32)
    y = experts.linear_sorted("down_proj", x, torch.tensor([1, 1, 3], dtype=torch.int32))
    w = experts.dequantize_experts("down_proj")
    torch.testing.assert_close(y[:3], torch.cat([x[:1] @ w[0].T, x[1:3] @ w[2].T]), rtol=1e-5, atol=1e-5)
    assert not y[3:].any()
