"""token_logprobs / sequence_logprobs take any integer label dtype, as documented: int8/int16/uint8 labels
ended in gather's "Expected dtype int32/int64 for index"."""

import pytest
import torch

from alignlab.losses.logprobs import sequence_logprobs, token_logprobs


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_small_integer_labels(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels.to(dtype)), want)
    torch.testing.assert_close(sequence_logprobs(logits, labels.to(dtype), ignore_index=99), want.sum(-1))
