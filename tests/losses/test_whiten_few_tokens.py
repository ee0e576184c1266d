"""``whiten`` / ``gae(whiten_advantages=True)`` with fewer than two unmasked tokens.

They raised ``ValueError`` (the unbiased variance of one value is 0/0), which stopped a PPO run on a mini-batch
holding a single response token. One value is its own mean, so ``x - μ = 0`` whatever the scale: it whitens to 0
(``shift_mean=False``: to itself), and no unmasked value whitens to all zeros. TRL's ``masked_whiten`` (``trl.core``
up to its PPO trainer's removal; TRL 1.16 in this venv no longer has it) is written out below as a formula: it
agrees with ours from two tokens on, gives NaN for one and raises for none.
"""

from __future__ import annotations

import pytest
import torch

from alignlab.losses.reward import gae, group_advantages, whiten

D = torch.float64


def trl_masked_whiten_formula(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's masked whitening as a formula: μ = Σmx/Σm, σ² = Σm(x-μ)²/Σm · n/(n-1) (an empty mask is an error),
    (x - μ)/√(σ² + 1e-8), + μ without shift_mean; unmasked entries only (TRL leaves the others unzeroed)."""
    m = mask.to(x.dtype)
    n = m.sum()
    if n == 0:
        raise ValueError("empty mask")
    mu = (x * m).sum() / n
    var = ((x - mu) ** 2 * m).sum() / n * (n / (n - 1))
    out = (x - mu) / torch.sqrt(var + 1e-8)
    return out + mu if not shift_mean else out


X = torch.tensor([[0.3, -1.2, 2.5, 7.0], [4.0, float("nan"), -0.5, 1.5]], dtype=D)  # NaN: masked padding


def _mask(*cells):
    m = torch.zeros(2, 4, dtype=torch.bool)
    for cell in cells:
        m[cell] = True
    return m


@pytest.mark.parametrize("shift_mean", [True, False])
def test_two_or_more_tokens_match_the_trl_formula(shift_mean):
    for cells in ([(0, 0), (1, 2)], [(0, 1), (0, 2), (1, 0)], [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 3)]):
        mask = _mask(*cells)
        got = whiten(X, mask, shift_mean=shift_mean)
        # TRL's formula multiplies by the mask, so NaN padding leaks into it: it gets the padding as 0
        torch.testing.assert_close(got[mask], trl_masked_whiten_formula(X.nan_to_num(0.0), mask, shift_mean)[mask])
        assert (got[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_one_token_whitens_to_zero_or_itself(shift_mean, dtype):
    x = (X.nan_to_num(9.0) * 2).round().to(dtype)
    mask = _mask((1, 3))
    got = whiten(x, mask, shift_mean=shift_mean)
    want = torch.zeros(2, 4, dtype=got.dtype)
    if not shift_mean:  # (x - μ)·s + μ with μ = x
        want[1, 3] = x[1, 3].to(got.dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.dtype == (dtype if dtype.is_floating_point else torch.float32)
    # TRL's formula: n/(n-1) = 1/0, so NaN at every entry
    assert trl_masked_whiten_formula(X.nan_to_num(0.0), mask).isnan().all()
    # the all-equal case it is the limit of: two tokens with the same value whiten to 0 as well
    same = torch.tensor([[3.0, 3.0]], dtype=D)
    assert whiten(same).abs().max().item() == 0.0 and whiten(x[1:, 3:]).abs().max().item() == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_no_token_whitens_to_zeros(shift_mean):
    got = whiten(X, torch.zeros(2, 4, dtype=torch.bool), shift_mean=shift_mean)
    torch.testing.assert_close(got, torch.zeros(2, 4, dtype=D), rtol=0, atol=0)
    with pytest.raises(ValueError):
        trl_masked_whiten_formula(X, torch.zeros(2, 4))
    assert whiten(torch.zeros(0, 3, dtype=D)).shape == (0, 3)


def test_one_token_keeps_the_graph_with_the_derivative_of_x_minus_its_mean():
    x = X.nan_to_num(0.0).clone().requires_grad_(True)
    mask = _mask((0, 2))
    (whiten(x, mask) * 5).sum().backward()
    assert x.grad is not None and (x.grad == 0).all()  # d(x - μ)/dx = 0 with μ = x
    x.grad = None
    whiten(x, mask, shift_mean=False).sum().backward()
    torch.testing.assert_close(x.grad, mask.to(D))  # d μ / dx = 1


def test_one_token_matches_grpo_s_group_of_one():
    reward = torch.tensor([2.5], dtype=D)
    assert group_advantages(reward, group_size=1).item() == 0.0 == whiten(reward).item()


def test_moments_counting_fewer_than_two():
    one = _mask((0, 1))
    x = X[0, 1]
    moments = torch.stack([torch.tensor(1.0, dtype=D), x, x * x])
    # the rank holding the rollout's one token, and a rank holding none of it
    torch.testing.assert_close(whiten(X, one, moments=moments), torch.zeros(2, 4, dtype=D), rtol=0, atol=0)
    torch.testing.assert_close(whiten(X, one, False, moments=moments), torch.where(one, X, 0.0), rtol=0, atol=0)
    none = torch.zeros(2, 4, dtype=torch.bool)
    for m in (moments, torch.zeros(3, dtype=D)):
        torch.testing.assert_close(whiten(X, none, moments=m), torch.zeros(2, 4, dtype=D), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"moments count 1.0 is below the 2 unmasked values of this piece"):
        whiten(X, _mask((0, 1), (1, 0)), moments=moments)
    with pytest.raises(ValueError, match=r"moments count 0.0 is below the 1 unmasked values"):
        whiten(X, one, moments=torch.zeros(3, dtype=D))


def test_gae_with_one_or_no_unmasked_token():
    rewards = torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    values = torch.tensor([[0.2, 0.7, 0.1], [0.4, 0.3, 0.9]], dtype=D)
    mask = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    gamma, lam, last = 0.9, 0.95, torch.tensor([0.6, -0.3], dtype=D)
    # the one token (0, 1): Â = r + γ·V_next - V with V_next the bootstrap value after it, R = Â + V
    a_raw = 1.5 + gamma * 0.6 - 0.7
    adv_raw, ret_raw = gae(rewards, values, mask, gamma, lam, last_values=last, whiten_advantages=False)
    want_raw = torch.zeros(2, 3, dtype=D)
    want_raw[0, 1] = a_raw
    torch.testing.assert_close(adv_raw, want_raw)
    want_ret = torch.zeros(2, 3, dtype=D)
    want_ret[0, 1] = a_raw + 0.7
    torch.testing.assert_close(ret_raw, want_ret)
    adv, ret = gae(rewards, values, mask, gamma, lam, last_values=last)
    torch.testing.assert_close(adv, torch.zeros(2, 3, dtype=D), rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret)  # returns use the raw advantages
    adv, ret = gae(rewards, values, torch.zeros(2, 3, dtype=torch.bool), gamma, lam)
    assert (adv == 0).all() and (ret == 0).all()
