"""Every kernel entry point whose reference is differentiable keeps autograd on the kernel path too (dispatch.py's
contract): rank_grads, lora_decode_add_ and down_ returned plain tensors on the Triton path (b.grad None, the LoRA
term's gradient dropped from y's graph). A helper's find; CPU runs the kernels under the interpreter."""
import pytest
import torch

from alignlab.kernels.dispatch import interpreting
from alignlab.kernels.lora_decode import down_, lora_decode_add_
from alignlab.kernels.lora_grads import rank_grads

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()), reason="needs the kernels")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _both(monkeypatch, fn):
    out = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
        torch.manual_seed(0)
        out.append(fn())
    return out


def test_rank_grads_differentiable(monkeypatch):
    def fn():
        g = torch.randn(5, 7, device=DEV, requires_grad=True)
        b = torch.randn(7, 3, device=DEV, requires_grad=True)
        xa = torch.randn(5, 3, device=DEV, requires_grad=True)
        gb, db = rank_grads(g, b, xa, 0.5, torch.float32)
        (gb.square().sum() + db.square().sum()).backward()
        return g.grad, b.grad, xa.grad
    ref, got = _both(monkeypatch, fn)
    for r, t in zip(ref, got):
        torch.testing.assert_close(t, r)


def test_lora_decode_differentiable(monkeypatch):
    def fn():
        x = torch.randn(2, 32, device=DEV, dtype=torch.float16, requires_grad=True)
        w = torch.randn(6, 32, device=DEV, dtype=torch.float16)
        a = torch.randn(4, 32, device=DEV, requires_grad=True)
        b = torch.randn(6, 4, device=DEV, requires_grad=True)
        y = lora_decode_add_(x @ w.T, x, a, b, 0.5)
        xa = down_(x, a, 0.5)
        (y.float().sum() + xa.float().sum()).backward()
        return x.grad, a.grad, b.grad
    ref, got = _both(monkeypatch, fn)
    for r, t in zip(ref, got):
        torch.testing.assert_close(t.float(), r.float(), atol=1e-2, rtol=1e-2)
