"""A bias on another device than the lm_head weight is a ValueError naming it (it ended in a RuntimeError
from the first chunk's addmm). The meta device stands in for a second accelerator on CPU-only runners."""

import pytest
import torch

from alignlab.losses.cross_entropy import linear_cross_entropy
from alignlab.losses.logprobs import linear_logprobs


def test_bias_on_another_device_is_named(kernel_mode):
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    bias = torch.zeros(7, device="meta")
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(hidden, weight, labels, bias=bias)
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(hidden, weight, labels, bias=bias)
