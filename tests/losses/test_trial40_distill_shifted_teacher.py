"""fused_linear_distill_loss with shifted teacher logits ``teacher[:, :-1]``: the same loss and gradients as
with a contiguous copy, without copying the teacher's logits (``reshape(-1, vocab)`` of that view made a full
copy, doubling the largest tensor of a distillation step)."""

import pytest
import torch

from conftest import LargestOutput

from alignlab.losses.distill import fused_linear_distill_loss


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shifted_teacher_logits_match_and_are_not_copied(kernel_mode, reduction):
    g = torch.Generator().manual_seed(0)
    teacher_full = torch.randn(3, 6, 20, generator=g)
    teacher = teacher_full[:, :-1]
    hidden0, weight0 = torch.randn(3, 5, 4, generator=g), torch.randn(20, 4, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.2

    def run(t):
        h, w = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        out = fused_linear_distill_loss(h, w, t, kind="jsd", mask=mask, reduction=reduction, chunk_size=4,
                                        grad_chunk_size=8)
        out.sum().backward()
        return out.detach(), h.grad, w.grad

    want = run(teacher.contiguous())
    with LargestOutput() as mode:
        got = run(teacher)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if kernel_mode == "torch" or torch.cuda.is_available():  # Triton's CPU interpreter copies whole storages
        assert mode.largest < teacher.numel()  # chunks of rows (8 x 20 at most), never the whole teacher
