"""Gradient accumulation for every loss of alignlab.losses: one big batch == k micro-batches == 2 ranks.

Each case normalises a micro-batch by counts of the *whole optimiser step* (pairs, completions, tokens,
the KTO reference-point sums), summed over the micro-batches of a rank and then over ranks (the all-reduce
is simulated by a sum), and the world size W multiplies the loss because DDP averages gradients over ranks.
The oracle is the same loss called once on the whole step with its default (batch) normalisation, in
float64: loss and gradients must agree to rounding.  Every case also checks the bug class (Unsloth #2055 /
#3527): the mean of the micro-batch means differs from the big batch, so the test would catch a loss that
silently ignored its step-wide counts.

The cases of test_batching.py (DPO/SimPO/CPO/KTO mean x n/N, PPO, GRPO, fused distillation) and the gloo
test of fused GRPO cover the same property for the losses that were exact before these counts existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from alignlab.losses import (
    bradley_terry_loss,
    count_tokens,
    cpo_loss,
    distill_loss,
    dpo_loss,
    forward_kl,
    fused_linear_cpo,
    fused_linear_distill_loss,
    fused_linear_dpo,
    fused_linear_grpo,
    fused_linear_kto,
    fused_linear_orpo,
    fused_linear_simpo,
    generalized_jsd,
    grpo_loss,
    kto_loss,
    linear_cross_entropy,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reverse_kl,
    sequence_kd_loss,
    simpo_loss,
    total_variation,
    una_loss,
)
from alignlab.losses.reward import GRPO_LOSS_TYPES

D = torch.float64
H, V, T = 6, 11, 5
N = 6  # examples (pairs, completions, sequences) in the step
MICRO = [(0, 1), (1, 4), (4, 6)]  # k = 3 uneven micro-batches on one process
RANKS = [[(0, 1), (1, 2)], [(2, 6)]]  # 2 ranks, uneven shards (2 and 4 examples), rank 0 with two micro-batches


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ragged_labels(g, shape, drop=0.35):
    """Token ids with ``-100`` holes, at least one scored token per row (ragged counts)."""
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < drop] = -100
    y[..., 0] = torch.randint(0, V, shape[:-1], generator=g)
    return y


@dataclass
class Case:
    """``data()`` gives per-example tensors (first dim N) and ``leaves`` (names taking gradients; shared
    ones have no example dim); ``counts(d)`` the micro-batch's local counts; ``loss(d, counts)`` the loss
    normalised by the step counts (``counts=None``: the loss's own batch normalisation)."""

    data: Callable[[], dict]
    leaves: tuple[str, ...]
    counts: Callable[[dict], dict]
    loss: Callable[[dict, dict | None], torch.Tensor]
    shared: tuple[str, ...] = ()


def _take(d: dict, lo: int, hi: int, shared: tuple[str, ...]) -> dict:
    return {k: (v if k in shared or not isinstance(v, torch.Tensor) else v[lo:hi]) for k, v in d.items()}


def _add(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in a}


def _leaves(case: Case, d: dict) -> dict:
    return {**d, **{k: d[k].detach().clone().requires_grad_(True) for k in case.leaves}}


def _grads(loss: torch.Tensor, d: dict, case: Case) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, [d[k] for k in case.leaves], allow_unused=True)
    return [torch.zeros_like(d[k]) if g is None else g for k, g in zip(case.leaves, gs)]


def _step(case: Case, d: dict, ranks: list[list[tuple[int, int]]]):
    """Loss and gradients of one optimiser step run as micro-batches on ``len(ranks)`` simulated ranks."""
    # each rank sums its local counts, then the all-reduce (SUM) gives every rank the step's counts
    step = None
    for parts in ranks:
        for lo, hi in parts:
            step = _add(step, case.counts(_take(d, lo, hi, case.shared)))
    world = len(ranks)
    total, rank_grads = 0.0, []
    for parts in ranks:
        acc = None
        for lo, hi in parts:
            loss = case.loss(_take(d, lo, hi, case.shared), step) * world  # DDP will divide by world
            gs = _grads(loss, d, case)
            acc = gs if acc is None else [a + b for a, b in zip(acc, gs)]
            total = total + loss.detach() / world
        rank_grads.append(acc)
    grads = [sum(gs[i] for gs in rank_grads) / world for i in range(len(case.leaves))]  # DDP's average
    return total, grads


