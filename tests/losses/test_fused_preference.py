"""Fused (hidden states + lm_head) preference losses give the unfused numbers: loss and gradients.

The unfused oracle is written out here: full logits ``h W^T + b``, ``log_softmax``, gather, masked sum, then
the log-prob loss.
"""

from __future__ import annotations

import pytest
import torch

from alignlab.losses.fused_preference import (
    completion_logps,
    fused_linear_cpo,
    fused_linear_dpo,
    fused_linear_kto,
    fused_linear_orpo,
    fused_linear_simpo,
)
from alignlab.losses.preference import cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss

B, T, H, V = 3, 7, 16, 37  # odd sizes: chunks of 4 rows leave a partial last chunk

# the lazy schedule (linear_logprobs + autograd) and the eager one with all, some or no chunks kept alive
SCHEDULES = {
    "lazy": {},
    "eager-all-resident": dict(eager=True, resident_bytes=2**30),
    "eager-some-resident": dict(eager=True, resident_bytes=3 * 4 * V * 8),
    "eager-recompute": dict(eager=True, resident_bytes=0),
}


def _batch(seed: int, dtype=torch.float64, n_seq: int = 2 * B, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_seq, T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, V, (n_seq, T), generator=g)
    # prompt prefix of varying length and right padding: both ignored
    for i in range(n_seq):
        labels[i, : 1 + i % 3] = -100
        labels[i, T - (i % 2) :] = -100
    return hidden, weight, b, labels


def _unfused_token_logps(hidden, weight, bias, labels):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != -100
    tok = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1) * valid
    return tok, valid.sum(1).double()


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None], retain_graph=True)


def _close(a, b, tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "loss_type,nll_alpha,schedule",
    [("sigmoid", 0.7, sch) for sch in SCHEDULES]
    + [(lt, 0.0, "lazy") for lt in ("sigmoid", "ipo", "apo_zero", "robust")]
    + [("ipo", 0.0, "eager-some-resident"), ("robust", 0.7, "eager-recompute")],
)
def test_fused_dpo_matches_unfused(loss_type, nll_alpha, schedule):
    hidden, weight, bias, labels = _batch(0)
    g = torch.Generator().manual_seed(1)
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 20
    ls = 0.1 if loss_type == "robust" else 0.0
    got, gm = fused_linear_dpo(
        hidden, weight, labels, ref[:B], ref[B:], bias=bias, beta=0.2, loss_type=loss_type,
        label_smoothing=ls, nll_alpha=nll_alpha, chunk_size=4, **SCHEDULES[schedule],
    )
    tok, counts = _unfused_token_logps(hidden, weight, bias, labels)
    seq = tok.sum(1)
    want, wm = dpo_loss(
        seq[:B], seq[B:], ref[:B], ref[B:], beta=0.2, loss_type=loss_type, label_smoothing=ls,
        chosen_lengths=counts[:B], rejected_lengths=counts[B:],
    )
    if nll_alpha:
        want = want + nll_alpha * (-tok[:B].sum() / counts[:B].sum())
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)
    assert gm["rewards/margins"].item() == pytest.approx(wm["rewards/margins"].item())


