"""Merge methods vs formulas written out independently (numpy, float64) and vs mergekit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlab.merging import methods as M


def _models(n=3, shape=(17, 13), dtype=torch.float32, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _np(t):
    return t.double().numpy()


# --------------------------------------------------------------------------- numpy oracles


def np_topk_mask(delta, density):
    flat = np.abs(delta).ravel()
    k = max(1, int(density * flat.size))
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


def np_ties(base, models, weights, density, normalize=True, lam=1.0):
    deltas = []
    for m in models:
        d = m - base
        deltas.append(np.where(np_topk_mask(d, density), d, 0.0) if density < 1 else d)
    wd = [w * d for w, d in zip(weights, deltas)]
    total = sum(wd)
    sign = np.where(total >= 0, 1.0, -1.0)
    num = np.zeros_like(base)
    den = np.zeros_like(base)
    for w, d in zip(weights, wd):
        agree = np.sign(d) == sign
        num += np.where(agree, d, 0)
        den += np.where(agree, w, 0)
    den[den == 0] = 1
    mixed = num / den if normalize else num
    return base + lam * mixed


def np_slerp(a, b, t, thr=0.9995):
    x, y = a.ravel(), b.ravel()
    dot = np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1)
    if abs(dot) > thr:
        return ((1 - t) * x + t * y).reshape(a.shape)
    om = np.arccos(dot)
    return ((np.sin((1 - t) * om) * x + np.sin(t * om) * y) / np.sin(om)).reshape(a.shape)


# --------------------------------------------------------------------------- formulas


def test_linear_formula():
    _, ms = _models(4)
    w = [0.1, 0.5, -0.2, 0.9]
    want = sum(wi * _np(m) for wi, m in zip(w, ms))
    np.testing.assert_allclose(_np(M.linear(ms, w)), want / sum(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(M.linear(ms, w, normalize=False)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(M.linear(ms)), sum(_np(m) for m in ms) / 4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_formula(normalize):
    base, ms = _models(3)
    w, lam = [0.5, 0.3, 0.7], 0.8
    mixed = sum(wi * (_np(m) - _np(base)) for wi, m in zip(w, ms))
    if normalize:
        mixed = mixed / sum(w)
    got = M.task_arithmetic(base, ms, w, normalize=normalize, lambda_=lam)
    np.testing.assert_allclose(_np(got), _np(base) + lam * mixed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_formula(density, normalize):
    base, ms = _models(3, shape=(31, 7))
    w = [0.5, 0.3, 0.7]
    got = M.ties(base, ms, w, density=density, normalize=normalize, lambda_=0.9)
    want = np_ties(_np(base), [_np(m) for m in ms], w, density, normalize, 0.9)
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-6)


def test_ties_count_consensus_and_per_model_density():
    base = torch.zeros(5)
    ms = [torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0]), torch.tensor([1.0, 3.0, -0.2, 0.0, -1.0]),
          torch.tensor([-5.0, 1.0, -0.1, 1.0, -1.0])]
    # by mass: elem0 sum=-3 -> '-', only model 2 agrees; by count: 2 of 3 positive -> '+'
    by_mass = M.ties(base, ms, density=1.0)
    by_count = M.ties(base, ms, density=1.0, consensus="count")
    assert by_mass[0] == -5.0 and by_count[0] == 1.0
    # elem3: only model 2 is nonzero; zeros never agree so the mean is over one model
    assert by_mass[3] == 1.0
    dens = M.ties(base, ms, density=[1.0, 0.2, 1.0])  # model 1 keeps only its top element (3.0)
    want = np_ties(np.zeros(5), [_np(ms[0]), np.array([0, 3.0, 0, 0, 0]), _np(ms[2])], [1, 1, 1], 1.0)
    np.testing.assert_allclose(_np(dens), want)


def test_magnitude_mask_ties_broken_by_position():
    d = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    mask = M.magnitude_mask(d, 0.5)  # k=3 of the four |2|s: the first three
    assert mask.tolist() == [False, True, True, False, True, False]
    assert M.magnitude_mask(d, 0.0).sum() == 0 and M.magnitude_mask(d, 1.0).all()
    assert M.magnitude_mask(d, 0.01).sum() == 1  # at least one element survives a positive density
    for bad in (1.5, 20, -0.1):  # a percentage or a sign slip is refused, not clamped to keep all / nothing
        with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
            M.magnitude_mask(d, bad)


def test_slerp_formula_and_endpoints():
    a, (b,) = _models(1, shape=(40, 9), scale=1.0)
    for t in (0.0, 0.3, 0.5, 1.0, 1.4):
        np.testing.assert_allclose(_np(M.slerp(a, b, t)), np_slerp(_np(a), _np(b), t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(M.slerp(a, b, 0.0), a)
    torch.testing.assert_close(M.slerp(a, b, 1.0), b, rtol=1e-5, atol=1e-5)


def test_slerp_lerp_fallback_threshold():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1000, generator=g, dtype=torch.float64)
    noise = torch.randn(1000, generator=g, dtype=torch.float64)
    noise -= (noise @ a) / (a @ a) * a  # orthogonal to a
    for cos, lerp in ((0.9999, True), (0.999, False)):
        # b at angle arccos(cos) from a
        b = cos * a / a.norm() + math.sqrt(1 - cos**2) * noise / noise.norm()
        b = 3.0 * b
        got = M.slerp(a, b, 0.25)
        lerped = 0.75 * a + 0.25 * b
        assert torch.allclose(got, lerped, rtol=0, atol=1e-12) is lerp
        np.testing.assert_allclose(got.numpy(), np_slerp(a.numpy(), b.numpy(), 0.25), rtol=1e-10)
    # antipodal: also lerp (no unique great circle)
    torch.testing.assert_close(M.slerp(a, -a, 0.25), 0.75 * a - 0.25 * a)


def test_slerp_chunked_equals_unchunked(monkeypatch):
    a, (b,) = _models(1, shape=(1000, 7), scale=1.0, dtype=torch.float64)
    whole = M.slerp(a, b, 0.4)
    monkeypatch.setattr(M, "_SLERP_CHUNK", 999)  # last chunk partial
    torch.testing.assert_close(M.slerp(a, b, 0.4), whole, rtol=1e-12, atol=1e-12)


def test_dare_drops_and_rescales():
    base, ms = _models(2, shape=(200, 50))
    g = torch.Generator().manual_seed(0)
    out = M.dare(base, ms[:1], density=0.3, generator=g)
    d = _np(ms[0]) - _np(base)
    got = _np(out) - _np(base)
    kept = np.abs(got) > 0
    np.testing.assert_allclose(got[kept], d[kept] / 0.3, rtol=1e-4, atol=1e-6)  # rescale 1/(1-p)
    assert abs(kept.mean() - 0.3) < 0.02
    # seeded -> reproducible; another seed -> different mask
    again = M.dare(base, ms[:1], density=0.3, generator=torch.Generator().manual_seed(0))
    other = M.dare(base, ms[:1], density=0.3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    assert not torch.equal(out, other)
    # unbiased: the expectation of the dropped-and-rescaled delta is the delta itself
    b, m = base[:4, :5], ms[0][:4, :5]
    mean = sum(_np(M.dare(b, [m], density=0.5, generator=torch.Generator().manual_seed(s))) for s in range(1000)) / 1000
    sd = np.abs(d[:4, :5]) / math.sqrt(1000)  # per-entry std of the mean at density 0.5
    assert (np.abs(mean - _np(b) - d[:4, :5]) <= 5 * sd + 1e-6).all()


def test_dare_l1_rescale_and_ties():
    base, ms = _models(3, shape=(64, 16))
    g = torch.Generator().manual_seed(0)
    out = M.dare(base, ms[:1], density=0.5, rescale="l1", generator=g)
    d = _np(ms[0]) - _np(base)
    np.testing.assert_allclose(np.abs(_np(out) - _np(base)).sum(), np.abs(d).sum(), rtol=1e-4)
    # with consensus the masked deltas go through the TIES combination
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    dt = M.dare(base, ms, [1, 2, 3], density=0.6, consensus="sum", normalize=True, generator=g1)
    masked = [_np(base) + np.where(M.dare_mask(m, 0.6, g2).numpy(), _np(m) - _np(base), 0) / 0.6 for m in ms]
    np.testing.assert_allclose(_np(dt), np_ties(_np(base), masked, [1, 2, 3], 1.0), rtol=1e-5, atol=1e-5)


def test_breadcrumbs_drops_both_tails():
    base = torch.zeros(10)
    m = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)
    out = M.breadcrumbs(base, [m], density=0.5, gamma=0.2)
    # keep 5 of 10: drop the 2 largest |.| (10, 9) and the 3 smallest (1, 2, 3)
    want = np.where(np.isin(np.abs(_np(m)), [4, 5, 6, 7, 8]), _np(m), 0)
    np.testing.assert_array_equal(_np(out), want)


def test_dare_masks_follow_the_tensors_device():
    """DARE drew its masks on the CPU and applied them with ``torch.where`` to task vectors on the inputs'
    device: on CUDA tensors it raised "Expected all tensors to be on the same device" (DELLA drew from a CPU
    generator on CUDA tensors: "Expected a 'cuda' device type for generator"). Masks are still drawn on the CPU
    (one seed, one merge on every device) and moved to the tensors' device. The meta device stands in for
    CUDA here (CI has no GPU): the same device check failed on it."""
    base, ms = _models(2, shape=(64, 48))
    base, ms = base.to("meta"), [m.to("meta") for m in ms]
    for kw in ({}, {"rescale": None, "consensus": "sum"}, {"density": [0.5, 1.0]}):
        out = M.dare(base, ms, **{"density": 0.5, **kw})
        assert out.device.type == "meta" and out.shape == base.shape
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator"):
        M.dare(*_models(1), density=0.5, generator=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dare", "dare_l1", "della"])
def test_dare_and_della_on_cuda_equal_the_cpu_merge(method):
    base, ms = _models(3, shape=(300, 257))
    merge = {"dare": lambda b, m, g: M.dare(b, m, density=0.4, generator=g),
             "dare_l1": lambda b, m, g: M.dare(b, m, density=0.4, rescale="l1", consensus="sum", generator=g),
             "della": lambda b, m, g: M.della(b, m, density=0.4, epsilon=0.1, generator=g)}[method]
    want = merge(base, ms, torch.Generator().manual_seed(0))
    got = merge(base.cuda(), [m.cuda() for m in ms], torch.Generator().manual_seed(0))
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        merge(base.cuda(), [m.cuda() for m in ms], torch.Generator("cuda").manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_breadcrumbs_with_inf_on_cuda_equals_the_cpu_merge():
    """Task vectors with inf/NaN take breadcrumbs' whole-tensor sort, whose mask was a CPU tensor."""
    base, ms = _models(2, shape=(300, 257))
    ms[0][3, 5] = float("inf")
    want = M.breadcrumbs(base, ms, density=0.5)
    got = M.breadcrumbs(base.cuda(), [m.cuda() for m in ms], density=0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)