# ------------------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------------------
def _pair_hidden_data(seed):
    g = _g(seed)
    return {
        "h": torch.randn(N, 2, T, H, generator=g, dtype=D),  # pair i: [chosen, rejected]
        "y": _ragged_labels(g, (N, 2, T)),
        "w": torch.randn(V, H, generator=g, dtype=D) * 0.4,
        "rc": torch.randn(N, generator=g, dtype=D) - 6,
        "rr": torch.randn(N, generator=g, dtype=D) - 6,
    }


def _stack(t):  # (n, 2, ...) pairs -> (2n, ...) chosen first, then rejected (the fused layout)
    return torch.cat([t[:, 0], t[:, 1]])


def _pair_counts(d):
    return {"num_items": d["h"].shape[0], "num_nll_tokens": int((d["y"][:, 0] != -100).sum())}


def _fused_pair(fn, with_nll=True, **kw):
    def loss(d, c):
        extra = {} if c is None else ({"num_items": c["num_items"]} | (
            {"num_nll_tokens": c["num_nll_tokens"]} if with_nll else {}))
        return fn(_stack(d["h"]), d["w"], _stack(d["y"]), chunk_size=4, **kw, **extra)[0]

    return Case(lambda: _pair_hidden_data(1), ("h", "w"), _pair_counts, loss, shared=("w",))


def _rpo(eager):
    def loss(d, c):
        extra = {} if c is None else {"num_items": c["num_items"], "num_nll_tokens": c["num_nll_tokens"]}
        return fused_linear_dpo(_stack(d["h"]), d["w"], _stack(d["y"]), d["rc"], d["rr"], nll_alpha=0.7,
                                chunk_size=4, eager=eager, **extra)[0]

    return Case(lambda: _pair_hidden_data(2), ("h", "w"), _pair_counts, loss, shared=("w",))


def _kto_data(seed):
    g = _g(seed)
    return {
        "h": torch.randn(N, T, H, generator=g, dtype=D),
        "y": _ragged_labels(g, (N, T)),
        "w": torch.randn(V, H, generator=g, dtype=D) * 0.4,
        "ref": torch.randn(N, generator=g, dtype=D) - 6,
        "good": torch.tensor([True, False, True, True, False, False]),
        # log-probs of the mismatched (prompt, completion) pairs: detached, only the reference point uses them
        "pkl": torch.randn(N, generator=g, dtype=D) - 5,
        "rkl": torch.randn(N, generator=g, dtype=D) - 5.5,
    }


def _kto_counts(d):
    # pass 1 of the two-pass recipe: sum of the KL log-ratios and their count (all-reduced like the rest)
    return {"num_items": d["h"].shape[0], "kl_sum": (d["pkl"] - d["rkl"]).sum(), "kl_n": d["pkl"].shape[0]}


def _kto_kl(c):
    return (c["kl_sum"] / c["kl_n"]).clamp(min=0)


def _fused_kto():
    def loss(d, c):
        kw = ({"policy_kl_logps": d["pkl"], "ref_kl_logps": d["rkl"]} if c is None else
              {"kl": _kto_kl(c), "num_items": c["num_items"]})
        return fused_linear_kto(d["h"], d["w"], d["y"], d["good"], d["ref"], chunk_size=4, **kw)[0]

    return Case(lambda: _kto_data(3), ("h", "w"), _kto_counts, loss, shared=("w",))


def _kto_unfused():
    def data():
        d = _kto_data(4)
        d["pi"] = torch.randn(N, generator=_g(40), dtype=D) - 6
        return d

    def loss(d, c):
        kw = ({"policy_kl_logps": d["pkl"], "ref_kl_logps": d["rkl"]} if c is None else
              {"kl": _kto_kl(c), "num_items": c["num_items"]})
        return kto_loss(d["pi"], d["ref"], d["good"], beta=0.5, desirable_weight=1.3, **kw)[0]

    return Case(data, ("pi",), _kto_counts, loss)


