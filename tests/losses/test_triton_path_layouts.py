"""The fused losses on the Triton row kernels (interpreter on CPU) and on the PyTorch path: a packed batch gives
the padded batch's loss and gradients, an empty batch and a one-token batch give the float64 formula's, and the
preference variants other than DPO match the PyTorch path. The vocabulary (300) ends in a partial block of the
interpreter's 256 (the distillation kernel's 64). On a GPU the tensors are CUDA ones (``kernel_device``), so that the
Triton cases run the compiled kernels, not the PyTorch path CPU tensors would take there."""

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses import linear_cross_entropy, linear_logprobs
from alignlab.losses.distill import distill_loss, fused_linear_distill_loss
from alignlab.losses.fused_preference import fused_linear_cpo, fused_linear_kto, fused_linear_orpo, fused_linear_simpo
from alignlab.losses.fused_rl import fused_linear_grpo

V, H = 300, 8


def _head(seed, *lead):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, H, generator=g), torch.randn(V, H, generator=g) / 2, g


def _on(device, *ts):
    """The CPU-drawn tensors ``ts`` on ``device``."""
    return tuple(t.to(device) for t in ts)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def test_cross_entropy_and_logprobs_packed_equal_padded(kernel_mode, kernel_device):
    """Right-padded rows (label -100) and the same tokens packed into one row: same per-token losses, summed loss
    and gradients, per-token weights included."""
    hidden, weight, g = _head(0, 3, 5)
    labels = torch.randint(0, V, (3, 5), generator=g)
    lengths = torch.tensor([5, 1, 3])
    real = torch.arange(5)[None] < lengths[:, None]
    labels[~real] = -100
    tw = torch.rand(3, 5, generator=g) + 0.5
    up = torch.randn(3, 5, generator=g)
    hidden, weight, labels, real, tw, up = _on(kernel_device, hidden, weight, labels, real, tw, up)
    got = {}
    for layout in ("padded", "packed"):
        sel = (lambda t: t[real][None]) if layout == "packed" else (lambda t: t)
        h, w, t = _leaf(sel(hidden)), _leaf(weight), _leaf(sel(tw))
        none = linear_cross_entropy(h, w, sel(labels), token_weights=t, reduction="none", label_smoothing=0.1,
                                    chunk_size=2).loss
        total = linear_cross_entropy(h, w, sel(labels), token_weights=t, reduction="sum", z_loss=1e-3).loss
        logp = linear_logprobs(h, w, sel(labels), chunk_size=3)
        grads = torch.autograd.grad((none * sel(up)).sum() + total + (logp * sel(up)).sum(), (h, w, t))
        unpack = (lambda x: x[0]) if layout == "packed" else (lambda x: x[real])
        got[layout] = (unpack(none), total, unpack(logp), unpack(grads[0]), grads[1], unpack(grads[2]))
    for a, b in zip(got["packed"], got["padded"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,seq", [(0, 3), (1, 1)], ids=["empty", "one_token"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_and_one_token_batches_match_the_formula(kernel_mode, kernel_device, batch, seq, reduction):
    hidden, weight, g = _head(1, batch, seq)
    labels = torch.randint(0, V, (batch, seq), generator=g)
    tw = torch.rand(batch, seq, generator=g) + 0.5
    up = torch.randn(batch, seq, generator=g, dtype=torch.float64)
    hidden, weight, labels, tw, up = _on(kernel_device, hidden, weight, labels, tw, up)
    h, w, t = _leaf(hidden), _leaf(weight), _leaf(tw)
    out = linear_cross_entropy(h, w, labels, token_weights=t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                               logit_softcap=4.0).loss
    logp = linear_logprobs(h, w, labels)
    weigh = (lambda x: (x * up.to(x.dtype)).sum()) if reduction == "none" else (lambda x: x)
    grads = torch.autograd.grad(weigh(out) + (logp * up.float()).sum(), (h, w, t))
    h64, w64, t64 = (_leaf(x.double()) for x in (hidden, weight, tw))
    z = 4.0 * torch.tanh((h64 @ w64.T) / 4.0)
    per = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), reduction="none", label_smoothing=0.1)
    per = (per + 1e-3 * torch.logsumexp(z, -1).reshape(-1) ** 2).view(batch, seq) * t64
    want = per if reduction == "none" else per.sum() / max(1, batch * seq)
    want_logp = torch.log_softmax(h64 @ w64.T, -1).gather(-1, labels[..., None]).squeeze(-1)
    want_grads = torch.autograd.grad(weigh(want) + (want_logp * up).sum(), (h64, w64, t64), allow_unused=True,
                                     materialize_grads=True)
    for a, b in zip((out, logp, *grads), (want, want_logp, *want_grads)):
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_grpo_packed_equals_padded_on_the_row_kernel(triton_mode, kernel_device, loss_type, level):
    hidden, weight, g = _head(2, 4, 3)
    ids = torch.randint(0, V, (4, 3), generator=g)
    mask = torch.arange(3)[None] < torch.tensor([3, 1, 0, 2])[:, None]  # a one-token and an empty completion
    adv = torch.randn(4, generator=g)
    old = torch.randn(4, 3, generator=g) * 0.3 - 4.0
    hidden, weight, ids, mask, adv, old = _on(kernel_device, hidden, weight, ids, mask, adv, old)
    kw = dict(beta=0.04, loss_type=loss_type, importance_sampling_level=level, entropy_coef=0.01, temperature=0.9,
              chunk_size=3)
    h, w = _leaf(hidden), _leaf(weight)
    loss, metrics = fused_linear_grpo(h, w, ids, adv, mask, old_logprobs=old, ref_logprobs=old + 0.1, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    hp, wp = _leaf(hidden[mask]), _leaf(weight)
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=mask.device), mask.sum(1).cumsum(0)])
    packed, packed_metrics = fused_linear_grpo(hp, wp, ids[mask], adv, old_logprobs=old[mask],
                                               ref_logprobs=old[mask] + 0.1, cu_seqlens=cu, **kw)
    ghp, gwp = torch.autograd.grad(packed, (hp, wp))
    torch.testing.assert_close(packed, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ghp, gh[mask], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gwp, gw, rtol=1e-5, atol=1e-7)
    for k in metrics:
        torch.testing.assert_close(packed_metrics[k], metrics[k], msg=k)


