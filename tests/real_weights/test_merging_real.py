"""Merge methods on real weight distributions, with mergekit as the oracle.

One checkpoint gives several real "models" of the same shape: the base is encoder layer 1's weight,
the two variants are layers 3 and 5's weights of the same kind. Their differences are real,
heavy-tailed task vectors (outlier rows, a few huge entries), unlike the Gaussian deltas of the
random tests, which is where trimming (TIES) and sign election actually have something to decide.
"""

from __future__ import annotations

import pytest
import torch

from alignlab import merging as M

KINDS = ["attention.self.query", "intermediate.dense", "output.dense"]


def _mergekit():
    return pytest.importorskip("mergekit.merge_methods", reason="mergekit is the oracle for these checks")


def _triples(state):
    for kind in KINDS:
        base, a, b = (state[f"encoder.layer.{i}.{kind}.weight"].float() for i in (1, 3, 5))
        yield kind, base, [a, b]


def test_equal_to_mergekit_on_real_weights(minilm_state):
    """Bit-identical for the deterministic methods; SLERP up to float32 rounding of its reductions."""
    mk = _mergekit()
    w, ids = [0.6, 0.4], {1: 0.6, 2: 0.4}

    def run(method, tensors, params, base_index=0):
        return mk.merge_tensors(tensors, method, parameters=params, base_index=base_index,
                                dtype=torch.float32, out_dtype=torch.float32)

    for kind, base, ms in _triples(minilm_state):
        # SLERP: the norms and the dot product come from one fused pass here, so float32 summation order differs
        # from mergekit's; equal up to that rounding, and at least as close as mergekit to the float64 formula
        theirs, ours = run("slerp", [ms[0], ms[1]], {"t": 0.3}), M.slerp(ms[0], ms[1], 0.3)
        exact = M.slerp(ms[0].double(), ms[1].double(), 0.3)
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7, msg=f"slerp on {kind}")
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() * 1.01 + 1e-9, kind
        cases = {
            "task_arithmetic": (run("task_arithmetic", [base, *ms], {"weight": ids, "lambda": 0.9}),
                                M.task_arithmetic(base, ms, w, lambda_=0.9)),
            "linear": (run("linear", [base, *ms], {"weight": [0.2, *w]}, None), M.linear([base, *ms], [0.2, *w])),
            "karcher": (run("karcher", [base, *ms], {}, None), M.karcher([base, *ms])),
            "model_stock": (run("model_stock", [base, *ms], {}), M.model_stock(base, ms)),
            "breadcrumbs": (run("breadcrumbs", [base, *ms], {"weight": ids, "density": 0.6, "gamma": 0.05}),
                            M.breadcrumbs(base, ms, w, density=0.6, gamma=0.05)),
        }
        for method, (theirs, ours) in cases.items():
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"{method} on {kind}")


def test_ties_matches_mergekit_on_real_task_vectors(minilm_state):
    mk = _mergekit()
    for kind, base, ms in _triples(minilm_state):
        theirs = mk.merge_tensors([base, *ms], "ties", parameters={"weight": 1.0, "density": 0.3},
                                  base_index=0, dtype=torch.float32, out_dtype=torch.float32)
        ours = M.ties(base, ms, density=0.3)
        # fp32 task vectors can still tie at the trim threshold; only such entries may differ
        at_threshold = torch.zeros_like(base, dtype=torch.bool)
        for m in ms:
            d = (m - base).abs()
            k = int(0.3 * d.numel())
            at_threshold |= d == d.reshape(-1).sort(descending=True).values[k - 1]
        assert not ((ours != theirs) & ~at_threshold).any(), kind
        # and the real deltas make TIES differ from a plain sum of task vectors
        assert (ours - M.task_arithmetic(base, ms)).abs().max() > 1e-3, kind


def test_chipalign_on_real_weights_follows_its_formula(minilm_state):
    """ChipAlign (arXiv 2412.19819): the direction moves along the great circle from A to B, the norm
    is interpolated geometrically, ``||W|| = ||A||^(1-λ) ||B||^λ``."""
    lam = 0.35
    for kind, _, (a, b) in _triples(minilm_state):
        out = M.chipalign(a, b, lam).double()
        a64, b64 = a.double(), b.double()
        want_norm = a64.norm() ** (1 - lam) * b64.norm() ** lam
        torch.testing.assert_close(out.norm(), want_norm, rtol=1e-5, atol=0)
        ua, ub, uo = a64 / a64.norm(), b64 / b64.norm(), out / out.norm()
        theta = torch.arccos((ua * ub).sum())
        torch.testing.assert_close(torch.arccos((ua * uo).sum().clamp(-1, 1)), lam * theta, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.arccos((ub * uo).sum().clamp(-1, 1)), (1 - lam) * theta, rtol=1e-4, atol=1e-6)


def test_dare_keeps_the_expected_task_vector_on_real_deltas(minilm_state):
    """DARE (arXiv 2311.03099) drops a fraction 1 - p of each delta and rescales the rest by 1/p, so the
    merge is unbiased: its mean over many masks is task arithmetic, and each mask keeps about p."""
    kind, base, ms = next(_triples(minilm_state))
    base, ms = base[:64], [m[:64] for m in ms]  # 64 real rows: enough entries, fast
    g = torch.Generator().manual_seed(0)
    density, n = 0.4, 200
    mean = sum(M.dare(base, ms, density=density, generator=g) for _ in range(n)) / n
    want = M.task_arithmetic(base, ms)
    delta = (want - base).abs().mean()
    assert (mean - want).abs().mean() < 0.25 * delta, kind  # Monte-Carlo error ~ sqrt((1-p)/(p n)) ≈ 0.09
    one = M.dare(base, [ms[0]], density=density, generator=g)
    kept = float(((one - base) != 0).float().mean())
    assert abs(kept - density) < 0.02, kept