def _seq_logps_data(seed):
    g = _g(seed)
    lengths = torch.tensor([[3, 1], [4, 2], [1, 5], [2, 2], [5, 3], [1, 1]])
    return {
        "pc": -torch.rand(N, generator=g, dtype=D) * 2 - 0.05,  # per-token averaged log-probs (< 0)
        "pr": -torch.rand(N, generator=g, dtype=D) * 2 - 0.05,
        "rc": -torch.rand(N, generator=g, dtype=D) * 2,
        "rr": -torch.rand(N, generator=g, dtype=D) * 2,
        # chosen-token NLL per pair: its sum, and the token count it is over (ragged)
        "nll_sum": torch.rand(N, generator=g, dtype=D) * 4,
        "len": lengths,
        "scores": torch.rand(N, generator=g, dtype=D),
    }


def _nll_counts(d):
    return {"num_items": d["pc"].shape[0], "num_nll_tokens": int(d["len"][:, 0].sum())}


def _nll_term(d, c):
    # the chosen NLL the user feeds to orpo_loss / cpo_loss: a token mean over this batch, or (accumulating)
    # this batch's sum over the step's chosen tokens
    if c is None:
        return d["nll_sum"].sum() / d["len"][:, 0].sum()
    return d["nll_sum"].sum() / c["num_nll_tokens"]


def _unfused(fn):
    def loss(d, c):
        kw = {} if c is None else {"num_items": c["num_items"]}
        return fn(d, c, kw)

    return Case(lambda: _seq_logps_data(5), ("pc", "pr", "nll_sum"), _nll_counts, loss)


def _grpo_data(seed):
    g = _g(seed)
    lens = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = torch.arange(T)[None] < lens[:, None]
    return {
        "lp": -torch.rand(N, T, generator=g, dtype=D) * 3,
        "old": -torch.rand(N, T, generator=g, dtype=D) * 3,
        "ref": -torch.rand(N, T, generator=g, dtype=D) * 3,
        "ent": torch.rand(N, T, generator=g, dtype=D) * 2,
        "adv": torch.randn(N, generator=g, dtype=D),
        "mask": mask,
        "h": torch.randn(N, T, H, generator=g, dtype=D),
        "y": torch.randint(0, V, (N, T), generator=g),
        "w": torch.randn(V, H, generator=g, dtype=D) * 0.4,
    }


def _grpo_counts(loss_type):
    def counts(d):
        tokens = int(d["mask"].sum())
        return {"num_items": tokens if loss_type in ("bnpo", "dapo") else d["mask"].shape[0], "num_tokens": tokens}

    return counts


def _grpo_entropy(loss_type):
    def loss(d, c):
        kw = {} if c is None else c
        return grpo_loss(d["lp"], d["adv"], d["mask"], d["old"], d["ref"], beta=0.05, loss_type=loss_type,
                         entropy=d["ent"], entropy_coef=0.3, max_completion_length=T, **kw)[0]

    return Case(lambda: _grpo_data(6), ("lp", "ent"), _grpo_counts(loss_type), loss)


def _fused_grpo_entropy(loss_type):
    def loss(d, c):
        kw = {} if c is None else c
        return fused_linear_grpo(d["h"], d["w"], d["y"], d["adv"], d["mask"], old_logprobs=d["old"],
                                 ref_logprobs=d["ref"], beta=0.05, loss_type=loss_type, entropy_coef=0.3,
                                 max_completion_length=T, chunk_size=4, **kw)[0]

    return Case(lambda: _grpo_data(7), ("h", "w"), _grpo_counts(loss_type), loss, shared=("w",))


def _token_counts(d):
    return {"num_items": int(d["mask"].sum())}


def _ppo_policy():
    def loss(d, c):
        kw = {} if c is None else c
        return ppo_policy_loss(d["lp"], d["old"], d["adv"], d["mask"], clip_range_high=0.28, **kw)[0]

    return Case(lambda: _grpo_data(8), ("lp",), _token_counts, loss)


def _ppo_value():
    def loss(d, c):
        kw = {} if c is None else c
        # values = lp, old values = old, returns = ref: any three (batch, seq) float tensors
        return ppo_value_loss(d["lp"], d["old"], d["ref"], d["mask"], clip_range_value=0.5, **kw)[0]

    return Case(lambda: _grpo_data(9), ("lp",), _token_counts, loss)


def _bradley_terry():
    def data():
        g = _g(10)
        return {"rc": torch.randn(N, generator=g, dtype=D), "rr": torch.randn(N, generator=g, dtype=D),
                "m": torch.rand(N, generator=g, dtype=D), "len": torch.ones(N)}

    def loss(d, c):
        kw = {} if c is None else c
        return bradley_terry_loss(d["rc"], d["rr"], d["m"], center_coef=0.01, **kw)[0]

    # pairs are uniform here, so a mean of means over unevenly sized micro-batches is what goes wrong
    return Case(data, ("rc", "rr"), lambda d: {"num_items": d["rc"].shape[0]}, loss)


