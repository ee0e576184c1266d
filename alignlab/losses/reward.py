r"""Reward-model and online-RL losses on tensors: Bradley–Terry, PPO/GAE, KL estimators, GRPO, RLOO.

Conventions shared by every function here:

* token-level tensors are ``(batch, seq)``: ``logprobs`` are per-token log-probs of the sampled completion
  tokens (:func:`alignlab.losses.logprobs.token_logprobs` or ``linear_logprobs``), ``mask`` marks the real
  completion tokens (1) vs prompt/padding (0): bools or exactly 0/1 in any real dtype, anything else (2, 0.5,
  NaN) is a ``ValueError`` as the mask selects tokens and does not weigh them
  (:func:`~alignlab.losses.logprobs.check_mask_values`).  ``mask=None`` means every position counts.  Masked positions
  never contribute to a loss, a mean, a variance or a gradient, whatever value they hold (NaN included for
  the inputs that are only read under the mask).
* sequence-level rewards are ``(batch,)``; for grouped methods (GRPO, RLOO) the ``group_size`` completions of
  one prompt are contiguous: ``[p0 g0, p0 g1, ..., p1 g0, ...]``.
* losses return ``(loss, metrics)`` with detached 0-d metric tensors.
* an argument of the wrong kind (a str, None, a list where a tensor or a number goes) is a ``TypeError`` naming it;
  a tensor of the wrong shape or dtype, or a number out of range, a ``ValueError`` (the "Raises" sections below
  list the latter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, is_int, is_real
from alignlab.losses.logprobs import check_mask_values
from alignlab.losses.preference import check_num_items, step_count

__all__ = [
    "KL_ESTIMATORS",
    "GRPO_LOSS_TYPES",
    "IS_MODES",
    "bradley_terry_loss",
    "kl_penalty",
    "masked_mean",
    "whiten",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
    "grpo_loss",
    "rloo_advantages",
]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_GROUP_SCALES = ("group", "batch", "none")


# ------------------------------------------------------------------------------------------------------------------
# checks and masked statistics
# ------------------------------------------------------------------------------------------------------------------
def _float(name: str, t: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):  # a str, None, a list: the wrong kind of thing, as _check_values says
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    dims = (dim,) if isinstance(dim, int) else dim
    if dims is not None and t.dim() not in dims:
        # a sequence-classification head's logits are (batch, 1): the scalar rewards are their one column
        hint = ("; a reward model's (batch, 1) score logits give the rewards as .squeeze(-1)"
                if dims == (1,) and t.dim() == 2 and t.shape[-1] == 1 else "")
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimension(s), got shape {tuple(t.shape)}"
                         f"{hint}")
    return t


def _real(name: str, value, expected: str = "a real number"):
    """``value`` itself; :class:`~alignlab.ArgumentTypeError` naming ``name`` unless it is a real number (Python or
    NumPy; not a bool).

    The library's convention (:func:`alignlab._checks.check_finite_number`): the wrong kind of thing (a str,
    None, a list, a tensor) is a ``TypeError``, a number out of range a ``ValueError`` (for the caller to raise).
    """
    if not is_real(value):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r}")
    return value


def _same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def _mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The mask as a bool tensor of ``like``'s shape (all True when None)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor of shape {tuple(like.shape)}, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"mask must be a tensor of shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    check_mask_values(mask, "mask")
    return mask.to(device=like.device, dtype=torch.bool)


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


def _check_values(values: torch.Tensor) -> None:
    """``values`` of :func:`masked_mean` / :func:`whiten`: a real tensor of any dtype (ints and bools count)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.is_complex():
        raise TypeError(f"values must be a real tensor, got dtype {values.dtype}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    r""":math:`\sum_t m_t x_t / \sum_t m_t` over ``dim`` (all elements when None); 0 where nothing is counted.

    Masked-out entries are replaced by 0 before the sum, so NaN/inf padding cannot leak in.  Half-precision
    values are summed and divided in float32 and the result is float32: in float16 a count above 65504 is
    ``inf`` (the mean came out 0 or NaN), and in bfloat16 counts above 256 and the sum were rounded.

    Raises:
        TypeError: ``values`` not a real tensor, or a ``dim`` that is no int.
        ValueError: ``mask`` not of ``values``' shape or not 0/1; a ``dim`` out of range.
    """
    _check_values(values)
    nd = max(values.dim(), 1)  # a 0-d tensor takes dim 0 / -1, as torch's sum does
    if dim is not None and (not is_int(dim) or not -nd <= dim < nd):
        kind = ValueError if is_int(dim) else ArgumentTypeError
        raise kind(f"dim must be None or an int in [-{nd}, {nd}) for values of shape {tuple(values.shape)}, "
                   f"got {dim!r}")
    m = _mask(mask, values)
    values = values.to(_compute_dtype(values))
    x = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    count = m.sum() if dim is None else m.sum(dim)
    total = x.sum() if dim is None else x.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    moments: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Masked whitening :math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` over all unmasked entries.

    :math:`\sigma^2` is the unbiased (Bessel-corrected) masked variance, as TRL's ``masked_whiten``;
    ``shift_mean=False`` adds :math:`\mu` back (only the scale changes).  Masked entries come back as 0.

    Fewer than two unmasked entries have no unbiased variance, but nothing needs it: a single entry is its own
    mean, so :math:`x - \mu = 0` whatever the scale, and it comes back as 0 (``shift_mean=False``: as
    :math:`\mu`, i.e. unchanged), as the only completion of a GRPO group gets advantage 0
    (:func:`group_advantages`); with no unmasked entry everything comes back as 0, as :func:`masked_mean` gives
    0 where nothing is counted. (TRL's ``masked_whiten`` returns NaN everywhere for one entry, from
    :math:`n/(n-1) = 1/0`, and raises for none.)

    ``moments`` whitens with the statistics of a larger batch than ``values``, e.g. the advantages of every
    rank: ``(3,)`` = :math:`(n, \sum x, \sum x^2)` over its unmasked entries, summed over the pieces (one
    ``all_reduce(SUM)`` of ``torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])`` per rank, in
    float64); then :math:`\mu = \sum x / n` and :math:`\sigma^2 = (\sum x^2 - n\mu^2)/(n-1)`, and each piece
    whitens exactly as the whole batch would.

    Half-precision values are whitened in float32 and returned in their dtype (in float16 the sum of squares
    of a few hundred advantages overflows, and the output was all zeros). Integer (e.g. 0/1 scores) or bool
    values are whitened and returned in float32, as :func:`masked_mean` returns their mean.

    Raises:
        ValueError: ``moments`` not of shape ``(3,)``, or counting fewer than two entries where this piece
            alone has more unmasked ones (the moments do not cover it); ``eps`` negative, NaN or infinite.
        TypeError: ``shift_mean`` not a bool, ``eps`` not a real number, ``values`` not a real tensor, ``moments``
            not a tensor (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    shift_mean = as_bool(shift_mean, "shift_mean")
    eps = check_finite_number(eps, "eps", minimum=0.0)
    _check_values(values)
    m = _mask(mask, values)
    # integer or bool values come back in float32: cast back to their dtype, the whitened values were truncated
    out_dtype = values.dtype if values.is_floating_point() else _compute_dtype(values)
    values = values.to(_compute_dtype(values))
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if moments is not None:
        if not isinstance(moments, torch.Tensor) or moments.shape != (3,):
            kind = ValueError if isinstance(moments, torch.Tensor) else ArgumentTypeError
            raise kind(f"moments must be a (3,) tensor (count, sum, sum of squares), got "
                       f"{getattr(moments, 'shape', type(moments).__name__)}")
        n_all, s1, s2 = moments.to(device=values.device, dtype=torch.float64).unbind()
        if float(n_all) < 2:  # one sync, as the count below
            local = int(m.sum())
            if local > float(n_all):
                raise ValueError(f"moments count {float(n_all)} is below the {local} unmasked values of this piece: "
                                 "moments must be the sums of (count, sum, sum of squares) over every piece")
            return _whiten_too_few(values, m, shift_mean, out_dtype)
        mean64 = s1 / n_all
        var64 = ((s2 - n_all * mean64 * mean64) / (n_all - 1)).clamp(min=0)
        mean, var = mean64.to(values.dtype), var64.to(values.dtype)
        centred = torch.where(m, values - mean, zero)
    else:
        n = int(m.sum())
        if n < 2:
            return _whiten_too_few(values, m, shift_mean, out_dtype)
        mean = masked_mean(values, m)
        centred = torch.where(m, values - mean, zero)
        var = (centred**2).sum() / (n - 1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero).to(out_dtype)


def _whiten_too_few(values: torch.Tensor, m: torch.Tensor, shift_mean: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`whiten` of at most one unmasked entry: 0 there (``x - μ = 0``), or the entry itself with
    ``shift_mean=False`` (``0 + μ``); 0 at masked entries. Written from ``values`` so that the graph and the
    derivative (0, resp. 1) are those of ``x - μ`` with ``μ = x``."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(m, values - values if shift_mean else values, zero).to(out_dtype)


def _reduce(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    # checked before the empty-batch shortcut, which took any string
    if not (isinstance(reduction, str) and reduction in ("mean", "sum", "none")):
        raise ValueError(f"reduction must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    if reduction == "none":
        return per_example
    if reduction == "sum" or per_example.numel() == 0:
        return per_example.sum()
    return per_example.mean()


# ------------------------------------------------------------------------------------------------------------------
# reward modelling
# ------------------------------------------------------------------------------------------------------------------
def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    *,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Pairwise Bradley–Terry loss for a scalar reward model.

    .. math::
        \mathcal L = -\mathrm{mean}\,\log\sigma(r_c - r_r - m)
            + \eta\,\mathrm{mean}\,(r_c + r_r)^2

    The pairwise ranking loss of "Training language models to follow instructions with human feedback"
    (Ouyang et al., arXiv 2203.02155); the margin :math:`m` (e.g. from preference strength) as in Llama 2
    (arXiv 2307.09288); the centring term :math:`\eta` (``center_coef``) pulls rewards towards zero mean, from
    "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"
    (Eisenstein et al., arXiv 2312.09244), as TRL's ``center_rewards_coefficient``.

    Args:
        chosen_rewards, rejected_rewards: ``(batch,)`` reward-model outputs.
        margin: ``(batch,)`` or scalar :math:`m`; None = 0.
        center_coef: :math:`\eta \ge 0`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per pair, centring term included per pair).
        num_items: pairs in the whole optimiser step (gradient-accumulation micro-batches and ranks): the
            mean becomes this batch's sum over ``num_items``, so the micro-batch losses sum to the big-batch
            loss exactly.

    Returns:
        ``(loss, metrics)`` with ``accuracy`` (fraction :math:`r_c > r_r`), ``margin`` (mean :math:`r_c - r_r`).

    Raises:
        ValueError: mismatched shapes, non-float inputs, negative or non-finite ``center_coef``, a NaN or
            infinite number ``margin``, ``num_items`` with a reduction other than ``"mean"``.
        TypeError: ``num_items`` neither a number nor a tensor; ``center_coef`` or a non-tensor ``margin`` not
            a real number.
    """
    check_num_items("num_items", num_items, reduction)
    _float("chosen_rewards", chosen_rewards, 1)
    _float("rejected_rewards", rejected_rewards, 1)
    _same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    center_coef = check_finite_number(center_coef, "center_coef", minimum=0.0)
    dtype = _compute_dtype(chosen_rewards, rejected_rewards)
    rc, rr = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    diff = rc - rr
    if margin is not None:
        if not isinstance(margin, torch.Tensor):  # a tensor margin is not read back (that would sync)
            margin = check_finite_number(margin, "margin")
        m = torch.as_tensor(margin, device=rc.device).to(dtype)
        if m.dim() != 0 and m.shape != rc.shape:
            raise ValueError(f"margin must be a scalar or of shape {tuple(rc.shape)}, got {tuple(m.shape)}")
        per_pair = -F.logsigmoid(diff - m)
    else:
        per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (rc + rr) ** 2
    d = diff.detach()
    metrics = {
        "accuracy": (d > 0).to(dtype).mean() if d.numel() else torch.full((), float("nan"), dtype=dtype),
        "margin": d.mean() if d.numel() else torch.full((), float("nan"), dtype=dtype),
    }
    if num_items is not None:
        return per_pair.sum() / step_count("num_items", num_items, per_pair.numel(), dtype, per_pair.device), metrics
    return _reduce(per_pair, reduction), metrics


# ------------------------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------------------------
def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-token estimate of :math:`\mathrm{KL}(\pi\|\pi_{\mathrm{ref}})` from tokens sampled from :math:`\pi`.

    With :math:`\delta = \log\pi(y_t) - \log\pi_{\mathrm{ref}}(y_t)` (J. Schulman, "Approximating KL
    Divergence", 2020):

    * ``k1`` :math:`= \delta` (unbiased, high variance, can be negative),
    * ``k2`` :math:`= \tfrac12\delta^2` (biased, low variance),
    * ``k3`` :math:`= e^{-\delta} - 1 + \delta` (unbiased, non-negative; GRPO's choice, arXiv 2402.03300).

    Args:
        logprobs, ref_logprobs: ``(batch, seq)`` (any shape, equal).
        estimator: one of :data:`KL_ESTIMATORS`.
        mask: positions to keep; others are 0.

    Half-precision inputs are computed in float32 and the result is float32 (float64 stays float64): ``k3``
    subtracts two numbers close to :math:`\delta` for the small :math:`\delta` of a policy near its reference,
    and in bfloat16 that cancellation left few correct digits (a relative error of several percent).

    Returns:
        Tensor of the input shape, float32 or float64; gradients flow to ``logprobs`` (and ``ref_logprobs`` if it
        requires them).

    Raises:
        ValueError: unknown estimator (lists the valid ones), shape mismatch, non-float inputs.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators are {list(KL_ESTIMATORS)}")
    _float("logprobs", logprobs)
    _float("ref_logprobs", ref_logprobs)
    _same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    m = _mask(mask, logprobs)
    dtype = _compute_dtype(logprobs, ref_logprobs)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # zero the log-ratio under the mask first so padding (even inf/NaN) cannot reach exp() or the gradient
    delta = torch.where(m, logprobs.to(dtype) - ref_logprobs.to(dtype), zero)
    if estimator == "k1":
        kl = delta
    elif estimator == "k2":
        kl = 0.5 * delta**2
    else:
        kl = torch.expm1(-delta) + delta
    return torch.where(m, kl, zero)


# ------------------------------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    last_values: torch.Tensor | None = None,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalized Advantage Estimation over token positions.

    "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (Schulman et al.,
    arXiv 1506.02438):

    .. math::
        \delta_t = r_t + \gamma V_{t+1} - V_t,\qquad
        \hat A_t = \delta_t + \gamma\lambda\,\hat A_{t+1},\qquad \hat R_t = \hat A_t + V_t

    Masked positions are skipped, not treated as steps: the recursion jumps from one unmasked token to the
    next unmasked one, so left/right padding and holes (e.g. tool-output tokens) give the same numbers as the
    compacted sequence.  After the last unmasked token :math:`V = ` ``last_values`` (0 by default: the episode
    ends) and :math:`\hat A = 0`.  Returns use the raw advantages; ``whiten_advantages`` then whitens the
    advantages over all unmasked tokens of the batch (:func:`whiten`): a batch with a single unmasked token
    gets advantage 0 there (it is its own mean), one with none all zeros.

    Batching: each row depends only on itself, so GAE on any subset of the rows gives those rows' numbers,
    except for the whitening, a statistic of the whole batch.  Run it once per rollout, before splitting into
    micro-batches; across ranks, call it with ``whiten_advantages=False``, all-reduce the advantages'
    moments and whiten with them (``whiten(adv, mask, moments=...)``): the same advantages as one process
    holding every rank's rollout.

    Args:
        rewards: ``(batch, seq)`` per-token rewards (typically the score on the last token minus a KL penalty).
        values: ``(batch, seq)`` value-head outputs (treated as constants: the result is detached).
        mask: ``(batch, seq)`` completion mask.
        gamma: discount :math:`\gamma \in [0, 1]`; lam: :math:`\lambda \in [0, 1]`.
        last_values: ``(batch,)`` bootstrap value after the final token (truncated episodes).
        whiten_advantages: whiten the advantages (not the returns).

    Returns:
        ``(advantages, returns)``, both ``(batch, seq)``, 0 at masked positions, detached.

    Raises:
        ValueError: shape/dtype mismatches, ``gamma``/``lam`` outside [0, 1].
        TypeError: ``whiten_advantages`` not a bool.
    """
    _float("rewards", rewards, 2)
    _float("values", values, 2)
    _same_shape("rewards", rewards, values=values)
    whiten_advantages = as_bool(whiten_advantages, "whiten_advantages")
    for name, v in (("gamma", gamma), ("lam", lam)):
        _real(name, v)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
    # Python floats: NumPy float32 scalars multiplied in float32 (gamma * lam rounded) inside float64 math
    gamma, lam = float(gamma), float(lam)
    m = _mask(mask, rewards)
    dtype = _compute_dtype(rewards, values)
    r = torch.where(m, rewards.detach().to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    v = torch.where(m, values.detach().to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    batch, seq = r.shape
    next_value = torch.zeros(batch, dtype=dtype, device=r.device)
    if last_values is not None:
        _float("last_values", last_values, 1)
        if last_values.shape != (batch,):
            raise ValueError(f"last_values must have shape ({batch},), got {tuple(last_values.shape)}")
        next_value = last_values.detach().to(dtype).clone()
    next_adv = torch.zeros(batch, dtype=dtype, device=r.device)
    adv = torch.zeros_like(r)
    for t in range(seq - 1, -1, -1):
        mt = m[:, t]
        a_t = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        adv[:, t] = torch.where(mt, a_t, torch.zeros((), dtype=dtype, device=r.device))
        next_adv = torch.where(mt, a_t, next_adv)
        next_value = torch.where(mt, v[:, t], next_value)
    returns = torch.where(m, adv + v, torch.zeros((), dtype=dtype, device=r.device))
    if whiten_advantages:
        adv = whiten(adv, m)
    return adv, returns


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    _float("advantages", advantages, (1, 2))
    if advantages.dim() == 1:
        if advantages.shape[0] != like.shape[0]:
            raise ValueError(f"advantages must have shape ({like.shape[0]},) or {tuple(like.shape)}, got {tuple(advantages.shape)}")
        return advantages.unsqueeze(1)
    if advantages.shape != like.shape:
        raise ValueError(f"advantages must have shape ({like.shape[0]},) or {tuple(like.shape)}, got {tuple(advantages.shape)}")
    return advantages


def _aggregate(
    per_token: torch.Tensor, m: torch.Tensor, aggregation: str, num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Token mean, or mean of per-sequence means; ``num_items`` (step-wide tokens / sequences) replaces the
    local count in the outer division."""
    if aggregation == "token":
        if num_items is None:
            return masked_mean(per_token, m)
        n = step_count("num_items", num_items, m.sum(), per_token.dtype, per_token.device)
        return torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum() / n
    if aggregation == "sequence":
        if num_items is None:
            return masked_mean(per_token, m, dim=1).mean() if per_token.shape[0] else per_token.sum()
        n = step_count("num_items", num_items, per_token.shape[0], per_token.dtype, per_token.device)
        return masked_mean(per_token, m, dim=1).sum() / n
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_range: float = 0.2,
    *,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token",
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""PPO's clipped surrogate objective, as a loss.

    "Proximal Policy Optimization Algorithms" (Schulman et al., arXiv 1707.06347), with
    :math:`\rho_t = \exp(\log\pi(y_t) - \log\pi_{\mathrm{old}}(y_t))`:

    .. math::
        \ell_t = \max\big(-\rho_t A_t,\; -\mathrm{clip}(\rho_t, 1-\epsilon_{lo}, 1+\epsilon_{hi}) A_t\big)

    ``clip_range_high`` sets an asymmetric :math:`\epsilon_{hi}` ("clip-higher", DAPO arXiv 2503.14476);
    ``dual_clip`` :math:`c > 1` caps the loss of negative-advantage tokens at :math:`-cA_t` (dual-clip PPO,
    arXiv 1912.09729).  ``aggregation="token"`` averages over all unmasked tokens of the batch,
    ``"sequence"`` averages within each sequence first.  ``num_items`` (unmasked tokens for ``"token"``,
    sequences for ``"sequence"``, counted over the whole optimiser step: every gradient-accumulation
    micro-batch and rank) replaces this batch's count in the outer division, so the micro-batch losses sum to
    the big-batch loss exactly.  Where :math:`A_t \ge 0` the ratio is capped at :math:`1+\epsilon_{hi}` before it
    multiplies :math:`A_t` (no change to the loss or gradient; an overflowing ratio no longer gives NaN, see
    :func:`clipped_surrogate`), and with ``dual_clip`` at :math:`e\,c` where :math:`A_t < 0` (beyond :math:`c`
    the capped loss :math:`-cA_t` is taken, with no gradient: an overflowing ratio gave a NaN gradient there).

    Args:
        logprobs: ``(batch, seq)`` current log-probs (with gradient).
        old_logprobs: ``(batch, seq)`` log-probs of the sampling policy (no gradient is taken through them).
        advantages: ``(batch, seq)`` or ``(batch,)`` (broadcast over tokens).
        mask: ``(batch, seq)`` completion mask.
        clip_range: :math:`\epsilon_{lo} > 0`.

    Returns:
        ``(loss, metrics)`` with ``clipfrac`` (fraction of unmasked tokens where the clipped term was taken),
        ``approx_kl`` (masked mean of :math:`\tfrac12(\log\rho)^2`), ``ratio`` (masked mean of :math:`\rho`).

    Raises:
        ValueError: shape/dtype mismatches, non-positive clip ranges, ``dual_clip <= 1``, a negative or non-finite
            ``num_items``, a ``num_items`` tensor that is not 0-d.
        TypeError: ``num_items`` neither a number nor a tensor.
    """
    check_num_items("num_items", num_items)
    _float("logprobs", logprobs, 2)
    _float("old_logprobs", old_logprobs, 2)
    _same_shape("logprobs", logprobs, old_logprobs=old_logprobs)
    adv = _broadcast_advantages(advantages, logprobs)
    if not _real("clip_range", clip_range) > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    hi = clip_range if clip_range_high is None else _real("clip_range_high", clip_range_high)
    if not hi > 0:
        raise ValueError(f"clip_range_high must be > 0, got {clip_range_high!r}")
    if dual_clip is not None and not _real("dual_clip", dual_clip) > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    # Python floats, as gae: NumPy float32 bounds (1 - eps) were rounded in float32 inside float64 math
    clip_range, hi = float(clip_range), float(hi)
    dual_clip = None if dual_clip is None else float(dual_clip)
    m = _mask(mask, logprobs)
    dtype = _compute_dtype(logprobs, old_logprobs, advantages)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    adv = torch.where(m, adv.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    # the loss's ratio is capped where it cannot matter, as in clipped_surrogate (an inf ratio times A = 0 was NaN)
    capped = _cap_log_ratio(log_ratio, adv, hi)
    if dual_clip is not None:  # where A < 0 no ratio above c changes the value (-cA is taken) or has a gradient; an
        # overflowing one gave the untaken branch's 0 · inf = NaN gradient (log c + 1: past the tie at rho = c)
        capped = torch.where(adv < 0, capped.clamp(max=math.log(dual_clip) + 1.0), capped)
    loss_ratio = torch.exp(capped)
    unclipped = -loss_ratio * adv
    clipped = -torch.clamp(loss_ratio, 1.0 - clip_range, 1.0 + hi) * adv
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip * adv), per_token)
    loss = _aggregate(per_token, m, aggregation, num_items)
    metrics = {
        "clipfrac": masked_mean((torch.clamp(ratio, 1.0 - clip_range, 1.0 + hi) * adv < ratio * adv).to(dtype), m).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, m),
        "ratio": masked_mean(ratio.detach(), m),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_range_value: float | None = 0.2,
    *,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""PPO's clipped value loss.

    .. math::
        \mathcal L_V = \tfrac12\,\mathrm{mean}_t\,\max\big((V_t - \hat R_t)^2,\;
            (V^{\mathrm{old}}_t + \mathrm{clip}(V_t - V^{\mathrm{old}}_t, -\epsilon, \epsilon) - \hat R_t)^2\big)

    (arXiv 1707.06347 and the OpenAI baselines implementation); ``clip_range_value=None`` gives the plain
    :math:`\tfrac12\,\mathrm{mean}(V - \hat R)^2`.  Masked mean over tokens; ``num_items`` (unmasked tokens
    of the whole optimiser step: every gradient-accumulation micro-batch and rank) replaces this batch's count,
    so the micro-batch losses sum to the big-batch loss exactly.

    Returns:
        ``(loss, metrics)`` with ``vf_clipfrac``.

    Raises:
        ValueError: shape/dtype mismatches, non-positive clip range, a ``num_items`` tensor that is not 0-d.
        TypeError: ``num_items`` neither a number nor a tensor.
    """
    check_num_items("num_items", num_items)
    _float("values", values, 2)
    _float("old_values", old_values, 2)
    _float("returns", returns, 2)
    _same_shape("values", values, old_values=old_values, returns=returns)
    if clip_range_value is not None and not _real("clip_range_value", clip_range_value) > 0:
        raise ValueError(f"clip_range_value must be > 0 or None, got {clip_range_value!r}")
    m = _mask(mask, values)
    dtype = _compute_dtype(values, old_values, returns)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(m, values.to(dtype), zero)
    old = torch.where(m, old_values.detach().to(dtype), zero)
    ret = torch.where(m, returns.detach().to(dtype), zero)
    err = (v - ret) ** 2
    if clip_range_value is None:
        per_token = err
        clipfrac = torch.zeros((), dtype=dtype, device=values.device)
    else:
        v_clipped = old + torch.clamp(v - old, -clip_range_value, clip_range_value)
        err_clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(err, err_clipped)
        clipfrac = masked_mean((err_clipped > err).to(dtype), m).detach()
    return 0.5 * _aggregate(per_token, m, "token", num_items), {"vf_clipfrac": clipfrac}


# ------------------------------------------------------------------------------------------------------------------
# GRPO / RLOO
# ------------------------------------------------------------------------------------------------------------------
def _grouped(rewards: torch.Tensor, group_size: int, minimum: int) -> torch.Tensor:
    if isinstance(rewards, torch.Tensor) and (rewards.dtype == torch.bool or not (
            rewards.is_floating_point() or rewards.is_complex())):
        rewards = rewards.float()  # rule-based 0/1 (or integer) rewards, as verifiers return them
    _float("rewards", rewards, 1)
    _real("group_size", group_size, f"an int >= {minimum}")
    if not is_int(group_size) or group_size < minimum:  # 2.0 or 2.5: a float, no count
        kind = ValueError if is_int(group_size) else ArgumentTypeError
        raise kind(f"group_size must be an int >= {minimum}, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards length {rewards.shape[0]} is not a multiple of group_size={group_size}")
    return rewards.view(-1, group_size)


def _nanstd(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std over the non-NaN entries (``keepdim`` along ``dim``), NaN where fewer than two: TRL's
    ``nanstd``, so that an unscorable completion's NaN reward stays out of its group's statistics."""
    mean = torch.nanmean(t, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(t)).sum(dim=dim, keepdim=dim is not None)
    var = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=dim is not None) * count / (count - 1)
    return torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()


def _zero_nan(adv: torch.Tensor) -> torch.Tensor:
    """Advantage 0 where it is NaN (an unscorable completion, or the only scorable one of its group)."""
    return adv.masked_fill(torch.isnan(adv), 0.0)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    r"""GRPO's group-relative advantages, one per completion.

    "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et al.,
    arXiv 2402.03300): :math:`A_i = (r_i - \mathrm{mean}_g(r)) / (\mathrm{std}_g(r) + \epsilon)` over the
    ``group_size`` completions of the same prompt (unbiased std, like TRL).  ``scale="batch"`` divides by the
    std of the whole batch instead; ``scale="none"`` only centres (Dr. GRPO, "Understanding R1-Zero-Like
    Training: A Critical Perspective", arXiv 2503.20783).

    A NaN reward marks a completion no reward function could score (TRL's ``None``): as in TRL's
    ``GRPOTrainer`` it is left out of the means and stds (``nanmean``/``nanstd``) and gets advantage 0, as
    does the only scorable completion of a group under ``scale="group"``.

    Args:
        rewards: ``(batch,)`` with contiguous groups; batch must be a multiple of ``group_size``. Integer or
            bool rewards (a verifier's 0/1) are taken as float32.
        group_size: completions per prompt, >= 1 (a group of 1 gets advantage 0).
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: added to the std.

    Returns:
        ``(batch,)`` advantages (detached).

    Raises:
        ValueError: bad shapes, group size, or ``scale``; ``eps`` negative, NaN or infinite.
        TypeError: ``group_size`` not an int (2.0 included; an :class:`~alignlab.ArgumentTypeError`, a
            ``ValueError`` too).
    """
    if scale not in _GROUP_SCALES:
        raise ValueError(f"scale must be one of {list(_GROUP_SCALES)}, got {scale!r}")
    eps = check_finite_number(eps, "eps", minimum=0.0)
    g = _grouped(rewards, group_size, 1).detach()
    g = g.to(_compute_dtype(g))
    centred = (g - torch.nanmean(g, dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return _zero_nan(centred)
    if scale == "group":
        std = _nanstd(g, dim=1).expand_as(g).reshape(-1) if group_size > 1 else torch.zeros_like(centred)
    else:
        std = _nanstd(g.reshape(-1)) if g.numel() > 1 else torch.zeros((), dtype=g.dtype, device=g.device)
    return _zero_nan(centred / (std + eps))


def rloo_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False, eps: float = 1e-4) -> torch.Tensor:
    r"""REINFORCE leave-one-out advantages.

    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs"
    (Ahmadian et al., arXiv 2402.14740), after Kool et al. 2019:

    .. math::
        A_i = r_i - \frac{1}{k-1}\sum_{j\ne i} r_j = \frac{k}{k-1}\,(r_i - \bar r)

    for the :math:`k` = ``group_size`` completions of one prompt.  ``normalize`` then standardises the
    advantages over the batch (TRL's ``normalize_advantages``).  A NaN reward (an unscorable completion) is
    left out as in TRL's ``RLOOTrainer``: the baseline averages the scorable siblings only, the normalisation
    uses ``nanmean``/``nanstd``, and NaN advantages (the unscorable completions, and a group's only scorable
    one) become 0. Integer or bool rewards are taken as float32, as in :func:`group_advantages`.

    Returns:
        ``(batch,)`` advantages (detached).

    Raises:
        ValueError: ``group_size < 2``, batch not a multiple of it, complex rewards, ``eps`` negative, NaN or
            infinite.
        TypeError: ``normalize`` not a bool, ``group_size`` not an int (2.0 included; an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    normalize = as_bool(normalize, "normalize")
    eps = check_finite_number(eps, "eps", minimum=0.0)
    g = _grouped(rewards, group_size, 2).detach()
    g = g.to(_compute_dtype(g))
    scorable = (~torch.isnan(g)).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(g, dim=1, keepdim=True) - g) / (scorable - 1)
    adv = (g - baseline).reshape(-1)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + eps)
    return _zero_nan(adv)


def is_weights(
    old: torch.Tensor, sampling: torch.Tensor, m: torch.Tensor, mode: str, is_min: float | None, is_max: float | None
) -> torch.Tensor:
    """Detached importance weights ``pi_old / pi_sampler`` per token ``(batch, seq)`` or per sequence ``(batch, 1)``.

    Equal log-probs give 1 (``-inf`` against ``-inf`` included); a NaN log-prob at an unmasked token gives weight 0
    in every mode (its token, or in the sequence modes its sequence, leaves the loss: the ratio is unknown), not 1."""
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    sampling = sampling.detach().to(old.dtype)
    diff = torch.where(m & (old != sampling), old - sampling, zero)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True)
    w = torch.exp(diff)
    lo = -float("inf") if is_min is None else is_min
    hi = float("inf") if is_max is None else is_max
    if mode.endswith("truncate"):
        w = w.clamp(min=lo, max=hi)
    else:
        w = w.masked_fill((w < lo) | (w > hi), 0.0)
    return torch.nan_to_num(w, nan=0.0, posinf=float("inf"))


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
) -> torch.Tensor:
    r"""Per-token :math:`-\min(\rho A, \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon_{hi}) A)` with
    :math:`\rho = e^{\log\rho}`: the one formula shared by :func:`grpo_loss` and the fused GRPO.

    Where :math:`A \ge 0` no ratio above :math:`1+\epsilon_{hi}` changes the value (the clipped term is taken)
    or has a gradient, so the log-ratio is capped at :math:`\log(1+\epsilon_{hi})` there before ``exp``: an
    overflowing ratio (:math:`\log\rho > 88` in float32, an old log-prob far below the current one) made
    the loss NaN for :math:`A = 0` and the gradient NaN for :math:`A \ge 0` (:math:`0\cdot\infty`)."""
    ratio = torch.exp(_cap_log_ratio(log_ratio, advantages, epsilon_high))
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * advantages)


def weighted_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float,
                       weights: torch.Tensor | None) -> torch.Tensor:
    """:func:`clipped_surrogate` times the importance ``weights`` (None: 1), exactly 0 with no gradient where a
    weight is 0 (a masked-out token or sequence, a NaN sampler log-prob): there the log-ratio is taken as 0, since
    an overflowing ratio (``inf`` for a negative advantage) times 0 made the loss and every gradient NaN."""
    if weights is None:
        return clipped_surrogate(log_ratio, advantages, epsilon, epsilon_high)
    kept = torch.where(weights == 0, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device), log_ratio)
    return clipped_surrogate(kept, advantages, epsilon, epsilon_high) * weights