def test_della_keep_probabilities_and_rescale():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 11, generator=g)
    mask, p = M.della_mask(delta, 0.5, 0.2, torch.Generator().manual_seed(0))
    ranks = np.argsort(np.argsort(np.abs(delta.numpy()), axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_allclose(p.numpy(), 0.3 + 0.4 * ranks / 10, rtol=1e-6)
    base = torch.zeros(8, 11)
    out = M.della(base, [delta], density=0.5, epsilon=0.2, consensus=None, normalize=False,
                  generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out.numpy(), np.where(mask.numpy(), delta.numpy() / p.numpy(), 0), rtol=1e-5)
    big = torch.randn(400, 500, generator=g)
    m, _ = M.della_mask(big, 0.4, 0.1, g)
    assert abs(m.float().mean().item() - 0.4) < 0.01
    top = big.abs() > big.abs().quantile(0.9)
    assert m[top].float().mean() > 0.48  # large entries survive more often
    with pytest.raises(ValueError, match="epsilon"):
        M.della(base, [delta], density=0.9, epsilon=0.2)


def _whole_tensor_masks(base, ms, dens, generator, draw):
    """Masked task vectors the straightforward way: whole tensors, model after model, one generator."""
    wd = torch.float64 if base.dtype == torch.float64 else torch.float32
    out = []
    for m, rho in zip(ms, dens):
        d = m.to(wd) - base.to(wd)
        if rho >= 1.0:
            out.append((d, None, None))
        elif rho <= 0.0:
            out.append((torch.zeros_like(d), None, None))
        else:
            kept, p = draw(d, rho, generator)
            out.append((d, kept, p))
    return out


def _rescaled(d, kept, p, rescale):
    if kept is None:
        return d
    r = torch.where(kept, d, 0.0)
    if rescale == "inverse":
        return r / p
    if rescale == "l1":
        before, after = d.abs().sum(), r.abs().sum()
        return r if before < 1e-7 or after < 1e-7 else r * (before / after)
    return r


def _np_breadcrumbs_mask(d, density, gamma):
    """Stable ascending sort of |δ| (float32): keep ranks [n - keep - ⌊γn⌋, ... + keep) (clamped at 0)."""
    flat = np.abs(d.float().numpy().ravel())
    n, keep = flat.size, int(density * flat.size)
    start = max(0, n - keep - int(gamma * n))
    mask = np.zeros(n, bool)
    mask[np.argsort(flat, kind="stable")[start : start + keep]] = True
    return torch.from_numpy(mask.reshape(d.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(37, 53), (4001,), (3, 7, 11)])
def test_dare_della_breadcrumbs_chunked_equal_the_whole_tensor_formulation(monkeypatch, dtype, shape):
    """Chunked DARE / DELLA / breadcrumbs (tiny chunks, many chunks, partial last chunk; radix selection
    forced) against the whole-tensor formulation: each model's mask drawn over its whole task vector, model
    after model from one generator (dare_mask / della_mask), breadcrumbs by a stable sort, combined by
    combine_deltas. Bit for bit, and the caller's generator ends in the same state; the one exception is
    rescale="l1" with float32 arithmetic, whose L1 norms are now summed chunk by chunk (float64 across
    chunks), so the rescale factor, and with it the result, may move by a float32 ulp or two."""
    monkeypatch.setattr(M, "_CHUNK", 1000)
    monkeypatch.setattr(M, "_FAST_CHUNK", 512)
    monkeypatch.setattr(M, "_RADIX_MIN", 100)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    ms = [(base.double() + torch.randn(shape, generator=g) * s).to(dtype) for s in (0.01, 0.1, 0.0)]
    W = [0.5, -0.3, 0.7]
    width = shape[-1]
    draws = {
        "dare": (lambda d, rho, gen: (M.dare_mask(d, rho, gen), rho)),
        "della": (lambda d, rho, gen: (lambda mp: (mp[0], mp[1].to(d.dtype)))(
            M.della_mask(d.reshape(-1, width), rho, 0.1, gen))),
    }
    cases = [dict(density=[0.3, 0.8, 0.5]), dict(density=0.5, consensus="sum", normalize=True),
             dict(density=[1.0, 0.6, 0.2], rescale=None, consensus="count"),
             dict(density=[0.4, 1.0, 0.7], rescale="l1")]
    for name, draw in draws.items():
        for kw in cases:
            kw = {"rescale": "inverse", "consensus": None, "normalize": False, **kw}
            dens = M._densities(kw["density"], 3)
            g_ref, g_new = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            parts = _whole_tensor_masks(base, ms, dens, g_ref, draw)
            masked = [_rescaled(d, k, p, kw["rescale"]) if k is None else
                      _rescaled(d.reshape(k.shape), k, p, kw["rescale"]).reshape(d.shape) for d, k, p in parts]
            want = M.combine_deltas(base, masked, W, consensus=kw["consensus"], normalize=kw["normalize"])
            extra = {"epsilon": 0.1} if name == "della" else {}
            got = getattr(M, name)(base, ms, W, generator=g_new, **kw, **extra)
            assert torch.equal(g_ref.get_state(), g_new.get_state()), (name, kw)
            if kw["rescale"] == "l1" and dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=3e-7, atol=3e-7 * float(want.abs().max()))
            else:
                assert torch.equal(got, want), (name, kw, int((got != want).sum()))
    for density, gamma in ((0.5, 0.1), (0.9, 0.2), (0.01, 0.0), (0.6, 0.5), (0.0, 0.1)):
        for consensus in (None, "sum"):
            masked = [torch.where(_np_breadcrumbs_mask(m.double() - base.double() if dtype == torch.float64
                                                       else m.float() - base.float(), density, gamma),
                                  m.to(torch.float64 if dtype == torch.float64 else torch.float32) - base.to(
                                      torch.float64 if dtype == torch.float64 else torch.float32), 0.0) for m in ms]
            want = M.combine_deltas(base, masked, W, consensus=consensus)
            got = M.breadcrumbs(base, ms, W, density=density, gamma=gamma, consensus=consensus)
            assert torch.equal(got, want), (density, gamma, consensus)


def test_breadcrumbs_ties_at_both_boundaries_and_non_finite(monkeypatch):
    """Many elements equal to each boundary value (kept or dropped by position like a stable sort),
    boundaries equal to each other, and a task vector with inf/NaN (whole-tensor sort fallback)."""
    monkeypatch.setattr(M, "_CHUNK", 7)
    monkeypatch.setattr(M, "_FAST_CHUNK", 16)
    monkeypatch.setattr(M, "_RADIX_MIN", 8)
    base = torch.zeros(60)
    for values in ([1.0] * 20 + [2.0] * 20 + [3.0] * 20, [2.0] * 60, [-1.0, 1.0, 2.0] * 20):
        m = torch.tensor(values)
        for density, gamma in ((0.5, 0.2), (0.3, 0.0), (0.9, 0.05), (0.25, 0.5)):
            want = torch.where(_np_breadcrumbs_mask(m, density, gamma), m, 0.0)
            torch.testing.assert_close(M.breadcrumbs(base, [m], density=density, gamma=gamma), want, rtol=0, atol=0)
    m = torch.arange(60.0)
    m[5], m[40] = float("inf"), float("-inf")
    want = torch.where(_np_breadcrumbs_mask(m, 0.5, 0.1), m, 0.0)
    torch.testing.assert_close(M.breadcrumbs(base, [m], density=0.5, gamma=0.1), want, rtol=0, atol=0)


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_formula(n):
    base, ms = _models(n, shape=(12, 5))
    b = _np(base).ravel()
    ds = [_np(m).ravel() - b for m in ms]
    cos = np.mean([ds[i] @ ds[j] / np.linalg.norm(ds[i]) / np.linalg.norm(ds[j])
                   for i in range(n) for j in range(i + 1, n)])
    t = n * cos / (1 + (n - 1) * cos)
    want = t * sum(_np(m) for m in ms) / n + (1 - t) * _np(base)
    np.testing.assert_allclose(_np(M.model_stock(base, ms)), want, rtol=1e-4, atol=1e-5)
    # filter-wise: one t per row
    fw = M.model_stock(base, ms, filter_wise=True)
    for r in range(3):
        np.testing.assert_allclose(_np(fw[r]), _np(M.model_stock(base[r], [m[r] for m in ms])), rtol=1e-5, atol=1e-6)


def test_karcher_two_points_is_slerp_midpoint():
    a, (b,) = _models(1, shape=(30,), scale=1.0, dtype=torch.float64)
    na, nb = a.norm(), b.norm()
    mid = np_slerp((a / na).numpy(), (b / nb).numpy(), 0.5)
    want = (na + nb).item() / 2 * mid / np.linalg.norm(mid)
    np.testing.assert_allclose(M.karcher([a, b]).numpy(), want, rtol=1e-6)


def test_karcher_stationarity_three_points():
    _, ms = _models(3, shape=(50,), scale=1.0, dtype=torch.float64)
    w = [0.2, 0.5, 0.3]
    mu = M.karcher(ms, w, max_iter=100, tol=1e-12).numpy()
    mu_hat = mu / np.linalg.norm(mu)
    grad = np.zeros_like(mu_hat)  # sum_i w_i log_mu(u_i) vanishes at the Karcher mean
    for wi, m in zip(w, ms):
        u = m.numpy() / np.linalg.norm(m.numpy())
        c = np.clip(mu_hat @ u, -1, 1)
        phi = np.arccos(c)
        grad += wi * phi / np.sin(phi) * (u - c * mu_hat)
    assert np.linalg.norm(grad) < 1e-8
    assert np.isclose(np.linalg.norm(mu), sum(wi * m.norm().item() for wi, m in zip(w, ms)))


def test_chipalign_geodesic():
    wi, (wd,) = _models(1, shape=(20, 6), scale=1.5, dtype=torch.float64)
    wd = 2.0 * wd
    ni, nd = np.linalg.norm(_np(wi)), np.linalg.norm(_np(wd))
    for lam in (0.0, 0.3, 0.6, 1.0):
        got = _np(M.chipalign(wi, wd, lam))
        direction = np_slerp(_np(wi) / ni, _np(wd) / nd, lam)
        want = ni ** (1 - lam) * nd**lam * direction
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_np(M.chipalign(wi, wd, 0.0)), _np(wi), rtol=1e-12)
    np.testing.assert_allclose(_np(M.chipalign(wi, wd, 1.0)), _np(wd), rtol=1e-12)
    # colinear: direction is shared, only the norm interpolates (geometrically)
    np.testing.assert_allclose(_np(M.chipalign(wi, 4 * wi, 0.5)), _np(2 * wi), rtol=1e-9)
    with pytest.raises(ValueError, match="lam"):
        M.chipalign(wi, wd, 1.5)