def _kd_data(seed):
    g = _g(seed)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[:, 0] = True
    return {
        "s": torch.randn(N, T, V, generator=g, dtype=D),
        "t": torch.randn(N, T, V, generator=g, dtype=D),
        "mask": mask,
        "y": _ragged_labels(g, (N, T), drop=0.4),
        "h": torch.randn(N, T, H, generator=g, dtype=D),
        "w": torch.randn(V, H, generator=g, dtype=D) * 0.4,
    }


def _mask_counts(d):
    return {"n": d["mask"].sum()}


def _distill(fn, **kw):
    def loss(d, c):
        if c is None:
            return fn(d["s"], d["t"], mask=d["mask"], **kw)
        return fn(d["s"], d["t"], mask=d["mask"], reduction="sum", **kw) / c["n"]

    return Case(lambda: _kd_data(11), ("s",), _mask_counts, loss)


def _fused_distill():
    def loss(d, c):
        if c is None:
            return fused_linear_distill_loss(d["h"], d["w"], d["t"], kind="forward_kl", mask=d["mask"], chunk_size=4)
        return fused_linear_distill_loss(d["h"], d["w"], d["t"], kind="forward_kl", mask=d["mask"],
                                         reduction="sum", chunk_size=4) / c["n"]

    return Case(lambda: _kd_data(12), ("h", "w"), _mask_counts, loss, shared=("w",))


def _sequence_kd():
    def loss(d, c):
        if c is None:
            return sequence_kd_loss(d["s"], d["y"])
        return sequence_kd_loss(d["s"], d["y"], reduction="sum") / c["n"]

    # the targets are the shifted labels: count those
    return Case(lambda: _kd_data(13), ("s",), lambda d: {"n": count_tokens(d["y"][:, 1:])}, loss)


def _cross_entropy():
    def loss(d, c):
        if c is None:
            return linear_cross_entropy(d["h"], d["w"], d["y"], chunk_size=4).loss
        return linear_cross_entropy(d["h"], d["w"], d["y"], reduction="sum", chunk_size=4).loss / c["n"]

    return Case(lambda: _kd_data(14), ("h", "w"), lambda d: {"n": count_tokens(d["y"])}, loss, shared=("w",))