@pytest.mark.parametrize("name", ["orpo", "simpo", "cpo", "kto"])
@pytest.mark.parametrize("eager", [False, True])
def test_preference_variants_on_the_row_kernel_match_torch(monkeypatch, kernel_device, name, eager):
    pytest.importorskip("triton")
    hidden, weight, g = _head(3, 4, 3)
    labels = torch.randint(0, V, (4, 3), generator=g)
    labels[:, 0] = -100
    labels[1, 1:] = -100  # a completion of one token
    ref, desirable = -torch.rand(4, generator=g), torch.tensor([True, False, True, False])
    hidden, weight, labels, ref, desirable = _on(kernel_device, hidden, weight, labels, ref, desirable)
    call = {"orpo": fused_linear_orpo, "simpo": fused_linear_simpo, "cpo": fused_linear_cpo}.get(name)
    if call is None:
        def call(h, w, y, **kw):
            return fused_linear_kto(h, w, y, desirable, ref, kl=0.3, **kw)
    got = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
        h, w = _leaf(hidden), _leaf(weight)
        loss, metrics = call(h, w, labels, chunk_size=2, eager=eager)
        got[mode] = (loss, *torch.autograd.grad(loss, (h, w)), *metrics.values())
    for a, b in zip(got["triton"], got["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distill_on_the_row_kernel_empty_packed_and_weighted(triton_mode, kernel_device, reduction):
    """Triton path: an empty batch gives 0 (mean) or (0, seq) losses with zero gradients; a packed batch the padded
    one's; float token weights get the gradient of the weighted divergence."""
    hidden, weight, g = _head(4, 3, 4)
    teacher = torch.randn(3, 4, V, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3
    mask[1] = False
    mask[2, 1:] = False
    up, fw = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    hidden, weight, teacher, mask, up, fw = _on(kernel_device, hidden, weight, teacher, mask, up, fw)
    empty = _leaf(hidden[:0])
    out = fused_linear_distill_loss(empty, weight, teacher[:0], reduction=reduction)
    assert out.shape == (() if reduction == "mean" else (0, 4)) and out.sum().item() == 0.0
    weigh = (lambda x, sel=lambda t: t: (x * sel(up)).sum()) if reduction == "none" else (lambda x, sel=None: x)
    h, w = _leaf(hidden), _leaf(weight)
    padded = fused_linear_distill_loss(h, w, teacher, kind="reverse_kl", mask=mask, reduction=reduction, chunk_size=2)
    gh, gw = torch.autograd.grad(weigh(padded), (h, w))
    hp, wp = _leaf(hidden[mask]), _leaf(weight)
    packed = fused_linear_distill_loss(hp, wp, teacher[mask], kind="reverse_kl", reduction=reduction, chunk_size=2)
    ghp, gwp = torch.autograd.grad(weigh(packed, lambda t: t[mask]), (hp, wp))
    torch.testing.assert_close(packed, padded[mask] if reduction == "none" else padded)
    torch.testing.assert_close(ghp, gh[mask])
    torch.testing.assert_close(gwp, gw)
    fw = _leaf(fw * mask)
    h, w = _leaf(hidden), _leaf(weight)
    out = fused_linear_distill_loss(h, w, teacher, kind="jsd", mask=fw, reduction=reduction, chunk_size=2)
    grads = torch.autograd.grad(weigh(out), (h, w, fw))
    h64, w64, fw64 = (_leaf(x.double()) for x in (hidden, weight, fw))
    want = distill_loss(h64 @ w64.T, teacher.double(), "jsd", mask=fw64, reduction=reduction)
    want_grads = torch.autograd.grad(weigh(want), (h64, w64, fw64))
    for a, b in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-5, atol=2e-6)
