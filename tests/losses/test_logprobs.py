"""Log-probs from logits and from hidden states, against plain float64 PyTorch."""

import pytest
import torch

from alignlab.losses.logprobs import linear_logprobs, sequence_logprobs, token_logprobs


def _oracle_token_logprobs(logits, labels, ignore_index=-100):
    """Independent: log_softmax in float64, gather, zero where ignored."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    valid = labels != ignore_index
    picked = lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def _oracle_linear(hidden, weight, labels, bias=None, softcap=None, ignore_index=-100):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return _oracle_token_logprobs(z, labels, ignore_index)


# ----------------------------------------------------------------------------- from logits
def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[1, :3] = -100
    out = token_logprobs(logits, labels)
    ref = _oracle_token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    assert torch.all(out[1, :3] == 0)


def test_token_logprobs_bf16_upcasts():
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(2, 5, 300, generator=g)).bfloat16()
    labels = torch.randint(0, 300, (2, 5), generator=g)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _oracle_token_logprobs(logits.float(), labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_sum_and_mean(average):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[0, :2] = -100
    labels[3, :] = -100  # a sequence with nothing to score
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, -1] = False
    out = sequence_logprobs(logits, labels, mask=mask, average=average)
    keep = (labels != -100) & mask
    tok = _oracle_token_logprobs(logits, labels) * keep
    ref = tok.sum(1)
    if average:
        ref = ref / keep.sum(1).clamp_min(1)
    torch.testing.assert_close(out, ref)
    assert out[3] == 0


def test_sequence_logprobs_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 4], [0, 2, 2]])
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, labels, average=True), (logits,))


def test_logits_bad_input():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        token_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="labels must be in"):
        token_logprobs(logits, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(3, 2))


# ----------------------------------------------------------------------------- from hidden states
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_linear_logprobs_matches_float64(torch_mode, with_bias, softcap, chunk_size):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    weight = (torch.randn(37, 16, generator=g) / 4).requires_grad_()  # vocab 37: no chunk divides it
    bias = torch.randn(37, generator=g).requires_grad_() if with_bias else None
    labels = torch.randint(0, 37, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    up = torch.randn(3, 5, generator=g)  # arbitrary upstream gradient

    out = linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk_size, logit_softcap=softcap)
    (out * up).sum().backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    ref = _oracle_linear(h64, w64, labels, b64, softcap)
    (ref * up.double()).sum().backward()

    assert out.dtype == torch.float32 and out.shape == labels.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    assert torch.all(out[labels == -100] == 0)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=2e-6, rtol=2e-5)
    assert torch.all(hidden.grad[labels == -100] == 0)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), b64.grad, atol=2e-6, rtol=2e-5)


def test_linear_logprobs_gradcheck_float64(torch_mode):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 6], [0, 2, 2]])
    fn = lambda h, w, b: linear_logprobs(h, w, labels, b, chunk_size=2, logit_softcap=2.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_linear_logprobs_packed_equals_padded(torch_mode):
    """Two sequences padded into (2, 6) vs packed into one row: same per-token log-probs and grads."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(29, 8, generator=g, dtype=torch.float64)
    a, b = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    ya, yb = torch.randint(0, 29, (4,), generator=g), torch.randint(0, 29, (6,), generator=g)

    padded_h = torch.zeros(2, 6, 8, dtype=torch.float64)
    padded_h[0, :4], padded_h[1] = a, b
    padded_y = torch.full((2, 6), -100)
    padded_y[0, :4], padded_y[1] = ya, yb
    packed_h, packed_y = torch.cat([a, b])[None], torch.cat([ya, yb])[None]

    res = []
    for h, y in ((padded_h, padded_y), (packed_h, packed_y)):
        w_ = w.clone().requires_grad_()
        lp = linear_logprobs(h, w_, y, chunk_size=3)
        lp.sum().backward()
        res.append((lp[y != -100], w_.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])


def test_linear_logprobs_one_and_zero_tokens(torch_mode):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 3, generator=g, requires_grad=True)
    h1 = torch.randn(1, 3, generator=g, requires_grad=True)
    out = linear_logprobs(h1, w, torch.tensor([2]))
    torch.testing.assert_close(out.double(), _oracle_linear(h1.double(), w.double(), torch.tensor([2])))
    # nothing scored: zeros out, zero grads, no error
    h = torch.randn(2, 3, generator=g, requires_grad=True)
    out = linear_logprobs(h, w, torch.tensor([-100, -100]))
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    # empty batch
    h0 = torch.randn(0, 4, 3, requires_grad=True)
    out = linear_logprobs(h0, w, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 4)
    out.sum().backward()
    assert h0.grad.shape == h0.shape