CASES: dict[str, Callable[[], Case]] = {
    # preference, fused: pair term over num_items, NLL over num_nll_tokens
    "fused_linear_dpo": lambda: _fused_pair(fused_linear_dpo, with_nll=False, reference_free=True, beta=0.4),
    "fused_linear_dpo_rpo_nll": lambda: _rpo(eager=False),
    "fused_linear_dpo_rpo_nll_eager": lambda: _rpo(eager=True),
    "fused_linear_orpo": lambda: _fused_pair(fused_linear_orpo),
    "fused_linear_orpo_eager": lambda: _fused_pair(fused_linear_orpo, eager=True),
    "fused_linear_cpo_nll": lambda: _fused_pair(fused_linear_cpo),
    "fused_linear_cpo_simpo_nll": lambda: _fused_pair(fused_linear_cpo, loss_type="simpo"),
    "fused_linear_simpo": lambda: _fused_pair(fused_linear_simpo, with_nll=False),
    "fused_linear_kto_two_pass_kl": _fused_kto,
    # preference, unfused (sequence log-probs in)
    "kto_loss_two_pass_kl": _kto_unfused,
    "dpo_loss": lambda: _unfused(lambda d, c, kw: dpo_loss(
        d["pc"], d["pr"], d["rc"], d["rr"], beta=0.3, loss_type=("sigmoid", "bco_pair"), **kw)[0]),
    "dpo_loss_ipo_lengths": lambda: _unfused(lambda d, c, kw: dpo_loss(
        d["pc"], d["pr"], d["rc"], d["rr"], loss_type="ipo", chosen_lengths=d["len"][:, 0],
        rejected_lengths=d["len"][:, 1], **kw)[0]),
    "orpo_loss": lambda: _unfused(lambda d, c, kw: orpo_loss(d["pc"], d["pr"], _nll_term(d, c), beta=0.2, **kw)[0]),
    "cpo_loss": lambda: _unfused(lambda d, c, kw: cpo_loss(d["pc"], d["pr"], _nll_term(d, c), beta=0.5, **kw)[0]),
    "simpo_loss": lambda: _unfused(lambda d, c, kw: simpo_loss(
        d["pc"], d["pr"], chosen_lengths=d["len"][:, 0], rejected_lengths=d["len"][:, 1], **kw)[0]),
    "una_loss": lambda: _unfused(lambda d, c, kw: una_loss(d["pc"], d["rc"], d["scores"], beta=2.0, **kw)[0]),
    "una_loss_bce": lambda: _unfused(lambda d, c, kw: una_loss(d["pc"], d["rc"], d["scores"], loss_type="bce",
                                                               **kw)[0]),
    "bradley_terry_loss": _bradley_terry,
    # RL
    "grpo_loss_grpo_entropy": lambda: _grpo_entropy("grpo"),
    "grpo_loss_dr_grpo_entropy": lambda: _grpo_entropy("dr_grpo"),
    "grpo_loss_dapo_entropy": lambda: _grpo_entropy("dapo"),
    "fused_linear_grpo_grpo_entropy": lambda: _fused_grpo_entropy("grpo"),
    "fused_linear_grpo_bnpo_entropy": lambda: _fused_grpo_entropy("bnpo"),
    "ppo_policy_loss": _ppo_policy,
    "ppo_value_loss": _ppo_value,
    # SFT and distillation
    "linear_cross_entropy": _cross_entropy,
    "sequence_kd_loss": _sequence_kd,
    "distill_loss": lambda: _distill(distill_loss, kind="jsd", beta=0.3),
    "forward_kl": lambda: _distill(forward_kl, temperature=2.0),
    "reverse_kl": lambda: _distill(reverse_kl),
    "generalized_jsd": lambda: _distill(generalized_jsd, beta=0.7),
    "total_variation": lambda: _distill(total_variation),
    "fused_linear_distill_loss": _fused_distill,
}


@pytest.mark.parametrize("name", list(CASES))
def test_big_batch_equals_micro_batches_equals_two_ranks(name, torch_mode):
    case = CASES[name]()
    d = _leaves(case, case.data())
    big = case.loss(d, None)
    g_big = _grads(big, d, case)
    for ranks in ([MICRO], RANKS):  # k micro-batches on one process; then two ranks
        total, grads = _step(case, d, ranks)
        torch.testing.assert_close(total, big.detach(), rtol=1e-11, atol=1e-12, msg=f"{name} loss, {ranks}")
        for leaf, g, gb in zip(case.leaves, grads, g_big):
            torch.testing.assert_close(g, gb, rtol=1e-9, atol=1e-12, msg=f"{name} d/d{leaf}, {ranks}")
    # the bug class: the mean of the micro-batch means is not the big batch's loss
    naive = sum(case.loss(_take(d, lo, hi, case.shared), None).detach() for lo, hi in MICRO) / len(MICRO)
    assert abs(float(naive - big.detach())) > 1e-6
    # and local counts (no all-reduce) are not enough across ranks
    local = 0.0
    for parts in RANKS:
        rank_counts = None
        for lo, hi in parts:
            rank_counts = _add(rank_counts, case.counts(_take(d, lo, hi, case.shared)))
        local = local + sum(case.loss(_take(d, lo, hi, case.shared), rank_counts).detach() for lo, hi in parts)
    assert abs(float(local / len(RANKS) - big.detach())) > 1e-6


