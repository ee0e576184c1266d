"""Triton row kernel of the chunked log-prob engine vs its PyTorch reference and a float64 oracle.

On CPU these run under TRITON_INTERPRET=1 (tiny shapes); on a GPU they run compiled.
"""

import pytest
import torch

from alignlab.kernels.linear_logprobs import (
    chunk_softmax_grad_reference_,
    chunk_softmax_grad_triton_,
)
from alignlab.losses.logprobs import linear_logprobs

pytest.importorskip("triton")


def _oracle(logits, labels, grad_scale, smoothing, z_loss, softcap):
    """Float64 autograd of sum_t g_t l_t, l_t written out from its definition."""
    x = logits.double().requires_grad_()
    z = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(z, 1)
    zy = z.gather(1, labels[:, None]).squeeze(1)
    loss = (1 - smoothing) * (lse - zy) + smoothing * (lse - z.mean(1)) + z_loss * lse**2
    (loss * grad_scale.double()).sum().backward()
    return lse.detach(), zy.detach(), z.mean(1).detach(), x.grad


@pytest.mark.parametrize("config", [None, (64, 1, 0, True)], ids=["default", "per-lane-lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "rows,vocab,smoothing,z_loss,softcap",
    [(3, 300, 0.0, 0.0, None), (1, 257, 0.1, 1e-3, None), (5, 33, 0.2, 0.0, 4.0), (2, 1, 0.0, 0.0, None)],
)
def test_kernel_matches_oracle_and_reference(kernel_device, dtype, rows, vocab, smoothing, z_loss, softcap, config):
    g = torch.Generator().manual_seed(rows * 1000 + vocab)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(dtype).to(kernel_device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(kernel_device)
    scale = torch.randn(rows, generator=g).to(kernel_device)
    lse_o, zy_o, mean_o, grad_o = _oracle(logits.cpu(), labels.cpu(), scale.cpu(), smoothing, z_loss, softcap)

    kw = dict(want_mean=True, smoothing=smoothing, z_loss=z_loss, softcap=softcap)
    z_tri, z_ref = logits.clone(), logits.clone()
    st = chunk_softmax_grad_triton_(z_tri, labels, grad_scale=scale, _config=config, **kw)
    st_ref = chunk_softmax_grad_reference_(z_ref, labels, grad_scale=scale, **kw)
    tol = dict(atol=2e-5, rtol=2e-5)
    for got, ref in ((st.lse, lse_o), (st.target, zy_o), (st.mean, mean_o)):
        torch.testing.assert_close(got.cpu().double(), ref, **tol)
    gtol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(z_tri.cpu().double(), grad_o, **gtol)
    torch.testing.assert_close(z_tri, z_ref, **gtol)

    # statistics-only pass leaves the logits alone; the gradient pass with a saved lse matches
    z_stats = logits.clone()
    st2 = chunk_softmax_grad_triton_(z_stats, labels, softcap=softcap, _config=config)
    assert torch.equal(z_stats, logits)
    torch.testing.assert_close(st2.lse, st.lse)
    z_lse = logits.clone()
    chunk_softmax_grad_triton_(z_lse, labels, lse=st.lse, grad_scale=scale, **kw)
    torch.testing.assert_close(z_lse, z_tri, **gtol)


@pytest.mark.parametrize("options", [{}, {"want_mean": True}, {"want_entropy": True},
                                     {"saved_lse": True, "grad_scale": True},
                                     {"saved_lse": True, "grad_scale": True, "want_entropy": True, "expected": True,
                                      "entropy_grad": True},
                                     {"grad_scale": True, "want_mean": True, "want_entropy": True, "entropy_grad": True}])
def test_kernel_zero_rows(kernel_device, options):
    """No rows, with every optional output and input: the reference's fields (empty, or None where it gives
    None), and the logits left as they are."""
    opts = dict(options)
    empty = torch.empty(0, device=kernel_device)
    kw = {k: opts.pop(k) for k in ("want_mean", "want_entropy") if k in opts}
    for name in ("expected", "entropy_grad", "grad_scale"):
        if opts.pop(name, False):
            kw[name] = empty
    if opts.pop("saved_lse", False):
        kw["lse"] = empty
    assert not opts
    labels = torch.empty(0, dtype=torch.long, device=kernel_device)
    got = chunk_softmax_grad_triton_(torch.empty(0, 17, device=kernel_device), labels, **kw)
    want = chunk_softmax_grad_reference_(torch.empty(0, 17, device=kernel_device), labels, **kw)
    for field, g, w in zip(got._fields, got, want):
        assert (g is None) == (w is None), field
        assert g is None or g.shape == (0,), field


def test_kernel_rejects_float64(kernel_device):
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        chunk_softmax_grad_triton_(torch.zeros(1, 3, dtype=torch.float64, device=kernel_device),
                                   torch.zeros(1, dtype=torch.long, device=kernel_device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_logprobs_triton_path(triton_mode, kernel_device, dtype):
    """End to end through the engine with the Triton kernel: same numbers as float64 PyTorch."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 5, 16, generator=g).to(dtype).to(kernel_device).requires_grad_()
    weight = (torch.randn(45, 16, generator=g) / 4).to(dtype).to(kernel_device).requires_grad_()
    labels = torch.randint(0, 45, (2, 5), generator=g)
    labels[1, 3:] = -100
    labels = labels.to(kernel_device)
    up = torch.randn(2, 5, generator=g).to(kernel_device)
    out = linear_logprobs(hidden, weight, labels, chunk_size=3)
    (out * up).sum().backward()

    h64 = hidden.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(-1, labels.cpu().clamp_min(0)[..., None]).squeeze(-1)
    ref = ref * (labels.cpu() != -100)
    (ref * up.cpu().double()).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    torch.testing.assert_close(hidden.grad.cpu().double(), h64.grad, **tol)
    torch.testing.assert_close(weight.grad.cpu().double(), w64.grad, **tol)


@pytest.mark.cuda
def test_linear_logprobs_bf16_cuda(triton_mode):
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(4, 300, 256, generator=g).bfloat16().cuda().requires_grad_()
    weight = (torch.randn(5003, 256, generator=g) / 16).bfloat16().cuda().requires_grad_()
    labels = torch.randint(0, 5003, (4, 300), generator=g)
    labels[:, :50] = -100
    labels = labels.cuda()
    up = torch.randn(4, 300, generator=g).cuda()
    out = linear_logprobs(hidden, weight, labels, chunk_size=256)
    (out * up).sum().backward()
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    z = (h32 @ w32.T).bfloat16().float()  # the logits the engine sees are bf16-rounded too
    ref = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * (labels != -100)
    (ref * up).sum().backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert (out - ref).abs().max().item() < 2e-3
    assert rel(hidden.grad, h32.grad) < 1e-2
    assert rel(weight.grad, w32.grad) < 1e-2


@pytest.mark.parametrize("name", ["labels", "lse", "grad_scale", "entropy_grad"])
def test_tensors_on_another_device_are_refused(name, kernel_mode):
    """The kernel takes raw pointers, so a tensor on another device was read as the logits' device's memory
    (a meta one failed deep in the launcher; on the reference path meta labels gave no error at all)."""
    from alignlab.kernels.linear_logprobs import chunk_softmax_grad_

    kw = dict(grad_scale=torch.ones(3))
    if name == "lse":
        kw["lse"] = torch.zeros(3)
    if name == "entropy_grad":
        kw["entropy_grad"] = torch.zeros(3)
    labels = torch.tensor([1, 2, 3])
    if name == "labels":
        labels = labels.to("meta")
    else:
        kw[name] = kw[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} must be on the logits' device"):
        chunk_softmax_grad_(torch.randn(3, 10), labels, **kw)
