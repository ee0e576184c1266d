"""linear_cross_entropy against plain PyTorch in float64: values AND gradients."""

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses.cross_entropy import CrossEntropyOutput, count_tokens, linear_cross_entropy
from alignlab.losses.logprobs import linear_logprobs

V, H = 37, 12  # vocab 37: no chunk size divides it


def _plain(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           z_loss=0.0, logit_softcap=None, token_weights=None):
    """The plain PyTorch expression the fused loss must equal (written out, float64 by the caller)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    zf, yf = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    valid = yf != ignore_index
    per = F.cross_entropy(zf, yf, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    per = per + z_loss * torch.logsumexp(zf, -1).square() * valid
    if token_weights is not None:
        per = per * token_weights.reshape(-1)
    if reduction == "none":
        return per.view(labels.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / valid.sum()


def _data(seed, shape=(3, 5), dtype=torch.float32, bias=False, weights=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / 3
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels.view(-1)[::4] = -100
    tw = torch.rand(*shape, generator=g, dtype=dtype) + 0.5 if weights else None
    return hidden, weight, b, labels, tw, g


def _leaves(*ts, dtype=None):
    return [None if t is None else (t.to(dtype) if dtype else t).detach().clone().requires_grad_() for t in ts]


CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(logit_softcap=2.0),
    dict(reduction="none", label_smoothing=0.2, z_loss=1e-2, logit_softcap=3.0),
    dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_plain_pytorch_values_and_grads(torch_mode, opts, weights, bias):
    hidden, weight, b, labels, tw, g = _data(1, bias=bias, weights=weights)
    up = torch.randn(labels.shape, generator=g) if opts.get("reduction") == "none" else torch.tensor(1.7)
    leaves = _leaves(hidden, weight, b, tw)
    out = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], token_weights=leaves[3],
                               chunk_size=4, **opts)
    assert isinstance(out, CrossEntropyOutput)
    assert out.n_tokens.item() == int((labels != -100).sum())
    (out.loss * up).sum().backward()

    ref_leaves = _leaves(hidden, weight, b, tw, dtype=torch.float64)
    ref = _plain(ref_leaves[0], ref_leaves[1], labels, bias=ref_leaves[2], token_weights=ref_leaves[3], **opts)
    (ref * up.double()).sum().backward()

    assert out.loss.dtype == torch.float32 and out.loss.shape == ref.shape
    torch.testing.assert_close(out.loss.double(), ref.detach(), atol=2e-6, rtol=2e-6)
    for got, want in zip(leaves, ref_leaves):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(torch_mode, reduction):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    tw = (torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    labels = torch.tensor([[1, -100, 6], [0, 2, 2]])

    def fn(h, w, b, t):
        return linear_cross_entropy(h, w, labels, bias=b, token_weights=t, reduction=reduction,
                                    label_smoothing=0.1, z_loss=0.05, logit_softcap=2.0, chunk_size=2).loss

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias, tw))


def test_packed_equals_padded(torch_mode):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    a, b = torch.randn(3, H, generator=g, dtype=torch.float64), torch.randn(7, H, generator=g, dtype=torch.float64)
    ya, yb = torch.randint(0, V, (3,), generator=g), torch.randint(0, V, (7,), generator=g)
    padded_h = torch.randn(2, 7, H, generator=g, dtype=torch.float64)  # junk under the padding
    padded_h[0, :3], padded_h[1] = a, b
    padded_y = torch.full((2, 7), -100)
    padded_y[0, :3], padded_y[1] = ya, yb
    packed_h, packed_y = torch.cat([a, b])[None], torch.cat([ya, yb])[None]
    res = []
    for h, y in ((padded_h, padded_y), (packed_h, packed_y)):
        w_ = w.clone().requires_grad_()
        out = linear_cross_entropy(h, w_, y, chunk_size=3, label_smoothing=0.1)
        out.loss.backward()
        res.append((out.loss, out.n_tokens, w_.grad))
    for x, y in zip(*res):
        torch.testing.assert_close(x, y)


def test_one_and_zero_tokens(torch_mode):
    hidden, weight, _, _, _, g = _data(4, shape=(1,))
    h, w = _leaves(hidden, weight)
    out = linear_cross_entropy(h, w, torch.tensor([5]))
    out.loss.backward()
    h64, w64 = _leaves(hidden, weight, dtype=torch.float64)
    ref = F.cross_entropy(h64 @ w64.T, torch.tensor([5]))
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach())
    torch.testing.assert_close(h.grad.double(), h64.grad)
    # every label ignored: loss 0 (PyTorch: NaN), zero grads, n_tokens 0
    h, w = _leaves(torch.randn(2, 3, H, generator=g), weight)
    for red in ("mean", "sum", "none"):
        out = linear_cross_entropy(h, w, torch.full((2, 3), -100), reduction=red)
        out.loss.sum().backward()
        assert out.n_tokens.item() == 0 and torch.all(out.loss == 0)
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0)
    # empty batch
    out = linear_cross_entropy(torch.randn(0, H), weight, torch.zeros(0, dtype=torch.long), reduction="none")
    assert out.loss.shape == (0,)


def test_no_grad_and_frozen_weight(torch_mode):
    hidden, weight, _, labels, _, _ = _data(5)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels).loss
    ref = _plain(hidden.double(), weight.double(), labels)
    torch.testing.assert_close(loss.double(), ref, atol=2e-6, rtol=2e-6)
    h, w = _leaves(hidden, weight)
    w.requires_grad_(False)
    linear_cross_entropy(h, w, labels).loss.backward()
    h64 = _leaves(hidden, dtype=torch.float64)[0]
    _plain(h64, weight.double(), labels).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    assert w.grad is None


def test_gradient_accumulation_equals_big_batch(torch_mode):
    """k micro-batches with reduction='sum' / count_tokens(step) == one big batch with 'mean'."""
    hidden, weight, _, labels, _, g = _data(6, shape=(6, 5))
    labels[0, :4] = -100  # unequal token counts per micro-batch: where the naive way goes wrong
    labels[5, :] = -100
    w_big = _leaves(weight)[0]
    linear_cross_entropy(hidden, w_big, labels).loss.backward()

    micro = [(hidden[i : i + 2], labels[i : i + 2]) for i in range(0, 6, 2)]
    n_step = count_tokens([y for _, y in micro])
    assert n_step.item() == int((labels != -100).sum())
    w_acc, w_naive = _leaves(weight, weight)
    for h, y in micro:
        (linear_cross_entropy(h, w_acc, y, reduction="sum").loss / n_step).backward()
        (linear_cross_entropy(h, w_naive, y).loss / len(micro)).backward()
    torch.testing.assert_close(w_acc.grad, w_big.grad, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(w_naive.grad, w_big.grad, atol=1e-4, rtol=1e-3)


def test_count_tokens_bad_input():
    with pytest.raises(ValueError):
        count_tokens([])
    with pytest.raises(TypeError):
        count_tokens([torch.zeros(3)])
    assert count_tokens(torch.tensor([1, -100, 2])).item() == 2


def test_bad_input():
    hidden, weight, _, labels, _, _ = _data(7)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(hidden, weight, labels, z_loss=-1.0)
    with pytest.raises(ValueError, match="logit_softcap"):
        linear_cross_entropy(hidden, weight, labels, logit_softcap=0.0)
    with pytest.raises(ValueError, match="token_weights"):
        linear_cross_entropy(hidden, weight, labels, token_weights=torch.ones(3))
    with pytest.raises(TypeError, match="token_weights"):
        linear_cross_entropy(hidden, weight, labels, token_weights=torch.ones(labels.shape, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, torch.full(labels.shape, V))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="none", label_smoothing=0.1, z_loss=1e-2, logit_softcap=3.0)])
def test_triton_path_matches(triton_mode, kernel_device, dtype, opts):
    """Engine with the Triton row kernel (interpreter on CPU): same numbers as the float64 expression."""
    hidden, weight, b, labels, tw, g = _data(8, bias=True, weights=True)
    up = torch.randn(labels.shape, generator=g) if opts.get("reduction") == "none" else torch.tensor(1.0)
    leaves = [t.to(dtype).to(kernel_device).detach().requires_grad_() for t in (hidden, weight, b)]
    out = linear_cross_entropy(*leaves[:2], labels.to(kernel_device), bias=leaves[2],
                               token_weights=tw.to(kernel_device), chunk_size=4, **opts)
    (out.loss * up.to(kernel_device)).sum().backward()
    ref_leaves = [t.to(dtype).double().requires_grad_() for t in (hidden, weight, b)]
    ref = _plain(*ref_leaves[:2], labels, bias=ref_leaves[2], token_weights=tw.double(), **opts)
    (ref * up.double()).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.loss.cpu().double(), ref.detach(), **tol)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction,softcap", [("mean", None), ("none", None), ("mean", 30.0)])
def test_bf16_cuda_matches_fp32(reduction, softcap):
    """bf16 on the GPU against the fp32 expression, with a logit soft cap too (Gemma's 30)."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 700, 512, generator=g).bfloat16().cuda().requires_grad_()
    weight = (torch.randn(10007, 512, generator=g) / 22).bfloat16().cuda().requires_grad_()
    labels = torch.randint(0, 10007, (2, 700), generator=g)
    labels[:, :100] = -100
    labels = labels.cuda()
    out = linear_cross_entropy(hidden, weight, labels, reduction=reduction, label_smoothing=0.05, z_loss=1e-4,
                               logit_softcap=softcap)
    out.loss.sum().backward()
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    ref = _plain(h32, w32, labels, reduction=reduction, label_smoothing=0.05, z_loss=1e-4, logit_softcap=softcap)
    ref.sum().backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out.loss, ref.detach()) < 5e-3
    assert rel(hidden.grad, h32.grad) < 2e-2
    assert rel(weight.grad, w32.grad) < 2e-2


