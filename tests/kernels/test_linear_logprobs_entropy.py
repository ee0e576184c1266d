"""The row kernel's entropy statistics and entropy gradient, Triton (interpreter on CPU) and reference,
against autograd of the written-out formula in float64."""

import pytest
import torch

from alignlab.kernels.linear_logprobs import chunk_softmax_grad_reference_, chunk_softmax_grad_triton_

ROWS, V = 7, 83  # V not a power of two: a masked tail block


def _oracle(z64, labels, g, e, softcap):
    z = z64.clone().requires_grad_(True)
    zc = softcap * torch.tanh(z / softcap) if softcap else z
    logp = torch.log_softmax(zc, dim=1)
    ent = -(logp.exp() * logp).sum(1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    (g * nll + e * ent).sum().backward()
    return ent.detach(), z.grad


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("saved", [False, True], ids=["one_call", "saved_stats"])
def test_entropy_stats_and_gradient(impl, softcap, saved, kernel_device):
    if impl == "triton":
        pytest.importorskip("triton")
        fn = chunk_softmax_grad_triton_
    else:
        fn = chunk_softmax_grad_reference_
    g = torch.Generator().manual_seed(0)
    z64 = torch.randn(ROWS, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (ROWS,), generator=g)
    gs = torch.randn(ROWS, generator=g, dtype=torch.float64)
    es = torch.randn(ROWS, generator=g, dtype=torch.float64)
    want_ent, want_grad = _oracle(z64, labels, gs, es, softcap)
    dev = kernel_device if impl == "triton" else "cpu"
    z = z64.float().to(dev)
    y, gsd, esd = labels.to(dev), gs.float().to(dev), es.float().to(dev)
    if saved:  # statistics pass, then the gradient pass from the saved lse / expected logits
        st = fn(z, y, want_entropy=True, softcap=softcap)
        fn(z, y, lse=st.lse, grad_scale=gsd, expected=st.expected, entropy_grad=esd, softcap=softcap)
    else:
        st = fn(z, y, grad_scale=gsd, entropy_grad=esd, want_entropy=True, softcap=softcap)
    torch.testing.assert_close(st.entropy.double().cpu(), want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double().cpu(), want_grad, rtol=1e-5, atol=1e-6)


def test_entropy_off_leaves_the_contract_alone(kernel_device):
    z = torch.randn(3, 17)
    st = chunk_softmax_grad_reference_(z.clone(), torch.tensor([0, 5, 16]))
    assert st.entropy is None and st.expected is None
    with pytest.raises(ValueError, match="entropy_grad"):
        chunk_softmax_grad_reference_(z.clone(), torch.tensor([0, 5, 16]), entropy_grad=torch.zeros(3))
    with pytest.raises(ValueError, match="expected"):
        chunk_softmax_grad_reference_(z.clone(), torch.tensor([0, 5, 16]), lse=torch.zeros(3),
                                      grad_scale=torch.zeros(3), entropy_grad=torch.zeros(3))