@pytest.mark.parametrize("loss_type,length_alpha", [("ipo", 0.0), ("sigmoid_norm", 0.0), ("sigmoid", 0.05)])
@pytest.mark.parametrize("schedule", ["lazy", "eager-recompute"])
def test_fused_losses_with_an_empty_completion_match_unfused(loss_type, length_alpha, schedule):
    """A pair whose rejected (or chosen) completion has no scored token: fused_linear_dpo / fused_linear_simpo give
    dpo_loss / simpo_loss's numbers with the true scored-token counts (0 for the empty side: its average is 0, and
    R-DPO's margin counts 0 tokens), on both schedules; the unfused losses used to raise there."""
    hidden, weight, bias, labels = _batch(4)
    labels[B] = -100  # pair 0's rejected completion
    labels[1] = -100  # pair 1's chosen completion
    g = torch.Generator().manual_seed(5)
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 20
    ref[B] = ref[1] = 0.0  # an empty completion's reference log-prob
    tok, counts = _unfused_token_logps(hidden, weight, bias, labels)
    assert counts[B] == 0 and counts[1] == 0
    seq = tok.sum(1)
    reduction = "none" if schedule == "lazy" else "sum"  # per pair where the schedule allows it
    got, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias, beta=0.2, loss_type=loss_type,
                              length_alpha=length_alpha, chunk_size=4, reduction=reduction, **SCHEDULES[schedule])
    want, _ = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.2, loss_type=loss_type, length_alpha=length_alpha,
                       chosen_lengths=counts[:B], rejected_lengths=counts[B:], reduction=reduction)
    torch.testing.assert_close(got, want)
    _close(_grads(got.sum(), hidden, weight, bias), _grads(want.sum(), hidden, weight, bias), 1e-10)
    got, _ = fused_linear_simpo(hidden, weight, labels, bias=bias, beta=2.0, gamma=0.4, chunk_size=4,
                                **SCHEDULES[schedule])
    want, _ = simpo_loss(seq[:B], seq[B:], beta=2.0, gamma=0.4, chosen_lengths=counts[:B],
                         rejected_lengths=counts[B:])
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_fused_dpo_reference_from_hidden_equals_precomputed(schedule):
    hidden, weight, bias, labels = _batch(2)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(hidden.shape, dtype=hidden.dtype, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        ref_tok, _ = _unfused_token_logps(ref_hidden, weight, bias, labels)
    ref_seq = ref_tok.sum(1)
    a, _ = fused_linear_dpo(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, chunk_size=5, **SCHEDULES[schedule])
    b, _ = fused_linear_dpo(hidden, weight, labels, ref_seq[:B], ref_seq[B:], bias=bias, chunk_size=5)
    torch.testing.assert_close(a, b)
    _close(_grads(a, hidden, weight, bias), _grads(b, hidden, weight, bias), 1e-12)
    # a separate reference head
    ref_w = weight.detach() * 1.1
    c, _ = fused_linear_dpo(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_w, **SCHEDULES[schedule])
    with torch.no_grad():
        ref_tok2, _ = _unfused_token_logps(ref_hidden, ref_w, None, labels)
    d, _ = dpo_loss(*(_unfused_token_logps(hidden, weight, bias, labels)[0].sum(1).split(B)), *ref_tok2.sum(1).split(B))
    torch.testing.assert_close(c, d)


def test_fused_dpo_still_checks_lengths_the_caller_passes():
    hidden, weight, _, labels = _batch(2, bias=False)
    ref = torch.zeros(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="^chosen_lengths must be finite and >= 0 everywhere"):
        fused_linear_dpo(hidden, weight, labels, ref, ref, loss_type="ipo",
                         chosen_lengths=-torch.ones(B), rejected_lengths=torch.ones(B))


def test_fused_dpo_reference_free_and_average():
    hidden, weight, _, labels = _batch(4, bias=False)
    got, _ = fused_linear_dpo(hidden, weight, labels, reference_free=True, average_log_prob=True, beta=1.0)
    tok, counts = _unfused_token_logps(hidden, weight, None, labels)
    avg = tok.sum(1) / counts
    want = -torch.nn.functional.logsigmoid(avg[:B] - avg[B:]).mean()
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight), _grads(want, hidden, weight), 1e-10)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", ("sigmoid", "ipo")])
def test_fused_dpo_average_log_prob_refused_where_the_loss_averages_itself(loss_type):
    """ipo and sigmoid_norm divide by the scored-token counts the fused DPO passes them; averaged log-probs
    on top were divided twice (IPO on log-ratio / length^2, silently). Without average_log_prob the loss
    is the per-token averaged one, written out here (IPO's TRL form)."""
    hidden, weight, _, labels = _batch(5, bias=False)
    ref_hidden = hidden.detach() * 0.9
    with pytest.raises(ValueError, match="average_log_prob"):
        fused_linear_dpo(hidden, weight, labels, ref_hidden=ref_hidden, loss_type=loss_type, average_log_prob=True)
    if loss_type != "ipo":
        return
    got, _ = fused_linear_dpo(hidden, weight, labels, ref_hidden=ref_hidden, loss_type="ipo", beta=0.5)
    tok, counts = _unfused_token_logps(hidden, weight, None, labels)
    ref_tok, _ = _unfused_token_logps(ref_hidden, weight.detach(), None, labels)  # the reference has no gradient
    h = (tok.sum(1) - ref_tok.sum(1)) / counts
    want = ((h[:B] - h[B:] - 1.0 / (2 * 0.5)) ** 2).mean()
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight), _grads(want, hidden, weight), 1e-10)


