"""``nf4_dequant(out=)`` into a tensor that requires grad (a parameter, a view of one): the Triton kernel wrote into it
behind autograd's back (no error, no version bump: a graph that saved it would use the new values silently), the
PyTorch path raised a ``RuntimeError`` from ``copy_``. Both refuse it now with a ``ValueError`` naming ``out``, before
writing anything; under ``torch.no_grad`` (how one fills a parameter) both write."""

import pytest
import torch

from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.quant.nf4 import nf4_quantize


@pytest.mark.parametrize("view", [False, True])
def test_out_that_requires_grad_is_refused_on_both_paths(view, kernel_mode):
    t = nf4_quantize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), blocksize=64)
    leaf = torch.zeros(4, 72 if view else 64, requires_grad=True)
    out = leaf[:, :64] if view else leaf
    with pytest.raises(ValueError, match="out must not require grad"):
        nf4_dequant(t, torch.float32, out=out)
    assert not leaf.detach().any()
    with torch.no_grad():
        nf4_dequant(t, torch.float32, out=out)
    assert torch.equal(out.detach(), nf4_dequant(t, torch.float32))