def test_num_items_arguments_are_checked():
    pc, pr = -torch.rand(4, dtype=D), -torch.rand(4, dtype=D)
    with pytest.raises(TypeError, match="num_items"):
        dpo_loss(pc, pr, pc, pr, num_items="4")
    with pytest.raises(ValueError, match="num_items"):
        kto_loss(pc, pr, pc > -0.5, kl=0.0, num_items=float("nan"))
    # a count over the world size (TRL passes num_items / W instead of scaling the loss) is a float
    torch.testing.assert_close(dpo_loss(pc, pr, pc * 0.5, pr, num_items=2.5)[0],
                               dpo_loss(pc, pr, pc * 0.5, pr, reduction="sum")[0] / 2.5)
    with pytest.raises(ValueError, match="num_items"):
        simpo_loss(pc, pr, num_items=-1)
    with pytest.raises(ValueError, match="num_items"):
        orpo_loss(pc, pr, num_items=torch.ones(2))
    with pytest.raises(ValueError, match="reduction='mean'"):
        cpo_loss(pc, pr, cpo_alpha=0.0, reduction="sum", num_items=4)
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(pc, pr, pc, pr, loss_type="aot_pair", num_items=4)
    with pytest.raises(ValueError, match="num_items"):
        bradley_terry_loss(pc, pr, reduction="none", num_items=4)
    with pytest.raises(TypeError, match="num_tokens"):
        grpo_loss(pc[None], pc[:1], num_tokens="7")
    with pytest.raises(TypeError, match="num_nll_tokens"):
        fused_linear_orpo(torch.zeros(2, 3, H, dtype=D), torch.zeros(V, H, dtype=D),
                          torch.zeros(2, 3, dtype=torch.long), num_nll_tokens=[1])
    with pytest.raises(TypeError, match="num_items"):
        ppo_value_loss(pc[None], pc[None], pc[None], num_items=[3])
    # a tensor count is read on the device (no host sync) and gives the int's result: the sum over the count
    s = torch.rand(4, generator=_g(0), dtype=D)
    a = una_loss(pc, pr, s, num_items=torch.tensor(9))[0]
    torch.testing.assert_close(a, una_loss(pc, pr, s, num_items=9)[0])
    torch.testing.assert_close(a, una_loss(pc, pr, s, reduction="sum")[0] / 9)


def test_a_zero_step_count_means_an_empty_step():
    """A step-wide count of 0 says the whole step is empty: with pairs or tokens in this batch it is refused
    (it used to divide by 1 and return this batch's sum); with nothing to count the loss is 0, not NaN."""
    pc, pr = -torch.rand(4, generator=_g(1), dtype=D), -torch.rand(4, generator=_g(2), dtype=D)
    lp = -torch.rand(2, T, generator=_g(3), dtype=D)
    adv, s = torch.tensor([0.5, -1.0], dtype=D), torch.rand(4, generator=_g(4), dtype=D)
    hid, w = torch.randn(2, T, H, generator=_g(5), dtype=D), torch.randn(V, H, generator=_g(6), dtype=D)
    ids = torch.randint(0, V, (2, T), generator=_g(7))
    calls = {
        "dpo": lambda n: dpo_loss(pc, pr, pc * 0.5, pr, num_items=n),
        "kto": lambda n: kto_loss(pc, pr, pc > -0.5, kl=0.0, num_items=n),
        "simpo": lambda n: simpo_loss(pc, pr, num_items=n),
        "orpo": lambda n: orpo_loss(pc, pr, num_items=n),
        "cpo": lambda n: cpo_loss(pc, pr, cpo_alpha=0.0, num_items=n),
        "una": lambda n: una_loss(pc, pr, s, num_items=n),
        "bradley_terry": lambda n: bradley_terry_loss(pc, pr, num_items=n),
        "ppo_policy_token": lambda n: ppo_policy_loss(lp, lp.detach(), adv, num_items=n),
        "ppo_policy_sequence": lambda n: ppo_policy_loss(lp, lp.detach(), adv, aggregation="sequence", num_items=n),
        "ppo_value": lambda n: ppo_value_loss(lp, lp.detach(), lp.detach() + 1, num_items=n),
        **{f"grpo_{t}": (lambda t: lambda n: grpo_loss(lp, adv, loss_type=t, num_items=n))(t) for t in GRPO_LOSS_TYPES},
        **{f"fused_grpo_{t}": (lambda t: lambda n: fused_linear_grpo(hid, w, ids, adv, loss_type=t, num_items=n))(t)
           for t in GRPO_LOSS_TYPES},
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="num_items must be > 0"):
            call(0)
        with pytest.raises(ValueError, match="num_items must be > 0"):
            call(0.0)
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        grpo_loss(lp, adv, entropy=-lp.detach(), entropy_coef=0.1, num_tokens=0)
    with pytest.raises(ValueError, match="num_nll_tokens must be > 0"):
        fused_linear_orpo(torch.randn(2, T, H, dtype=D), w, ids, num_nll_tokens=0)
    empty = torch.zeros(0, dtype=D, requires_grad=True)
    for loss in (dpo_loss(empty, empty, empty, empty, num_items=0)[0], bradley_terry_loss(empty, empty, num_items=0)[0],
                 grpo_loss(lp, adv, torch.zeros(2, T, dtype=torch.bool), loss_type="dapo", num_items=0)[0]):
        assert loss.item() == 0.0
    # a count under 1 (a count over the world size: 1 pair on 4 ranks) divides as it is, a number or a tensor
    for n in (0.25, torch.tensor(0.25, dtype=D)):
        torch.testing.assert_close(dpo_loss(pc, pr, pc * 0.5, pr, num_items=n)[0],
                                   dpo_loss(pc, pr, pc * 0.5, pr, reduction="sum")[0] / 0.25)
        torch.testing.assert_close(grpo_loss(lp, adv, loss_type="dapo", num_items=n)[0],
                                   grpo_loss(lp, adv, loss_type="dapo", num_items=1)[0] / 0.25)


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_aot_accumulation_is_bounded_not_exact(loss_type):
    """AOT sorts over the batch, so micro-batches pair other ranks; the documented bound:
    0 <= L_acc - L_big <= beta * min(range(x), range(y)) for the sorted-against values x, y."""
    g = _g(20)
    beta = 0.7
    gaps = []
    for trial in range(20):
        n = 9
        pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=D) * 2 for _ in range(4))
        ls = 0.2 if trial % 2 else 0.0
        big = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)[0]
        cuts = sorted(torch.randperm(n - 1, generator=g)[:2].add(1).tolist())
        parts = list(zip([0, *cuts], [*cuts, n]))
        acc = sum(dpo_loss(pc[lo:hi], pr[lo:hi], rc[lo:hi], rr[lo:hi], beta=beta, loss_type=loss_type,
                           label_smoothing=ls)[0] * (hi - lo) / n for lo, hi in parts)
        x, y = (pc - pr, rc - rr) if loss_type == "aot" else (pc - rc, pr - rr)
        bound = beta * min(float(x.max() - x.min()), float(y.max() - y.min()))
        gap = float(acc - big)
        assert -1e-12 <= gap <= bound + 1e-12, (trial, gap, bound)
        gaps.append(gap)
    assert max(gaps) > 1e-3  # not exact


