"""Labels (and sequence_logprobs' mask) on another device than the logits are a ValueError naming them; gather
raised torch's unnamed device error, and a meta mask failed in .item(). The meta device stands in for a GPU."""

import pytest
import torch

from alignlab.losses.distill import sequence_kd_loss
from alignlab.losses.logprobs import sequence_logprobs, token_logprobs


def test_labels_on_another_device():
    logits, labels = torch.randn(2, 3, 5, device="meta"), torch.randint(0, 5, (2, 3))
    for fn in (token_logprobs, sequence_logprobs, sequence_kd_loss):
        with pytest.raises(ValueError, match="labels must be on the"):
            fn(logits, labels)


def test_sequence_logprobs_mask_on_another_device():
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="mask must be on the labels' device"):
        sequence_logprobs(logits, labels, mask=torch.ones(2, 3, device="meta"))
