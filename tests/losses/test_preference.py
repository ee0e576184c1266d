"""Preference losses against TRL 1.16's trainers (run on plain tensors) and against the papers' formulas.

TRL's DPO/KTO losses live inside ``_compute_loss(model, inputs)``; we drive them with a stand-in model whose
output carries per-token log-probs we choose, on a trainer built with ``object.__new__`` (no datasets, no
accelerate set-up).  Gradients are compared through the per-token log-probs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

# The oracle drives TRL's private loss methods, whose signatures changed across releases: checked on 1.16;
# older TRL (the declared floor is 0.26) skips these tests with pytest's version reason.
TRL_INTERNALS = "1.16"
import torch.nn.functional as F

from alignlab.losses.preference import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
    una_loss,
)

B, L = 5, 9  # pairs, sequence length of the stand-in batch
# the dpo_loss types whose formula has the label-flip rate (the others refuse label_smoothing > 0)
_SMOOTHED = {"sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_pair", "aot_unpaired"}


# ------------------------------------------------------------------------------------------------------------------
# TRL oracles
# ------------------------------------------------------------------------------------------------------------------
class _StandInModel:
    """Plays the policy: returns the per-token log-probs it was given (and neutral extras TRL logs)."""

    def __init__(self, by_input: dict[int, torch.Tensor]):
        self.by_input = by_input
        self.training = True

    def __call__(self, input_ids, **kwargs):
        lp = self.by_input[id(input_ids)]
        n, t = lp.shape
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros(n, t, dtype=lp.dtype),
            mean_logits=torch.zeros(n, t, dtype=lp.dtype),
            is_top1=torch.zeros(n, t, dtype=torch.bool),
            aux_loss=None,
        )


def _accelerator():
    ident = lambda x: x  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=ident, gather=ident, num_processes=1)


def _trainer(cls, **attrs):
    trainer = object.__new__(cls)
    trainer.accelerator = _accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


@pytest.fixture(scope="module")
def trl_dpo():
    pytest.importorskip("trl", minversion=TRL_INTERNALS)
    from trl.trainer.dpo_trainer import DPOTrainer

    def run(per_token, completion_mask, ref_c, ref_r, loss_types, beta, label_smoothing=0.0, loss_weights=None):
        model = _StandInModel({})
        input_ids = torch.ones(per_token.shape[0], per_token.shape[1] + 1, dtype=torch.long)
        model.by_input[id(input_ids)] = per_token
        trainer = _trainer(
            DPOTrainer,
            model=model,
            beta=beta,
            precompute_ref_logps=True,
            loss_types=list(loss_types),
            loss_weights=loss_weights or [1.0] * len(loss_types),
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            label_smoothing=label_smoothing,
            use_weighting=False,
            args=SimpleNamespace(discopop_tau=0.05),
        )
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "completion_mask": completion_mask,
            "ref_chosen_logps": ref_c,
            "ref_rejected_logps": ref_r,
        }
        loss = trainer._compute_loss(model, inputs, return_outputs=False)
        return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    return run


def _dpo_batch(seed: int, dtype=torch.float64):
    """Per-token log-probs (2B, L-1), completion mask (2B, L) with varied lengths, reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L, (2 * B,), generator=g)
    completion_mask = (torch.arange(L)[None, :] >= L - lengths[:, None]).long()
    per_token = -torch.rand(2 * B, L - 1, generator=g, dtype=dtype) * 2.0
    per_token = per_token * completion_mask[:, 1:]  # what a fused LM head returns: 0 outside the completion
    ref = (-torch.rand(2 * B, generator=g, dtype=dtype) * 2.0) * lengths + torch.randn(2 * B, generator=g, dtype=dtype)
    return per_token.requires_grad_(True), completion_mask, ref[:B], ref[B:], lengths


TRL_DPO_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_matches_trl(trl_dpo, loss_type, beta):
    per_token, cmask, ref_c, ref_r, lengths = _dpo_batch(seed=TRL_DPO_TYPES.index(loss_type))
    ls = {"robust": 0.2, "exo_pair": 1e-3}.get(loss_type, 0.0)
    # TRL's `sigmoid` ignores label_smoothing; the cDPO form is tested against the formula separately
    want, want_metrics = trl_dpo(per_token, cmask, ref_c, ref_r, [loss_type], beta, ls)
    (want_grad,) = torch.autograd.grad(want, per_token)

    logps = per_token.sum(1)
    kwargs = {}
    if loss_type in ("ipo", "sigmoid_norm"):
        kwargs = dict(chosen_lengths=cmask[:B].sum(1), rejected_lengths=cmask[B:].sum(1))
    got, metrics = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=ls, **kwargs)
    (got_grad,) = torch.autograd.grad(got, per_token)

    # TRL builds exo_pair's log(1 - eps), log(eps) from a float32 tensor
    rtol = 1e-5 if loss_type == "exo_pair" else 1e-10
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=max(rtol, 1e-9), atol=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        # TRL averages the accuracies in float32
        assert metrics[key].item() == pytest.approx(want_metrics[key], rel=1e-7, abs=1e-12), key


def test_dpo_multiple_loss_types_match_trl(trl_dpo):
    per_token, cmask, ref_c, ref_r, _ = _dpo_batch(seed=3)
    types, weights = ["sigmoid", "bco_pair", "apo_zero"], [0.8, 0.2, 1.5]
    want, _ = trl_dpo(per_token, cmask, ref_c, ref_r, types, 0.3, loss_weights=weights)
    logps = per_token.sum(1)
    got, _ = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta=0.3, loss_type=types, loss_weights=weights)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-10, atol=1e-12)


def test_dpo_reference_free_matches_trl_with_zero_reference(trl_dpo):
    per_token, cmask, _, _, _ = _dpo_batch(seed=4)
    zeros = torch.zeros(B, dtype=per_token.dtype)
    want, _ = trl_dpo(per_token, cmask, zeros, zeros, ["sigmoid"], 0.5)
    logps = per_token.sum(1)
    got, metrics = dpo_loss(logps[:B], logps[B:], None, None, beta=0.5, reference_free=True)
    torch.testing.assert_close(got, want.to(got.dtype))
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * logps[:B].mean().item())