def test_backward_twice_through_retained_graph(torch_mode):
    """The forward-computed grads are handed over once; a second backward recomputes them."""
    hidden, weight, _, labels, _, _ = _data(10)
    h, w = _leaves(hidden, weight)
    loss = linear_cross_entropy(h, w, labels, label_smoothing=0.1).loss
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(w.grad, 3 * first, atol=1e-6, rtol=1e-5)


def test_backward_twice_fp16_triton(triton_mode, kernel_device):
    """The recompute path (second backward) keeps 1/N out of the fp16 logits like the forward does."""
    hidden, weight, _, labels, _, _ = _data(11)
    h = hidden.half().to(kernel_device).requires_grad_()
    w = weight.half().to(kernel_device).requires_grad_()
    loss = linear_cross_entropy(h, w, labels.to(kernel_device), chunk_size=4).loss
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    loss.backward()
    torch.testing.assert_close(w.grad, first, atol=1e-3, rtol=1e-3)
    h64, w64 = _leaves(hidden.half(), weight.half(), dtype=torch.float64)
    _plain(h64, w64, labels).backward()
    torch.testing.assert_close(first.cpu().double(), w64.grad, atol=2e-3, rtol=2e-2)


def test_matches_llama_loss_and_grads(torch_mode, tiny_llama):
    """On a tiny random Llama: same loss and lm_head/hidden gradients as LlamaForCausalLM(labels=...)."""
    model = tiny_llama
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    ref_loss = model(input_ids=ids, labels=labels).loss.detach()
    model.zero_grad()
    hidden = model.model(input_ids=ids).last_hidden_state
    out = linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert out.n_tokens.item() == int((labels[:, 1:] != -100).sum())


def test_nan_and_infinite_options_are_refused():
    """z_loss=NaN passed `z_loss < 0` and gave a NaN loss; logit_softcap=inf gave inf * tanh(0) = NaN logits;
    a string label_smoothing failed in float() with a message that named nothing."""
    hidden, weight, _, labels, _, _ = _data(8)
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(hidden, weight, labels, z_loss=float("nan"))
    with pytest.raises(ValueError, match="logit_softcap"):
        linear_cross_entropy(hidden, weight, labels, logit_softcap=float("inf"))
    with pytest.raises(ValueError, match="logit_softcap"):
        linear_logprobs(hidden, weight, labels, logit_softcap=float("inf"))
    with pytest.raises(TypeError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, labels, label_smoothing="0.1")
