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


@pytest.mark.parametrize("rows,dtype", [(ROWS, torch.float32), (ROWS, torch.float16), (1, torch.float32),
                                        (1, torch.float16)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("saved", [False, True], ids=["one_call", "saved_stats"])
def test_entropy_stats_and_gradient(impl, softcap, saved, rows, dtype, kernel_device):
    """fp32 and fp16 logits (the gradient written over them in their dtype), several rows and one."""
    if impl == "triton":
        pytest.importorskip("triton")
        fn = chunk_softmax_grad_triton_
    else:
        fn = chunk_softmax_grad_reference_
    g = torch.Generator().manual_seed(0)
    z64 = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 2).to(dtype).double()
    labels = torch.randint(0, V, (rows,), generator=g)
    gs = torch.randn(rows, generator=g, dtype=torch.float64)
    es = torch.randn(rows, generator=g, dtype=torch.float64)
    want_ent, want_grad = _oracle(z64, labels, gs, es, softcap)
    dev = kernel_device if impl == "triton" else "cpu"
    z = z64.to(dtype).to(dev)
    y, gsd, esd = labels.to(dev), gs.float().to(dev), es.float().to(dev)
    if saved:  # statistics pass, then the gradient pass from the saved lse / expected logits
        st = fn(z, y, want_entropy=True, softcap=softcap)
        fn(z, y, lse=st.lse, grad_scale=gsd, expected=st.expected, entropy_grad=esd, softcap=softcap)
    else:
        st = fn(z, y, grad_scale=gsd, entropy_grad=esd, want_entropy=True, softcap=softcap)
    torch.testing.assert_close(st.entropy.double().cpu(), want_ent, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-4)  # fp16 rounding
    torch.testing.assert_close(z.double().cpu(), want_grad, **tol)


def test_entropy_off_leaves_the_contract_alone(kernel_device):
    z = torch.randn(3, 17)
    st = chunk_softmax_grad_reference_(z.clone(), torch.tensor([0, 5, 16]))
    assert st.entropy is None and st.expected is None
    with pytest.raises(ValueError, match="entropy_grad"):
        chunk_softmax_grad_reference_(z.clone(), torch.tensor([0, 5, 16]), entropy_grad=torch.zeros(3))
    with pytest.raises(ValueError, match="expected"):
        chunk_softmax_grad_reference_(z.clone(), torch.tensor([0, 5, 16]), lse=torch.zeros(3),
                                      grad_scale=torch.zeros(3), entropy_grad=torch.zeros(3))


@pytest.mark.cuda
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_entropy_stats_and_gradient_cuda_bf16(softcap):
    """bf16 logits on the GPU (the interpreter cannot load bf16), a vocabulary over several blocks."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(4)
    rows, vocab = 64, 5003
    z64 = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4).to(torch.bfloat16).double()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    gs, es = torch.randn(rows, generator=g, dtype=torch.float64), torch.randn(rows, generator=g, dtype=torch.float64)
    want_ent, want_grad = _oracle(z64, labels, gs, es, softcap)
    z = z64.to(torch.bfloat16).cuda()
    st = chunk_softmax_grad_triton_(z, labels.cuda(), grad_scale=gs.float().cuda(), entropy_grad=es.float().cuda(),
                                    want_entropy=True, softcap=softcap)
    torch.testing.assert_close(st.entropy.double().cpu(), want_ent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.double().cpu(), want_grad, rtol=1.6e-2, atol=1e-4)  # bf16 rounding of the gradient