def _cap_log_ratio(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_high: float) -> torch.Tensor:
    """``log_ratio`` capped at ``log(1 + epsilon_high)`` where ``advantages >= 0`` (see :func:`clipped_surrogate`)."""
    return torch.where(advantages >= 0, log_ratio.clamp(max=math.log1p(epsilon_high)), log_ratio)


def entropy_normaliser(loss_type: str, num_items, num_tokens, local_tokens: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """Token count the entropy bonus divides by, a 0-d ``dtype`` tensor: ``num_tokens``, else ``num_items`` where it
    counts tokens (``bnpo``/``dapo``), else this batch's unmasked tokens ``local_tokens`` (at least 1).

    Raises:
        ValueError: the step-wide count is 0 while this batch has unmasked tokens (see :func:`step_count`).
    """
    if num_tokens is not None:
        return step_count("num_tokens", num_tokens, local_tokens, dtype, local_tokens.device)
    if loss_type in ("bnpo", "dapo") and num_items is not None:
        return step_count("num_items", num_items, local_tokens, dtype, local_tokens.device)
    return local_tokens.clamp(min=1).to(dtype)


def check_grpo_options(loss_type: str, importance_sampling_level: str, kl_estimator: str, is_mode: str) -> None:
    """ValueError naming the option and the valid values, for the string options of the GRPO family
    (shared by :func:`grpo_loss` and :func:`alignlab.losses.fused_rl.fused_linear_grpo`)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {list(GRPO_LOSS_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; valid estimators are {list(KL_ESTIMATORS)}")
    if is_mode not in IS_MODES:
        raise ValueError(f"unknown is_mode {is_mode!r}; valid modes are {list(IS_MODES)}")


def grpo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    *,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items: int | torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    sampling_logprobs: torch.Tensor | None = None,
    is_mode: str = "token_truncate",
    is_min: float | None = None,
    is_max: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""GRPO policy loss with its aggregation variants, GSPO's sequence ratio and off-policy correction.

    Per token, with the importance ratio :math:`\rho_t = \pi(y_t)/\pi_{\mathrm{old}}(y_t)` and the sequence's
    advantage :math:`A` (:func:`group_advantages`):

    .. math::
        \ell_t = -\min\big(\rho_t A,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon_{hi}) A\big)\,w_t
            + \beta\,\mathrm{KL}_{k}(\pi\|\pi_{\mathrm{ref}})_t

    * ``importance_sampling_level="sequence"`` (GSPO, "Group Sequence Policy Optimization", arXiv 2507.18071)
      replaces :math:`\rho_t` by :math:`\exp(\frac1{|y|}\sum_t \log\rho_t)`, one ratio per sequence;
    * :math:`w_t` corrects for a sampling engine whose log-probs ``sampling_logprobs`` differ from the
      trainer's (vLLM vs. training kernels; truncated importance sampling, Yao et al. 2025 "Your Efficient RL
      Framework Secretly Brings You Off-Policy RL Training"): :math:`w_t = \exp(\log\pi_{\mathrm{old}}(y_t)
      - \log\pi_{\mathrm{sampler}}(y_t))` (summed over the sequence for ``is_mode="sequence_*"``), detached,
      then ``*_truncate`` clamps it to ``[is_min, is_max]`` and ``*_mask`` zeroes it outside; :math:`w_t=1`
      without ``sampling_logprobs``.  This is TRL's ``vllm_importance_sampling_mode`` /
      ``vllm_importance_sampling_clip_min`` / ``_clip_max``.  A token of weight 0 adds exactly 0 to the loss
      and its gradient, even where its ratio overflows (TRL's ``inf · 0`` is NaN there);
    * the KL estimator :math:`k` is ``kl_estimator`` (:func:`kl_penalty`, ``k3`` as GRPO).

    Then aggregated (``loss_type``); ``num_items`` is the normaliser over the whole optimiser step (all
    gradient-accumulation micro-batches and all ranks), so that summing the micro-batch losses gives the
    big-batch loss exactly:

    * ``grpo`` — mean over sequences of the per-sequence token mean (DeepSeekMath, arXiv 2402.03300):
      :math:`\sum_i \bar\ell_i / N_{seq}`, ``num_items`` = total sequences (this batch's by default);
    * ``bnpo`` — sum over all unmasked tokens / their count (``num_items`` = total tokens, default local);
    * ``dapo`` — as ``bnpo`` (DAPO, arXiv 2503.14476, pair with ``epsilon_high`` for clip-higher);
    * ``dr_grpo`` — sum / (sequences · ``max_completion_length``) (Dr. GRPO, arXiv 2503.20783; pair it with
      ``group_advantages(..., scale="none")``); ``num_items`` = total sequences.

    With ``entropy`` (per-token entropies, e.g. from :func:`~alignlab.losses.fused_rl.fused_linear_grpo`)
    the metric ``entropy`` is reported and ``entropy_coef`` :math:`c` subtracts :math:`c` times their token
    mean, as TRL's entropy bonus: this batch's entropy sum over ``num_tokens``, the unmasked tokens of the
    whole optimiser step (default: ``num_items`` for ``bnpo``/``dapo``, else this batch's tokens), so that
    with ``num_items`` and ``num_tokens`` every loss type, bonus included, accumulates exactly.

    Args:
        logprobs: ``(batch, seq)`` current per-token log-probs (with gradient).
        advantages: ``(batch,)`` or ``(batch, seq)``.
        mask: ``(batch, seq)`` completion mask.
        old_logprobs: sampling-policy log-probs; None = on-policy (``logprobs.detach()``, ratio 1).
        ref_logprobs: reference log-probs, required when ``beta > 0``.
        beta: KL coefficient.
        epsilon, epsilon_high: clip range (``epsilon_high`` defaults to ``epsilon``).
        max_completion_length: normaliser of ``dr_grpo`` (default: ``seq``, this batch's width, which changes
            with the padding: pass the generation budget, as TRL does, for a packed batch to give the padded
            one's loss and for micro-batches of different widths to accumulate exactly).
        num_items: step-wide normaliser (above).
        num_tokens: unmasked tokens of the whole step, the entropy bonus's normaliser (above).
        importance_sampling_level: ``"token"`` or ``"sequence"``.
        kl_estimator: one of :data:`KL_ESTIMATORS`.
        entropy: ``(batch, seq)`` per-token entropies; entropy_coef: bonus coefficient (needs ``entropy``).
        sampling_logprobs: ``(batch, seq)`` log-probs reported by the sampling engine.
        is_mode: ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"`` or ``"sequence_mask"``.
        is_min, is_max: bounds of the importance weight (None = unbounded on that side).

    Returns:
        ``(loss, metrics)`` with TRL's names: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (token means; at sequence level the mean over sequences of each one's
        fraction of clipped tokens, judged with each token's own advantage: TRL's per-sequence mean for
        ``(batch,)`` advantages), ``clip_ratio`` (=
        ``region_mean``), ``kl`` when ``beta > 0``, ``entropy`` with ``entropy``, and
        ``sampling/importance_sampling_ratio/{min,mean,max}`` with ``sampling_logprobs`` (over unmasked tokens,
        or in the ``sequence_*`` modes over the sequences' weights, one per sequence with a token, as TRL, which
        also counts a sequence without tokens, as weight 1).

    Raises:
        ValueError: unknown ``loss_type``/``importance_sampling_level``/``kl_estimator``/``is_mode`` (lists the
            valid ones), shape/dtype mismatches, ``beta < 0``, ``beta > 0`` without ``ref_logprobs``,
            non-positive clip ranges, ``entropy_coef`` without ``entropy``, a NaN or infinite ``beta``,
            ``epsilon``, ``epsilon_high``, ``entropy_coef``, ``is_min`` or ``is_max``, ``is_min > is_max``.
        TypeError: any of those numbers not a real number; ``max_completion_length`` a float (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    check_grpo_options(loss_type, importance_sampling_level, kl_estimator, is_mode)
    _float("logprobs", logprobs, 2)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropy", entropy),
                    ("sampling_logprobs", sampling_logprobs)):
        if t is not None:
            _float(name, t, 2)
    _same_shape("logprobs", logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, entropy=entropy,
                sampling_logprobs=sampling_logprobs)
    adv = _broadcast_advantages(advantages, logprobs)
    beta = check_finite_number(beta, "beta", minimum=0.0)
    entropy_coef = check_finite_number(entropy_coef, "entropy_coef")
    is_min = None if is_min is None else check_finite_number(is_min, "is_min")
    is_max = None if is_max is None else check_finite_number(is_max, "is_max")
    if is_min is not None and is_max is not None and is_min > is_max:
        raise ValueError(f"is_min must be <= is_max, got {is_min!r} > {is_max!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    check_num_items("num_items", num_items)
    check_num_items("num_tokens", num_tokens)
    # checked for every loss type (TRL passes its max_completion_length whatever the loss): a bad value was
    # accepted silently until the same call with loss_type="dr_grpo" refused it
    if max_completion_length is not None:
        _real("max_completion_length", max_completion_length, "a positive int or None")
        if not is_int(max_completion_length) or max_completion_length < 1:  # inline: every call runs it
            kind = ValueError if is_int(max_completion_length) else ArgumentTypeError
            raise kind(f"max_completion_length must be a positive int or None, got {max_completion_length!r}")
    epsilon = check_finite_number(epsilon, "epsilon")
    hi = epsilon if epsilon_high is None else check_finite_number(epsilon_high, "epsilon_high")
    if not (epsilon > 0 and hi > 0):
        raise ValueError(f"epsilon and epsilon_high must be > 0, got {epsilon!r}, {epsilon_high!r}")
    m = _mask(mask, logprobs)
    dtype = _compute_dtype(logprobs, adv)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    lp = logprobs.to(dtype)
    old = lp.detach() if old_logprobs is None else old_logprobs.detach().to(dtype)
    log_ratio = torch.where(m, lp - old, zero)
    a = torch.where(m, adv.detach().to(dtype).expand_as(lp), zero)
    if importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
    ratio = torch.exp(log_ratio)
    w = None if sampling_logprobs is None else is_weights(old, sampling_logprobs, m, is_mode, is_min, is_max)
    per_token = weighted_surrogate(log_ratio, a, epsilon, hi, w)
    metrics: dict[str, torch.Tensor] = {}
    # per token, with the token's own advantage (a GSPO ratio broadcasts over its sequence)
    low = ((ratio < 1.0 - epsilon) & (a < 0)).to(dtype).detach()
    high = ((ratio > 1.0 + hi) & (a > 0)).to(dtype).detach()
    if importance_sampling_level == "sequence":  # each sequence's clipped fraction, averaged over sequences
        def stat(x):
            return masked_mean(x, m, dim=1).mean() if x.shape[0] else zero
    else:
        def stat(x):
            return masked_mean(x, m)
    metrics["clip_ratio/low_mean"] = stat(low)
    metrics["clip_ratio/high_mean"] = stat(high)
    metrics["clip_ratio/region_mean"] = stat(torch.maximum(low, high))
    metrics["clip_ratio"] = metrics["clip_ratio/region_mean"]
    if w is not None:
        # statistics over the weights as they are: one per sequence (with a completion token) in the sequence
        # modes, as TRL logs them; a token mean there would weigh each sequence's one weight by its length
        wm = w[:, 0][m.any(dim=1)] if is_mode.startswith("sequence") else w[m]
        metrics["sampling/importance_sampling_ratio/min"] = wm.min() if wm.numel() else zero
        metrics["sampling/importance_sampling_ratio/mean"] = wm.mean() if wm.numel() else zero
        metrics["sampling/importance_sampling_ratio/max"] = wm.max() if wm.numel() else zero
    if beta > 0:
        kl = kl_penalty(lp, ref_logprobs.detach().to(dtype), kl_estimator, m)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), m)
    per_token = torch.where(m, per_token, zero)

    if loss_type in ("bnpo", "dapo"):  # num_items counts tokens
        n = m.sum().clamp(min=1).to(dtype) if num_items is None else step_count("num_items", num_items, m.sum(), dtype, lp.device)
        loss = per_token.sum() / n
    else:  # grpo, dr_grpo: num_items counts sequences
        n_seq = step_count("num_items", max(logprobs.shape[0], 1) if num_items is None else num_items,
                           logprobs.shape[0], dtype, lp.device)
        if loss_type == "grpo":
            per_seq = per_token.sum(dim=1) / m.sum(dim=1).clamp(min=1).to(dtype)
            loss = per_seq.sum() / n_seq
        else:
            # a batch of width 0 has no token (its sum is 0): it was refused as "max_completion_length ... got None"
            length = max(logprobs.shape[1], 1) if max_completion_length is None else max_completion_length
            loss = per_token.sum() / (n_seq * length)
    if entropy is not None:
        ent = torch.where(m, entropy.to(dtype), zero)
        metrics["entropy"] = masked_mean(ent.detach(), m)
        if entropy_coef:
            n_tok = entropy_normaliser(loss_type, num_items, num_tokens, m.sum(), dtype)
            loss = loss - entropy_coef * ent.sum() / n_tok
    return loss, metrics