# ------------------------------------------------------------------------------------------------------------------
# DPO: formulas written out independently
# ------------------------------------------------------------------------------------------------------------------
def _pairs(seed, n=6, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    xs = [(-torch.rand(n, generator=g, dtype=dtype) * 30).requires_grad_(requires_grad) for _ in range(4)]
    return xs


def _logsig(x):
    return -torch.log1p(torch.exp(-x))


def test_conservative_dpo_label_smoothing_formula():
    pc, pr, rc, rr = _pairs(0)
    beta, eps = 0.2, 0.1
    z = beta * ((pc - rc) - (pr - rr))
    want = (-(1 - eps) * _logsig(z) - eps * _logsig(-z)).mean()
    got, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(got, want)


def test_rdpo_length_margin_formula():
    pc, pr, rc, rr = _pairs(1)
    lc = torch.tensor([3, 10, 7, 1, 4, 8])
    lr = torch.tensor([5, 2, 7, 9, 4, 1])
    beta, alpha = 0.1, 0.05
    # Park et al. (arXiv 2403.19159): -log sigmoid(beta*h_c - beta*h_r + alpha*(|y_c| - |y_r|))
    z = beta * (pc - rc) - beta * (pr - rr) + alpha * (lc - lr).double()
    want = -_logsig(z).mean()
    got, _ = dpo_loss(pc, pr, rc, rr, beta=beta, chosen_lengths=lc, rejected_lengths=lr, length_alpha=alpha)
    torch.testing.assert_close(got, want)
    hinge, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge", chosen_lengths=lc, rejected_lengths=lr, length_alpha=alpha)
    torch.testing.assert_close(hinge, torch.relu(1 - z).mean())


def test_aot_pair_is_aot_unpaired():
    pc, pr, rc, rr = _pairs(2)
    a, _ = dpo_loss(pc, pr, rc, rr, loss_type="aot_pair")
    b, _ = dpo_loss(pc, pr, rc, rr, loss_type="aot_unpaired")
    hc, hr = pc - rc, pr - rr
    want = -_logsig(0.1 * (hc.sort().values - hr.sort().values)).mean()
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(b, want)


def test_ipo_without_lengths_is_the_paper_formula():
    pc, pr, rc, rr = _pairs(3)
    tau = 0.4
    want = (((pc - rc) - (pr - rr) - 1 / (2 * tau)) ** 2).mean()
    got, _ = dpo_loss(pc, pr, rc, rr, beta=tau, loss_type="ipo")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradcheck_float64(loss_type):
    pc, pr, rc, rr = _pairs(5, n=4, requires_grad=True)
    pc, pr, rc, rr = [x / 10 for x in (pc, pr, rc, rr)]  # keep sigmoids away from saturation
    ls = {"robust": 0.1, "exo_pair": 1e-2}.get(loss_type, 0.05 if loss_type in _SMOOTHED else 0.0)
    lengths = dict(chosen_lengths=torch.tensor([2, 3, 1, 4]), rejected_lengths=torch.tensor([3, 3, 2, 1]))
    extra = dict(length_alpha=0.01) if loss_type in ("sigmoid", "robust", "hinge", "exo_pair", "discopop") else {}
    if loss_type in ("ipo", "sigmoid_norm") or extra:
        extra.update(lengths)

    # the reference log-probs are constants (detached by dpo_loss): the policy's are the inputs
    def f(a, b):
        return dpo_loss(a, b, rc.detach(), rr.detach(), beta=0.3, loss_type=loss_type, label_smoothing=ls, **extra)[0]

    leaves = [x.detach().requires_grad_(True) for x in (pc, pr)]
    assert torch.autograd.gradcheck(f, leaves)


def test_dpo_reduction_none_per_pair_and_grads():
    pc, pr, rc, rr = _pairs(6, requires_grad=True)
    per_pair, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, reduction="none")
    z = 0.25 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(per_pair, -_logsig(z))
    w = torch.linspace(0.1, 2.0, pc.numel(), dtype=pc.dtype)
    (g,) = torch.autograd.grad((per_pair * w).sum(), pc)
    # d/dpc of -w * logsigmoid(0.25 * (...)) = -w * 0.25 * sigmoid(-z)
    torch.testing.assert_close(g, -w * 0.25 * torch.sigmoid(-z.detach()))
    total, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, reduction="sum")
    torch.testing.assert_close(total, per_pair.sum())


def test_dpo_bf16_inputs_upcast():
    pc, pr, rc, rr = _pairs(7, n=64, dtype=torch.float64)
    ref, _ = dpo_loss(*(x.bfloat16().double() for x in (pc, pr, rc, rr)), beta=0.1)
    got, metrics = dpo_loss(*(x.bfloat16() for x in (pc, pr, rc, rr)), beta=0.1)
    assert got.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_dpo_metrics_definitions():
    pc, pr, rc, rr = _pairs(8)
    _, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    cr, rj = 0.5 * (pc - rc), 0.5 * (pr - rr)
    assert m["rewards/chosen"].item() == pytest.approx(cr.mean().item())
    assert m["rewards/rejected"].item() == pytest.approx(rj.mean().item())
    assert m["rewards/margins"].item() == pytest.approx((cr - rj).mean().item())
    assert m["rewards/accuracies"].item() == pytest.approx((cr > rj).double().mean().item())
    assert not any(v.requires_grad for v in m.values())


def test_dpo_empty_batch_and_single_pair():
    e = torch.zeros(0, dtype=torch.float32, requires_grad=True)
    loss, m = dpo_loss(e, e, e.detach(), e.detach())
    loss.backward()
    assert loss.item() == 0.0 and math.isnan(m["rewards/chosen"].item())
    one = [torch.tensor([v], dtype=torch.float64) for v in (-3.0, -5.0, -4.0, -4.5)]
    got, _ = dpo_loss(*one, beta=1.0)
    assert got.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(1.0 - (-0.5))))))


