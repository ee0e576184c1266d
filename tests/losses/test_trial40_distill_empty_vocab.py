"""An empty vocabulary is a ValueError naming the argument (the fused loss crashed in a reshape, the
token-level one returned 0 as if the distributions agreed)."""

import pytest
import torch

from alignlab.losses.distill import distill_loss, fused_linear_distill_loss


def test_token_level_refuses_an_empty_vocabulary():
    with pytest.raises(ValueError, match="student_logits"):
        distill_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 0))


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_fused_refuses_an_empty_vocabulary(kernel_mode, teacher):
    hidden, weight = torch.randn(2, 3, 4), torch.randn(0, 4)
    kw = (dict(teacher_logits=torch.randn(2, 3, 0)) if teacher == "logits"
          else dict(teacher_hidden=torch.randn(2, 3, 5), teacher_weight=torch.randn(0, 5)))
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_distill_loss(hidden, weight, **kw)