def test_docs_inventory_covers_every_name_and_names_real_tests():
    """docs/rl.md "Batching: what is exact": one row per name of alignlab.losses.__all__, and every test it
    names exists (A cases in CASES, test functions in tests/losses)."""
    import re
    from pathlib import Path

    import alignlab.losses as losses

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "rl.md").read_text()
    table = text.split("### Batching: what is exact", 1)[1].split("**Not exact in one pass, and why.**", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = [n for row in rows for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row.split("|")[1])]
    assert sorted(names) == sorted(losses.__all__)
    sources = "\n".join(p.read_text() for p in (root / "tests" / "losses").glob("*.py"))
    for row in rows:
        for test in re.findall(r"\b(test_\w+)\b(?!\.)", row):
            assert f"def {test}(" in sources, test
        for case in re.findall(r"`\[(\w+)\]`", row):
            assert case in CASES or f'"{case}"' in sources, case


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
@pytest.mark.parametrize("reference_free", [False, True])
def test_aot_two_pass_is_exact(loss_type, reference_free):
    """With the step's log-probs from a first pass (gathered over ranks), each micro-batch sorts against the
    whole step: k micro-batches and 2 ranks give the one-batch AOT loss and gradients."""
    g = _g(21)
    pc, pr = ((torch.randn(N, generator=g, dtype=D) - 4).requires_grad_(True) for _ in range(2))
    rc, rr = (torch.randn(N, generator=g, dtype=D) - 4 for _ in range(2))
    refs = (None, None) if reference_free else (rc, rr)
    kw = dict(beta=0.6, loss_type=loss_type, label_smoothing=0.1, reference_free=reference_free)
    big = dpo_loss(pc, pr, *refs, **kw)[0]
    g_big = torch.autograd.grad(big, (pc, pr))
    step = (pc.detach(), pr.detach(), *refs)  # pass 1, no gradient (all_gather over ranks)
    for ranks in ([MICRO], RANKS):
        world, total, grads = len(ranks), 0.0, [torch.zeros(N, dtype=D), torch.zeros(N, dtype=D)]
        for parts in ranks:
            for lo, hi in parts:
                local_refs = refs if reference_free else (rc[lo:hi], rr[lo:hi])
                loss = dpo_loss(pc[lo:hi], pr[lo:hi], *local_refs, aot_step_logps=step, aot_step_offset=lo,
                                **kw)[0] * world
                for acc, gr in zip(grads, torch.autograd.grad(loss, (pc, pr))):
                    acc += gr / world  # DDP's average over ranks
                total = total + loss.detach() / world
        torch.testing.assert_close(total, big.detach(), rtol=1e-12, atol=1e-13)
        for gr, gb in zip(grads, g_big):
            torch.testing.assert_close(gr, gb, rtol=1e-10, atol=1e-13)
    # reduction="sum" over the step's pairs is the same thing
    s = sum(dpo_loss(pc[lo:hi], pr[lo:hi], *(refs if reference_free else (rc[lo:hi], rr[lo:hi])),
                     aot_step_logps=step, aot_step_offset=lo, reduction="sum", **kw)[0].detach() for lo, hi in MICRO)
    torch.testing.assert_close(s / N, big.detach())


