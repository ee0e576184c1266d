"""fused_linear_distill_loss takes teacher logits of any float dtype, but with a float32 student and float64
teacher logits (or a float64 teacher head) the Triton path raised "teacher_logits must be float32/float16/bfloat16"
from inside the kernel launcher; the PyTorch path computed the loss.  Now both paths agree."""

import pytest
import torch

from alignlab.losses import distill_loss, fused_linear_distill_loss


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_teacher_with_float32_student(kernel_mode, teacher_form, reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, generator=g).requires_grad_()
    w = torch.randn(70, 6, generator=g).requires_grad_()
    th = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    tw = torch.randn(70, 5, dtype=torch.float64, generator=g)
    t_logits = th @ tw.T
    kw = dict(teacher_logits=t_logits) if teacher_form == "logits" else dict(teacher_hidden=th, teacher_weight=tw)
    got = fused_linear_distill_loss(x, w, kind="jsd", temperature=2.0, reduction=reduction, chunk_size=2, **kw)
    want = distill_loss(x @ w.T, t_logits.float(), "jsd", temperature=2.0, reduction=reduction)
    torch.testing.assert_close(got, want)
    up = torch.linspace(0.5, 1.5, want.numel()).view(want.shape)
    for a, b in zip(torch.autograd.grad((got * up).sum(), [x, w]), torch.autograd.grad((want * up).sum(), [x, w])):
        torch.testing.assert_close(a, b)
