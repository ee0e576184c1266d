"""float16 gradients of the chunked engine under a small upstream gradient (a mean over many tokens).

dL/dZ = g (p_v - [v = y]) is written into the fp16 logits chunk: with g = 1e-5 every p_v g of a
2000-token vocabulary lay below fp16's smallest subnormal and was flushed, so dL/dh lost the whole
softmax part (11% off against float64, where rounding the true gradient to fp16 costs 2%).
"""

import pytest
import torch

from alignlab.losses.cross_entropy import linear_cross_entropy
from alignlab.losses.logprobs import linear_logprobs


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("entry", ["logprobs", "cross_entropy_none"])
def test_fp16_gradients_reach_the_fp16_rounding_floor(kernel_mode, entry):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(2000, 16, generator=g) * 0.1
    labels = torch.randint(0, 2000, (6,), generator=g)

    def grads(dtype):
        h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        if entry == "logprobs":
            out = linear_logprobs(h, w, labels)
        else:
            out = linear_cross_entropy(h, w, labels, reduction="none").loss
        (out.sum() * 1e-5).backward()
        return h.grad, w.grad

    want = grads(torch.float64)
    got = grads(torch.float16)
    for a, b in zip(got, want):
        floor = _rel(b.half(), b)  # the true gradient rounded to fp16
        assert _rel(a, b) < 2 * floor + 1e-3


def test_fp16_nan_upstream_spoils_only_its_row(kernel_mode):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 4, generator=g).half().requires_grad_(True)
    w = torch.randn(9, 4, generator=g).half()
    lp = linear_logprobs(h, w, torch.tensor([1, 2, 3]))
    (lp * torch.tensor([1e-3, float("nan"), 1e-3], dtype=torch.float16)).sum().backward()
    assert h.grad[1].isnan().all() and h.grad[[0, 2]].isfinite().all()
