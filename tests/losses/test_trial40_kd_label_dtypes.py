"""sequence_kd_loss takes any integer label dtype, as its TypeError contract says: int32 / int16 token ids
ended in cross_entropy's "expected target dtype to be Long or Byte"."""

import pytest
import torch

from alignlab.losses.distill import sequence_kd_loss


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_int32_and_int16_labels(dtype, reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3] = -100
    want = sequence_kd_loss(logits, labels, reduction=reduction)
    torch.testing.assert_close(sequence_kd_loss(logits, labels.to(dtype), reduction=reduction), want)
    packed = sequence_kd_loss(logits[:1], labels[:1].to(dtype), reduction=reduction, cu_seqlens=torch.tensor([0, 2, 5]))
    torch.testing.assert_close(
        packed, sequence_kd_loss(logits[:1], labels[:1], reduction=reduction, cu_seqlens=torch.tensor([0, 2, 5])))