@pytest.mark.parametrize("schedule", ["lazy", "eager-some-resident"])
def test_fused_orpo_simpo_cpo_match_unfused(schedule):
    sched = SCHEDULES[schedule]
    hidden, weight, bias, labels = _batch(5)
    tok, counts = _unfused_token_logps(hidden, weight, bias, labels)
    seq, avg = tok.sum(1), tok.sum(1) / counts
    nll = -tok[:B].sum() / counts[:B].sum()

    got, _ = fused_linear_orpo(hidden, weight, labels, bias=bias, beta=0.3, chunk_size=4, **sched)
    want, _ = orpo_loss(avg[:B], avg[B:], nll, beta=0.3)
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)

    got, _ = fused_linear_simpo(hidden, weight, labels, bias=bias, beta=2.0, gamma=0.4, chunk_size=4, **sched)
    want, _ = simpo_loss(avg[:B], avg[B:], beta=2.0, gamma=0.4)
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)

    got, _ = fused_linear_cpo(hidden, weight, labels, bias=bias, beta=0.2, cpo_alpha=0.5, chunk_size=4, **sched)
    want, _ = cpo_loss(seq[:B], seq[B:], nll, beta=0.2, cpo_alpha=0.5)
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)

    # AlphaPO's reward shape: on length-normalized log-probs by default
    got, _ = fused_linear_cpo(hidden, weight, labels, bias=bias, beta=0.2, cpo_alpha=0.5, alpha=0.3, chunk_size=4,
                              **sched)
    want, _ = cpo_loss(avg[:B], avg[B:], nll, beta=0.2, cpo_alpha=0.5, alpha=0.3)
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)


@pytest.mark.parametrize("schedule", ["lazy", "eager-recompute"])
def test_fused_kto_matches_unfused(schedule):
    hidden, weight, bias, labels = _batch(6, n_seq=5)
    desirable = torch.tensor([True, False, True, True, False])
    ref_hidden = hidden.detach() * 0.9
    got, _ = fused_linear_kto(hidden, weight, labels, desirable, bias=bias, ref_hidden=ref_hidden, kl=0.3, beta=0.5, **SCHEDULES[schedule])
    tok, _ = _unfused_token_logps(hidden, weight, bias, labels)
    with torch.no_grad():
        ref_tok, _ = _unfused_token_logps(ref_hidden, weight, bias, labels)
    want, _ = kto_loss(tok.sum(1), ref_tok.sum(1), desirable, kl=0.3, beta=0.5)
    torch.testing.assert_close(got, want)
    _close(_grads(got, hidden, weight, bias), _grads(want, hidden, weight, bias), 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_fused_dpo_low_precision_close_to_float64(dtype, tol):
    hidden, weight, bias, labels = _batch(7, dtype=dtype)
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 20
    got, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias, chunk_size=4)
    assert got.dtype == torch.float64 or got.dtype == torch.float32
    h64, w64, b64 = (x.detach().double().requires_grad_(True) for x in (hidden, weight, bias))
    tok, _ = _unfused_token_logps(h64, w64, b64, labels)
    want, _ = dpo_loss(*tok.sum(1).split(B), ref[:B], ref[B:])
    assert got.item() == pytest.approx(want.item(), rel=tol, abs=tol)
    _close(_grads(got, hidden, weight, bias), _grads(want, h64, w64, b64), tol)


