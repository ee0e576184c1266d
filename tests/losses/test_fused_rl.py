"""fused_linear_grpo against grpo_loss on materialised float64 logits (the oracle), every option."""

import math

import pytest
import torch

from alignlab.losses.fused_rl import fused_linear_grpo, packed_to_padded
from alignlab.losses.reward import grpo_loss, kl_penalty

B, T, H, V = 6, 7, 24, 53  # odd shapes: 42 rows (37 unmasked) over 53 vocabulary entries
D = torch.float64


def _data(seed=0, bias=False, dtype=D):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=D)
    weight = torch.randn(V, H, generator=g, dtype=D) * 0.4
    b = torch.randn(V, generator=g, dtype=D) * 0.3 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 6, 7, 3, 4])  # 32 tokens + ragged padding
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=D)
    old = torch.randn(B, T, generator=g, dtype=D) * 0.3 - 4.0  # ratios far from 1: both clips fire
    ref = torch.randn(B, T, generator=g, dtype=D) * 0.3 - 4.0
    samp = old + torch.randn(B, T, generator=g, dtype=D) * 0.5
    ref_hidden = hidden + 0.1 * torch.randn(B, T, H, generator=g, dtype=D)
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=None if b is None else b.to(dtype), ids=ids,
                mask=mask, adv=adv, old=old, ref=ref, samp=samp, ref_hidden=ref_hidden.to(dtype))


def _oracle_logps(hidden, weight, bias, ids, temperature):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    lp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent


def _oracle(d, temperature=1.0, ref_from_hidden=False, entropy=False, **kw):
    h = d["hidden"].detach().double().clone().requires_grad_(True)
    w = d["weight"].detach().double().clone().requires_grad_(True)
    b = None if d["bias"] is None else d["bias"].detach().double().clone().requires_grad_(True)
    lp, ent = _oracle_logps(h, w, b, d["ids"], temperature)
    ref = kw.pop("ref_logprobs", None)
    if ref_from_hidden:
        with torch.no_grad():
            ref, _ = _oracle_logps(d["ref_hidden"].double(), w, b, d["ids"], temperature)
    loss, metrics = grpo_loss(lp, d["adv"], d["mask"], ref_logprobs=ref, entropy=ent if entropy else None, **kw)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad, None if b is None else b.grad


def _fused(d, temperature=1.0, ref_from_hidden=False, entropy=False, chunk_size=5, **kw):
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    b = None if d["bias"] is None else d["bias"].clone().requires_grad_(True)
    if ref_from_hidden:
        kw["ref_hidden"] = d["ref_hidden"]
    loss, metrics = fused_linear_grpo(h, w, d["ids"], d["adv"], d["mask"], bias=b, temperature=temperature,
                                      compute_entropy=entropy, chunk_size=chunk_size, **kw)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad, None if b is None else b.grad


def _close(got, want, tol=1e-9):
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:]):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k].double(), want[1][k].double(), rtol=tol, atol=tol, msg=k)


CASES = [
    dict(),
    dict(loss_type="bnpo", epsilon_high=0.28),
    dict(loss_type="dapo", epsilon=0.1, epsilon_high=0.28, num_items=50),
    dict(loss_type="dr_grpo", max_completion_length=9),
    dict(loss_type="grpo", num_items=9),
    dict(importance_sampling_level="sequence"),
    dict(importance_sampling_level="sequence", loss_type="dapo", beta=0.05),
    dict(beta=0.04, kl_estimator="k1"),
    dict(beta=0.04, kl_estimator="k2", loss_type="bnpo"),
    dict(beta=0.04, kl_estimator="k3", loss_type="dapo"),
    dict(sampling=True),
    dict(sampling=True, is_mode="token_mask", is_min=0.5, is_max=1.5),
    dict(sampling=True, is_mode="sequence_truncate", is_max=2.0),
    dict(sampling=True, is_mode="sequence_mask", is_max=3.0, no_old=True),
    dict(sampling=True, is_mode="token_truncate", no_old=True),
    dict(entropy=True),
    dict(entropy=True, entropy_coef=0.01, loss_type="dapo"),
    dict(entropy=True, entropy_coef=0.02, importance_sampling_level="sequence", beta=0.1),
    dict(temperature=0.7, beta=0.04),
    dict(no_old=True, beta=0.04),
    dict(ref_from_hidden=True, beta=0.04, temperature=1.3),
    dict(bias=True, beta=0.04, entropy=True, entropy_coef=0.01),
]


