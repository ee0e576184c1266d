"""bradley_terry_loss checks ``reduction`` whatever the batch: an empty batch returned 0 for any string (a typo such
as ``"MEAN"`` or ``None`` passed until the first non-empty batch), as dpo_loss / simpo_loss refuse it up front."""

import pytest
import torch

from alignlab.losses import bradley_terry_loss


@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("reduction", ["MEAN", "avg", None])
def test_unknown_reduction_is_refused_for_every_batch_size(n, reduction):
    with pytest.raises(ValueError, match="reduction must be one of"):
        bradley_terry_loss(torch.zeros(n), torch.zeros(n), reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_still_gives_nothing_to_count(reduction):
    loss, metrics = bradley_terry_loss(torch.zeros(0), torch.zeros(0), margin=1.0, center_coef=0.1,
                                       reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and float(loss.sum()) == 0.0
    assert metrics["accuracy"].isnan() and metrics["margin"].isnan()