@pytest.mark.parametrize("eager", [False, True])
def test_fused_dpo_triton_interpreter_matches_torch(triton_mode, eager):
    hidden, weight, bias, labels = _batch(9, dtype=torch.float32)
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(10)) * 20
    got, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias, chunk_size=8, nll_alpha=1.0, eager=eager, resident_bytes=8 * V * 4)
    g_got = _grads(got, hidden, weight, bias)
    tok, counts = _unfused_token_logps(hidden, weight, bias, labels)
    want, _ = dpo_loss(*tok.sum(1).split(B), ref[:B].double(), ref[B:].double(), chosen_lengths=counts[:B], rejected_lengths=counts[B:])
    want = want + (-tok[:B].sum() / counts[:B].sum())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    _close(g_got, _grads(want, hidden, weight, bias), 1e-5)


def test_completion_logps_and_fully_ignored_sequence():
    hidden, weight, bias, labels = _batch(11)
    labels[0] = -100  # a chosen sequence without any scored token
    tok, seq, counts = completion_logps(hidden, weight, labels, bias)
    want_tok, want_counts = _unfused_token_logps(hidden, weight, bias, labels)
    torch.testing.assert_close(tok, want_tok)
    torch.testing.assert_close(counts, want_counts)
    assert seq[0].item() == 0.0
    loss, _ = fused_linear_dpo(hidden, weight, labels, *(-torch.ones(2 * B, dtype=torch.float64)).split(B), bias=bias, loss_type="ipo")
    assert torch.isfinite(loss)


def test_fused_errors():
    hidden, weight, bias, labels = _batch(12, n_seq=5)
    ref = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="even batch"):
        fused_linear_dpo(hidden, weight, labels, ref, ref)
    hidden, weight, bias, labels = _batch(12)
    ref = torch.zeros(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_dpo(hidden, weight, labels, ref, ref, ref_hidden=hidden.detach())
    with pytest.raises(ValueError, match=r"\(batch, seq, hidden\)"):
        fused_linear_dpo(hidden[0], weight, labels[0], ref, ref)
    with pytest.raises(ValueError, match="valid loss types"):
        fused_linear_dpo(hidden, weight, labels, ref, ref, loss_type="nope")
    # None failed in frozenset.intersection (unnamed TypeError), a nested list as unhashable
    for bad in (None, 3, ["sigmoid", ["ipo"]]):
        with pytest.raises(ValueError, match=r"loss_type.*'sigmoid', 'robust'"):
            fused_linear_dpo(hidden, weight, labels, ref, ref, loss_type=bad)
    with pytest.raises(ValueError, match="ref_logps or ref_hidden"):
        fused_linear_kto(hidden, weight, labels, torch.ones(2 * B, dtype=torch.bool), kl=0.0)


def test_eager_backward_scales_by_upstream_gradient_and_respects_frozen_inputs():
    hidden, weight, bias, labels = _batch(13)
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 20
    lazy, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias)
    g_lazy = _grads(3.5 * lazy, hidden, weight, bias)
    eager, m = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias, eager=True, chunk_size=5)
    assert "rewards/chosen" in m
    torch.testing.assert_close(eager, lazy)
    _close(_grads(3.5 * eager, hidden, weight, bias), g_lazy, 1e-10)
    # a frozen lm_head (LoRA set-up): only the hidden gradient is produced
    w_frozen = weight.detach()
    loss, _ = fused_linear_dpo(hidden, w_frozen, labels, ref[:B], ref[B:], eager=True)
    (gh,) = torch.autograd.grad(loss, hidden)
    lazy2, _ = fused_linear_dpo(hidden, w_frozen, labels, ref[:B], ref[B:])
    torch.testing.assert_close(gh, torch.autograd.grad(lazy2, hidden)[0])
    # no grad needed: forward only, same value
    with torch.no_grad():
        v, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias, eager=True)
    torch.testing.assert_close(v, lazy.detach())
    with pytest.raises(ValueError, match="resident_bytes"):
        fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], eager=True, resident_bytes=-1)
    with pytest.raises(ValueError, match="scalar loss"):
        fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], eager=True, reduction="none")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_frozen_hidden_gets_only_head_gradients(schedule):
    """Hidden states that need no gradient (a frozen trunk): the chunk step skips dL/dH, the head's are exact."""
    hidden, weight, bias, labels = _batch(15)
    hidden = hidden.detach()
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(16), dtype=torch.float64) * 20
    got, _ = fused_linear_dpo(hidden, weight, labels, ref[:B], ref[B:], bias=bias, nll_alpha=0.5, chunk_size=4,
                              **SCHEDULES[schedule])
    tok, counts = _unfused_token_logps(hidden, weight, bias, labels)
    want, _ = dpo_loss(tok.sum(1)[:B], tok.sum(1)[B:], ref[:B], ref[B:], chosen_lengths=counts[:B],
                       rejected_lengths=counts[B:])
    want = want + 0.5 * -tok[:B].sum() / counts[:B].sum()
    torch.testing.assert_close(got, want)
    _close(_grads(got, weight, bias), _grads(want, weight, bias), 1e-10)


LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_fused_dpo_matches_liger(loss_type):
    """Liger-Kernel's LigerFusedLinearDPOLoss (torch path, compile off) as a second, fused oracle."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, _, labels = _batch(20, bias=False)
    ref_hidden = hidden.detach() * 0.9 + 0.05
    ls = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    nll = loss_type in ("sigmoid", "apo_zero")  # RPO-style NLL term on a couple of types
    avg = loss_type in ("hinge", "nca_pair")
    peer = liger.LigerFusedLinearDPOLoss(
        beta=0.2, compiled=False, use_ref_model=True, loss_type=loss_type, label_smoothing=ls,
        compute_nll_loss=nll, alpha=0.5, average_log_prob=avg,
    )
    want = peer(weight, hidden, labels, ref_input=ref_hidden, ref_weight=weight.detach())[0]
    got, _ = fused_linear_dpo(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight.detach(), beta=0.2, loss_type=loss_type,
        label_smoothing=ls, nll_alpha=0.5 if nll else 0.0, average_log_prob=avg, eager=loss_type == "discopop",
    )
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-7)
    _close(_grads(got, hidden, weight), _grads(want, hidden, weight), 1e-6)


@pytest.mark.parametrize("which", ["orpo", "simpo", "cpo"])
def test_fused_orpo_simpo_cpo_match_liger(which):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, _, labels = _batch(21, bias=False)
    if which == "orpo":
        peer = liger.LigerFusedLinearORPOLoss(beta=0.3, compiled=False)
        got, _ = fused_linear_orpo(hidden, weight, labels, beta=0.3)
    elif which == "simpo":
        peer = liger.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.4, label_smoothing=0.05, compute_nll_loss=False, compiled=False)
        got, _ = fused_linear_simpo(hidden, weight, labels, beta=2.0, gamma=0.4, label_smoothing=0.05, eager=True)
    else:
        peer = liger.LigerFusedLinearCPOLoss(beta=0.2, alpha=0.7, label_smoothing=0.1, compiled=False)
        got, _ = fused_linear_cpo(hidden, weight, labels, beta=0.2, cpo_alpha=0.7, label_smoothing=0.1)
    want = peer(weight, hidden, labels)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-7)
    _close(_grads(got, hidden, weight), _grads(want, hidden, weight), 1e-6)


def test_schedule_and_average_flags_must_be_bools():
    """A truthy string switched the eager schedule or the averaging on."""
    hidden, weight, _, labels = _batch(6, bias=False)
    ref = torch.zeros(B, dtype=torch.float64)
    with pytest.raises(TypeError, match="eager"):
        fused_linear_dpo(hidden, weight, labels, ref, ref, eager="no")
    with pytest.raises(TypeError, match="eager"):
        fused_linear_orpo(hidden, weight, labels, eager=1)
    with pytest.raises(TypeError, match="average_log_prob"):
        fused_linear_dpo(hidden, weight, labels, ref, ref, average_log_prob="no")
    with pytest.raises(TypeError, match="average_log_prob"):
        fused_linear_cpo(hidden, weight, labels, average_log_prob=0)


def test_a_missing_or_half_given_reference_names_the_fused_forms():
    """Without a reference, fused_linear_dpo said "ref_chosen_logps and ref_rejected_logps are required unless
    reference_free=True", not naming ref_hidden, the form the fused loss exists for; and ref_weight / ref_bias
    without ref_hidden (a reference head for hidden states never given) were dropped without a word, in DPO and
    KTO alike. Both are ValueErrors naming ref_hidden."""
    hidden, weight, bias, labels = _batch(13)
    with pytest.raises(ValueError, match="ref_hidden"):
        fused_linear_dpo(hidden, weight, labels)
    ref = torch.zeros(B, dtype=torch.float64)
    for kwargs in ({"ref_weight": weight.detach()}, {"ref_bias": bias.detach()}):
        with pytest.raises(ValueError, match="ref_hidden"):
            fused_linear_dpo(hidden, weight, labels, ref, ref, **kwargs)
        with pytest.raises(ValueError, match="ref_hidden"):
            fused_linear_kto(hidden, weight, labels, torch.ones(2 * B, dtype=torch.bool), torch.zeros(2 * B,
                             dtype=torch.float64), kl=0.0, **kwargs)
    fused_linear_dpo(hidden, weight, labels, reference_free=True)  # still fine
    fused_linear_dpo(hidden, weight, labels, ref_hidden=hidden.detach(), ref_weight=weight.detach())


@pytest.mark.parametrize("schedule", ["lazy", "eager-recompute"])
def test_a_reference_head_with_fewer_tokens_than_the_labels_is_refused(kernel_mode, schedule):
    """The eager schedule scored ref_hidden with the labels checked against the policy's vocabulary only: a
    ref_weight with fewer rows made the Triton row kernel read past its logits (a made-up loss) and the torch
    path raised an IndexError from gather; the lazy schedule already said ValueError. Both say it now."""
    hidden, weight, _, labels = _batch(15, bias=False)
    small = weight.detach()[: int(labels.max())]
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {small.shape[0]}\)"):
        fused_linear_dpo(hidden, weight, labels, ref_hidden=hidden.detach(), ref_weight=small, **SCHEDULES[schedule])
    wide = torch.cat([weight.detach(), torch.randn(3, H, dtype=torch.float64)])  # more rows: fine, and as unfused
    loss, _ = fused_linear_dpo(hidden, weight, labels, ref_hidden=hidden.detach(), ref_weight=wide,
                               **SCHEDULES[schedule])
    tok, _ = _unfused_token_logps(hidden, weight, None, labels)
    ref_tok, _ = _unfused_token_logps(hidden.detach(), wide, None, labels)
    pc, pr = tok.sum(1).split(B)
    rc, rr = ref_tok.sum(1).split(B)
    torch.testing.assert_close(loss, dpo_loss(pc, pr, rc, rr)[0])


@pytest.mark.parametrize("schedule", ["lazy", "eager-recompute"])
def test_bad_arguments_are_named_before_any_work(schedule):
    """A string ignore_index raised AttributeError ('bool' object has no attribute 'sum') in the counts of ORPO,
    SimPO, CPO and DPO; a list bias or ref_bias an AttributeError ('detach') in KTO's and DPO's reference pass;
    a negative resident_bytes passed unnoticed on the lazy schedule."""
    hidden, weight, bias, labels = _batch(16)
    kw = SCHEDULES[schedule]
    ref = torch.zeros(B, dtype=torch.float64)
    for loss in (fused_linear_orpo, fused_linear_simpo, fused_linear_cpo):
        with pytest.raises(TypeError, match="ignore_index"):
            loss(hidden, weight, labels, ignore_index="-100", **kw)
        with pytest.raises(ValueError, match="resident_bytes"):
            loss(hidden, weight, labels, resident_bytes=-1, eager=kw.get("eager", False))
    with pytest.raises(TypeError, match="ignore_index"):
        fused_linear_dpo(hidden, weight, labels, ref, ref, ignore_index=None, **kw)
    desirable = torch.ones(2 * B, dtype=torch.bool)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_kto(hidden, weight, labels, desirable, ref_hidden=hidden.detach(), bias=[0.0] * V, kl=0.0, **kw)
    for loss, args in ((fused_linear_kto, (desirable,)), (fused_linear_dpo, ())):
        extra = dict(kl=0.0) if loss is fused_linear_kto else {}
        with pytest.raises(TypeError, match="ref_bias"):
            loss(hidden, weight, labels, *args, ref_hidden=hidden.detach(), ref_bias=[0.0] * V, **extra, **kw)


@pytest.mark.parametrize("eager", [False, True])
def test_generic_loss_must_return_loss_and_metrics(eager):
    """loss_from_token_logps returning a bare loss came back as is from the lazy schedule (the caller's unpacking
    failed later) and failed without a name in the eager one; a non-callable failed inside the chunk loop."""
    from alignlab.losses.fused_preference import fused_linear_preference

    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    with pytest.raises(TypeError, match=r"must return \(loss, metrics\)"):
        fused_linear_preference(h, w, y, lambda t: t.sum(), eager=eager)
    with pytest.raises(TypeError, match="must be callable"):
        fused_linear_preference(h, w, y, "dpo", eager=eager)
    loss, metrics = fused_linear_preference(h, w, y, lambda t: (t.sum(), {"n": t.new_ones(())}), eager=eager)
    torch.testing.assert_close(loss, (torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None])).sum())
    assert set(metrics) == {"n"}


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("value, error, message", [
    (float("nan"), ValueError, "nll_alpha must be a finite number >= 0"),
    (float("inf"), ValueError, "nll_alpha must be a finite number >= 0"),
    (-1.0, ValueError, "nll_alpha must be a finite number >= 0"),
    (True, TypeError, "nll_alpha must be a real number"),
    ("0.5", TypeError, "nll_alpha must be a real number"),
])
def test_fused_dpo_refuses_a_bad_nll_alpha(value, error, message, eager):
    """The RPO weight went through unchecked: NaN / inf gave a NaN / inf loss, -1 a negative one, True counted as
    1.0, and a string failed inside torch without naming the argument (a helper's find)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    w = torch.randn(37, 8, generator=g)
    y = torch.randint(0, 37, (2, 4), generator=g)
    with pytest.raises(error, match=message):
        fused_linear_dpo(h, w, y, reference_free=True, nll_alpha=value, eager=eager)
    loss, metrics = fused_linear_dpo(h, w, y, reference_free=True, nll_alpha=0.5, eager=eager)
    assert torch.isfinite(loss) and "nll_loss" in metrics


def test_reference_hidden_errors_name_the_reference():
    """A reference of the wrong shape or dtype is reported as ref_hidden (the policy's names before)."""
    h, w = torch.randn(4, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (4, 3))
    with pytest.raises(ValueError, match="ref_hidden"):
        fused_linear_dpo(h, w, labels, ref_hidden=torch.randn(4, 2, 8))
    with pytest.raises(TypeError, match="ref_hidden and lm_head_weight"):
        fused_linear_dpo(h, w, labels, ref_hidden=torch.randn(4, 3, 8).double())
    with pytest.raises(ValueError, match="ref_weight"):
        fused_linear_dpo(h, w, labels, ref_hidden=torch.randn(4, 3, 8), ref_weight=torch.randn(11, 6))