def _split(case):
    case = dict(case)
    d = _data(bias=case.pop("bias", False))
    sampling, no_old = case.pop("sampling", False), case.pop("no_old", False)
    kw = dict(case)
    if not no_old:
        kw["old_logprobs"] = d["old"]
    if sampling:
        kw["sampling_logprobs"] = d["samp"]
    if kw.get("beta", 0) > 0 and not kw.get("ref_from_hidden"):
        kw["ref_logprobs"] = d["ref"]
    return d, kw


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_matches_float64_oracle(case, torch_mode):
    d, kw = _split(case)
    _close(_fused(d, **kw), _oracle(d, **kw))


@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[16]], ids=["dapo", "gspo", "entropy_bonus"])
def test_triton_row_kernel_path(case, triton_mode):
    d, kw = _split(case)
    d = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == D and k in ("hidden", "weight", "ref_hidden")
             else v) for k, v in d.items()}
    _close(_fused(d, **kw), _oracle(d, **kw), tol=2e-5)


def test_metric_names_are_trls(torch_mode):
    d, kw = _split(dict(sampling=True, beta=0.04))
    _, metrics = fused_linear_grpo(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"], compute_entropy=True,
                                   chunk_size=8, **kw)
    # TRL GRPOTrainer._compute_loss logs these names ("clip_ratio/*", "kl", "entropy") and
    # _generate_and_score_completions the "sampling/importance_sampling_ratio/*" ones
    assert {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "entropy",
            "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
            "sampling/importance_sampling_ratio/max"} <= set(metrics)
    assert 0 < float(metrics["clip_ratio/low_mean"]) < 1 and 0 < float(metrics["clip_ratio/high_mean"]) < 1


