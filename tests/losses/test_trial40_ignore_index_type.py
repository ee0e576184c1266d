"""A non-int ignore_index is a TypeError naming it, as F.cross_entropy makes it (a str used to end in an
AttributeError, and a float such as 1.5 matched no label and silently scored every token)."""

import pytest
import torch

from alignlab.losses.cross_entropy import linear_cross_entropy
from alignlab.losses.logprobs import linear_logprobs, sequence_logprobs, token_logprobs


@pytest.mark.parametrize("bad", ["-100", 1.5, None])
def test_non_int_ignore_index_is_named(kernel_mode, bad):
    hidden, weight = torch.randn(2, 3, 4), torch.randn(6, 4)
    labels = torch.tensor([[1, 2, -100], [0, -100, 5]])
    calls = [
        lambda: linear_cross_entropy(hidden, weight, labels, ignore_index=bad),
        lambda: linear_logprobs(hidden, weight, labels, ignore_index=bad),
        lambda: token_logprobs(torch.randn(2, 3, 6), labels, ignore_index=bad),
        lambda: sequence_logprobs(torch.randn(2, 3, 6), labels, ignore_index=bad),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="ignore_index"):
            call()
