"""bradley_terry_loss given a reward model's raw (batch, 1) score logits: the shape error says how to get the
(batch,) rewards (TRL squeezes them itself; a user coming from there passes the logits as they are)."""

import pytest
import torch

from alignlab.losses import bradley_terry_loss


def test_batch_by_one_rewards_get_the_squeeze_hint():
    chosen, rejected = torch.randn(4, 1), torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"chosen_rewards must have 1 dimension.*\(4, 1\).*squeeze\(-1\)"):
        bradley_terry_loss(chosen, rejected)
    loss, _ = bradley_terry_loss(chosen.squeeze(-1), rejected.squeeze(-1))
    assert loss.isfinite()


def test_other_shapes_keep_the_plain_message():
    with pytest.raises(ValueError, match=r"must have 1 dimension\(s\), got shape \(4, 2\)$"):
        bradley_terry_loss(torch.randn(4, 2), torch.randn(4, 2))