def test_importance_sampling_scales_the_policy_gradient_exactly(torch_mode):
    # with beta = 0 every token's policy term is multiplied by w_t = min(exp(old_t - sampler_t), cap):
    # d loss / d logp_t must be w_t times the uncorrected one, token by token (the bug class of Liger #1082)
    d, kw = _split(dict())
    lp = _oracle_logps(d["hidden"], d["weight"], None, d["ids"], 1.0)[0].requires_grad_(True)
    base, _ = grpo_loss(lp, d["adv"], d["mask"], d["old"])
    (g0,) = torch.autograd.grad(base, lp)
    corr, _ = grpo_loss(lp, d["adv"], d["mask"], d["old"], sampling_logprobs=d["samp"], is_max=1.7)
    (g1,) = torch.autograd.grad(corr, lp)
    w = torch.exp(d["old"] - d["samp"]).clamp(max=1.7)
    torch.testing.assert_close(g1, g0 * w * d["mask"], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(g1, g0)
    # and the fused loss turns that into the chain rule through the logits: the same dL/dlogp, fed back
    got = _fused(d, sampling_logprobs=d["samp"], is_max=1.7, **kw)
    h = d["hidden"].clone().requires_grad_(True)
    lp_h, _ = _oracle_logps(h, d["weight"], None, d["ids"], 1.0)
    (gh,) = torch.autograd.grad((lp_h * (g0 * w)).sum(), h)
    torch.testing.assert_close(got[2], gh, rtol=1e-9, atol=1e-12)


def test_packed_equals_padded(torch_mode):
    d, kw = _split(dict(beta=0.04, entropy_coef=0.01, sampling=True))
    want = _fused(d, entropy=True, **kw)
    m = d["mask"]
    lengths = m.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def pack(t):
        return t[m]

    h = pack(d["hidden"]).clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    side = {k: pack(v) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    loss, metrics = fused_linear_grpo(h.unsqueeze(0), w, pack(d["ids"]).unsqueeze(0), d["adv"], cu_seqlens=cu,
                                      compute_entropy=True, chunk_size=4, **{k: v.unsqueeze(0) for k, v in side.items()},
                                      **rest)
    loss.backward()
    torch.testing.assert_close(loss, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, want[2][m], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, want[3], rtol=1e-10, atol=1e-12)
    for k in want[1]:
        torch.testing.assert_close(metrics[k], want[1][k], msg=k)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_with_step_normaliser(loss_type, torch_mode):
    # k micro-batches (as k ranks or k accumulation steps), each normalised by the step-wide count
    # (sequences for grpo/dr_grpo, tokens for bnpo/dapo): the sum of their losses and gradients is the big batch's
    d, kw = _split(dict(beta=0.04, sampling=True))
    big = _fused(d, loss_type=loss_type, **kw)
    n_items = B if loss_type in ("grpo", "dr_grpo") else int(d["mask"].sum())
    w = d["weight"].clone().requires_grad_(True)
    h = d["hidden"].clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven micro-batches
        side = {k: v[sl] for k, v in kw.items() if isinstance(v, torch.Tensor)}
        loss, _ = fused_linear_grpo(h[sl], w, d["ids"][sl], d["adv"][sl], d["mask"][sl], loss_type=loss_type,
                                    num_items=n_items, max_completion_length=T, chunk_size=3, beta=0.04, **side)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, big[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, big[2], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(w.grad, big[3], rtol=1e-10, atol=1e-13)


def test_no_grad_and_frozen_head(torch_mode):
    d, kw = _split(dict(beta=0.04))
    want = _oracle(d, **kw)
    with torch.no_grad():
        loss, _ = fused_linear_grpo(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"], **kw)
    torch.testing.assert_close(loss, want[0])
    h = d["hidden"].clone().requires_grad_(True)
    loss, _ = fused_linear_grpo(h, d["weight"], d["ids"], d["adv"], d["mask"], chunk_size=6, **kw)
    (2.5 * loss).backward()
    torch.testing.assert_close(h.grad, 2.5 * want[2])


def test_memory_stays_chunk_sized(torch_mode):
    # the largest tensor allocated is a chunk of logits, never (rows, vocab)
    d, kw = _split(dict(entropy_coef=0.01))
    seen = []
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    w_storage = w.untyped_storage().data_ptr()

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == V \
                    and out.untyped_storage().data_ptr() != w_storage:  # views of the weight are not logits
                seen.append(out.shape[0])
            return out

    with Spy():
        loss, _ = fused_linear_grpo(h, w, d["ids"], d["adv"], d["mask"], chunk_size=4, **kw)
        loss.backward()
    assert seen and max(seen) <= 4


def test_errors():
    d, kw = _split(dict())
    args = (d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"])
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_grpo(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_grpo(*args, temperature=0.0)
    with pytest.raises(ValueError, match="ref_logprobs or ref_hidden"):
        fused_linear_grpo(*args, beta=0.1)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_grpo(*args, beta=0.1, ref_logprobs=d["ref"], ref_hidden=d["ref_hidden"])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        fused_linear_grpo(*args, importance_sampling_level="group")
    with pytest.raises(ValueError, match="is_mode"):
        fused_linear_grpo(*args, sampling_logprobs=d["samp"], is_mode="clip")
    with pytest.raises(TypeError, match="completion_ids"):
        fused_linear_grpo(d["hidden"], d["weight"], d["ids"].double(), d["adv"])
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_grpo(d["hidden"].float(), d["weight"], d["ids"], d["adv"])
    with pytest.raises(ValueError, match="completion_ids must be in"):
        fused_linear_grpo(d["hidden"], d["weight"], d["ids"] + V, d["adv"])
    with pytest.raises(ValueError, match="old_logprobs"):
        fused_linear_grpo(*args, old_logprobs=d["old"][:, :3])
    with pytest.raises(TypeError, match="old_logprobs must be a torch.Tensor"):  # as grpo_loss
        fused_linear_grpo(*args, old_logprobs="x")
    with pytest.raises(ValueError, match="old_logprobs must be a floating-point tensor"):
        fused_linear_grpo(*args, old_logprobs=d["old"].long())
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_grpo(*args[:3], d["adv"][:4], d["mask"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_grpo(d["hidden"][0], d["weight"], d["ids"][0], d["adv"][:1], cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.parametrize("case", [
    "reference head without ref_hidden", "ref_weight of integers", "ref_weight narrower than hidden",
    "ref_weight with fewer tokens than the ids", "ref_bias of another size", "ref_bias not a tensor",
    "bias not a tensor", "lm_head_weight on meta", "ref_weight on meta", "0-d hidden",
])
def test_head_and_reference_arguments_are_checked(kernel_mode, case):
    # the reference head was not checked at all: without ref_hidden it was ignored, an integer one truncated
    # the reference hidden states, one with fewer rows than the ids read past its logits (the Triton row kernel:
    # a made-up loss), and a meta-device policy head gave a loss read from a logits buffer never written
    d = _data()
    h, w, ids, adv = d["hidden"], d["weight"], d["ids"], d["adv"]
    kw = dict(beta=0.1, ref_hidden=d["ref_hidden"])
    want = ValueError
    if case == "reference head without ref_hidden":
        kw = dict(beta=0.1, ref_logprobs=d["ref"], ref_weight=w)
    elif case == "ref_weight of integers":
        kw["ref_weight"], want = (w * 10).long(), TypeError
    elif case == "ref_weight narrower than hidden":
        kw["ref_weight"] = w[:, :-1]
    elif case == "ref_weight with fewer tokens than the ids":
        kw["ref_weight"] = w[: int(ids[d["mask"]].max())]
    elif case == "ref_bias of another size":
        kw["ref_bias"] = torch.zeros(V + 1, dtype=D)
    elif case == "ref_bias not a tensor":
        kw["ref_bias"], want = [0.0] * V, TypeError
    elif case == "bias not a tensor":
        kw["bias"], want = [0.0] * V, TypeError
    elif case == "lm_head_weight on meta":
        w = w.to("meta")
    elif case == "ref_weight on meta":
        kw["ref_weight"] = w.to("meta")
    else:
        h, ids, adv = torch.tensor(1.0, dtype=D), ids[0, 0], adv[:1]
    name = {"0-d hidden": "hidden", "lm_head_weight on meta": "lm_head_weight", "bias not a tensor": "bias",
            "reference head without ref_hidden": "ref_hidden"}.get(case, case.split()[0])
    with pytest.raises(want, match=name):
        fused_linear_grpo(h, w, ids, adv, d["mask"] if h.dim() == 3 else None, **kw)


def test_a_reference_head_of_its_own_scores_ref_hidden():
    # the checks above let the legitimate forms through: a reference head with its own (wider) vocabulary and bias
    d = _data()
    g = torch.Generator().manual_seed(1)
    rw = torch.randn(V + 3, H, generator=g, dtype=D) * 0.4
    rb = torch.randn(V + 3, generator=g, dtype=D) * 0.3
    loss, _ = fused_linear_grpo(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"], beta=0.1,
                                old_logprobs=d["old"], ref_hidden=d["ref_hidden"], ref_weight=rw, ref_bias=rb)
    lp, _ = _oracle_logps(d["hidden"], d["weight"], None, d["ids"], 1.0)
    ref, _ = _oracle_logps(d["ref_hidden"], rw, rb, d["ids"], 1.0)
    want, _ = grpo_loss(lp, d["adv"], d["mask"], d["old"], ref, beta=0.1)
    torch.testing.assert_close(loss, want)


def test_packed_to_padded_roundtrip():
    x = torch.arange(10.0).view(5, 2)
    padded, mask = packed_to_padded(x, torch.tensor([0, 2, 2, 5]))
    assert padded.shape == (3, 3, 2) and mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert torch.equal(padded[mask], x)
    assert math.isclose(float(padded[1].abs().sum()), 0.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_to_padded(x, torch.tensor([0, 3]))


def test_kl_estimators_against_schulman():
    # k1/k2/k3 of J. Schulman, "Approximating KL Divergence": independent formulas written out
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    r = torch.exp(ref - lp)
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), -torch.log(r))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * torch.log(r) ** 2)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), r - 1 - torch.log(r))


# ------------------------------------------------------------------------------------------------------------------
# the new grpo_loss options against TRL 1.16's GRPOTrainer._compute_loss, driven on plain tensors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("is_mode", [None, "token_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_loss_options_match_trl(level, is_mode, loss_type):
    pytest.importorskip("trl", minversion="1.16")
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(3)
    n, t = 6, 5
    mask = torch.ones(n, t, dtype=torch.long)
    for i, length in enumerate([5, 3, 1, 4, 2, 5]):
        mask[i, length:] = 0
    lp = (-torch.rand(n, t, generator=g, dtype=D) * 2).requires_grad_(True)
    ent = (torch.rand(n, t, generator=g, dtype=D) * 3).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(n, t, generator=g, dtype=D)
    ref = lp.detach() + 0.2 * torch.randn(n, t, generator=g, dtype=D)
    samp = old + 0.4 * torch.randn(n, t, generator=g, dtype=D)
    adv = torch.randn(n, generator=g, dtype=D)
    cap = 1.5
    inputs = dict(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.zeros(n, t, dtype=torch.long), completion_mask=mask, advantages=adv,
        old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum().to(D),
    )
    if is_mode is not None:
        # the weight as TRL's GRPOTrainer._generate_and_score_completions builds it (vllm_importance_sampling_mode)
        diff = (old - samp) * mask
        if is_mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        inputs["importance_sampling_ratio"] = ratio.clamp(max=cap) if is_mode.endswith("truncate") \
            else ratio.masked_fill(ratio > cap, 0.0)

    ident = lambda x, **_: x  # noqa: E731
    metrics_log = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer = object.__new__(GRPOTrainer)
    for k, v in dict(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, use_vllm=is_mode is not None,
        vllm_importance_sampling_correction=is_mode is not None, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=8, _entropy_bonus_enabled=True,
        entropy_coef=0.03, use_adaptive_entropy=False, aux_loss_enabled=False, _metrics=metrics_log,
        accelerator=SimpleNamespace(gather=ident, reduce=ident, gather_for_metrics=ident, num_processes=1,
                                    sync_gradients=False),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    ).items():
        setattr(trainer, k, v)
    want = trainer._compute_loss(None, inputs)
    want_grads = torch.autograd.grad(want, (lp, ent))
    kw = {} if is_mode is None else dict(sampling_logprobs=samp, is_mode=is_mode, is_max=cap)
    got, metrics = grpo_loss(lp, adv, mask, old, ref, beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                             importance_sampling_level=level, entropy=ent, entropy_coef=0.03, **kw)
    got_grads = torch.autograd.grad(got, (lp, ent))
    torch.testing.assert_close(got, want.to(got.dtype))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    for name in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        # TRL averages the clip indicators in float32
        assert float(metrics[name]) == pytest.approx(metrics_log["train"][name][0], rel=1e-6, abs=1e-12), name


def test_no_mask_and_all_masked(torch_mode):
    d, kw = _split(dict(beta=0.04))
    d["mask"] = torch.ones(B, T, dtype=torch.bool)  # every row kept: hidden rows are a view
    _close(_fused(d, **kw), _oracle(d, **kw))
    h = d["hidden"].clone().requires_grad_(True)
    loss, _ = fused_linear_grpo(h, d["weight"], d["ids"], d["adv"], torch.zeros(B, T, dtype=torch.bool), **kw)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(h.grad.abs().max()) == 0.0


def test_bfloat16_inputs_and_sliced_hidden(torch_mode):
    # bf16 hidden/weight (logits chunk in bf16, statistics in float32) and a non-contiguous hidden slice, as
    # model(...).last_hidden_state[:, plen - 1 : -1] gives
    d, kw = _split(dict(beta=0.04, entropy_coef=0.01))
    big = torch.cat([d["hidden"], torch.zeros(B, 1, H, dtype=D)], dim=1).to(torch.bfloat16)
    h_full = big.clone().requires_grad_(True)
    w = d["weight"].to(torch.bfloat16).requires_grad_(True)
    loss, metrics = fused_linear_grpo(h_full[:, :T], w, d["ids"], d["adv"], d["mask"], compute_entropy=True, **kw)
    loss.backward()
    d64 = dict(d, hidden=big[:, :T].double(), weight=w.detach().double())
    want = _oracle(d64, entropy=True, **kw)
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-2, atol=1e-3)  # logits rounded to bf16, as lm_head gives
    torch.testing.assert_close(h_full.grad[:, :T].double(), want[2], rtol=3e-2, atol=3e-3)
    assert float(h_full.grad[:, T:].abs().max()) == 0.0
    torch.testing.assert_close(w.grad.double(), want[3], rtol=3e-2, atol=3e-3)


def test_compute_entropy_must_be_a_bool():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    weight = torch.randn(5, 4, dtype=torch.float64)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="compute_entropy"):
        fused_linear_grpo(hidden, weight, ids, torch.ones(2, dtype=torch.float64), compute_entropy="no")


def test_numbers_are_checked_by_name():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    weight = torch.randn(5, 4, dtype=torch.float64)
    ids, adv = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="beta"):
        fused_linear_grpo(hidden, weight, ids, adv, beta="0.04", ref_logprobs=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="epsilon"):
        fused_linear_grpo(hidden, weight, ids, adv, epsilon="0.2")
    with pytest.raises(ValueError, match="entropy_coef"):
        fused_linear_grpo(hidden, weight, ids, adv, entropy_coef=float("nan"))


def test_completion_mask_holds_bools_or_exactly_0_1(torch_mode):
    """completion_mask went through .to(bool) unchecked: 2 and 0.5 counted as True. Now ValueError naming it;
    int and float 0/1 give the bool mask's numbers."""
    d, kw = _split(dict())
    args = (d["hidden"], d["weight"], d["ids"], d["adv"])
    for bad in (d["mask"].long() * 2, d["mask"].double() * 0.5, torch.where(d["mask"], 1.0, float("nan"))):
        with pytest.raises(ValueError, match="completion_mask must hold bools or exactly 0/1"):
            fused_linear_grpo(*args, bad, **kw)
    with pytest.raises(TypeError, match="completion_mask must be a tensor"):  # the wrong kind: TypeError
        fused_linear_grpo(*args, d["mask"].tolist(), **kw)
    want, _ = fused_linear_grpo(*args, d["mask"], **kw)
    for ok in (d["mask"].long(), d["mask"].double()):
        torch.testing.assert_close(fused_linear_grpo(*args, ok, **kw)[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("case", [dict(importance_sampling_level="sequence", beta=0.04),
                                  dict(importance_sampling_level="sequence", loss_type="dr_grpo",
                                       max_completion_length=T, sampling=True, is_mode="sequence_truncate")],
                         ids=["gspo", "gspo-dr_grpo-seq-is"])
def test_gspo_per_token_advantages_packed_equals_padded(case, torch_mode):
    """GSPO couples each sequence's tokens (two passes) and per-token advantages take the packed side-input path:
    the packed batch gives the padded batch's loss, gradients and metrics (clip ratios included)."""
    d, kw = _split(case)
    g = torch.Generator().manual_seed(7)
    d["adv"] = torch.randn(B, T, generator=g, dtype=D)  # per token
    m = d["mask"]
    want = _fused(d, **kw)
    assert want[1]["clip_ratio/region_mean"] > 0  # the metric is exercised
    cu = torch.cat([torch.zeros(1, dtype=torch.long), m.sum(1).cumsum(0)])
    h = d["hidden"][m].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    side = {k: v[m] for k, v in kw.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    loss, metrics = fused_linear_grpo(h, w, d["ids"][m], d["adv"][m], cu_seqlens=cu, chunk_size=4, **side, **rest)
    loss.backward()
    torch.testing.assert_close(loss, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, want[2][m], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, want[3], rtol=1e-10, atol=1e-12)
    assert set(metrics) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(metrics[k], want[1][k], msg=k)


def test_packed_grpo_batch_of_no_sequence_matches_the_padded_one():
    """A padded batch of 0 rows gives loss 0; its packed form, cu_seqlens = [0], was refused as a bad cu_seqlens."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g, requires_grad=True)
    padded, _ = fused_linear_grpo(torch.zeros(0, 2, 3), weight, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0))
    h = torch.zeros(0, 3, requires_grad=True)
    packed, metrics = fused_linear_grpo(h, weight, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                        cu_seqlens=torch.tensor([0]), compute_entropy=True)
    assert packed.item() == padded.item() == 0.0
    assert metrics["entropy"].item() == 0.0
    gh, gw = torch.autograd.grad(packed, (h, weight))
    assert gh.shape == (0, 3) and (gw == 0).all()


def test_packed_advantages_of_the_wrong_length_name_both_accepted_shapes():
    """Packed: advantages are one per sequence ``(n_seq,)`` or one per token; a vector of another length was
    refused with a message naming only the per-token shape."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(9, 3, generator=g), torch.randn(5, 3, generator=g)
    ids = torch.randint(0, 5, (9,), generator=g)
    cu = torch.tensor([0, 2, 6, 9])
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\) \(one per packed sequence\) or "
                                         r"completion_ids' shape \(9,\)"):
        fused_linear_grpo(h, w, ids, torch.zeros(2), cu_seqlens=cu)
    fused_linear_grpo(h, w, ids, torch.zeros(3), cu_seqlens=cu)
    fused_linear_grpo(h, w, ids, torch.zeros(9), cu_seqlens=cu)


@pytest.mark.parametrize("feature", [(), (5,)])
def test_packed_to_padded_reads_a_batch_dim_of_one_for_a_single_token_too(feature):
    """``(1, total, ...)`` with total = 1 kept the batch dim as an extra one (``(1, 1, H)`` gave ``(1, 1, 1, H)``,
    and the documented ``.sum(1)`` of per-token values a ``(1, 1)`` result); a helper's find, 2026-12-07. The same
    values as ``(total, ...)`` give the same result."""
    for total in (1, 2, 3):
        values = torch.randn(1, total, *feature)
        cu = torch.tensor([0, total])
        padded, mask = packed_to_padded(values, cu)
        assert padded.shape == (1, total, *feature) and mask.shape == (1, total) and bool(mask.all())
        torch.testing.assert_close(padded[0], values[0], rtol=0, atol=0)
        flat, _ = packed_to_padded(values[0], cu)
        torch.testing.assert_close(flat, padded, rtol=0, atol=0)
    assert packed_to_padded(torch.randn(1, 1), torch.tensor([0, 1]))[0].sum(1).shape == (1,)
    # two sequences, 1 token each, packed as (1, 2): the batch dim as before
    padded, _ = packed_to_padded(torch.tensor([[1.0, 2.0]]), torch.tensor([0, 1, 2]))
    assert padded.tolist() == [[1.0], [2.0]]