def test_linear_logprobs_frozen_weight(torch_mode):
    """A frozen lm_head (LoRA) gets no gradient and the hidden gradient is unchanged."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(4, 6, generator=g, requires_grad=True)
    w = torch.randn(11, 6, generator=g)
    y = torch.randint(0, 11, (4,), generator=g)
    linear_logprobs(h, w, y).sum().backward()
    h64 = h.detach().double().requires_grad_()
    _oracle_linear(h64, w.double(), y).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)
    assert w.grad is None


def test_linear_logprobs_bad_input():
    h, w = torch.randn(2, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(torch.randn(2, 5), w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        linear_logprobs(h.double(), w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        linear_logprobs(h, w, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_logprobs(h, w, torch.zeros(2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(h, w, torch.zeros(2, dtype=torch.long), bias=torch.zeros(8))


def test_sequence_logprobs_average_must_be_a_bool():
    logits, labels = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="average"):
        sequence_logprobs(logits, labels, average="no")


@pytest.mark.parametrize("bad", [0.5, float("nan"), 2.0, -1.0])
def test_sequence_logprobs_mask_holds_bools_or_exactly_0_1(bad):
    """A float mask was multiplied in unchecked: 0.5 halved a token silently (while ``average`` still divided by
    the mask's sum), NaN gave a NaN sequence. The mask is a mask, as in the RL losses: ValueError naming it."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, bad, 1.0]])
    for average in (False, True):
        with pytest.raises(ValueError, match="mask must hold bools or exactly 0/1"):
            sequence_logprobs(logits, labels, mask=mask, average=average)
    with pytest.raises(TypeError, match="mask must be a tensor"):  # the wrong kind of thing: TypeError
        sequence_logprobs(logits, labels, mask=[[1, 1, 0], [1, 1, 1]])
    want = sequence_logprobs(logits, labels, mask=torch.tensor([[True, True, False], [True, True, True]]))
    for ok in (torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])):
        torch.testing.assert_close(sequence_logprobs(logits, labels, mask=ok), want, rtol=0, atol=0)


def test_numpy_bool_flags_are_taken_and_strings_still_refused():
    """np.bool_ flags (a sweep's value) raised TypeError in every loss; they now act as the Python bool."""
    import numpy as np

    from alignlab.losses import dpo_loss, fused_linear_grpo, rloo_advantages, sequence_divergence, whiten

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64)
    r = torch.randn(4, generator=g, dtype=torch.float64)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64)
    calls = [
        lambda f: sequence_logprobs(logits, labels, average=f),
        lambda f: whiten(x, shift_mean=f),
        lambda f: rloo_advantages(r, 2, normalize=f),
        lambda f: sequence_divergence(x, normalize=f),
        lambda f: dpo_loss(r, r, None, None, reference_free=f)[0] if f else dpo_loss(r, r, r, r, reference_free=f)[0],
        lambda f: fused_linear_grpo(hidden, weight, labels, r[:2], compute_entropy=f)[1].get("entropy", x.sum()),
    ]
    for call in calls:
        for flag in (True, False):
            torch.testing.assert_close(call(np.bool_(flag)), call(flag), rtol=0, atol=0)
        with pytest.raises(TypeError, match="must be a bool"):
            call("no")


@pytest.mark.parametrize("chunk_size", [4096, None])
@pytest.mark.parametrize("entry", ["ce_mean", "logprobs_mean", "grpo_dapo"])
def test_fp16_weight_gradient_summed_over_many_tokens_stays_finite(torch_mode, entry, chunk_size):
    """float16 dL/dZ rows are written at O(1) scale (the mean's 1/N, or the power-of-two unit, is kept out so that
    g p_v does not flush), so dW = sum_t dZ_t h_t^T grows with the number of tokens: 120k tokens of one label
    summed to -1.1e5 in the float16 buffer (-inf), where the gradient of the mean is -0.9. Summed in float32, over
    the chunks and within each (chunk_size=None: all 120k rows in one chunk, whose product was once written in
    float16), it is the float64 gradient rounded to float16."""
    from alignlab.losses.cross_entropy import linear_cross_entropy
    from alignlab.losses.fused_rl import fused_linear_grpo

    n = 120_000
    hidden = torch.ones(n, 4, dtype=torch.float64)
    weight = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    labels = torch.zeros(n, dtype=torch.long)

    def grad_w(dtype):
        h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        if entry == "ce_mean":
            loss = linear_cross_entropy(h, w, labels, chunk_size=chunk_size).loss
        elif entry == "logprobs_mean":
            loss = linear_logprobs(h, w, labels, chunk_size=chunk_size).mean()
        else:
            loss, _ = fused_linear_grpo(h.view(2, n // 2, 4), w, labels.view(2, n // 2), torch.ones(2),
                                        loss_type="dapo", chunk_size=chunk_size)
        (g,) = torch.autograd.grad(loss, [w])
        return g

    want, got = grad_w(torch.float64), grad_w(torch.float16)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), want.half().double(), rtol=2e-3, atol=1e-4)


@pytest.mark.cuda
def test_fp16_chunk_product_is_written_in_float32_on_cuda():
    """The float16 weight-gradient product of one chunk on the GPU: the GEMM's float32 output (mm's out_dtype
    overload), finite where the float16 output overflows, equal to the float64 product within float32 rounding."""
    from alignlab.losses.logprobs import _fp32_product

    dz = torch.full((100_000, 8), 1.0, dtype=torch.float16, device="cuda")
    h = torch.full((100_000, 4), 0.75, dtype=torch.float16, device="cuda")
    got = _fp32_product(dz.t(), h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), torch.full((8, 4), 75_000.0, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    assert not (dz.t() @ h).isfinite().any()  # what the float16 product gave


def test_empty_vocabulary_and_hidden_size_are_refused_by_name():
    """A vocabulary of 0 (logits (..., 0)) and a hidden size of 0 are named errors (before: every label out of
    range, ignored ones too; torch's reshape error)."""
    with pytest.raises(ValueError, match="vocabulary of at least one"):
        token_logprobs(torch.randn(2, 3, 0), torch.full((2, 3), -100))
    assert token_logprobs(torch.randn(0, 0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match="hidden >= 1"):
        linear_logprobs(torch.randn(2, 3, 0), torch.randn(5, 0), torch.zeros(2, 3, dtype=torch.long))