def test_chipalign_of_near_colinear_bf16_weights_is_float32_accurate():
    """Two fine-tunes of one model are near-colinear (cos Θ ≈ 0.999), where ``arccos`` amplifies an error in
    ``cos Θ`` by ``1/sin Θ``. With float32 norms and dot product the (1024, 1024) output was 1.3e-5 (relative to
    its largest element) from the paper's formula in float64 and 310 bf16 elements were off by one ulp; with
    float64 reductions and coefficients it is float32 rounding (~1e-7) and bf16 rounds as the formula does."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=g)
    wi = a.bfloat16()
    wd = (a + 0.05 * torch.randn(1024, 1024, generator=g)).bfloat16()
    x, y = wi.double(), wd.double()
    ni, nd = x.norm(), y.norm()
    theta = torch.acos((x * y).sum() / (ni * nd))
    assert math.cos(theta) > 0.998
    for lam in (0.3, 0.5):
        want = ni ** (1 - lam) * nd**lam * (torch.sin((1 - lam) * theta) * x / ni
                                             + torch.sin(lam * theta) * y / nd) / torch.sin(theta)
        got = M.chipalign(wi, wd, lam, out_dtype=torch.float32)
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 4e-7
        assert (M.chipalign(wi, wd, lam) != want.to(torch.bfloat16)).sum().item() <= 5


# --------------------------------------------------------------------------- edge cases

ALL_TASK = {
    "task_arithmetic": lambda b, ms: M.task_arithmetic(b, ms, 0.7),
    "ties": lambda b, ms: M.ties(b, ms, density=0.3),
    "dare": lambda b, ms: M.dare(b, ms, density=0.5, generator=torch.Generator().manual_seed(0)),
    "dare_ties": lambda b, ms: M.dare(b, ms, density=0.5, consensus="sum", generator=torch.Generator().manual_seed(0)),
    "breadcrumbs": lambda b, ms: M.breadcrumbs(b, ms, density=0.5),
    "della": lambda b, ms: M.della(b, ms, density=0.5, generator=torch.Generator().manual_seed(0)),
    "model_stock": lambda b, ms: M.model_stock(b, ms),
}
ALL_SYMMETRIC = {
    "linear": lambda ms: M.linear(ms),
    "karcher": lambda ms: M.karcher(ms),
    "slerp": lambda ms: M.slerp(ms[0], ms[1], 0.3),
    "chipalign": lambda ms: M.chipalign(ms[0], ms[1], 0.3),
}


@pytest.mark.parametrize("name", list(ALL_TASK))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_identical_models_give_the_model_and_keep_dtype(name, dtype):
    base, (m,) = _models(1, dtype=dtype)
    out = ALL_TASK[name](base, [m, m.clone()])
    assert out.dtype == dtype and out.shape == base.shape
    same = ALL_TASK[name](base, [base.clone(), base.clone()])  # zero task vectors
    torch.testing.assert_close(same, base, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ALL_SYMMETRIC))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identical_inputs_symmetric(name, dtype):
    _, (m,) = _models(1, dtype=dtype)
    out = ALL_SYMMETRIC[name]([m, m.clone(), m.clone()])
    assert out.dtype == dtype
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out, m, rtol=tol, atol=tol)


def test_one_model():
    base, (m,) = _models(1)
    torch.testing.assert_close(M.linear([m]), m)
    torch.testing.assert_close(M.karcher([m]), m)
    torch.testing.assert_close(M.task_arithmetic(base, [m]), m, rtol=0, atol=1e-6)
    torch.testing.assert_close(M.ties(base, [m]), m, rtol=0, atol=1e-6)  # density 1, one model: m itself
    with pytest.raises(ValueError, match="at least 2"):
        M.model_stock(base, [m])


def test_weights_summing_to_zero():
    base, ms = _models(2)
    with pytest.raises(ValueError, match="sum to"):
        M.linear(ms, [1.0, -1.0])
    torch.testing.assert_close(M.linear(ms, [1.0, -1.0], normalize=False), ms[0] - ms[1])
    # task arithmetic with normalize: a vanishing total weight is left as 1 (as mergekit)
    got = M.task_arithmetic(base, ms, [1.0, -1.0], normalize=True)
    torch.testing.assert_close(got, base + (ms[0] - ms[1]), rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_name_the_tensor():
    base, ms = _models(2)
    bad = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"models\[1\] has shape \(3, 3\)"):
        M.ties(base, [ms[0], bad])
    with pytest.raises(ValueError, match=r"tensors\[2\]"):
        M.linear([ms[0], ms[1], bad])
    with pytest.raises(ValueError, match=r"\bb\b has shape"):
        M.slerp(base, bad, 0.5)


def test_bad_arguments():
    base, ms = _models(2)
    with pytest.raises(ValueError, match="density"):
        M.ties(base, ms, density=1.5)
    with pytest.raises(ValueError, match="weights has 3 entries"):
        M.task_arithmetic(base, ms, [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        M.ties(base, [])
    with pytest.raises(TypeError, match="floating"):
        M.linear([torch.ones(3, dtype=torch.int64)] * 2)
    with pytest.raises(TypeError, match="sequence"):
        M.ties(base, ms[0])
    with pytest.raises(ValueError, match="consensus"):
        M.ties(base, ms, consensus="vote")


NAN = float("nan")
TASK_VECTOR = {  # every method with normalize / lambda_ / out_dtype, called on (base, models, **kw)
    "task_arithmetic": M.task_arithmetic,
    "ties": lambda b, ms, **kw: M.ties(b, ms, density=0.5, **kw),
    "dare": lambda b, ms, **kw: M.dare(b, ms, density=0.5, generator=torch.Generator().manual_seed(0), **kw),
    "breadcrumbs": lambda b, ms, **kw: M.breadcrumbs(b, ms, density=0.5, **kw),
    "della": lambda b, ms, **kw: M.della(b, ms, density=0.5, generator=torch.Generator().manual_seed(0), **kw),
    "combine_deltas": lambda b, ms, **kw: M.combine_deltas(b, [m - b for m in ms], [1.0] * len(ms), **kw),
}


@pytest.mark.parametrize("name", list(TASK_VECTOR))
def test_task_vector_options_are_checked(name):
    """A truthy string must not switch normalize on, a NaN lambda_ must not reach every output element,
    an integer out_dtype must not truncate the weights: each is refused, naming the argument."""
    base, ms = _models(2)
    merge = TASK_VECTOR[name]
    with pytest.raises(TypeError, match="normalize must be a bool, got 'false'"):
        merge(base, ms, normalize="false")
    with pytest.raises(TypeError, match="normalize must be a bool"):
        merge(base, ms, normalize=1)
    with pytest.raises(ValueError, match="lambda_ must be a finite number"):
        merge(base, ms, lambda_=NAN)
    with pytest.raises(TypeError, match="lambda_ must be a real number"):
        merge(base, ms, lambda_="2")
    torch.testing.assert_close(merge(base, ms, normalize=np.True_), merge(base, ms, normalize=True), rtol=0, atol=0)
    with pytest.raises(TypeError, match="out_dtype"):
        merge(base, ms, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        merge(base, ms, out_dtype="float32")
    with pytest.raises(TypeError, match="weights must be a number or one number per model"):
        merge(base, ms, weights=["a", "b"]) if name != "combine_deltas" else M.combine_deltas(base, ms, ["a", "b"])


def test_scalar_and_flag_arguments_are_checked():
    base, ms = _models(2)
    a, b = ms
    with pytest.raises(ValueError, match="t must be a finite number"):
        M.slerp(a, b, NAN)
    with pytest.raises(TypeError, match="t must be a real number"):
        M.slerp(a, b, "0.5")
    torch.testing.assert_close(M.slerp(a, b, torch.tensor(0.25)), M.slerp(a, b, 0.25), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dot_threshold"):
        M.slerp(a, b, 0.5, dot_threshold=NAN)
    with pytest.raises(TypeError, match="out_dtype"):
        M.slerp(a, b, 0.5, out_dtype=torch.int64)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        M.chipalign(a, b, NAN)
    with pytest.raises(TypeError, match="lam must be a real number"):
        M.chipalign(a, b, "0.5")
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        M.della(base, ms, density=0.5, epsilon=NAN)
    with pytest.raises(ValueError, match="max_iter"):
        M.karcher(ms, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        M.karcher(ms, tol=NAN)
    with pytest.raises(TypeError, match="filter_wise must be a bool"):
        M.model_stock(base, ms, filter_wise="no")
    torch.testing.assert_close(M.model_stock(base, ms, filter_wise=np.True_), M.model_stock(base, ms, filter_wise=True))
    torch.testing.assert_close(M.linear(ms, normalize=np.False_), M.linear(ms, normalize=False))
    with pytest.raises(TypeError, match="normalize must be a bool"):
        M.linear(ms, normalize="no")
    with pytest.raises(ValueError, match="density must be a finite number"):
        M.magnitude_mask(a, NAN)
    with pytest.raises(ValueError, match="density must be finite"):
        M.dare_mask(a, NAN)
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        M.dare_mask(a, 1.5)
    with pytest.raises(ValueError, match="density must be a finite number"):
        M.della_mask(a, NAN, 0.1)


MERGES = {
    "linear": lambda b, ms: M.linear(ms),
    "task_arithmetic": lambda b, ms: M.task_arithmetic(b, ms),
    "ties": lambda b, ms: M.ties(b, ms, density=0.5),
    "ties_density_1": lambda b, ms: M.ties(b, ms),
    "dare": lambda b, ms: M.dare(b, ms, density=0.5, generator=torch.Generator().manual_seed(0)),
    "della": lambda b, ms: M.della(b, ms, density=0.5, generator=torch.Generator().manual_seed(0)),
    "breadcrumbs": lambda b, ms: M.breadcrumbs(b, ms, density=0.5),
    "slerp": lambda b, ms: M.slerp(ms[0], ms[1], 0.3),
    "chipalign": lambda b, ms: M.chipalign(ms[0], ms[1], 0.3),
    "karcher": lambda b, ms: M.karcher(ms),
    "model_stock": lambda b, ms: M.model_stock(b, ms),
    "combine_deltas": lambda b, ms: M.combine_deltas(b, [m - b for m in ms], [1.0, 1.0]),
}


@pytest.mark.parametrize("name", list(MERGES))
def test_parameters_can_be_merged_directly(name):
    """``ties(layer.weight, [...])`` raised "functions with out=... arguments don't support automatic
    differentiation" (TIES, SLERP) while the other methods returned a graph; every merge now runs without
    autograd and equals the merge of the detached tensors."""
    base, ms = _models(2, shape=(64, 48))
    params = [torch.nn.Parameter(t.clone()) for t in (base, *ms)]
    got = MERGES[name](params[0], params[1:])
    assert not got.requires_grad
    torch.testing.assert_close(got, MERGES[name](base, ms), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MERGES))
@pytest.mark.parametrize("which", [1, 2])
def test_inputs_on_two_devices_are_a_named_value_error(name, which):
    """Inputs on two devices raised torch's unnamed "Expected all tensors to be on the same device" in some
    methods and were copied across in others (TIES on a CPU base read CUDA models chunk by chunk); ``linear``
    of a CPU and a meta tensor returned a CPU tensor without a word. Now every method names the tensor. The
    meta device stands in for a second device (CI has no GPU)."""
    base, ms = _models(2, shape=(64, 48))
    inputs = [base, *ms]
    inputs[which] = inputs[which].to("meta")
    merge = MERGES[name] if name != "combine_deltas" else lambda b, ds: M.combine_deltas(b, ds, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"is on (meta|cpu) but \S+ is on (cpu|meta)"):
        merge(inputs[0], inputs[1:])


def test_string_weights_are_refused_not_parsed():
    """list("1") is ["1"] and float("1") is 1.0: a string weight from a config used to merge as a number."""
    base, ms = _models(2)
    with pytest.raises(TypeError, match="weights must be a number"):
        M.task_arithmetic(base, ms[:1], "1")
    with pytest.raises(TypeError, match="weights must be a number"):
        M.linear(ms, ["0.5", "0.5"])
    with pytest.raises(TypeError, match="density must be a number"):
        M.ties(base, ms, density=["0.5", 1.0])
    torch.testing.assert_close(M.linear(ms, [torch.tensor(1.0), np.float32(3.0)]), M.linear(ms, [1.0, 3.0]))
    torch.testing.assert_close(M.linear(ms, [np.array(1.0), torch.tensor([3.0])]), M.linear(ms, [1.0, 3.0]))


def test_empty_model_lists_name_the_argument():
    """linear([]) said "expected at least one tensor in [], got none", naming no argument."""
    for merge in (M.linear, M.karcher):
        with pytest.raises(ValueError, match="tensors must hold at least one tensor"):
            merge([])
    with pytest.raises(ValueError, match="models must hold at least one"):
        M.task_arithmetic(torch.ones(3), [])


def test_combine_deltas_checks_its_inputs():
    base, ms = _models(2)
    deltas = [m - base for m in ms]
    with pytest.raises(ValueError, match=r"deltas\[1\] has shape \(3,\)"):
        M.combine_deltas(base, [deltas[0], torch.zeros(3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        M.combine_deltas(base, [], [])
    with pytest.raises(ValueError, match="weights has 1 entries but there are 2"):
        M.combine_deltas(base, deltas, [1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        M.combine_deltas(base, deltas, [1.0, NAN])


def test_out_dtype_is_kept_on_the_shortcuts():
    """karcher of one tensor or of all-zero tensors, and chipalign of two zero tensors, return early;
    they must still return ``out_dtype`` like the general path."""
    _, (m,) = _models(1, dtype=torch.bfloat16)
    z = torch.zeros(5, dtype=torch.bfloat16)
    assert M.karcher([m], out_dtype=torch.float32).dtype == torch.float32
    assert M.karcher([z, z], out_dtype=torch.float32).dtype == torch.float32
    assert M.chipalign(z, z, 0.5, out_dtype=torch.float32).dtype == torch.float32
    one = M.karcher([m], out_dtype=torch.float32)
    torch.testing.assert_close(one, m.float(), rtol=0, atol=0)
    assert one.data_ptr() != m.data_ptr()


def test_empty_tensors():
    e = torch.zeros(0, 4)
    assert M.slerp(e, e, 0.5).shape == (0, 4)
    assert M.ties(e, [e, e], density=0.5).shape == (0, 4)


# --------------------------------------------------------------------------- mergekit parity

def _mergekit():
    return pytest.importorskip("mergekit.merge_methods", reason="mergekit is the oracle for these checks")


@pytest.mark.parametrize("dtype,out", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.bfloat16, torch.float32)])
def test_matches_mergekit(dtype, out):
    """float32 arithmetic on both sides, mergekit's out_dtype against ours: bit-identical. bf16 checkpoints
    merged into float32 keep float32 digits (rounded once), as mergekit's `dtype: float32, out_dtype: float32`."""
    mk = _mergekit()
    base, ms = _models(3, shape=(33, 21), dtype=dtype)
    W = [0.5, 0.3, 0.7]
    ids = {1: 0.5, 2: 0.3, 3: 0.7}

    def run(name, tensors, params, base_index=0):
        return mk.merge_tensors(tensors, name, parameters=params, base_index=base_index,
                                dtype=torch.float32, out_dtype=out)

    o = dict(out_dtype=out)
    cases = [
        (run("task_arithmetic", [base, *ms], {"weight": ids, "normalize": True, "lambda": 0.8}),
         M.task_arithmetic(base, ms, W, normalize=True, lambda_=0.8, **o)),
        (run("linear", [base, *ms], {"weight": [0.1, *W]}, None), M.linear([base, *ms], [0.1, *W], **o)),
        (run("model_stock", [base, *ms], {}), M.model_stock(base, ms, **o)),
        (run("karcher", [base, *ms], {}, None), M.karcher([base, *ms], **o)),
        (run("ties", [base, *ms], {"weight": ids, "density": 1.0}), M.ties(base, ms, W, density=1.0, **o)),
    ]
    if dtype == torch.float32:  # continuous values: no ties at the trim threshold
        cases += [
            (run("ties", [base, *ms], {"weight": ids, "density": 0.4}), M.ties(base, ms, W, density=0.4, **o)),
            (run("breadcrumbs", [base, *ms], {"weight": ids, "density": 0.6, "gamma": 0.05}),
             M.breadcrumbs(base, ms, W, density=0.6, gamma=0.05, **o)),
        ]
    for theirs, ours in cases:
        assert ours.dtype == theirs.dtype == out
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if (dtype, out) == (torch.bfloat16, torch.float32):  # not bf16 values in a float32 file
        merged = M.task_arithmetic(base, ms, W, lambda_=0.8, out_dtype=out)
        assert not torch.equal(merged, merged.bfloat16().float())