def test_dpo_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="batch size mismatch"):
        dpo_loss(x, torch.zeros(4), x, x)
    with pytest.raises(ValueError, match="^ref_chosen_logps is on meta but policy_chosen_logps is on cpu"):
        dpo_loss(x, x, x.to("meta"), x)
    with pytest.raises(ValueError, match="^policy_rejected_logps is on meta"):
        simpo_loss(x, x.to("meta"))
    with pytest.raises(ValueError, match="floating-point"):
        dpo_loss(torch.zeros(3, dtype=torch.long), x, x, x)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        dpo_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=-1.0)
    with pytest.raises(ValueError, match="valid loss types are .*'sigmoid'.*'discopop'"):
        dpo_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(x, x)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(x, x, x, x, length_alpha=0.1)
    with pytest.raises(ValueError, match="R-DPO"):
        dpo_loss(x, x, x, x, loss_type="ipo", length_alpha=0.1, chosen_lengths=[1, 1, 1], rejected_lengths=[1, 1, 1])
    with pytest.raises(ValueError, match="reduction"):
        dpo_loss(x, x, x, x, reduction="avg")


# ------------------------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_kto():
    pytest.importorskip("trl", minversion=TRL_INTERNALS)
    from trl.trainer.kto_trainer import KTOTrainer

    def run(per_token, kl_per_token, labels, ref_logps, ref_kl_logps, loss_type, beta, wd, wu):
        model = _StandInModel({})
        input_ids = torch.ones(per_token.shape[0], per_token.shape[1] + 1, dtype=torch.long)
        kl_ids = torch.ones(kl_per_token.shape[0], kl_per_token.shape[1] + 1, dtype=torch.long)
        model.by_input[id(input_ids)] = per_token
        model.by_input[id(kl_ids)] = kl_per_token
        trainer = _trainer(
            KTOTrainer,
            model=model,
            beta=beta,
            precompute_ref_logps=True,
            loss_type=loss_type,
            desirable_weight=wd,
            undesirable_weight=wu,
            calculate_KL=loss_type == "kto",
        )
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "completion_mask": torch.ones_like(input_ids),
            "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones_like(kl_ids),
            "KL_completion_mask": torch.ones_like(kl_ids),
            "label": labels,
            "ref_logps": ref_logps,
            "ref_KL_logps": ref_kl_logps,
        }
        loss = trainer._compute_loss(model, inputs, return_outputs=False)
        return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    return run


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # -1: the KL estimate is negative and clamps to 0
def test_kto_matches_trl(trl_kto, loss_type, kl_sign):
    g = torch.Generator().manual_seed(11)
    n = 7
    per_token = (-torch.rand(n, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    kl_per_token = -torch.rand(n, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([True, False, True, True, False, False, True])
    ref = per_token.detach().sum(1) + torch.randn(n, generator=g, dtype=torch.float64)
    ref_kl = kl_per_token.sum(1) - kl_sign * torch.rand(n, generator=g, dtype=torch.float64)
    want, wm = trl_kto(per_token, kl_per_token, labels, ref, ref_kl, loss_type, 0.3, 1.3, 0.7)
    (want_grad,) = torch.autograd.grad(want, per_token)

    got, m = kto_loss(
        per_token.sum(1), ref, labels, kl_per_token.sum(1), ref_kl, beta=0.3,
        desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type,
    )
    (got_grad,) = torch.autograd.grad(got, per_token)
    torch.testing.assert_close(got, want.to(got.dtype))
    torch.testing.assert_close(got_grad, want_grad)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert m[key].item() == pytest.approx(wm[key], rel=1e-9, abs=1e-12), key


def test_kto_formula_and_errors():
    pi = torch.tensor([-2.0, -3.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.5, -2.0, -1.5], dtype=torch.float64)
    good = torch.tensor([1, 0, 1])
    loss, m = kto_loss(pi, ref, good, beta=0.5, kl=0.2)
    h = (pi.detach() - ref).tolist()
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = ((1 - s(0.5 * (h[0] - 0.2))) + (1 - s(0.5 * (0.2 - h[1]))) + (1 - s(0.5 * (h[2] - 0.2)))) / 3
    assert loss.item() == pytest.approx(want)
    assert torch.autograd.gradcheck(lambda p: kto_loss(p, ref, good, beta=0.5, kl=0.2)[0], (pi,))
    with pytest.raises(ValueError, match="policy_kl_logps"):
        kto_loss(pi, ref, good)
    with pytest.raises(ValueError, match="valid loss types"):
        kto_loss(pi, ref, good, kl=0.0, loss_type="bco")
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(pi, ref, torch.tensor([1, 0]), kl=0.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(pi, ref, good, kl=0.0, desirable_weight=0.0)


# ------------------------------------------------------------------------------------------------------------------
# ORPO / CPO / SimPO
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_cpo():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    def run(pc, pr, nll, loss_type, beta, ls, gamma, cpo_alpha, alpha):
        t = _trainer(CPOTrainer, beta=beta, loss_type=loss_type, label_smoothing=ls, simpo_gamma=gamma, alpha=alpha)
        losses, cr, rr = t.cpo_loss(pc, pr)
        return losses.mean() + cpo_alpha * nll, cr, rr

    return run


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_matches_trl(trl_cpo, loss_type, alpha):
    g = torch.Generator().manual_seed(21)
    pc = (-torch.rand(6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    pr = (-torch.rand(6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    nll = (-pc).mean()
    ls = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    want, cr, _ = trl_cpo(pc, pr, nll, loss_type, 0.3, ls, 0.7, 0.8, alpha)
    got, m = cpo_loss(pc, pr, nll, beta=0.3, loss_type=loss_type, label_smoothing=ls, simpo_gamma=0.7, cpo_alpha=0.8, alpha=alpha)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want, (pc, pr))
    gg = torch.autograd.grad(got, (pc, pr))
    torch.testing.assert_close(gg, gw)
    assert m["rewards/chosen"].item() == pytest.approx(cr.mean().item())


def _alphapo_formula(pc, pr, alpha):
    """(1 - e^{-αp})/α for each side and their difference, written out in float64."""
    rc, rr = ((1.0 - torch.exp(-alpha * p.double())) / alpha for p in (pc, pr))
    return rc, rr, rc - rr


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.25, -0.5])
def test_cpo_alphapo_on_summed_logps_has_no_nan(loss_type, alpha):
    """(1 - e^{-αp})/α overflowed on summed log-probs (p = -500, α = 0.25: e^125 is inf in float32) and the
    chosen - rejected difference was inf - inf = NaN: the loss and every gradient NaN. Now the difference is
    formed with the larger exponent factored out: the float64 formula's values where float32 can hold them,
    ±inf (0 for a tie) where it cannot, and no NaN in loss, metrics or gradients."""
    pc = torch.tensor([-500.0, -501.0, -500.0, -1.2, -0.7, -2.0, -300.0, -40.0], requires_grad=True)
    pr = torch.tensor([-501.0, -500.0, -500.0, -0.9, -1.5, -2.0, -300.5, -41.0], requires_grad=True)
    loss, m = cpo_loss(pc, pr, beta=0.3, loss_type=loss_type, cpo_alpha=0.0, alpha=alpha, reduction="none")
    _, _, want = _alphapo_formula(pc.detach(), pr.detach(), alpha)  # float64: finite everywhere here
    margin = torch.where(want.abs() <= torch.finfo(torch.float32).max, want, want.sign() * math.inf).float()
    gamma = 0.5 if loss_type == "simpo" else 0.0
    expect = {"sigmoid": -F.logsigmoid(0.3 * margin), "simpo": -F.logsigmoid(0.3 * margin - gamma),
              "hinge": torch.relu(1 - 0.3 * margin), "ipo": (margin - 1 / 0.6) ** 2}[loss_type]
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    assert not loss.isnan().any()
    finite = torch.isfinite(loss)
    (gc, gr) = torch.autograd.grad(loss[finite].sum(), (pc, pr))
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    keep = [0, 2, 3, 4, 5, 6, 7]  # no +inf and -inf margins together: their mean has no value
    _, m = cpo_loss(pc[keep], pr[keep], beta=0.3, loss_type=loss_type, cpo_alpha=0.0, alpha=alpha)
    assert not any(v.isnan().any() for v in m.values())
    assert m["rewards/accuracies"].item() == pytest.approx((want[keep] > 0).double().mean().item())


def test_cpo_alphapo_matches_the_formula_where_finite():
    """Length-normalized log-probs (the paper's and TRL's use): the same numbers and gradients as the plain
    (1 - e^{-αp})/α difference in float64."""
    g = torch.Generator().manual_seed(5)
    pc = (-torch.rand(16, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    pr = (-torch.rand(16, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    for alpha in (0.25, -0.3, 2.0):
        got, m = cpo_loss(pc, pr, beta=0.3, cpo_alpha=0.0, alpha=alpha)
        rc, rr, d = _alphapo_formula(pc, pr, alpha)
        want = -F.logsigmoid(0.3 * d).mean()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, (pc, pr)), torch.autograd.grad(want, (pc, pr)),
                                   rtol=1e-12, atol=1e-12)
        assert m["rewards/margins"].item() == pytest.approx((0.3 * (rc - rr)).mean().item(), rel=1e-12)


def test_simpo_matches_trl_cpo_simpo(trl_cpo):
    g = torch.Generator().manual_seed(22)
    sums_c = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    sums_r = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    lc, lr = torch.tensor([4, 9, 2, 7, 5, 3]), torch.tensor([8, 1, 6, 6, 2, 10])
    want, _, _ = trl_cpo(sums_c / lc, sums_r / lr, torch.zeros(()), "simpo", 2.5, 0.05, 1.2, 0.0, 0.0)
    got, _ = simpo_loss(sums_c, sums_r, beta=2.5, gamma=1.2, label_smoothing=0.05, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(got, want)
    # the paper's eq. 6 written out
    u = 2.5 * sums_c / lc - 2.5 * sums_r / lr - 1.2
    torch.testing.assert_close(got, (-0.95 * _logsig(u) - 0.05 * _logsig(-u)).mean())
    leaves = (sums_c.clone().requires_grad_(True), sums_r.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, chosen_lengths=lc, rejected_lengths=lr)[0], leaves)


@pytest.fixture(scope="module")
def trl_orpo():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    def run(pc, pr, nll, beta):
        t = _trainer(ORPOTrainer, beta=beta)
        losses, cr, rr, ratio, log_odds = t.odds_ratio_loss(pc, pr)
        return nll - losses.mean(), ratio, log_odds

    return run


def test_orpo_matches_trl(trl_orpo):
    g = torch.Generator().manual_seed(31)
    # averaged log-probs on both sides of the -log 2 switch of log1mexp
    pc = torch.cat([-torch.rand(4, generator=g, dtype=torch.float64) * 0.6 - 1e-3, -torch.rand(4, generator=g, dtype=torch.float64) * 5 - 0.7])
    pr = torch.cat([-torch.rand(4, generator=g, dtype=torch.float64) * 5 - 0.7, -torch.rand(4, generator=g, dtype=torch.float64) * 0.6 - 1e-3])
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    nll = -pc.mean()
    want, ratio, log_odds = trl_orpo(pc, pr, nll, 0.2)
    got, m = orpo_loss(pc, pr, nll, beta=0.2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (pc, pr)), torch.autograd.grad(want, (pc, pr)))
    assert m["log_odds_ratio"].item() == pytest.approx(ratio.item())
    assert m["log_odds_chosen"].item() == pytest.approx(log_odds.item())
    # eq. 4/7 of the paper with probabilities
    p_c, p_r = pc.detach().exp(), pr.detach().exp()
    odds = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
    torch.testing.assert_close(got.detach(), nll.detach() - 0.2 * torch.log(odds / (1 + odds)).mean())
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, beta=0.2)[0], (pc.detach().requires_grad_(), pr.detach().requires_grad_()))


def test_cpo_and_orpo_errors():
    x = -torch.rand(3)
    with pytest.raises(ValueError, match="chosen_nll_loss"):
        cpo_loss(x, x)
    with pytest.raises(ValueError, match="valid loss types are"):
        cpo_loss(x, x, cpo_alpha=0.0, loss_type="robust")
    with pytest.raises(ValueError, match="chosen_nll_loss"):
        orpo_loss(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="batch size mismatch"):
        simpo_loss(x, -torch.rand(2))
    with pytest.raises(ValueError, match="^chosen_lengths must be finite and >= 0 everywhere"):
        simpo_loss(x, x, chosen_lengths=[1, 2, -1], rejected_lengths=[1, 1, 1])
    with pytest.raises(ValueError, match="^rejected_lengths must be finite and >= 0 everywhere"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=[1, 2, 3], rejected_lengths=[1, float("nan"), 1])
    with pytest.raises(ValueError, match="^chosen_lengths must be finite"):  # an inf length made the R-DPO margin inf
        dpo_loss(x, x, x, x, length_alpha=0.1, chosen_lengths=[1, math.inf, 3], rejected_lengths=[1, 1, 1])


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_empty_completion_averages_to_zero(loss_type):
    """A completion with no scored token (length 0, summed log-probs 0) has per-token average 0, as
    sequence_logprobs(average=True) writes it: dpo_loss's length-normalised types and simpo_loss take the other
    side's average alone, with finite gradients, where they raised before (the fused losses, which pass
    scored-token counts, did not)."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-torch.rand(3, generator=g, dtype=torch.float64) * 9 for _ in range(4))
    lc, lr = [4, 0, 2], [3, 5, 0]
    pc[1] = rc[1] = pr[2] = rr[2] = 0.0  # pair 1's chosen and pair 2's rejected completion are empty
    pc.requires_grad_()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr,
                       reduction="none")
    for i in range(3):
        avg_c = (pc[i] - rc[i]) / lc[i] if lc[i] else 0.0
        avg_r = (pr[i] - rr[i]) / lr[i] if lr[i] else 0.0
        want = ((avg_c - avg_r - 1 / (2 * 0.3)) ** 2 if loss_type == "ipo"
                else -torch.nn.functional.logsigmoid(torch.as_tensor(0.3 * (avg_c - avg_r))))
        torch.testing.assert_close(loss[i], torch.as_tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    assert torch.isfinite(grad).all()
    s_loss, _ = simpo_loss(pc, pr, beta=2.0, gamma=0.5, chosen_lengths=lc, rejected_lengths=lr, reduction="none")
    for i in range(3):
        avg_c = pc[i] / lc[i] if lc[i] else 0.0
        avg_r = pr[i] / lr[i] if lr[i] else 0.0
        want = -torch.nn.functional.logsigmoid(torch.as_tensor(2.0 * (avg_c - avg_r) - 0.5))
        torch.testing.assert_close(s_loss[i], want.to(torch.float64), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# UNA
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["mse", "bce"])
def test_una_formula_and_gradcheck(loss_type):
    g = torch.Generator().manual_seed(41)
    pi = (-torch.rand(6, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    ref = -torch.rand(6, generator=g, dtype=torch.float64) * 10
    s = torch.tensor([1.0, 0.0, 0.3, 0.9, 0.5, 0.0], dtype=torch.float64)
    got, m = una_loss(pi, ref, s, beta=0.2, loss_type=loss_type)
    r = 0.2 * (pi.detach() - ref)
    sig = 1 / (1 + torch.exp(-r))
    if loss_type == "mse":
        want = ((sig - s) ** 2).mean()
    else:
        want = -(s * torch.log(sig) + (1 - s) * torch.log(1 - sig)).mean()
    torch.testing.assert_close(got.detach(), want)
    assert m["rewards/implicit"].item() == pytest.approx(r.mean().item())
    assert torch.autograd.gradcheck(lambda p: una_loss(p, ref, s, beta=0.2, loss_type=loss_type)[0], (pi,))


def test_una_bce_on_binary_labels_is_bce_with_logits():
    pi, ref = -torch.rand(8, dtype=torch.float64) * 5, -torch.rand(8, dtype=torch.float64) * 5
    y = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float64)
    got, _ = una_loss(pi, ref, y, beta=0.5, loss_type="bce")
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(0.5 * (pi - ref), y))


def test_una_errors():
    x = -torch.rand(3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        una_loss(x, x, torch.tensor([0.0, 1.5, 0.2]))
    with pytest.raises(ValueError, match="valid loss types"):
        una_loss(x, x, torch.zeros(3), loss_type="l1")


# ------------------------------------------------------------------------------------------------------------------
# edge values (issue 27)
# ------------------------------------------------------------------------------------------------------------------

def _orpo_term_grad_formula(pc, pr, beta):
    """d/d pc and d/d pr of -beta * log sigmoid(log odds_c - log odds_r), written out in float64 from
    sigma(-L) / (1 - e^pc); at pc = 0 the limit -beta * e^pr / (1 - e^pr)."""
    pc, pr = pc.double(), pr.double()
    odds_c, odds_r = pc.exp() / -torch.expm1(pc), pr.exp() / -torch.expm1(pr)
    sig_neg = odds_r / (odds_r + odds_c)  # sigma(-L)
    d_pc = torch.where(pc == 0, -beta * odds_r, -beta * sig_neg / -torch.expm1(pc))
    d_pr = beta * sig_neg / -torch.expm1(pr)
    return d_pc, d_pr


@pytest.mark.parametrize("chosen", [0.0, -1e-9, -1e-6])
def test_orpo_gradient_finite_up_to_a_zero_chosen_logprob(chosen):
    pc = torch.tensor([chosen, -0.3, -2.0], dtype=torch.float32, requires_grad=True)
    pr = torch.tensor([-0.7, -1e-3, -40.0], dtype=torch.float32, requires_grad=True)
    loss, m = orpo_loss(pc, pr, beta=0.2, reduction="sum")
    g_pc, g_pr = torch.autograd.grad(loss, (pc, pr))
    want_pc, want_pr = _orpo_term_grad_formula(pc.detach(), pr.detach(), 0.2)
    assert torch.isfinite(loss) and torch.isfinite(g_pc).all() and torch.isfinite(g_pr).all()
    torch.testing.assert_close(g_pc.double(), want_pc, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_pr.double(), want_pr, rtol=1e-5, atol=1e-7)
    p_c, p_r = pc.detach().double().exp(), pr.detach().double().exp()
    inv_odds = ((1 - p_c) / p_c) / ((1 - p_r) / p_r)  # -log(odds / (1 + odds)) = log(1 + 1/odds)
    torch.testing.assert_close(loss.detach().double(), (0.2 * torch.log1p(inv_odds)).sum(), rtol=1e-5, atol=1e-7)


def test_orpo_gradient_matches_formula_and_gradcheck_near_zero():
    pc = torch.tensor([-1e-12, -1e-4, -0.69, -0.7, -30.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-0.5, -1e-5, -0.7, -0.69, -1e-3], dtype=torch.float64, requires_grad=True)
    loss, _ = orpo_loss(pc, pr, beta=0.3, reduction="sum")
    g = torch.autograd.grad(loss, (pc, pr))
    for a, b in zip(g, _orpo_term_grad_formula(pc.detach(), pr.detach(), 0.3)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, beta=0.3)[0], (pc[1:], pr[1:]), eps=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_orpo_second_derivatives_are_those_of_the_formula(reduction):
    """The odds-ratio term's backward was once_differentiable: a Hessian or a gradient penalty through orpo_loss came
    back zero without a word (TRL's plain-op formula gives the true one). gradgradcheck, and the Hessian against
    autograd of the formula written out in float64."""
    pc = torch.tensor([-0.3, -1e-3, -2.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-0.8, -0.6, -1e-2], dtype=torch.float64, requires_grad=True)

    def ours(a, b):
        loss, _ = orpo_loss(a, b, beta=0.5, reduction=reduction)
        return loss if reduction == "mean" else (loss * torch.tensor([1.0, -2.0, 0.5], dtype=loss.dtype)).sum()

    def formula(a, b):  # -β log σ(log odds_c - log odds_r), log odds = π̄ - log(1 - e^π̄)
        odds = (a - torch.log1p(-a.exp())) - (b - torch.log1p(-b.exp()))
        per = -0.5 * torch.nn.functional.logsigmoid(odds)
        return per.mean() if reduction == "mean" else (per * torch.tensor([1.0, -2.0, 0.5], dtype=per.dtype)).sum()

    assert torch.autograd.gradgradcheck(ours, (pc, pr))
    got = torch.autograd.functional.hessian(ours, (pc, pr))
    want = torch.autograd.functional.hessian(formula, (pc, pr))
    for row_got, row_want in zip(got, want):
        for g, w in zip(row_got, row_want):
            assert w.abs().max() > 0
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_orpo_positive_logprob_raises():
    with pytest.raises(ValueError, match="must be <= 0"):
        orpo_loss(torch.tensor([-0.1, 0.2]), torch.tensor([-0.5, -0.5]))
    with pytest.raises(ValueError, match="must be <= 0"):
        orpo_loss(torch.tensor([-0.1, -0.2]), torch.tensor([-0.5, 1e-3]))
    loss, _ = orpo_loss(torch.tensor([-0.1]), torch.tensor([0.0]))  # rejected at probability 1: +inf, not NaN
    assert loss.item() == float("inf")


def test_kto_rejects_labels_other_than_0_1_and_empty_kl_logps():
    pi = torch.tensor([-2.0, -3.0, -1.0])
    ref = torch.tensor([-2.5, -2.0, -1.5])
    for bad in (torch.tensor([2, 0, 1]), torch.tensor([1, -1, 0]), torch.tensor([1.0, 0.5, 0.0])):
        with pytest.raises(ValueError, match="desirable must hold booleans"):
            kto_loss(pi, ref, bad, kl=0.0)
    with pytest.raises(ValueError, match="policy_kl_logps and ref_kl_logps are empty"):
        kto_loss(pi, ref, torch.tensor([True, False, True]), torch.empty(0), torch.empty(0))
    # one mismatched pair is enough, and gives z0 = max(0, pi_kl - ref_kl)
    _, m = kto_loss(pi, ref, torch.tensor([True, False, True]), torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert m["kl"].item() == pytest.approx(0.5)


def test_dpo_numpy_scalars_match_python_numbers():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(4, generator=g) for _ in range(4))
    want, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2, num_items=8)
    got, _ = dpo_loss(pc, pr, rc, rr, beta=np.float32(0.1), label_smoothing=np.float32(0.2), num_items=np.int64(8))
    torch.testing.assert_close(got, want)
    for kw, arg in (({"beta": True}, "beta"), ({"beta": float("nan")}, "beta"), ({"label_smoothing": True}, "label_smoothing"),
                    ({"label_smoothing": float("nan")}, "label_smoothing")):
        with pytest.raises(ValueError, match=arg):
            dpo_loss(pc, pr, rc, rr, **kw)
    with pytest.raises(TypeError, match="num_items"):
        dpo_loss(pc, pr, rc, rr, num_items=True)


def test_reference_free_must_be_a_bool():
    """reference_free="no" is truthy: it used to drop the reference and give the reference-free loss silently."""
    pc, pr = -torch.rand(3, dtype=torch.float64), -torch.rand(3, dtype=torch.float64)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="reference_free"):
            dpo_loss(pc, pr, reference_free=bad)
    with pytest.raises(TypeError, match="reference_free"):
        dpo_loss(pc, pr, pc * 0.5, pr * 0.5, reference_free=0)


def test_nan_and_non_number_arguments_are_refused():
    """Each of these reached the loss as NaN (or a type error that named nothing) instead of being refused."""
    d = torch.float64
    pc, pr = -torch.rand(3, dtype=d) - 1, -torch.rand(3, dtype=d) - 1
    nan = float("nan")
    with pytest.raises(ValueError, match="scores"):
        una_loss(pc, pr, torch.tensor([0.5, nan, 0.1], dtype=d))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, pc, pr, loss_type="ipo", chosen_lengths=torch.tensor([nan, 2, 2]), rejected_lengths=[2, 2, 2])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, pc, pr, loss_type="ipo", chosen_lengths=torch.ones(3, dtype=torch.bool),
                 rejected_lengths=[2, 2, 2])
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(pc, pr, pc, pr, loss_type=("sigmoid", "ipo"), loss_weights=(nan, 1.0))
    with pytest.raises(TypeError, match="length_alpha"):
        dpo_loss(pc, pr, pc, pr, length_alpha="0.1", chosen_lengths=[1, 2, 3], rejected_lengths=[3, 2, 1])
    with pytest.raises(ValueError, match="kl"):
        kto_loss(pc, pr, torch.tensor([True, False, True]), kl=nan)
    with pytest.raises(TypeError, match="kl"):
        kto_loss(pc, pr, torch.tensor([True, False, True]), kl="0.1")
    with pytest.raises(TypeError, match="gamma"):
        simpo_loss(pc, pr, gamma="0.5")
    for name in ("cpo_alpha", "simpo_gamma", "alpha"):
        with pytest.raises(ValueError, match=name):
            cpo_loss(pc, pr, torch.tensor(1.0, dtype=d), **{name: nan})
        with pytest.raises(TypeError, match=name):
            cpo_loss(pc, pr, torch.tensor(1.0, dtype=d), **{name: "1"})
    # a tensor kl is not read back (no sync); NumPy scalars are numbers
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(kto_loss(pc, pr, torch.tensor([True, False, True]), kl=torch.tensor(0.2))[0],
                               kto_loss(pc, pr, torch.tensor([True, False, True]), kl=np.float32(0.2))[0])


@pytest.mark.parametrize("bad", [None, 3, {"sigmoid"}, [], ["sigmoid", None], ("sigmoid", ["ipo"])],
                         ids=["none", "int", "set", "empty", "list-with-none", "nested"])
def test_dpo_loss_type_not_a_name_is_named(bad):
    """loss_type=None (or 3) failed in list(loss_type) with an unnamed TypeError; a set was taken in no order
    (to pair with loss_weights). Now a ValueError naming loss_type and listing the valid names."""
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"loss_type.*'sigmoid', 'robust', 'ipo'"):
        dpo_loss(x, x, x, x, loss_type=bad)
    # the other string-valued options already named themselves; kept so
    for fn, arg in ((lambda v: kto_loss(x, x, torch.ones(2, dtype=torch.bool), kl=0.0, loss_type=v), "loss_type"),
                    (lambda v: cpo_loss(x, x, loss_type=v), "loss_type"),
                    (lambda v: una_loss(x, x, torch.full((2,), 0.5, dtype=torch.float64), loss_type=v), "loss_type"),
                    (lambda v: dpo_loss(x, x, x, x, reduction=v), "reduction"),
                    (lambda v: simpo_loss(x, x, reduction=v), "reduction")):
        with pytest.raises(ValueError, match=arg):
            fn(None)


def test_kto_and_simpo_reduction_none_gradients_match_hand_formulas():
    """reduction="none" per example, weighted by per-example upstream gradients u, against the derivatives written
    out: KTO with s = sigmoid(beta (h - z0)) desirable, d/dpi = -lambda_D beta s (1 - s); with
    s' = sigmoid(beta (z0 - h)) undesirable, d/dpi = +lambda_U beta s' (1 - s'). SimPO with u = beta pc / Lc -
    beta pr / Lr - gamma and label smoothing e: dl/du = -(1 - e) sigmoid(-u) + e sigmoid(u), times beta / Lc for
    pc and -beta / Lr for pr."""
    g = torch.Generator().manual_seed(21)
    n = 6
    pi = (-torch.rand(n, generator=g, dtype=torch.float64) * 20).requires_grad_(True)
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    desirable = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    up = torch.linspace(-0.5, 2.0, n, dtype=torch.float64)
    beta, z0, lam_d, lam_u = 0.2, 0.7, 1.3, 0.6
    per, _ = kto_loss(pi, ref, desirable, beta=beta, kl=z0, desirable_weight=lam_d, undesirable_weight=lam_u,
                      reduction="none")
    (gpi,) = torch.autograd.grad(per, pi, up)
    with torch.no_grad():
        h = pi - ref
        s_good, s_bad = torch.sigmoid(beta * (h - z0)), torch.sigmoid(beta * (z0 - h))
        torch.testing.assert_close(per, torch.where(desirable, lam_d * (1 - s_good), lam_u * (1 - s_bad)))
        want = torch.where(desirable, -lam_d * beta * s_good * (1 - s_good), lam_u * beta * s_bad * (1 - s_bad))
    torch.testing.assert_close(gpi, up * want, rtol=1e-12, atol=1e-14)

    pc = (-torch.rand(n, generator=g, dtype=torch.float64) * 30).requires_grad_(True)
    pr = (-torch.rand(n, generator=g, dtype=torch.float64) * 30).requires_grad_(True)
    lc, lr = torch.tensor([3, 7, 1, 4, 9, 2]), torch.tensor([5, 2, 6, 1, 3, 8])
    beta, gamma, eps = 2.0, 0.5, 0.1
    per, _ = simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
                        reduction="none")
    gc, gr = torch.autograd.grad(per, (pc, pr), up)
    with torch.no_grad():
        u = beta * pc / lc - beta * pr / lr - gamma
        torch.testing.assert_close(per, -(1 - eps) * _logsig(u) - eps * _logsig(-u))
        dl_du = -(1 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u)
    torch.testing.assert_close(gc, up * dl_du * beta / lc, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gr, -up * dl_du * beta / lr, rtol=1e-12, atol=1e-14)


def test_label_smoothing_on_a_type_it_does_not_change_is_refused():
    """``label_smoothing`` changes the logistic types only; on the others it was accepted and ignored (TRL ignores it
    too). A list with one type it changes takes it."""
    pc, pr, rc, rr = _pairs(1, n=3)
    for loss_type in sorted(set(DPO_LOSS_TYPES) - _SMOOTHED):
        with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect"):
            dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=0.1)
        dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=0.0)
    plain = dpo_loss(pc, pr, rc, rr, loss_type=("sigmoid", "hinge"))[0]
    assert dpo_loss(pc, pr, rc, rr, loss_type=("sigmoid", "hinge"), label_smoothing=0.1)[0] != plain
    for loss_type in ("hinge", "ipo"):
        with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect"):
            cpo_loss(pc, pr, loss_type=loss_type, label_smoothing=0.1)


def test_reduction_none_does_not_mix_aot_with_pair_indexed_types():
    pc, pr, rc, rr = _pairs(2, n=4)
    with pytest.raises(ValueError, match="reduction='none' cannot combine"):
        dpo_loss(pc, pr, rc, rr, loss_type=("sigmoid", "aot"), reduction="none")
    per = dpo_loss(pc, pr, rc, rr, loss_type=("aot", "aot_pair"), reduction="none")[0]  # both by sorted rank
    assert per.shape == (4,)
    mixed = dpo_loss(pc, pr, rc, rr, loss_type=("sigmoid", "aot"), reduction="sum")[0]
    want = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", reduction="sum")[0] + dpo_loss(
        pc, pr, rc, rr, loss_type="aot", reduction="sum")[0]
    torch.testing.assert_close(mixed, want)


# ------------------------------------------------------------------------------------------------------------------
# Infinite log-probs (a zero-probability token, a -inf reference): the formula's limit, never NaN
# ------------------------------------------------------------------------------------------------------------------
def _pair_formula(loss_type: str, z: torch.Tensor, eps: float, tau: float = 0.05) -> torch.Tensor:
    """The per-pair losses written out (float64), for the limits at large |z|."""
    ls = F.logsigmoid
    if loss_type in ("sigmoid", "robust"):  # robust at eps = 0 is the sigmoid loss
        return -ls(z)
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (ls(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (ls(-z) - math.log(eps))
    return -ls(z) * torch.sigmoid(-z / tau) + torch.sigmoid(z / tau) * torch.exp(-z)  # discopop


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "discopop"])
@pytest.mark.parametrize("side", ["chosen", "rejected", "ref_rejected"])
def test_dpo_infinite_log_probs_give_the_limit_not_nan(loss_type, side):
    """A -inf policy log-prob drives z to -inf (chosen) or +inf (rejected), a -inf reference log-prob of the rejected
    completion to -inf: the pair's loss is the formula's limit (the float64 formula at |z| = 60, or +inf where the
    limit is) and every gradient is finite and the limit's (0 * log 0 was NaN in robust at eps = 0, exo_pair and
    discopop; the batch mean with it)."""
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    beta = 0.1
    pc = torch.tensor([-1.0, -1.0], requires_grad=True)
    pr = torch.tensor([-2.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5, -1.5]), torch.tensor([-2.5, -2.5])
    with torch.no_grad():
        {"chosen": pc, "rejected": pr, "ref_rejected": rr}[side][0] = -math.inf
    per_pair, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, reduction="none")
    per_pair.sum().backward()
    sign = -1.0 if side in ("chosen", "ref_rejected") else 1.0
    z = torch.tensor(sign * 60.0, dtype=torch.float64, requires_grad=True)
    want = _pair_formula(loss_type, z, eps)
    want.backward()
    limit_inf = sign < 0 and loss_type != "exo_pair"
    if limit_inf:
        assert per_pair[0].item() == math.inf
    else:
        assert per_pair[0].item() == pytest.approx(want.item(), abs=1e-6)
    # the other pair is untouched
    zf = torch.tensor(beta * ((-1.0 + 1.5) - (-2.0 + 2.5)), dtype=torch.float64)
    assert per_pair[1].item() == pytest.approx(_pair_formula(loss_type, zf, eps).item(), rel=1e-5)
    for grad in (pc.grad, pr.grad):
        assert torch.isfinite(grad).all(), (pc.grad, pr.grad)
    # z = beta * ((pc - rc) - (pr - rr)): dL/dpc = beta * dL/dz and dL/dpr = -beta * dL/dz, dL/dz the limit's slope
    g = beta * z.grad.item()
    assert pc.grad[0].item() == pytest.approx(g, abs=1e-6) and pr.grad[0].item() == pytest.approx(-g, abs=1e-6)


@pytest.mark.parametrize("s,ref_inf", [(0.0, False), (1.0, True)])
def test_una_bce_infinite_reward_with_a_zero_weight_term(s, ref_inf):
    """UNA's BCE with a score of 0 (1) next to r = -inf (+inf): the term that would be infinite has weight 0, so the
    loss is 0 with a zero gradient, not 0 * inf = NaN."""
    pi = torch.tensor([-math.inf if not ref_inf else -1.0, -1.0], requires_grad=True)
    ref = torch.tensor([0.0 if not ref_inf else -math.inf, -1.0])
    got, _ = una_loss(pi, ref, torch.tensor([s, 0.5]), beta=0.5, loss_type="bce", reduction="none")
    got.sum().backward()
    assert got[0].item() == 0.0 and got[1].item() == pytest.approx(math.log(2))
    assert torch.equal(pi.grad, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8])
def test_una_takes_bool_and_integer_scores_as_binary_labels(dtype):
    """Boolean or 0 / 1 integer scores (desirable or not) are the binary labels the docs allow: the same loss as
    0 / 1 floats; an integer 2 is still outside [0, 1]."""
    pi, ref = -torch.rand(6, dtype=torch.float64) * 5, -torch.rand(6, dtype=torch.float64) * 5
    y = torch.tensor([1, 0, 1, 1, 0, 0]).to(dtype)
    for loss_type in ("mse", "bce"):
        got, _ = una_loss(pi, ref, y, loss_type=loss_type)
        torch.testing.assert_close(got, una_loss(pi, ref, y.double(), loss_type=loss_type)[0])
    if dtype != torch.bool:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            una_loss(pi, ref, torch.tensor([1, 0, 2, 1, 0, 0]).to(dtype))
