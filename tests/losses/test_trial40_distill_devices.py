"""Tensors on another device than the student's are a ValueError naming them. The meta device stands in
for a second accelerator on CPU-only runners: a meta student or teacher weight gave a number (read from an
unwritten logits buffer) instead of an error."""

import pytest
import torch

from alignlab.losses.distill import distill_loss, fused_linear_distill_loss


def _meta(*shape):
    return torch.zeros(*shape, device="meta")


@pytest.mark.parametrize("bad", ["student_weight", "teacher_logits", "teacher_hidden", "teacher_weight"])
def test_fused_names_a_tensor_on_another_device(kernel_mode, bad):
    hidden = torch.randn(2, 3, 4)
    args = dict(student_weight=torch.randn(7, 4))
    if bad == "teacher_logits":
        args["teacher_logits"] = _meta(2, 3, 7)
    elif bad != "student_weight":
        args.update(teacher_hidden=torch.randn(2, 3, 5), teacher_weight=torch.randn(7, 5))
        args[bad] = _meta(*args[bad].shape)
    else:
        args.update(student_weight=_meta(7, 4), teacher_logits=torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=bad):
        fused_linear_distill_loss(hidden, **args)


def test_token_level_names_a_teacher_on_another_device():
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_loss(torch.randn(2, 7), _meta(2, 7))