def test_aot_step_arguments_are_checked():
    pc, pr = -torch.rand(4, dtype=D), -torch.rand(4, dtype=D)
    step = (pc, pr, pc, pr)
    with pytest.raises(ValueError, match="aot_step_logps applies"):
        dpo_loss(pc, pr, pc, pr, aot_step_logps=step)
    with pytest.raises(ValueError, match="aot_step_offset"):
        dpo_loss(pc[:2], pr[:2], pc[:2], pr[:2], loss_type="aot", aot_step_logps=step, aot_step_offset=3)
    with pytest.raises(ValueError, match="aot_step_logps"):
        dpo_loss(pc, pr, pc, pr, loss_type="aot", aot_step_logps=step[:3])
    with pytest.raises(ValueError, match="reduction"):
        dpo_loss(pc, pr, pc, pr, loss_type="aot", aot_step_logps=step, reduction="none")
    with pytest.raises(ValueError, match="aot_step_logps"):
        dpo_loss(pc, pr, pc, pr, loss_type="aot", num_items=8)


def test_aot_two_pass_through_fused_dpo(torch_mode):
    """fused_linear_dpo passes aot_step_logps on to dpo_loss: pass 1 = completion_logps without gradient."""
    from alignlab.losses import completion_logps

    d = _pair_hidden_data(22)
    h, w = d["h"].clone().requires_grad_(True), d["w"].clone().requires_grad_(True)
    kw = dict(beta=0.5, loss_type="aot_pair", chunk_size=4)
    big = fused_linear_dpo(_stack(h), w, _stack(d["y"]), d["rc"], d["rr"], **kw)[0]
    g_big = torch.autograd.grad(big, (h, w))
    with torch.no_grad():
        seq = completion_logps(_stack(h), w, _stack(d["y"]))[1]
    step = (seq[:N], seq[N:], d["rc"], d["rr"])
    total, gh, gw = 0.0, torch.zeros_like(h), torch.zeros_like(w)
    for lo, hi in MICRO:
        loss = fused_linear_dpo(_stack(h[lo:hi]), w, _stack(d["y"][lo:hi]), d["rc"][lo:hi], d["rr"][lo:hi],
                                aot_step_logps=step, aot_step_offset=lo, **kw)[0]
        a, b = torch.autograd.grad(loss, (h, w))
        total, gh, gw = total + loss.detach(), gh + a, gw + b
    torch.testing.assert_close(total, big.detach(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gh, g_big[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, g_big[1], rtol=1e-9, atol=1e-12)


def test_ppo_policy_loss_checks_num_items():
    """ppo_policy_loss divided by any num_items it was given: -1 flipped the loss's sign, a (2,) tensor gave a
    (2,) loss, NaN a NaN loss; it now refuses them like every other loss."""
    lp, old = torch.rand(2, 3, dtype=D), torch.rand(2, 3, dtype=D)
    adv = torch.rand(2, dtype=D)
    for aggregation in ("token", "sequence"):
        for bad in (-1, float("nan"), torch.ones(2)):
            with pytest.raises(ValueError, match="num_items"):
                ppo_policy_loss(lp, old, adv, aggregation=aggregation, num_items=bad)
        for bad in ("6", True, [6]):
            with pytest.raises(TypeError, match="num_items"):
                ppo_policy_loss(lp, old, adv, aggregation=aggregation, num_items=bad)