@pytest.mark.parametrize("dtype,out", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape,scale", [((33, 21), 0.1), ((300, 257), 0.1), ((300, 257), 2.0), ((70_000,), 0.01)])
def test_slerp_matches_mergekit_up_to_float32_rounding_of_the_dot(dtype, out, shape, scale):
    """Our SLERP reduces a·a, b·b and a·b in one pass in float64 and takes the coefficients from that
    cosine in float64, mergekit the two norms and then the dot product of the normalised tensors
    (float32 throughout). Same formula: the cosine differs by float32 rounding, which moves the
    coefficients by ~|dc/dcos|·1e-7 relative (acos amplifies it by 1/sin Ω near colinear tensors). So
    the outputs agree to 2e-5 relative in float32 and within one bf16 ulp in bf16, and ours is at least
    as close as mergekit's to the formula evaluated in float64 (ours the same at any torch thread count;
    measured at 1-16 threads, the closest call (33, 21) float32: 2.7e-7 vs 3.3e-7; the lerp cases equal)."""
    mk = _mergekit()
    base, (m,) = _models(1, shape=shape, dtype=dtype, scale=scale)
    theirs = mk.merge_tensors([base, m], "slerp", parameters={"t": 0.3}, base_index=0,
                              dtype=torch.float32, out_dtype=out)
    ours = M.slerp(base, m, 0.3, out_dtype=out)
    assert ours.dtype == theirs.dtype == out and ours.shape == base.shape
    exact = np_slerp(_np(base).ravel(), _np(m).ravel(), 0.3).reshape(shape)
    if out == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5 * float(theirs.abs().max()))
        assert np.abs(_np(ours) - exact).max() <= np.abs(_np(theirs) - exact).max() * 1.01
    else:  # at most one bf16 ulp apart, and only rarely
        ulp = theirs.float().abs().clamp_min(2.0**-126) * 2.0**-7
        diff = (ours.float() - theirs.float()).abs()
        assert bool((diff <= ulp * 1.0001).all())
        assert int((diff > 0).sum()) <= max(2, ours.numel() // 200)


def test_ties_matches_mergekit_up_to_threshold_ties():
    """bf16 task vectors repeat values; only elements tied at the trim threshold may differ."""
    mk = _mergekit()
    base, ms = _models(2, shape=(64, 48), dtype=torch.bfloat16)
    theirs = mk.merge_tensors([base, *ms], "ties", parameters={"weight": 1.0, "density": 0.4},
                              base_index=0, dtype=torch.float32, out_dtype=torch.bfloat16)
    ours = M.ties(base, ms, density=0.4)
    at_threshold = torch.zeros_like(base, dtype=torch.bool)
    for m in ms:
        d = (m.float() - base.float()).abs()
        k = int(0.4 * d.numel())
        at_threshold |= d == d.reshape(-1).sort(descending=True).values[k - 1]
    diff = ours != theirs
    assert not (diff & ~at_threshold).any()


@pytest.mark.parametrize("chunk", [7, 64, 1 << 21])
def test_ties_chunked_with_many_threshold_ties(monkeypatch, chunk):
    """Integer task vectors: lots of |δ| tied at the threshold, kept in position order across chunks."""
    monkeypatch.setattr(M, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (37, 11), generator=g).float()
    ms = [base + torch.randint(-3, 4, (37, 11), generator=g).float() for _ in range(3)]
    w = [0.25, 0.5, 0.125]  # dyadic: exact sums, so sign election at 0 agrees with the float64 oracle
    for density in (0.1, 0.35, 0.8):
        got = M.ties(base, ms, w, density=density)
        want = np_ties(_np(base), [_np(m) for m in ms], w, density)
        np.testing.assert_allclose(_np(got), want, rtol=1e-6, atol=1e-6)
    got = M.task_arithmetic(base, ms, [0.2, 0.5, 0.3], lambda_=0.5)
    want = _np(base) + 0.5 * sum(w * (_np(m) - _np(base)) for w, m in zip([0.2, 0.5, 0.3], ms))
    np.testing.assert_allclose(_np(got), want, rtol=1e-6, atol=1e-6)


def test_kth_largest_sampled_path_is_exact():
    g = torch.Generator().manual_seed(0)
    for values in (torch.randn(300_001, generator=g).abs(), torch.randint(0, 50, (400_000,), generator=g).float()):
        for k in (1, 17, 150_000, values.numel() - 3, values.numel()):
            want = values.sort(descending=True).values[k - 1]
            assert M._kth_largest(values, k) == want


@pytest.mark.parametrize("name", list(ALL_TASK))
def test_inputs_are_not_modified(name):
    base, ms = _models(2)
    copies = [base.clone()] + [m.clone() for m in ms]
    ALL_TASK[name](base, ms)
    for before, after in zip(copies, [base, *ms]):
        assert torch.equal(before, after)


# --------------------------------------------------------------------------- float32 TIES fast path


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def _ties_cases():
    g = torch.Generator().manual_seed(5)
    n = 3001
    smooth = (torch.randn(n, generator=g) * 0.02).bfloat16()
    yield "bf16", smooth, [(smooth.float() + torch.randn(n, generator=g) * 0.002).bfloat16() for _ in range(3)]
    ints = torch.randint(-3, 4, (n,), generator=g).half()  # |δ| repeats: thousands of ties at each threshold
    yield "ties", ints, [ints + torch.randint(-3, 4, (n,), generator=g).half() for _ in range(3)]
    zeros = torch.zeros(n)
    zeros[::2] = -0.0  # signed zeros in the base and in the task vectors: the output's zero signs must match
    yield "zeros", zeros, [torch.randint(-1, 2, (n,), generator=g).float() * 0.0, ints.float()[:n] * 0.5, -ints.float()]


@pytest.mark.parametrize("case", ["bf16", "ties", "zeros"])
def test_ties_float32_path_is_bit_identical_to_reference(monkeypatch, case):
    """The bitwise-mask fast path equals the masked_fill/where reference bit for bit, ties at the
    threshold carried across chunk boundaries included."""
    monkeypatch.setattr(M, "_FAST_CHUNK", 1024)
    monkeypatch.setattr(M, "_RADIX_MIN", 1000)  # the histogram selection, not the small-tensor kthvalue
    base, ms = next((b, m) for name, b, m in _ties_cases() if name == case)
    for n_models in (1, 2, 3):
        for density in (0.5, [0.3, 1.0, 0.05][:n_models], 0.0, 1.0):
            for consensus in ("sum", "count"):
                for normalize, lam, w, out in ((True, 1.0, [0.6, 0.4, 0.25], None),
                                               (False, -0.7, [-1.0, 1.0, 0.5], torch.float32)):
                    dens = M._densities(density, n_models)
                    want = M._ties_reference(base, ms[:n_models], w[:n_models], dens, consensus, normalize, lam, out)
                    got = M.ties(base, ms[:n_models], w[:n_models], density=density, consensus=consensus,
                                 normalize=normalize, lambda_=lam, out_dtype=out)
                    assert got.dtype == want.dtype
                    assert torch.equal(_bits(got), _bits(want)), (n_models, density, consensus, normalize, out)


def test_ties_float32_path_non_finite_falls_back_exactly(monkeypatch):
    """inf task vectors (where 0/1 factors would not act as masks) give the reference's numbers (a NaN is refused:
    tests/merging/test_nan_inputs.py). One model's +inf beside another's -inf in a chunk (y[5], z[7]) raised
    math.fsum's own "-inf + inf in fsum" under consensus="count"."""
    monkeypatch.setattr(M, "_FAST_CHUNK", 64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    y, z = x + torch.randn(1000, generator=g), x + torch.randn(1000, generator=g)
    y[5], y[900], z[7] = float("inf"), -float("inf"), -float("inf")
    big = torch.full((300,), 3e38)
    for base, ms in ((x, [y, z]), (x, [x + 1, y]), (x, [z]), (-big, [big, big])):
        for density in (0.5, 1.0, 0.0, [1.0, 0.5][: len(ms)]):
            for consensus in ("sum", "count"):
                dens = M._densities(density, len(ms))
                want = M._ties_reference(base, ms, [1.0] * len(ms), dens, consensus, True, 1.0, None)
                got = M.ties(base, ms, density=density, consensus=consensus)
                assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("radix_min", [0, 1 << 16])  # histogram selection; one kthvalue for small tensors
def test_trim_thresholds_are_the_kth_largest_magnitudes(monkeypatch, radix_min):
    monkeypatch.setattr(M, "_RADIX_MIN", radix_min)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(20_000, generator=g).bfloat16()
    ms = [(base.float() + torch.randn(20_000, generator=g) * s).bfloat16() for s in (1e-3, 1.0, 0.0)]
    ks = [1, 7_000, 20_000]
    got = M._trim_thresholds(base, ms, ks, 999)
    for m, k, (bits, tied) in zip(ms, ks, got):
        mag = (m.float() - base.float()).abs()
        thr = mag.sort(descending=True).values[k - 1]
        assert bits == int(thr.view(torch.int32))
        assert tied == k - int((mag > thr).sum()) >= 1
    assert M._trim_thresholds(base, ms, [None, 0, None], 999) == [None, (0x7F800000, 0), None]
    for bad in (float("inf"), float("nan")):
        m = ms[1].clone()
        m[3] = bad
        assert M._trim_thresholds(base, [m], [5], 999) is None


_SCRATCH_SCRIPT = r"""
import ctypes, json, sys, threading, time, torch
from alignlab.merging import methods as M
torch.set_num_threads(1)
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
g = torch.Generator().manual_seed(0)
shape = (2048, 4096)  # 8 Mi elements
base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
ms = [(base.float() + torch.randn(shape, generator=g) * 0.002).bfloat16() for _ in range(2)]
gen = torch.Generator().manual_seed(0)
fn = {
    "ties": lambda: M.ties(base, ms, [0.6, 0.4], density=0.5),
    "dare": lambda: M.dare(base, ms, [0.6, 0.4], density=0.5, consensus="sum", generator=gen),
    "dare_l1": lambda: M.dare(base, ms, [0.6, 0.4], density=0.5, rescale="l1", generator=gen),
    "della": lambda: M.della(base, ms, [0.6, 0.4], density=0.5, epsilon=0.1, generator=gen),
    "breadcrumbs": lambda: M.breadcrumbs(base, ms, [0.6, 0.4], density=0.5, gamma=0.05, consensus="sum"),
    "slerp": lambda: M.slerp(base, ms[0], 0.4),
}[sys.argv[1]]
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0002)
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that RSS counts live allocations
before = rss()
th = threading.Thread(target=sample); th.start()
res = fn()
done.set(); th.join()
out = (peak[0] - before - res.numel() * res.element_size()) / 2**20
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or sys.platform != "linux",
                    reason="RSS sampling reads /proc and trims the heap with glibc's malloc_trim (Linux)")
@pytest.mark.parametrize("method", ["ties", "dare", "dare_l1", "della", "breadcrumbs", "slerp"])
def test_scratch_is_a_few_chunks_not_the_tensor(method):
    """Besides its output, each method holds a few chunks of 2**18 elements (1 MiB in float32): no
    whole-tensor float32 copy. 8 Mi elements: one float32 copy of a task vector alone is 32 MiB; the
    whole-tensor DARE took 192 MiB beyond its output, DARE with L1 rescaling 184, DELLA 312, breadcrumbs
    344, against 7-15 MiB chunked (measured on the same script)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _SCRATCH_SCRIPT, method], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    extra = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{method} scratch beyond the output: {extra:.1f} MiB")
    # ~12 buffers of 2**18 elements (1 MiB each) and allocator slack: 7-15 MiB measured, 24.4 once on a loaded
    # machine; under 30 still rules out one whole-tensor float32 copy (32 MiB) and is far under the unchunked 184+
    assert extra < 30


def test_per_model_weights_accept_numpy_scalars_refuse_bools():
    ms = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    torch.testing.assert_close(M.linear(ms, np.float32(2.0)), M.linear(ms, 2.0))
    torch.testing.assert_close(M.linear(ms, [np.float32(1), np.int64(3)]), M.linear(ms, [1.0, 3.0]))
    for bad in (True, [True, 1.0]):
        with pytest.raises(TypeError, match="weights"):
            M.linear(ms, bad)


@pytest.mark.parametrize("merge", [
    lambda b, m: M.linear([b, m], normalize=False),
    lambda b, m: M.task_arithmetic(b, [m], lambda_=4.0),
    lambda b, m: M.ties(b, [m], density=1.0, lambda_=4.0),
    lambda b, m: M.ties(b, [m], density=1.0, lambda_=4.0, out=torch.empty(3, 5, dtype=b.dtype)),
    lambda b, m: M.dare(b, [m], density=1.0, lambda_=4.0, generator=torch.Generator().manual_seed(0)),
    lambda b, m: M.combine_deltas(b, [m - b], [1.0], lambda_=4.0),
], ids=["linear", "task_arithmetic", "ties", "ties_out", "dare", "combine_deltas"])
def test_float16_result_beyond_its_range_raises(merge):
    """float32 arithmetic beyond ±65504, rounded to a float16 result, became inf without a word."""
    b, m = torch.full((3, 5), 30000.0, dtype=torch.float16), torch.full((3, 5), 40000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"15 merged value\(s\) are beyond float16's largest finite value 65504.*"
                                         r"out_dtype=torch.bfloat16"):
        merge(b, m)
    merge(b.float(), m.float())  # float32's range: fine
    m[0, 0] = float("inf")  # an inf already in an input is passed through
    assert torch.isinf(merge(b, m)[0, 0])


def test_della_refuses_a_negative_epsilon_and_dare_a_missing_density():
    """della(epsilon=-0.1) ran MagPrune upside down (small entries kept more often than large ones) and
    dare / breadcrumbs / della(density=None) kept every entry, where density is a required argument."""
    base = torch.zeros(4, 8)
    models = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        M.della(base, models, density=0.5, epsilon=-0.1)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        M.della_mask(models[0], 0.5, -0.1)
    for call in (lambda: M.dare(base, models, density=None), lambda: M.breadcrumbs(base, models, density=None),
                 lambda: M.della(base, models, density=None), lambda: M.dare_mask(models[0], None)):
        with pytest.raises(TypeError, match="density: expected a number in"):
            call()
    g = torch.Generator().manual_seed(0)
    assert M.della(base, models, density=0.5, epsilon=0.0, generator=g).shape == base.shape  # ε = 0 is DARE's mask
    assert M.ties(base, models, density=None).shape == base.shape  # TIES' density defaults to 1: None keeps all
