"""Triton distillation row kernel vs. its PyTorch reference (float64), forward and gradient.

On CPU this runs under ``TRITON_INTERPRET=1`` (tiny shapes, fp32/fp16); bf16 is checked on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from alignlab.kernels.distill import distill_rows  # noqa: E402
from alignlab.losses.distill import distill_loss, distill_rows_torch, fused_linear_distill_loss  # noqa: E402

KINDS = ["forward_kl", "reverse_kl", "jsd", "tv"]


def _rows(rows, vocab, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g) * scale).to(device)
    t = (torch.randn(rows, vocab, generator=g) * scale).to(device)
    w = torch.rand(rows, generator=g).to(device)
    return s, t, w


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 77), (2, 130), (1, 130)])
def test_rows_forward_and_gradient_fp32(kernel_device, kind, rows, vocab):
    s, t, w = _rows(rows, vocab, kernel_device)
    want_loss, want_dz = distill_rows_torch(s.double(), t.double(), kind, 0.3, 1.5, w.double())
    dz = torch.full_like(s, float("nan"))  # poisoned: every element must be written
    loss = distill_rows(s, t, kind, beta=0.3, temperature=1.5, grad_scale=w, grad_out=dz)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double(), want_dz, rtol=1e-4, atol=1e-6)
    only_loss = distill_rows(s, t, kind, beta=0.3, temperature=1.5)
    torch.testing.assert_close(only_loss, loss)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_without_rows(kernel_device, kind):
    """No rows: an empty loss, and a gradient buffer left as it was (nothing to write)."""
    s, t, w = _rows(0, 77, kernel_device)
    dz = torch.empty_like(s)
    loss = distill_rows(s, t, kind, beta=0.3, temperature=1.5, grad_scale=w, grad_out=dz)
    assert loss.shape == (0,) and dz.shape == (0, 77)
    assert distill_rows(s, t, kind, beta=0.3, temperature=1.5).shape == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_fp16_logits_gradient_in_place(kernel_device, kind):
    s, t, w = _rows(4, 77, kernel_device, seed=1)
    s16, t16 = s.half(), t.half()
    want_loss, want_dz = distill_rows_torch(s16.double(), t16.double(), kind, 0.7, 0.9, w.double())
    buf = s16.clone()
    loss = distill_rows(buf, t16, kind, beta=0.7, temperature=0.9, grad_scale=w, grad_out=buf)  # replaces the logits
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf.double(), want_dz, rtol=2e-3, atol=1e-5)


def test_rows_extreme_logits_stay_finite(kernel_device):
    s, t, w = _rows(2, 70, kernel_device, scale=60.0, seed=2)
    for kind in KINDS:
        dz = torch.empty_like(s)
        loss = distill_rows(s, t, kind, beta=0.5, temperature=1.0, grad_scale=w, grad_out=dz)
        want_loss, want_dz = distill_rows_torch(s.double(), t.double(), kind, 0.5, 1.0, w.double())
        assert torch.isfinite(loss).all() and torch.isfinite(dz).all()
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-4)
        # Probabilities underflow here; bound the error by the gradient's own scale.
        assert (dz.double() - want_dz).abs().max().item() <= 1e-4 * max(1.0, want_dz.abs().max().item())


def test_rows_bad_arguments(kernel_device):
    s, t, w = _rows(2, 8, kernel_device)
    with pytest.raises(ValueError, match="kind"):
        distill_rows(s, t, "kl")
    with pytest.raises(ValueError, match="student_logits"):
        distill_rows(s.double(), t, "jsd")
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_rows(s, t.long(), "jsd")
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_rows(s, t[:, :4], "jsd")
    with pytest.raises(ValueError, match="grad_scale"):
        distill_rows(s, t, "jsd", grad_out=torch.empty_like(s))


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize(
    "dtype,kind,grad_chunk",  # grad_chunk 3: gradient over the logits' own bytes; 6: gathered
    [(torch.float32, "jsd", 3), (torch.float16, "jsd", 3), (torch.float16, "reverse_kl", 6), (torch.float32, "tv", 6)],
)
def test_fused_loss_triton_path_matches_unfused(kernel_device, dtype, kind, grad_chunk):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 16, generator=g)).to(kernel_device, dtype).requires_grad_(True)
    w = (torch.randn(69, 16, generator=g) * 0.3).to(kernel_device, dtype).requires_grad_(True)
    th = torch.randn(2, 5, 12, generator=g).to(kernel_device, dtype)
    tw = (torch.randn(69, 12, generator=g) * 0.3).to(kernel_device, dtype)
    mask = (torch.rand(2, 5, generator=g) > 0.2).to(kernel_device)
    up = torch.randn(2, 5, generator=g).to(kernel_device)
    for reduction in ("mean", "none"):
        got = fused_linear_distill_loss(
            x, w, teacher_hidden=th, teacher_weight=tw, kind=kind, beta=0.25, mask=mask, reduction=reduction, chunk_size=3,
            grad_chunk_size=grad_chunk,
        )
        x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        want = distill_loss(x64 @ w64.T, th.double() @ tw.double().T, kind, beta=0.25, mask=mask, reduction=reduction)
        g_up = up.to(got.dtype) if reduction == "none" else None
        gx, gw = torch.autograd.grad(got, (x, w), g_up)
        rx, rw = torch.autograd.grad(want, (x64, w64), None if g_up is None else g_up.double())
        tol = 1e-5 if dtype == torch.float32 else 5e-3
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        for a, b in ((gx, rx), (gw, rw)):
            assert ((a.double() - b).norm() / b.norm()).item() < tol


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("kind", KINDS)
def test_fused_bf16_cuda_matches_unfused(kind):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 64, generator=g).cuda().bfloat16().requires_grad_(True)
    w = (torch.randn(1000, 64, generator=g) * 0.2).cuda().bfloat16().requires_grad_(True)
    t = (torch.randn(3, 50, 1000, generator=g) * 2).cuda().bfloat16()
    mask = (torch.rand(3, 50, generator=g) > 0.2).cuda()
    got = fused_linear_distill_loss(x, w, t, kind=kind, mask=mask, chunk_size=37, grad_chunk_size=37 if kind == "tv" else 74)
    gx, gw = torch.autograd.grad(got, (x, w))
    # Oracle: the unfused path, i.e. the bf16 logits the student's own lm_head gives, then float64 math
    x64, w64 = x.detach().double(), w.detach().double()
    z = (x.detach() @ w.detach().T).double().requires_grad_(True)
    want = distill_loss(z, t.double(), kind, mask=mask)
    (dz,) = torch.autograd.grad(want, (z,))
    rx, rw = dz @ w64, (dz.reshape(-1, dz.shape[-1]).T @ x64.reshape(-1, x64.shape[-1]))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for a, b in ((gx, rx), (gw, rw)):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-2


def _minus_inf_rows(kernel_device, kind):
    """Rows whose teacher is top-4 (-inf elsewhere) or, for reverse KL (+inf then), whose entries
    1, 6 and 7 are -inf in both student and teacher (a vocabulary mask)."""
    s, t, w = _rows(3, 19, kernel_device, seed=5)
    if kind == "reverse_kl":
        banned = torch.tensor([1, 6, 7], device=kernel_device)
        return s.index_fill(-1, banned, float("-inf")), t.index_fill(-1, banned, float("-inf")), w
    top = t.topk(4, dim=-1).indices
    return s, torch.full_like(t, float("-inf")).scatter(-1, top, t.gather(-1, top)), w


@pytest.mark.parametrize("kind", KINDS)
def test_rows_minus_inf_logits_give_the_finite_limit(kernel_device, kind):
    s, t, w = _minus_inf_rows(kernel_device, kind)
    # Oracle: the float64 autograd path (checked against the formula over the support in tests/losses).
    s64 = s.double().cpu().requires_grad_(True)
    want_loss = distill_loss(s64, t.double().cpu(), kind, beta=0.3, temperature=1.5, reduction="none")
    (want_dz,) = torch.autograd.grad(want_loss, s64, w.double().cpu())
    dz = torch.full_like(s, float("nan"))
    loss = distill_rows(s, t, kind, beta=0.3, temperature=1.5, grad_scale=w, grad_out=dz)
    assert torch.isfinite(loss).all() and torch.isfinite(dz).all()
    torch.testing.assert_close(loss.double().cpu(), want_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double().cpu(), want_dz, rtol=1e-4, atol=1e-6)
    ref_loss, ref_dz = distill_rows_torch(s.double(), t.double(), kind, 0.3, 1.5, w.double())
    torch.testing.assert_close(ref_loss.cpu(), want_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref_dz.cpu(), want_dz, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("kind", KINDS)
def test_fused_triton_path_ignores_masked_garbage_and_minus_inf(kernel_device, kind):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 16, generator=g)
    w = torch.randn(37, 16, generator=g) * 0.3
    t = torch.randn(2, 5, 37, generator=g) * 2
    if kind != "reverse_kl":  # a vocabulary-masked teacher (reverse KL would be +inf)
        t[..., [3, 30]] = float("-inf")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = False
    x_bad, t_bad = x.clone(), t.clone()
    x_bad[~mask] = float("nan")
    t_bad[0, 1] = float("inf")
    t_bad[1, 4] = float("nan")
    xl = x_bad.to(kernel_device).requires_grad_(True)
    wl = w.to(kernel_device).requires_grad_(True)
    got = fused_linear_distill_loss(xl, wl, t_bad.to(kernel_device), kind=kind, beta=0.3, mask=mask.to(kernel_device),
                                    chunk_size=3, grad_chunk_size=6)
    gx, gw = torch.autograd.grad(got, (xl, wl))
    xk, w64 = x[mask].double().requires_grad_(True), w.double().requires_grad_(True)
    want = distill_loss(xk @ w64.T, t[mask].double(), kind, beta=0.3)  # masked rows dropped
    rx, rw = torch.autograd.grad(want, (xk, w64))
    assert torch.isfinite(got) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(gx[~mask.to(kernel_device)] == 0)
    torch.testing.assert_close(gx[mask.to(kernel_device)].double().cpu(), rx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double().cpu(), rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_keep_drops_rows_unread(kernel_device, kind):
    s, t, w = _rows(4, 37, kernel_device, seed=8)
    keep = torch.tensor([True, False, True, False], device=kernel_device)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1], t_bad[1, 3], t_bad[3] = float("nan"), float("inf"), float("-inf")
    dz = torch.full_like(s, float("nan"))
    loss = distill_rows(s_bad, t_bad, kind, beta=0.4, temperature=1.1, grad_scale=w, grad_out=dz, keep=keep)
    want_loss, want_dz = distill_rows_torch(s.double(), t.double(), kind, 0.4, 1.1, w.double())
    ref_loss, ref_dz = distill_rows_torch(s_bad.double(), t_bad.double(), kind, 0.4, 1.1, w.double(), keep)
    assert torch.all(loss[~keep] == 0) and torch.all(dz[~keep] == 0) and torch.all(ref_dz[~keep] == 0)
    torch.testing.assert_close(loss[keep].double(), want_loss[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz[keep].double(), want_dz[keep], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ref_loss, torch.where(keep, want_loss, 0.0))
    torch.testing.assert_close(ref_dz[keep], want_dz[keep])
    with pytest.raises(ValueError, match="keep"):
        distill_rows(s, t, kind, keep=keep[:2])


@pytest.mark.parametrize("name", ["teacher_logits", "grad_scale", "grad_out", "keep"])
def test_distill_rows_refuses_tensors_on_another_device(name):
    """distill_rows takes raw pointers: a tensor on another device was read as the student's device's memory."""
    s = torch.randn(3, 10)
    kw = dict(teacher_logits=s.clone(), grad_scale=torch.ones(3), grad_out=s.clone(), keep=torch.ones(3, dtype=torch.bool))
    kw[name] = kw[name].to("meta")
    t = kw.pop("teacher_logits")
    with pytest.raises(ValueError, match=f"{name} must be on the student_logits' device"):
        distill_rows(s, t, "jsd", **kw)


def test_distill_rows_grad_scale_needs_grad_out():
    """A grad_scale without grad_out was ignored: no gradient was written and nothing said so."""
    s = torch.randn(3, 10)
    with pytest.raises(ValueError, match="grad_out"):
        distill_rows(s, s.clone(), "jsd", grad_scale=torch.ones(3))


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                dict(beta=1.5), dict(beta=-0.1), dict(beta=float("nan")), dict(beta="0.5")])
def test_distill_rows_checks_temperature_and_beta(kw):
    """temperature=0 was a ZeroDivisionError and a negative one ran; a beta outside [0, 1] weighted the JSD mixture
    with a negative share: ValueError naming them, as the losses above it say."""
    s = torch.randn(3, 10)
    with pytest.raises(ValueError, match=next(iter(kw))):
        distill_rows(s, s.clone(), "jsd", **kw)
