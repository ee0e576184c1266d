"""fused_linear_distill_loss under torch.no_grad() (an evaluation loop over a head that requires grad) must not
compute gradients: autograd.Function's needs_input_grad reports requires_grad whatever the grad mode, and the
"mean"/"sum" forward ran both gradient GEMMs per chunk and kept a weight-sized dW that no backward would read."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignlab.losses import fused_linear_distill_loss


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_no_grad_forms_only_the_logits(reduction, teacher):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g, requires_grad=True)
    th, tw = torch.randn(2, 6, 5, generator=g), torch.randn(20, 5, generator=g)
    kw = dict(teacher_logits=th @ tw.T) if teacher == "logits" else dict(teacher_hidden=th, teacher_weight=tw)
    want = fused_linear_distill_loss(h, w, reduction=reduction, chunk_size=4, **kw).detach()
    with torch.no_grad(), _CountMatmuls() as count:
        got = fused_linear_distill_loss(h, w, reduction=reduction, chunk_size=4, **kw)
    chunks = 3  # 12 rows, 4 at a time
    assert count.n == chunks * (1 if teacher == "logits" else 2)  # the student's (and teacher's) logits only
    assert not got.requires_grad
    torch.testing.assert_close(got, want)
