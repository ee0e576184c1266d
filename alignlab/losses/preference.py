r"""Offline preference losses on sequence log-probabilities.

Every loss here is a plain function of per-sequence log-probabilities
(``log pi(y|x)`` summed, or averaged, over the completion tokens; see
:func:`alignlab.losses.logprobs.sequence_logprobs`).  The user runs the policy
and the reference in their own loop, then calls e.g.::

    loss, metrics = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)
    loss.backward()

Each function returns ``(loss, metrics)``.  ``metrics`` holds detached 0-d
tensors (no host sync is forced); the keys follow TRL's trainers:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` plus per-loss
extras.

Notation: :math:`\pi_c, \pi_r` policy log-probs of the chosen / rejected
completion, :math:`\rho_c, \rho_r` the same under the reference, the implicit
log-ratios :math:`h_c = \pi_c - \rho_c`, :math:`h_r = \pi_r - \rho_r`, and
:math:`\Delta = h_c - h_r`.

Gradient accumulation: every loss takes ``num_items=``, the number of pairs (completions for KTO and
UNA) in the whole optimiser step, summed over micro-batches and ranks; the mean over this batch becomes
this batch's sum over ``num_items``, so the micro-batch losses add up to the big-batch loss exactly.  A
``num_items`` that is not a number >= 0 or a 0-d tensor raises ``TypeError``/``ValueError``, and so does one with
``reduction`` other than ``"mean"``.  ``num_items=0`` means an empty step: it gives a zero loss on an empty batch
and raises ``ValueError`` on a batch with pairs (a 0-d tensor is not checked, to spare a device sync).
Arguments of the wrong kind (a log-prob that is no tensor; a ``beta``, any other positive coefficient or a
``label_smoothing`` that is no real number: a str, None, a bool) raise :class:`~alignlab.ArgumentTypeError`, a
``TypeError`` that is also a ``ValueError``; values out of range (``beta <= 0``, NaN, inf) a plain ``ValueError``.

Half-precision inputs are upcast to float32 before the loss is formed; float64
stays float64.  An empty batch gives a zero loss that is still connected to the
graph and NaN means in ``metrics``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, is_finite_real, is_int, is_real

__all__ = [
    "DPO_LOSS_TYPES",
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "UNA_LOSS_TYPES",
    "dpo_loss",
    "dpo_loss_types",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
    "cpo_loss",
    "una_loss",
]

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
"""Valid ``loss_type`` values of :func:`dpo_loss` (``aot_unpaired`` is TRL>=1.0's name for ``aot_pair``)."""

# loss types whose loss is a function of the single logit z = beta * Delta; the R-DPO length margin enters there.
_LOGIT_LOSS_TYPES = frozenset({"sigmoid", "robust", "hinge", "exo_pair", "discopop", "sigmoid_norm"})
# loss types that sort over the batch: they couple every pair of the batch, so no per-micro-batch form is exact.
_BATCH_SORTED = frozenset({"aot", "aot_pair", "aot_unpaired"})
# the dpo_loss types whose value depends on label_smoothing
_SMOOTHED = frozenset({"sigmoid", "sigmoid_norm", "robust", "exo_pair"}) | _BATCH_SORTED
# loss types that divide the log-ratios by the completion length when lengths are given.
_LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm"})

CPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
UNA_LOSS_TYPES: tuple[str, ...] = ("mse", "bce")
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------
def _check_logps(**named: torch.Tensor | None) -> torch.dtype:
    """All given tensors: floating, 1-D, one shape, one device.  Returns the dtype the loss is computed in."""
    shape = None
    first = None
    dtype = None
    device = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor of shape (batch,), got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (batch,), got {tuple(t.shape)}")
        if shape is None:
            shape, first, device = t.shape, name, t.device
        elif t.shape != shape:
            raise ValueError(
                f"batch size mismatch: {first} has shape {tuple(shape)} but {name} has shape {tuple(t.shape)}"
            )
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all must be on one device")
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return torch.promote_types(dtype, torch.float32)


def dpo_loss_types(loss_type: str | Sequence[str]) -> list[str]:
    """``loss_type`` of :func:`dpo_loss` as a list: one name of :data:`DPO_LOSS_TYPES`, or a non-empty list/tuple
    of them (combined with ``loss_weights``, in order). ``ValueError`` naming ``loss_type`` and listing the valid
    names otherwise: an unknown name or an empty list; for None, a number or a set (no order to pair with the
    weights), or a list holding something other than names, an :class:`~alignlab.ArgumentTypeError` (a
    ``ValueError`` too)."""
    if isinstance(loss_type, str):
        loss_types = [loss_type]
    elif isinstance(loss_type, (list, tuple)) and loss_type:
        loss_types = list(loss_type)
    else:
        kind = ValueError if isinstance(loss_type, (list, tuple)) else ArgumentTypeError
        raise kind(f"loss_type must be one of {list(DPO_LOSS_TYPES)} or a non-empty list/tuple of them, "
                         f"got {loss_type!r}")
    for lt in loss_types:
        if not isinstance(lt, str) or lt not in DPO_LOSS_TYPES:
            kind = ValueError if isinstance(lt, str) else ArgumentTypeError
            raise kind(f"unknown loss_type {lt!r}; valid loss types are {list(DPO_LOSS_TYPES)}")
    return loss_types


def _check_positive(name: str, value: float) -> float:
    # inline, not the shared check: every loss call runs this, and the valid path stays as cheap as it was
    if not is_finite_real(value) or value <= 0:  # Python or NumPy real; not a bool, NaN or inf
        kind = ValueError if is_real(value) else ArgumentTypeError
        raise kind(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")


def _check_label_smoothing(label_smoothing: float, upper: float = 1.0) -> float:
    if not is_real(label_smoothing) or not 0.0 <= label_smoothing < upper:  # NaN fails the range test
        kind = ValueError if is_real(label_smoothing) else ArgumentTypeError
        raise kind(f"label_smoothing must lie in [0, {upper}), got {label_smoothing!r}")
    return float(label_smoothing)


_LENGTHS_VALID = contextvars.ContextVar("alignlab_lengths_valid", default=False)


@contextlib.contextmanager
def _lengths_known_valid() -> Iterator[None]:
    """For callers that built the lengths themselves (scored-token counts, >= 0): skip the value check,
    which reads the tensor on the host and so would stall a CUDA stream that is still busy."""
    token = _LENGTHS_VALID.set(True)
    try:
        yield
    finally:
        _LENGTHS_VALID.reset(token)


def _lengths(name: str, lengths: torch.Tensor | Sequence[int] | None, like: torch.Tensor) -> torch.Tensor | None:
    """Completion lengths as a float tensor shaped like ``like``; every length must be >= 0 (a completion with no
    scored token has length 0: the losses that average over a completion divide by ``max(length, 1)``, so its
    average is 0, as ``sequence_logprobs(average=True)`` writes it)."""
    if lengths is None:
        return None
    try:  # a str or a list holding None failed inside torch without the argument's name
        t = torch.as_tensor(lengths, device=like.device)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentTypeError(f"{name} must be a tensor or a sequence of token counts, got "
                                f"{type(lengths).__name__}") from None
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one length per sequence), got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold token counts, got dtype {t.dtype}")
    t = t.to(like.dtype)
    if t.numel() and not _LENGTHS_VALID.get() and bool((~((t >= 0) & (t < math.inf))).any()):  # NaN fails both
        raise ValueError(f"{name} must be finite and >= 0 everywhere (number of completion tokens), with no NaN")
    return t


def check_num_items(name: str, value: int | float | torch.Tensor | None, reduction: str = "mean") -> None:
    """``value`` is None, a number >= 0 (a count, or a count over the world size) or a 0-d integer/float
    tensor (read on the device, no sync); it replaces the denominator of a mean, so it needs
    ``reduction="mean"``."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a number or a 0-d real tensor (a step-wide count), got "
                             f"shape {tuple(value.shape)} dtype {value.dtype}")
    elif not is_real(value):
        raise TypeError(f"{name} must be a number or a 0-d tensor (a step-wide count), got {type(value).__name__}")
    elif not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if reduction != "mean":
        raise ValueError(f"{name} replaces the denominator of the mean: it needs reduction='mean', got {reduction!r}")


def step_count(name: str, count: int | float | torch.Tensor, local_count: int | torch.Tensor,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A step-wide count (``num_items``, ``num_tokens``, ``num_nll_tokens``; see :func:`check_num_items`) as the
    0-d ``dtype`` denominator of this batch's sum.

    0 means the whole step is empty, so this batch must have nothing to count: then the denominator is 1 and
    the loss 0 (not NaN). A count under 1 (a count over the world size) divides as it is. ``local_count`` is
    what this batch has to count; it is read only when ``count`` is the number 0 (a tensor then costs one
    device sync). A 0-d tensor ``count`` is not checked (that would sync every call): 0 divides as 1.

    Raises:
        ValueError: ``count`` is the number 0 and ``local_count > 0``.
    """
    if isinstance(count, torch.Tensor):
        c = count.to(device)
        return torch.where(c > 0, c, torch.ones_like(c)).to(dtype)
    if count == 0:
        have = int(local_count)
        if have > 0:
            raise ValueError(f"{name} must be > 0: it counts the whole step (micro-batches and ranks), which "
                             f"includes this batch's {have}; 0 means an empty step")
        count = 1
    return torch.as_tensor(count, device=device).to(dtype)


def _reduce(per_example: torch.Tensor, reduction: str, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    if num_items is not None:
        total = per_example.sum()
        return total / step_count("num_items", num_items, per_example.numel(), total.dtype, total.device)
    if reduction == "none":
        return per_example
    if reduction == "sum" or per_example.numel() == 0:
        # an empty batch contributes nothing (mean of nothing would be NaN and poison the step)
        return per_example.sum()
    return per_example.mean()


def _mean(t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Detached mean for logging; NaN for an empty tensor, like TRL. ``keep``: a ``(batch,)`` bool mask of the
    entries to average (the others may hold inf/NaN); NaN when it keeps none, computed on the device."""
    t = t.detach()
    if t.numel() == 0:
        return torch.full((), float("nan"), dtype=t.dtype, device=t.device)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if keep is not None:
        return torch.where(keep, t, torch.zeros_like(t)).sum() / keep.sum().to(t.dtype)
    return t.mean()


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    margins: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's pair metrics; ``margins`` (default ``chosen - rejected``) when the loss formed them more
    carefully than the difference of two rewards that may both be infinite (AlphaPO); ``keep``: the pairs to
    average over (``(batch,)`` bool, default all)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    if margins is None:
        margins, won = chosen_rewards - rejected_rewards, chosen_rewards > rejected_rewards
    else:
        margins = margins.detach()
        won = margins > 0
    return {
        "rewards/chosen": _mean(chosen_rewards, keep),
        "rewards/rejected": _mean(rejected_rewards, keep),
        "rewards/margins": _mean(margins, keep),
        "rewards/accuracies": _mean(won.to(chosen_rewards.dtype), keep),
        "logps/chosen": _mean(chosen_logps, keep),
        "logps/rejected": _mean(rejected_logps, keep),
    }


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    r""":math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)` (conservative DPO when :math:`\varepsilon>0`)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = loss * (1.0 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return loss


# ----------------------------------------------------------------------------------------------------------------
# DPO family
# ----------------------------------------------------------------------------------------------------------------
def _dpo_per_pair(
    loss_type: str,
    *,
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    beta: float,
    label_smoothing: float,
    len_c: torch.Tensor | None,
    len_r: torch.Tensor | None,
    length_margin: torch.Tensor | None,
    discopop_tau: float,
) -> torch.Tensor:
    hc, hr = pc - rc, pr - rr
    if loss_type in _LENGTH_NORMALISED and len_c is not None:  # an empty completion averages to 0
        delta = hc / len_c.clamp(min=1) - hr / len_r.clamp(min=1)
    else:
        delta = hc - hr

    if loss_type in _LOGIT_LOSS_TYPES:
        z = beta * delta
        if length_margin is not None:
            z = z + length_margin
        if loss_type in ("sigmoid", "sigmoid_norm"):
            return _smoothed_sigmoid(z, label_smoothing)
        if loss_type == "robust":
            eps = label_smoothing
            if not eps:  # the sigmoid loss; the formula's 0 * log(sigmoid(-z)) was NaN at z = +inf
                return -F.logsigmoid(z)
            return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
        if loss_type == "hinge":
            return torch.relu(1.0 - z)
        if loss_type == "exo_pair":
            eps = label_smoothing
            # KL(softmax over {chosen, rejected} of the implicit rewards || [1 - eps, eps]). At z = +-inf (a -inf
            # log-prob) one softmax entry is 0 and 0 * log 0 was NaN: the limits -log(1 - eps) / -log(eps) instead,
            # with the formula evaluated at 0 there so that no NaN reaches the gradient either
            inf = torch.isinf(z)
            zf = torch.where(inf, 0.0, z)
            kl = torch.sigmoid(zf) * (F.logsigmoid(zf) - math.log1p(-eps)) + torch.sigmoid(-zf) * (
                F.logsigmoid(-zf) - math.log(eps)
            )
            return torch.where(inf, torch.where(z > 0, -math.log1p(-eps), -math.log(eps)).to(kl.dtype), kl)
        # discopop: blend of the logistic and the exponential loss, gated by sigmoid(z / tau). The exponential
        # term is formed in log space: exp(-z) alone overflows for z < -88 in float32, and inf times the gate's 0
        # made the loss and every gradient NaN where the paper's value is finite (about -z). At z = -inf (a -inf
        # chosen log-prob) the loss is the logistic term's +inf, with its slope: the blend there was inf - inf
        low = z == -math.inf
        zf = torch.where(low, 0.0, z)
        blend = -F.logsigmoid(zf) * torch.sigmoid(-zf / discopop_tau) + torch.exp(
            F.logsigmoid(zf / discopop_tau) - zf)
        return torch.where(low, -F.logsigmoid(z), blend)

    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * hc) - 0.5 * F.logsigmoid(-beta * hc) - 0.5 * F.logsigmoid(-beta * hr)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * hc) - F.logsigmoid(-beta * hr)
    if loss_type == "sppo_hard":
        return (hc - 0.5 / beta) ** 2 + (hr + 0.5 / beta) ** 2
    if loss_type == "aot":
        # optimal transport between the policy's and the reference's distribution of pair log-ratios
        delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return _smoothed_sigmoid(beta * delta, label_smoothing)
    if loss_type in ("aot_pair", "aot_unpaired"):
        delta = torch.sort(hc).values - torch.sort(hr).values
        return _smoothed_sigmoid(beta * delta, label_smoothing)
    if loss_type == "apo_zero":
        return (1.0 - torch.sigmoid(beta * hc)) + torch.sigmoid(beta * hr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * hc) + (1.0 - torch.sigmoid(beta * (hc - hr)))
    raise AssertionError(loss_type)  # unreachable: validated by the caller


def _aot_margins(loss_type: str, pc, pr, rc, rr):
    """The two vectors AOT sorts against each other: policy vs reference margins (``aot``), or the chosen vs
    rejected log-ratios (``aot_pair``)."""
    return (pc - pr, rc - rr) if loss_type == "aot" else (pc - rc, pr - rr)


def _aot_step_per_pair(loss_type, pc, pr, rc, rr, step, offset, beta, label_smoothing):
    r"""AOT's terms for this batch's pairs when the sort runs over the whole step.

    With the step's values :math:`\hat x, \hat y` from a first pass (no gradient), the :math:`k`-th
    smallest :math:`x` is paired with the :math:`k`-th smallest :math:`y`.  Each local :math:`x_i` contributes
    :math:`f(\beta(x_i - \hat y_{(r_i)}))`; each local :math:`y_j` the gradient of
    :math:`f(\beta(\hat x_{(s_j)} - y_j))` with value 0, so that summed over the step every sorted pair is
    counted once and every input gets the gradient of the one-batch sort.
    """
    spc, spr, src, srr = step
    x, y = _aot_margins(loss_type, pc, pr, rc, rr)
    xs, ys = _aot_margins(loss_type, spc, spr, src, srr)
    y, ys = y.expand_as(x), ys.expand_as(xs)  # a reference-free zero reference is a scalar
    idx = torch.arange(offset, offset + x.shape[0], device=x.device)
    order_x, order_y = torch.argsort(xs, stable=True), torch.argsort(ys, stable=True)
    rank_x, rank_y = torch.empty_like(order_x), torch.empty_like(order_y)
    rank_x[order_x] = torch.arange(xs.shape[0], device=x.device)
    rank_y[order_y] = torch.arange(ys.shape[0], device=x.device)
    y_partner = ys[order_y][rank_x[idx]]  # the y sorted against each local x
    x_partner = xs[order_x][rank_y[idx]]  # the x sorted against each local y

    def f(z):
        return _smoothed_sigmoid(beta * z, label_smoothing)

    per = f(x - y_partner)
    if y.requires_grad:  # the y side: its gradient, and a value of exactly 0
        per = per + (f(x_partner - y) - f(x_partner - y.detach()).detach())
    return per


def _check_aot_step(step, offset, n, dtype, device, reference_free):
    """The step's four log-prob vectors, detached and in ``dtype``; ``offset`` in range."""
    if not isinstance(step, (tuple, list)) or len(step) != 4:
        kind = ValueError if isinstance(step, (tuple, list)) else ArgumentTypeError
        raise kind("aot_step_logps must be a tuple (policy_chosen, policy_rejected, ref_chosen, ref_rejected) "
                   "of the whole step's sequence log-probs")
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    out = []
    for name, t in zip(names, step):
        if t is None and reference_free and name.startswith("ref"):
            out.append(torch.zeros((), dtype=dtype, device=device))
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
            kind = ValueError if isinstance(t, torch.Tensor) else ArgumentTypeError
            raise kind(f"aot_step_logps[{name}] must be a floating-point (n_step,) tensor")
        if t.shape != step[0].shape:
            raise ValueError(f"aot_step_logps[{name}] has shape {tuple(t.shape)}, expected {tuple(step[0].shape)}")
        out.append(t.detach().to(device=device, dtype=dtype))
    if not is_int(offset) or not 0 <= offset <= step[0].shape[0] - n:
        kind = ValueError if is_int(offset) else ArgumentTypeError
        raise kind(f"aot_step_offset must be an int in [0, {step[0].shape[0] - n}] (where this batch's "
                   f"{n} pairs sit in the step), got {offset!r}")
    return tuple(out)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    loss_weights: Sequence[float] | None = None,
    reference_free: bool = False,
    chosen_lengths: torch.Tensor | Sequence[int] | None = None,
    rejected_lengths: torch.Tensor | Sequence[int] | None = None,
    length_alpha: float = 0.0,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    aot_step_logps: Sequence[torch.Tensor | None] | None = None,
    aot_step_offset: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Direct Preference Optimization and its variants.

    With :math:`z = \beta\Delta + \alpha(|y_c| - |y_r|)` (the second term only for R-DPO, ``length_alpha=α``):

    ============== ===============================================================================================
    ``loss_type``  per-pair loss
    ============== ===============================================================================================
    ``sigmoid``    :math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`; DPO, Rafailov et al.
                   "Direct Preference Optimization" (arXiv 2305.18290); :math:`\varepsilon` =
                   ``label_smoothing`` > 0 is conservative DPO (cDPO, Mitchell 2023).
    ``robust``     :math:`\frac{-(1-\varepsilon)\log\sigma(z) + \varepsilon\log\sigma(-z)}{1-2\varepsilon}`,
                   rDPO, "Provably Robust DPO" (arXiv 2403.00409); needs :math:`0\le\varepsilon<1/2`.
    ``ipo``        :math:`(\Delta' - \frac{1}{2\beta})^2`, IPO, "A General Theoretical Paradigm to Understand
                   Learning from Human Preferences" (arXiv 2310.12036). :math:`\Delta'` uses per-token averaged
                   log-ratios when ``chosen_lengths``/``rejected_lengths`` are given (TRL's convention), else
                   :math:`\Delta` as passed.
    ``hinge``      :math:`\max(0, 1 - z)`, SLiC, "Calibrating Sequence Likelihood" (arXiv 2305.10425).
    ``exo_pair``   :math:`\sigma(z)(\log\sigma(z) - \log(1-\varepsilon)) + \sigma(-z)(\log\sigma(-z) -
                   \log\varepsilon)`, EXO, "Towards Efficient Exact Optimization of Language Model Alignment"
                   (arXiv 2402.00856); needs :math:`\varepsilon>0` (1e-3 recommended).
    ``nca_pair``   :math:`-\log\sigma(\beta h_c) - \tfrac12\log\sigma(-\beta h_c) - \tfrac12\log\sigma(-\beta h_r)`,
                   NCA, "Noise Contrastive Alignment of Language Models with Explicit Rewards" (arXiv 2402.05369).
    ``bco_pair``   :math:`-\log\sigma(\beta h_c) - \log\sigma(-\beta h_r)`, BCO, "Binary Classifier Optimization
                   for Large Language Model Alignment" (arXiv 2404.04656), without the running reward shift.
    ``sppo_hard``  :math:`(h_c - \frac{1}{2\beta})^2 + (h_r + \frac{1}{2\beta})^2`, SPPO with hard win
                   probabilities, "Self-Play Preference Optimization" (arXiv 2405.00675).
    ``aot``        :math:`-(1-\varepsilon)\log\sigma(\beta d) - \varepsilon\log\sigma(-\beta d)`,
                   :math:`d = \mathrm{sort}(\pi_c-\pi_r) - \mathrm{sort}(\rho_c-\rho_r)` over the batch; AOT,
                   "Distributional Preference Alignment of LLMs via Optimal Transport" (arXiv 2406.05882).
    ``aot_pair``   same with :math:`d = \mathrm{sort}(h_c) - \mathrm{sort}(h_r)` (alias ``aot_unpaired``).
    ``apo_zero``   :math:`1 - \sigma(\beta h_c) + \sigma(\beta h_r)`, APO, "Anchored Preference Optimization"
                   (arXiv 2408.06266), eq. 7.
    ``apo_down``   :math:`\sigma(\beta h_c) + 1 - \sigma(\beta\Delta)`, APO eq. 8.
    ``discopop``   :math:`(1-g)(-\log\sigma(z)) + g\,e^{-z}`, :math:`g=\sigma(z/\tau)`, DiscoPOP, "Discovering
                   Preference Optimization Algorithms with and for LLMs" (arXiv 2406.08414); :math:`g\,e^{-z}`
                   is formed in log space, finite for very negative :math:`z` (no NaN from ``inf * 0``).
    ``sigmoid_norm`` ``sigmoid`` on per-token averaged log-ratios (lengths required).
    ============== ===============================================================================================

    R-DPO ("Disentangling Length from Quality in Direct Preference Optimization", arXiv 2403.19159) adds the
    margin :math:`\alpha(|y_c| - |y_r|)` inside the logit of the logit-based types (``sigmoid``, ``robust``,
    ``hinge``, ``exo_pair``, ``discopop``, ``sigmoid_norm``).  Reference-free mode (``reference_free=True``)
    sets :math:`\rho_c=\rho_r=0`.

    ``loss_type`` may be a sequence (e.g. ``("sigmoid", "bco_pair")``, as in MPO); the loss is then
    :math:`\sum_k w_k \cdot \mathrm{reduce}(\ell_k)` with ``loss_weights`` :math:`w_k` (default 1).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` summed completion log-probs of the policy.
        ref_chosen_logps, ref_rejected_logps: ``(batch,)`` the same under the reference; ``None`` only with
            ``reference_free=True``. Constants: detached, so no gradient reaches them even if they require grad
            (as TRL computes them under ``torch.no_grad()``); the fused forms, on either schedule, do the same.
        beta: :math:`\beta > 0`, the KL-regularisation strength (:math:`\tau` for IPO).
        loss_type: one of :data:`DPO_LOSS_TYPES` or a non-empty list/tuple of them.
        label_smoothing: :math:`\varepsilon`, the assumed label-flip rate.
        chosen_lengths, rejected_lengths: ``(batch,)`` completion token counts (R-DPO, ``ipo``, ``sigmoid_norm``);
            a completion with none (length 0) has per-token average log-ratio 0 in ``ipo`` / ``sigmoid_norm``.
        length_alpha: :math:`\alpha` of R-DPO (0 disables it).
        discopop_tau: :math:`\tau` of DiscoPOP.
        reduction: ``"mean"`` (over pairs), ``"sum"`` or ``"none"`` (per-pair losses, ``(batch,)``; for ``aot``
            they are indexed by sorted rank, not by pair, so ``"none"`` does not mix the aot types with others).
        num_items: pairs in the whole optimiser step (every gradient-accumulation micro-batch and rank); the
            mean becomes this batch's sum over ``num_items``, so the micro-batch losses sum to the big-batch
            loss exactly.  ``aot``/``aot_pair`` sort over the batch and need ``aot_step_logps`` as well.
        aot_step_logps: for the ``aot`` types under accumulation, the step's four sequence log-prob vectors
            ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``, ``(n_step,)`` each, from a first
            pass without gradient over every micro-batch (gathered over ranks; the references may be None
            with ``reference_free``).  The sort then runs over the step, and summing the micro-batch losses
            gives the one-batch loss and gradients, provided the second pass reproduces the first pass's
            values.  The mean divides by ``num_items`` (default ``n_step``).
        aot_step_offset: where this batch's first pair sits in the ``aot_step_logps`` vectors.

    Returns:
        ``(loss, metrics)``; ``metrics["rewards/chosen"]`` is the batch mean of :math:`\beta h_c` (and so on) as
        TRL logs it.

    Raises:
        ValueError: mismatched batch sizes or devices, non-float or non-1-D inputs, ``beta <= 0``, an unknown
            ``loss_type`` or one that is neither a name nor a list/tuple of names, None included (the message
            lists the valid ones), ``label_smoothing`` outside the loss type's range or > 0 for types it does not change, missing
            reference log-probs or lengths, ``num_items`` with an ``aot`` type or a reduction other than mean,
            negative or NaN lengths, a NaN or infinite ``loss_weights`` entry or ``length_alpha``, ``reduction='none'``
            mixing an aot type with another.
        TypeError: ``num_items`` neither a number nor a tensor; ``reference_free`` not a bool;
            ``loss_weights`` not a sequence or its entries, ``length_alpha``, ``beta``, ``discopop_tau`` or
            ``label_smoothing`` not real numbers, ``aot_step_offset`` not an int, lengths that are no token counts
            (all but the first two an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    loss_types = dpo_loss_types(loss_type)
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    elif not hasattr(loss_weights, "__len__") or isinstance(loss_weights, str):  # a bare 0.5: len() named nothing
        raise ArgumentTypeError(f"loss_weights must be a sequence of numbers, one per loss_type, got {loss_weights!r}")
    elif len(loss_weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has {len(loss_types)}")
    loss_weights = [check_finite_number(w, "loss_weights") for w in loss_weights]
    length_alpha = check_finite_number(length_alpha, "length_alpha")
    reference_free = as_bool(reference_free, "reference_free")  # a truthy string would drop the reference silently
    beta = _check_positive("beta", beta)
    discopop_tau = _check_positive("discopop_tau", discopop_tau)
    _check_reduction(reduction)
    check_num_items("num_items", num_items, reduction)
    sorted_types = _BATCH_SORTED.intersection(loss_types)
    if aot_step_logps is not None and not sorted_types:
        raise ValueError(f"aot_step_logps applies to the aot loss types {sorted(_BATCH_SORTED)}, not {loss_types}")
    if aot_step_logps is not None and reduction == "none":
        raise ValueError("aot_step_logps needs reduction='mean' or 'sum' (per-pair terms of a step-wide sort)")
    if reduction == "none" and sorted_types and len(sorted_types) != len(loss_types):
        raise ValueError(f"reduction='none' cannot combine {sorted(sorted_types)} (terms indexed by sorted rank) with "
                         f"{[t for t in loss_types if t not in sorted_types]} (terms indexed by pair): their per-pair "
                         "sum would add terms of different pairs; use 'mean' / 'sum', or one call per kind")
    if num_items is not None and sorted_types and aot_step_logps is None:
        raise ValueError(
            "num_items alone cannot make the aot loss types exact: they sort the log-ratios over the batch, and "
            "a micro-batch's sort is not the step's; pass the step's log-probs as aot_step_logps too"
        )
    upper = 0.5 if "robust" in loss_types else 1.0
    label_smoothing = _check_label_smoothing(label_smoothing, upper)
    if "exo_pair" in loss_types and label_smoothing <= 0.0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if label_smoothing and not _SMOOTHED.intersection(loss_types):
        raise ValueError(f"label_smoothing={label_smoothing!r} has no effect on loss_type {loss_types} (it applies to "
                         f"{sorted(_SMOOTHED)}); leave it at 0")

    if reference_free:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("reference_free=True ignores the reference: pass ref_chosen_logps=ref_rejected_logps=None")
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless reference_free=True")

    dtype = _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if reference_free:
        rc = rr = torch.zeros((), dtype=dtype, device=pc.device)
    else:
        # the reference is a constant: detached here, so every caller (unfused, fused lazy or eager) agrees
        rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)

    len_c = _lengths("chosen_lengths", chosen_lengths, pc)
    len_r = _lengths("rejected_lengths", rejected_lengths, pc)
    if (len_c is None) != (len_r is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if "sigmoid_norm" in loss_types and len_c is None:
        raise ValueError("loss_type='sigmoid_norm' needs chosen_lengths and rejected_lengths")
    step = None
    if aot_step_logps is not None:
        step = _check_aot_step(aot_step_logps, aot_step_offset, pc.shape[0], dtype, pc.device, reference_free)
        if num_items is None and reduction == "mean":
            num_items = step[0].shape[0]
    length_margin = None
    if length_alpha:
        if len_c is None:
            raise ValueError("length_alpha (R-DPO) needs chosen_lengths and rejected_lengths")
        bad = [lt for lt in loss_types if lt not in _LOGIT_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"length_alpha (R-DPO) applies to the logit-based loss types {sorted(_LOGIT_LOSS_TYPES)}, not {bad}"
            )
        length_margin = length_alpha * (len_c - len_r)

    loss = None
    for lt, weight in zip(loss_types, loss_weights):
        if step is not None and lt in _BATCH_SORTED:
            per_pair = _aot_step_per_pair(lt, pc, pr, rc, rr, step, aot_step_offset, beta, label_smoothing)
            term = float(weight) * _reduce(per_pair, reduction, num_items)
            loss = term if loss is None else loss + term
            continue
        per_pair = _dpo_per_pair(
            lt,
            pc=pc,
            pr=pr,
            rc=rc,
            rr=rr,
            beta=beta,
            label_smoothing=label_smoothing,
            len_c=len_c,
            len_r=len_r,
            length_margin=length_margin,
            discopop_tau=discopop_tau,
        )
        term = float(weight) * _reduce(per_pair, reduction, num_items)
        loss = term if loss is None else loss + term

    metrics = _pair_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------------------------
def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    *,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | float | None = None,
    loss_type: str = "kto",
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Kahneman–Tversky Optimization on unpaired, binary-labelled completions.

    "KTO: Model Alignment as Prospect Theoretic Optimization" (Ethayarajh et al., arXiv 2402.01306), eq. 7:

    .. math::
        h = \pi(y|x) - \rho(y|x),\qquad
        \ell = \begin{cases} \lambda_D\,(1 - \sigma(\beta(h - z_0))) & y\ \text{desirable}\\
                             \lambda_U\,(1 - \sigma(\beta(z_0 - h))) & y\ \text{undesirable}\end{cases}

    The reference point :math:`z_0` is the batch estimate of :math:`\mathrm{KL}(\pi\|\rho)` from mismatched
    (prompt, completion) pairs, :math:`z_0 = \max(0, \mathrm{mean}(\pi_{KL} - \rho_{KL}))`, detached (no gradient
    flows through it), as in TRL.  ``loss_type="apo_zero_unpaired"`` is APO-zero for unpaired data
    (arXiv 2408.06266): :math:`1-\sigma(\beta h)` for desirable, :math:`\sigma(\beta h)` for undesirable, no
    :math:`z_0`.  With ``reduction="mean"`` the loss is the mean over all completions.

    Gradient accumulation, exactly: :math:`z_0` is a statistic of the whole batch, so estimating it per
    micro-batch gives each micro-batch another reference point.  Two passes make the step exact at no extra
    forward: first run the mismatched completions of every micro-batch (no gradient) and sum
    :math:`\sum(\pi_{KL} - \rho_{KL})` and their count over the step (and over ranks: all-reduce both sums),
    then call each micro-batch with ``kl = max(0, sum / count)`` and ``num_items`` = completions of the step.

    Args:
        policy_logps, ref_logps: ``(batch,)`` summed completion log-probs; ``ref_logps`` is a constant (detached:
            no gradient reaches it, on every path, fused or not).
        desirable: ``(batch,)`` bool (or 0/1) labels, True for desirable completions. Non-bool labels are
            checked to be 0/1 (one device sync).
        policy_kl_logps, ref_kl_logps: ``(n_kl,)`` log-probs of the mismatched completions (policy is used only
            for :math:`z_0`, no gradient).  Required for ``loss_type="kto"`` unless ``kl`` is given.
        beta: :math:`\beta > 0`.
        desirable_weight, undesirable_weight: :math:`\lambda_D, \lambda_U > 0`.
        kl: an explicit reference point :math:`z_0` (overrides the KL log-probs).
        loss_type: one of :data:`KTO_LOSS_TYPES`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per completion, in input order).
        num_items: completions in the whole optimiser step (micro-batches and ranks): the mean becomes this
            batch's sum over ``num_items``.

    Returns:
        ``(loss, metrics)`` with ``kl``, ``rewards/chosen`` (mean :math:`\beta h` over desirable),
        ``rewards/rejected``, ``rewards/margins`` (their difference), ``logps/chosen``, ``logps/rejected``.

    Raises:
        ValueError: bad shapes/dtypes, ``beta <= 0``, non-positive weights, unknown ``loss_type``, missing or
            empty KL log-probs, labels other than 0/1, a NaN or infinite number ``kl``.
        TypeError: ``kl`` neither a tensor nor a real number; a log-prob or ``desirable`` that is no tensor, a
            ``beta`` or weight that is no number (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {list(KTO_LOSS_TYPES)}")
    beta = _check_positive("beta", beta)
    desirable_weight = _check_positive("desirable_weight", desirable_weight)
    undesirable_weight = _check_positive("undesirable_weight", undesirable_weight)
    _check_reduction(reduction)
    check_num_items("num_items", num_items, reduction)
    dtype = _check_logps(policy_logps=policy_logps, ref_logps=ref_logps)
    if not isinstance(desirable, torch.Tensor) or desirable.shape != policy_logps.shape:
        kind = ValueError if isinstance(desirable, torch.Tensor) else ArgumentTypeError
        raise kind(f"desirable must be a tensor of shape {tuple(policy_logps.shape)}")
    if desirable.dtype != torch.bool and bool(((desirable != 0) & (desirable != 1)).any()):
        raise ValueError("desirable must hold booleans (or exactly 0/1)")  # one sync, only for non-bool labels
    is_good = desirable.to(device=policy_logps.device, dtype=torch.bool)

    pi, ref = policy_logps.to(dtype), ref_logps.detach().to(dtype)  # the reference is a constant
    h = pi - ref
    if loss_type == "apo_zero_unpaired":
        z0 = torch.zeros((), dtype=dtype, device=pi.device)
        good_loss = 1.0 - torch.sigmoid(beta * h)
        bad_loss = torch.sigmoid(beta * h)
    else:
        if kl is not None:
            if not isinstance(kl, torch.Tensor):  # a tensor is not read back (that would sync)
                kl = check_finite_number(kl, "kl")
            z0 = torch.as_tensor(kl, dtype=dtype, device=pi.device).detach()
            if z0.dim() != 0:
                raise ValueError(f"kl must be a scalar, got shape {tuple(z0.shape)}")
        else:
            if policy_kl_logps is None or ref_kl_logps is None:
                raise ValueError(
                    "loss_type='kto' needs policy_kl_logps and ref_kl_logps (mismatched-pair log-probs) or kl"
                )
            kl_dtype = _check_logps(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
            if policy_kl_logps.numel() == 0:
                raise ValueError(
                    "policy_kl_logps and ref_kl_logps are empty: z0 needs at least one mismatched pair "
                    "(or pass kl= explicitly)"
                )
            diff = (policy_kl_logps.to(kl_dtype) - ref_kl_logps.to(kl_dtype)).detach()
            z0 = diff.mean().clamp(min=0).to(dtype)
        good_loss = 1.0 - torch.sigmoid(beta * (h - z0))
        bad_loss = 1.0 - torch.sigmoid(beta * (z0 - h))
    per_example = torch.where(is_good, desirable_weight * good_loss, undesirable_weight * bad_loss)
    loss = _reduce(per_example, reduction, num_items)

    rewards = beta * h.detach()
    chosen_r, rejected_r = rewards[is_good], rewards[~is_good]
    metrics = {
        "kl": z0.detach(),
        "rewards/chosen": _mean(chosen_r),
        "rewards/rejected": _mean(rejected_r),
        "rewards/margins": _mean(chosen_r) - _mean(rejected_r),
        "logps/chosen": _mean(pi[is_good]),
        "logps/rejected": _mean(pi[~is_good]),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# reference-free losses: ORPO, SimPO, CPO
# ----------------------------------------------------------------------------------------------------------------
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - e^{x})` for :math:`x \le 0`, switching formulas at :math:`-\log 2` (Mächler 2012).

    Each branch sees only inputs on its own side of the switch, so the branch not taken holds no
    ``inf`` whose gradient (times the zero that ``where`` gives it) would be NaN."""
    far = x < -math.log(2.0)
    return torch.where(far, torch.log1p(-torch.exp(torch.where(far, x, -1.0))), torch.log(-torch.expm1(torch.where(far, -1.0, x))))


class _OddsRatioLogSigmoid(torch.autograd.Function):
    r""":math:`\log\sigma(\log\mathrm{odds}(y_c) - \log\mathrm{odds}(y_r))` per pair, with a backward
    that stays finite up to :math:`\bar\pi_c = 0` (where :math:`\log\mathrm{odds}(y_c) = +\infty`).

    With :math:`o = \log\mathrm{odds}` and :math:`L = o_c - o_r`, autograd would form
    :math:`\sigma(-L)\cdot 1/(1 - e^{\bar\pi_c})`, i.e. :math:`0\cdot\infty` at the limit. Written as
    :math:`\partial/\partial\bar\pi_c = 1 / (-\mathrm{expm1}(\bar\pi_c) + e^{\bar\pi_c - o_r})` it
    tends to :math:`e^{o_r}`, the odds of the rejected completion; the rejected side is
    :math:`-\sigma(-L) / (-\mathrm{expm1}(\bar\pi_r))` (infinite, as the loss, at :math:`\bar\pi_r = 0`).

    The backward recomputes the odds from the inputs with differentiable ops, so that a backward with
    ``create_graph=True`` (Hessian-vector products, gradient penalties) differentiates it: with
    ``once_differentiable`` the second derivatives came back as zeros, silently.
    """

    @staticmethod
    def forward(ctx, pc, pr):
        log_odds = pc - _log1mexp(pc) - (pr - _log1mexp(pr))
        ctx.save_for_backward(pc, pr)
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros (0 / 0 at π̄_c = 0)
        return F.logsigmoid(log_odds), log_odds

    @staticmethod
    def backward(ctx, grad, grad_log_odds):
        pc, pr = ctx.saved_tensors
        if grad is None:
            grad = torch.zeros_like(pc)
        orr = pr - _log1mexp(pr)
        log_odds = pc - _log1mexp(pc) - orr
        d_pc = 1.0 / (-torch.expm1(pc) + torch.exp(pc - orr))
        d_pr = -torch.sigmoid(-log_odds) / -torch.expm1(pr)
        g_pc, g_pr = grad * d_pc, grad * d_pr
        if grad_log_odds is not None:  # ∂L/∂π̄_c = 1 / (1 - e^π̄_c), ∂L/∂π̄_r = -1 / (1 - e^π̄_r)
            g_pc = g_pc + grad_log_odds / -torch.expm1(pc)
            g_pr = g_pr - grad_log_odds / -torch.expm1(pr)
        return g_pc, g_pr


def _nll(name: str, nll: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if nll is None:
        return None
    if not isinstance(nll, torch.Tensor) or not nll.is_floating_point() or nll.dim() != 0:
        kind = ValueError if isinstance(nll, torch.Tensor) else ArgumentTypeError
        raise kind(f"{name} must be a floating-point scalar tensor (the mean NLL of the chosen completions)")
    return nll.to(dtype)


def _nonempty_pairs(chosen_lengths, rejected_lengths, like: torch.Tensor) -> torch.Tensor | None:
    """``(batch,)`` bool on ``like``'s device: both completions of the pair have a scored token (length > 0); None
    when neither length is given. The values are not checked: that would read them back from the device."""
    if chosen_lengths is None and rejected_lengths is None:
        return None
    if chosen_lengths is None or rejected_lengths is None:
        missing, given = ("chosen_lengths", "rejected_lengths") if chosen_lengths is None else ("rejected_lengths",
                                                                                                 "chosen_lengths")
        raise ValueError(f"{missing} is None but {given} is given: pass both (completion token counts) or neither")
    keep = None
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        try:
            t = torch.as_tensor(lengths, device=like.device)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(f"{name} must be a tensor or a sequence of token counts, got "
                                    f"{type(lengths).__name__}") from None
        if t.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)} (one token count per pair), got {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must hold token counts, got dtype {t.dtype}")
        keep = t > 0 if keep is None else keep & (t > 0)
    return keep


def _reduce_kept(per_pair: torch.Tensor, keep: torch.Tensor, reduction: str,
                 num_items: int | torch.Tensor | None) -> torch.Tensor:
    """:func:`_reduce` over the pairs ``keep`` marks (the others hold 0): the mean divides by their number."""
    if num_items is not None:
        total = per_pair.sum()
        return total / step_count("num_items", num_items, keep.sum(), total.dtype, total.device)
    if reduction == "mean":
        return per_pair.sum() / keep.sum().clamp(min=1).to(per_pair.dtype)
    return per_pair if reduction == "none" else per_pair.sum()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll_loss: torch.Tensor | None = None,
    beta: float = 0.1,
    *,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | Sequence[int] | None = None,
    rejected_lengths: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Odds-Ratio Preference Optimization.

    "ORPO: Monolithic Preference Optimization without Reference Model" (Hong et al., arXiv 2403.07691):

    .. math::
        \log\mathrm{odds}(y) = \bar\pi(y) - \log(1 - e^{\bar\pi(y)}),\qquad
        \mathcal L = \mathcal L_{\mathrm{NLL}} - \beta\,\mathrm{mean}\,
            \log\sigma\big(\log\mathrm{odds}(y_c) - \log\mathrm{odds}(y_r)\big)

    where :math:`\bar\pi` is the **per-token average** completion log-prob (:math:`\le 0`) and
    :math:`\beta` is the paper's :math:`\lambda`. At :math:`\bar\pi(y_c) = 0` the odds-ratio term is 0 and
    its gradient the finite limit :math:`-\beta\,e^{\bar\pi(y_r)}/(1 - e^{\bar\pi(y_r)})` (per pair, before
    the mean); at :math:`\bar\pi(y_r) = 0` it is :math:`+\infty`. Checking that no log-prob is positive reads
    one flag back from the device (one sync per call).

    **Empty completions.** A completion with no scored token has no average log-prob (0/0;
    ``sequence_logprobs(average=True)`` writes 0, which reads as probability 1 and made the loss inf, or NaN
    when both sides were empty; TRL gives NaN). With ``chosen_lengths``/``rejected_lengths`` a pair whose chosen
    or rejected length is 0 has no odds ratio: it adds 0 to the odds-ratio term, passes it no gradient, and is
    left out of its mean (``"mean"`` divides by the pairs with both completions non-empty; 0 if there are none),
    so every other pair's loss and gradients are those of the batch without it. The same pairs are left out of
    the metrics. All of it is computed on the device (no sync). With ``num_items`` the caller's step-wide count
    should count the non-empty pairs only. ``chosen_nll_loss`` is the caller's: an empty chosen completion adds
    no token to a token-mean NLL (as :func:`~alignlab.losses.fused_preference.fused_linear_orpo` forms it).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` averaged log-probs (``average=True`` in
            :func:`~alignlab.losses.logprobs.sequence_logprobs`).
        chosen_nll_loss: scalar SFT loss on the chosen completions; ``None`` leaves only the odds-ratio term.
        beta: :math:`\lambda > 0`.
        reduction: ``"mean"``/``"sum"`` over pairs of the odds-ratio term, or ``"none"`` for per-pair
            :math:`-\beta\log\sigma(\cdot)` (the NLL is then not added).
        num_items: pairs in the whole optimiser step (micro-batches and ranks): the preference term becomes
            this batch's sum over ``num_items``.  For exact accumulation pass ``chosen_nll_loss`` normalised
            step-wide too: this batch's chosen-token NLL **sum** over the step's chosen tokens (e.g.
            ``linear_cross_entropy(..., reduction="sum").loss / count_tokens(step_chosen_labels)``).
        chosen_lengths, rejected_lengths: ``(batch,)`` scored tokens of each completion (the denominators of the
            averages), both or neither; a pair with a length ``<= 0`` on either side is empty (above). ``None``:
            every completion is taken to be non-empty.

    Returns:
        ``(loss, metrics)``; extra metrics ``log_odds_ratio`` (mean log-sigmoid), ``log_odds_chosen`` (mean
        log-odds difference) and ``nll_loss``.  Rewards are :math:`\beta\bar\pi` as TRL logs them.

    Raises:
        ValueError: bad shapes/dtypes, ``beta <= 0``, a non-scalar ``chosen_nll_loss``, a log-prob ``> 0``,
            lengths of the wrong shape or dtype, or only one of the two.
        TypeError: a log-prob or ``chosen_nll_loss`` that is no tensor, a ``beta`` that is no number (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    beta = _check_positive("beta", beta)
    _check_reduction(reduction)
    check_num_items("num_items", num_items, reduction)
    dtype = _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    nll = _nll("chosen_nll_loss", chosen_nll_loss, dtype)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if pc.numel() and bool(((pc > 0) | (pr > 0)).any()):
        raise ValueError(
            "policy_chosen_logps and policy_rejected_logps must be <= 0 (per-token averaged log-probs); "
            "a positive value is no log-probability"
        )
    keep = _nonempty_pairs(chosen_lengths, rejected_lengths, pc)
    if keep is None:
        ratio, log_odds = _OddsRatioLogSigmoid.apply(pc, pr)
        loss = _reduce(-beta * ratio, reduction, num_items)
    else:
        # an empty pair's odds are evaluated at a finite stand-in and then dropped: its inf/NaN would otherwise
        # reach the sum, and its gradient (0 · inf) the other pairs through the shared backward
        stand_in = torch.full_like(pc, -1.0)
        ratio, log_odds = _OddsRatioLogSigmoid.apply(torch.where(keep, pc, stand_in), torch.where(keep, pr, stand_in))
        loss = _reduce_kept(torch.where(keep, -beta * ratio, torch.zeros_like(ratio)), keep, reduction, num_items)
    if nll is not None and reduction != "none":
        loss = loss + nll
    metrics = _pair_metrics(beta * pc, beta * pr, pc, pr, keep=keep)
    metrics["log_odds_ratio"] = _mean(ratio, keep)
    metrics["log_odds_chosen"] = _mean(log_odds, keep)
    if nll is not None:
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _cpo_per_pair(
    loss_type: str, margin: torch.Tensor, beta: float, label_smoothing: float, gamma: float
) -> torch.Tensor:
    if loss_type == "simpo":
        return _smoothed_sigmoid(beta * margin - gamma, label_smoothing)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(beta * margin, label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * margin)
    return (margin - 1.0 / (2.0 * beta)) ** 2  # ipo


def _alphapo_margin(pc: torch.Tensor, pr: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""AlphaPO's reward difference :math:`r(\pi_c) - r(\pi_r)` with :math:`r(\pi) = (1 - e^{-\alpha\pi})/\alpha`,
    formed as :math:`e^{m}\,(e^{u_r - m} - e^{u_c - m})/\alpha` with :math:`u = -\alpha\pi`, :math:`m = \max(u_c, u_r)`.

    Both exponentials of the plain difference overflow together on summed log-probs (:math:`\pi = -500`,
    :math:`\alpha = 0.25`: :math:`e^{125}` is inf in float32), and ``inf - inf`` is NaN; here only :math:`e^m`
    can overflow. Where it does, the difference is :math:`\pm\infty` with the sign of the bracket (0 where
    :math:`\pi_c = \pi_r`) and passes no gradient (the finite branch is evaluated with :math:`e^m = 1` there, so no
    ``0 \cdot \infty`` reaches backward). :math:`m` is detached: the difference does not depend on it.
    """
    big = torch.finfo(pc.dtype).max
    # clamped: a -inf log-prob (u = +inf) gives the plain formula's sign instead of inf - inf in the bracket
    uc, ur = (-alpha * pc).clamp(-big, big), (-alpha * pr).clamp(-big, big)
    m = torch.maximum(uc, ur).detach()
    bracket = torch.exp(ur - m) - torch.exp(uc - m)
    scale = torch.exp(m)
    overflow = torch.isinf(scale)
    finite = torch.where(overflow, torch.ones_like(scale), scale) * bracket / alpha
    saturated = torch.where(bracket == 0, torch.zeros_like(m), torch.sign(bracket).detach() * math.copysign(math.inf, alpha))
    return torch.where(overflow, saturated, finite)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: torch.Tensor | Sequence[int] | None = None,
    rejected_lengths: torch.Tensor | Sequence[int] | None = None,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Simple Preference Optimization (reference-free, length-normalised, target margin).

    "SimPO: Simple Preference Optimization with a Reference-Free Reward" (Meng et al., arXiv 2405.14734), eq. 6:

    .. math::
        \ell = -\log\sigma\Big(\frac{\beta}{|y_c|}\log\pi(y_c) - \frac{\beta}{|y_r|}\log\pi(y_r) - \gamma\Big)

    (with ``label_smoothing`` :math:`\varepsilon`, the conservative form
    :math:`-(1-\varepsilon)\log\sigma(u) - \varepsilon\log\sigma(-u)`).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` per-token **averaged** log-probs, or summed
            log-probs together with ``chosen_lengths``/``rejected_lengths`` (then divided here; a length of 0, a
            completion with no scored token, averages to 0 as ``sequence_logprobs(average=True)`` writes it).
        beta: :math:`\beta > 0` (the paper uses 2.0–2.5).
        gamma: the target reward margin :math:`\gamma` (absolute, not the ratio :math:`\gamma/\beta`).
        label_smoothing: :math:`\varepsilon \in [0, 1)`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        num_items: pairs in the whole optimiser step (micro-batches and ranks): the mean becomes this batch's
            sum over ``num_items``.

    Returns:
        ``(loss, metrics)``; rewards are :math:`\beta\,\overline{\log\pi}` as TRL's CPO/SimPO trainer logs them.

    Raises:
        ValueError: bad shapes/dtypes/lengths, ``beta <= 0``, ``label_smoothing`` outside [0, 1), a NaN or
            infinite ``gamma``.
        TypeError: ``gamma`` not a real number, lengths that are no token counts (a str, a list holding None).
    """
    beta = _check_positive("beta", beta)
    label_smoothing = _check_label_smoothing(label_smoothing)
    _check_reduction(reduction)
    check_num_items("num_items", num_items, reduction)
    gamma = check_finite_number(gamma, "gamma")
    dtype = _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    len_c = _lengths("chosen_lengths", chosen_lengths, pc)
    len_r = _lengths("rejected_lengths", rejected_lengths, pc)
    if (len_c is None) != (len_r is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if len_c is not None:  # an empty completion averages to 0
        pc, pr = pc / len_c.clamp(min=1), pr / len_r.clamp(min=1)
    loss = _reduce(_cpo_per_pair("simpo", pc - pr, beta, label_smoothing, gamma), reduction, num_items)
    return loss, _pair_metrics(beta * pc, beta * pr, pc, pr)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll_loss: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Contrastive Preference Optimization: reference-free DPO plus a behaviour-cloning NLL term.

    "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation"
    (Xu et al., arXiv 2401.08417), eq. 3:

    .. math::
        \mathcal L = \mathrm{mean}\big[-\log\sigma(\beta(\pi_c - \pi_r))\big] + \alpha_{\mathrm{CPO}}\,
        \mathcal L_{\mathrm{NLL}}(y_c)

    ``loss_type`` swaps the preference term like in :func:`dpo_loss` (``hinge``, ``ipo``) or to SimPO's
    :math:`-\log\sigma(\beta(\pi_c-\pi_r) - \gamma)` (``simpo``; CPO-SimPO).  For ``ipo``/``simpo`` pass
    per-token averaged log-probs, as TRL does.  ``alpha`` :math:`\ne 0` applies the AlphaPO reward shape
    ("AlphaPO: Reward Shape Matters for LLM Alignment", Gupta et al., arXiv 2501.03884)
    :math:`r(y) = (1 - p(y)^{-\alpha})/\alpha = (1 - e^{-\alpha\pi})/\alpha` in place of :math:`\pi = \log p(y)`.
    AlphaPO is defined on **length-normalized** log-probs (:math:`p(y)^{1/|y|}`, the per-token mean; TRL's
    ``loss_type="alphapo"`` is ``simpo`` on averaged log-probs): on summed log-probs :math:`e^{-\alpha\pi}`
    leaves float range (:math:`\pi = -500`, :math:`\alpha = 0.25`: :math:`e^{125}`). The difference
    :math:`r(y_c) - r(y_r)` is formed with the larger exponent factored out, so it is never NaN: where it is
    beyond the dtype's range it is :math:`\pm\infty` (0 for equal log-probs) and those pairs pass no
    gradient; ``rewards/chosen``/``rewards/rejected`` may then be :math:`-\infty`.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` completion log-probs.
        chosen_nll_loss: scalar NLL of the chosen completions; required when ``cpo_alpha != 0``.
        beta: :math:`\beta > 0`.
        loss_type: one of :data:`CPO_LOSS_TYPES`.
        label_smoothing: :math:`\varepsilon` for ``sigmoid``/``simpo``.
        cpo_alpha: weight of the NLL term.
        simpo_gamma: :math:`\gamma` for ``loss_type="simpo"``.
        alpha: AlphaPO exponent (0 = plain log-probs); pass per-token averaged log-probs with it.
        reduction: ``"mean"``/``"sum"`` (plus the NLL term) or ``"none"`` (per-pair preference term only).
        num_items: pairs in the whole optimiser step (micro-batches and ranks): the preference term becomes
            this batch's sum over ``num_items``.  For exact accumulation pass ``chosen_nll_loss`` normalised
            step-wide too: this batch's chosen-token NLL **sum** over the step's chosen tokens (e.g.
            ``linear_cross_entropy(..., reduction="sum").loss / count_tokens(step_chosen_labels)``).

    Returns:
        ``(loss, metrics)``; rewards :math:`\beta\pi` (or :math:`\beta r` under AlphaPO), ``nll_loss``.

    Raises:
        ValueError: bad shapes/dtypes, ``beta <= 0``, unknown ``loss_type``, ``cpo_alpha != 0`` without
            ``chosen_nll_loss``, a NaN or infinite ``cpo_alpha``/``simpo_gamma``/``alpha``, ``label_smoothing`` > 0 with
            ``hinge`` / ``ipo``.
        TypeError: ``cpo_alpha``/``simpo_gamma``/``alpha`` not a real number.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {list(CPO_LOSS_TYPES)}")
    beta = _check_positive("beta", beta)
    label_smoothing = _check_label_smoothing(label_smoothing)
    if label_smoothing and loss_type not in ("sigmoid", "simpo"):
        raise ValueError(f"label_smoothing={label_smoothing!r} has no effect on loss_type {loss_type!r} (it applies to "
                         "'sigmoid' and 'simpo'); leave it at 0")
    cpo_alpha = check_finite_number(cpo_alpha, "cpo_alpha")
    simpo_gamma = check_finite_number(simpo_gamma, "simpo_gamma")
    alpha = check_finite_number(alpha, "alpha")
    _check_reduction(reduction)
    check_num_items("num_items", num_items, reduction)
    dtype = _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    nll = _nll("chosen_nll_loss", chosen_nll_loss, dtype)
    if cpo_alpha and nll is None:
        raise ValueError("cpo_alpha != 0 needs chosen_nll_loss (the behaviour-cloning term); pass cpo_alpha=0.0 to drop it")
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if alpha:
        rc = (1.0 - torch.exp(-alpha * pc)) / alpha  # for the metrics: -inf where e^{-αp} overflows
        rr = (1.0 - torch.exp(-alpha * pr)) / alpha
        margin = _alphapo_margin(pc, pr, alpha)  # not rc - rr: inf - inf where both overflow
    else:
        rc, rr = pc, pr
        margin = rc - rr
    loss = _reduce(_cpo_per_pair(loss_type, margin, beta, label_smoothing, simpo_gamma), reduction, num_items)
    if cpo_alpha and reduction != "none":
        loss = loss + cpo_alpha * nll
    metrics = _pair_metrics(beta * rc, beta * rr, pc, pr, margins=beta * margin if alpha else None)
    if nll is not None:
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# UNA
# ----------------------------------------------------------------------------------------------------------------
def una_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "mse",
    *,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""UNA: align the implicit reward with an explicit reward or score.

    "UNA: Unifying Alignments of RLHF/PPO, DPO and KTO by a Generalized Implicit Reward Function" (Wang et al.,
    arXiv 2408.15339).  With the implicit reward :math:`r_\theta = \beta(\pi(y|x) - \rho(y|x))` and an explicit
    score :math:`s \in [0, 1]` (a binary label, or a reward-model / rater score normalised to [0, 1]):

    .. math::
        \ell_{\mathrm{MSE}} = (\sigma(r_\theta) - s)^2,\qquad
        \ell_{\mathrm{BCE}} = -s\log\sigma(r_\theta) - (1-s)\log\sigma(-r_\theta)

    Works on unpaired completions; for pairs, concatenate chosen and rejected.

    Args:
        policy_logps, ref_logps: ``(batch,)`` summed completion log-probs; ``ref_logps`` is a constant (detached:
            no gradient reaches it).
        scores: ``(batch,)`` explicit rewards in [0, 1] (floats, or binary labels as bool or 0 / 1 integers).
        beta: :math:`\beta > 0`.
        loss_type: ``"mse"`` or ``"bce"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        num_items: completions in the whole optimiser step (micro-batches and ranks): the mean becomes this
            batch's sum over ``num_items``.

    Returns:
        ``(loss, metrics)`` with ``rewards/implicit`` (mean :math:`r_\theta`), ``rewards/explicit`` (mean s).

    Raises:
        ValueError: bad shapes/dtypes, scores outside [0, 1] (NaN included), ``beta <= 0``, unknown ``loss_type``.
    """
    if loss_type not in UNA_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {list(UNA_LOSS_TYPES)}")
    beta = _check_positive("beta", beta)
    _check_reduction(reduction)
    check_num_items("num_items", num_items, reduction)
    if (isinstance(scores, torch.Tensor) and not (scores.is_floating_point() or scores.is_complex())
            and isinstance(policy_logps, torch.Tensor)):
        scores = scores.to(policy_logps.dtype)  # binary labels (desirable / not), bool or 0/1 ints; [0, 1] below
    dtype = _check_logps(policy_logps=policy_logps, ref_logps=ref_logps, scores=scores)
    s = scores.to(dtype)
    if s.numel() and bool((~((s >= 0) & (s <= 1))).any()):  # NaN is outside too
        raise ValueError("scores must lie in [0, 1] (normalise explicit rewards first)")
    r = beta * (policy_logps.to(dtype) - ref_logps.detach().to(dtype))  # the reference is a constant
    if loss_type == "mse":
        per_example = (torch.sigmoid(r) - s) ** 2
    else:
        # each term 0 where its weight is (a score of 0 or 1 next to an infinite r: 0 * -inf was NaN)
        per_example = (torch.where(s == 0, 0.0, -s * F.logsigmoid(r))
                       + torch.where(s == 1, 0.0, -(1.0 - s) * F.logsigmoid(-r)))
    metrics = {"rewards/implicit": _mean(r), "rewards/explicit": _mean(s)}
    return _reduce(per_example, reduction, num_items), metrics
