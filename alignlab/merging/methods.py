"""Model-merging methods as plain functions on tensors.

Every function takes one tensor per model (all of the same shape, on one device, e.g. one
``(out_features, in_features)`` projection of each checkpoint) and returns the
merged tensor in ``out_dtype`` (default: the dtype of the first input).
Arithmetic runs in float32 (float64 when the inputs are float64), the way merges
of bf16 checkpoints are usually done, and the result is rounded once, to
``out_dtype``: bf16 inputs merged into float32 keep every float32 digit. A float16 result that
overflowed (an inf where no input has one: float32 values beyond ±65504) raises ``ValueError``.
Merges run without autograd (parameters can be passed as they are, e.g. ``layer.weight``; the
result never requires grad). A NaN in any input tensor raises ``ValueError`` naming the input, how many NaN it
holds and the first one's index: a merge has no number to give there. mergekit writes NaN into its result instead
(the element, or the whole tensor where a norm or dot product sees it), and before this check TIES-style methods
dropped the NaN in the sign election and returned a finite merge, wrong at that element. Each method finds a NaN
through sums it takes anyway or one cheap sum per chunk, and scans for it only when a sum is not finite (an inf
passes as before); the chunked methods report it after writing the chunks (``out=`` may then hold part of the
merge).
Options are checked before any arithmetic: flags (``normalize``, ``filter_wise``) must
be bools, scalars (``lambda_``, ``t``, ``epsilon``, ...) finite numbers and ``out_dtype``
a floating-point dtype; a ``TypeError``/``ValueError`` names the argument otherwise.

Notation: ``θ_0`` is the base (pre-trained) tensor, ``θ_i`` the fine-tuned ones,
``δ_i = θ_i − θ_0`` their task vectors and ``w_i`` the per-model weights.

The task-vector methods (task arithmetic, TIES, DARE, breadcrumbs, DELLA) share
one combination step, :func:`combine_deltas`; each method only decides how to
sparsify each ``δ_i`` before it. Where mergekit (arcee-ai/mergekit) implements the
same method the defaults follow it, so a recipe gives the same numbers in both,
except DARE / DELLA's rescaling (the papers' ``1/p`` by default, mergekit's L1 rescaling with
``rescale="l1"``) and Karcher's weights (mergekit 0.1.5 ignores them); the differences that remain
are listed in each docstring.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Literal, Sequence

import torch
from torch import Tensor

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, is_int, is_real

__all__ = [
    "breadcrumbs",
    "chipalign",
    "combine_deltas",
    "dare",
    "dare_mask",
    "della",
    "della_mask",
    "karcher",
    "linear",
    "magnitude_mask",
    "model_stock",
    "slerp",
    "task_arithmetic",
    "ties",
]

Consensus = Literal["sum", "count"]
Rescale = Literal["inverse", "l1"]

# SLERP works through the flattened tensors in chunks of this many elements, small enough for the
# float32 copies of both inputs to stay in cache, so its scratch is bounded whatever the tensor size.
_SLERP_CHUNK = 1 << 16
# Element-wise merges (task arithmetic, TIES after its thresholds) run over chunks of this size.
_CHUNK = 1 << 18


# --------------------------------------------------------------------------- output


class _TensorDest:
    """Where a chunked merge writes its result: straight into a preallocated flat tensor.

    The chunked methods ask ``chunk(start, length)`` for the tensor to write elements
    ``start:start+length`` into, then call ``put(start, chunk)``. Anything with these two methods
    can take the place of this class (``out=``): the checkpoint merge passes one that writes each
    chunk to its place in the output file, so no whole-tensor output buffer exists.
    """

    __slots__ = ("flat",)

    def __init__(self, flat: Tensor):
        self.flat = flat

    def chunk(self, start: int, length: int) -> Tensor:
        return self.flat[start : start + length]

    def put(self, start: int, values: Tensor) -> None:
        pass


def _dest(out, like: Tensor, dtype: torch.dtype):
    """The destination of a chunked merge, and the tensor to return (``None`` for a chunk writer)."""
    if out is None:
        flat = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return _TensorDest(flat), flat.reshape(like.shape)
    if isinstance(out, Tensor):
        if out.shape != like.shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(like.shape)}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        return _TensorDest(out.reshape(-1)), out
    return out, None


_FLOAT16_MAX = torch.finfo(torch.float16).max


class _Float16Overflow(ValueError):
    """A merge rounded to float16 gave inf where every input was finite (the checkpoint merge names the tensor)."""


def _refuse_float16_inf(result: Tensor, inputs, where: str, remedy: str) -> None:
    """``ValueError`` if ``result`` is float16 and holds an inf although no tensor of ``inputs`` does.

    float32 arithmetic can leave float16's range (±65504) and rounding the result to float16 writes inf, a
    weight that breaks the model without a word. An inf already in an input is passed through; bfloat16 has
    float32's range and is not checked. ``where`` starts the message (the function or the tensor), ``remedy``
    ends it (what to do instead). Shared by the merge methods, :func:`~alignlab.merging.fold_lora` and the
    adapter merges, so that all of them refuse alike.
    """
    if not isinstance(result, Tensor) or result.dtype != torch.float16:
        return
    overflowed = int(torch.isinf(result).sum())
    if overflowed and not any(bool(torch.isinf(t).any()) for t in inputs):
        raise _Float16Overflow(
            f"{where}: {overflowed} merged value(s) are beyond float16's largest finite value "
            f"{_FLOAT16_MAX:.0f} and round to inf although no input is infinite; {remedy}")


def _finite_float16(fn):
    """Refuse a float16 result that overflowed (:func:`_refuse_float16_inf`), e.g. from ``lambda_`` or
    weights above 1."""

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        result = fn(*args, **kwargs)
        _refuse_float16_inf(result, _tensor_args(args, kwargs), fn.__name__,
                                "pass out_dtype=torch.bfloat16 (float32's range) or torch.float32, or check the "
                                "weights / lambda_")
        return result

    return checked


class _NaNInput(ValueError):
    """An input of a merge holds NaN. ``position`` is the input's place among the method's tensors in call order
    (the base first where there is one), so that the checkpoint merge can name the model rather than the argument;
    ``count`` and ``first`` (the first NaN's index) say where."""

    def __init__(self, message: str, position: int, count: int, first: tuple[int, ...]):
        super().__init__(message)
        self.position, self.count, self.first = position, count, first


NAN_ADVICE = ("a merge has no number to give there (mergekit writes NaN into the result; some methods would drop "
              "it unseen); replace them first (torch.nan_to_num, or the base's values) or leave that model out")


def _refuse_nan(inputs: Sequence[Tensor], names: Sequence[str], where: str) -> None:
    """``ValueError`` naming the first of ``inputs`` that holds a NaN; nothing if none does.

    A whole-tensor scan (~2 ns per element on CPU), so the methods call it only once something they compute anyway,
    or a cheap sum, has turned out NaN (or inf, whose inputs pass): finite inputs never pay for it.
    """
    for position, (t, name) in enumerate(zip(inputs, names)):
        nan = torch.isnan(t)
        count = int(nan.sum())
        if count:
            first = tuple(int(i) for i in nan.nonzero()[0])
            raise _NaNInput(f"{where}: {name} holds {count} NaN value(s), the first at index {first}: {NAN_ADVICE}",
                            position, count, first)


class _NaNWatch:
    """Adds up every element it is shown into one float64 scalar on the tensors' device: a NaN anywhere leaves it
    NaN, so :meth:`clean` (one host sync, at the end) is True when none of them held a NaN. It can also come out
    non-finite without a NaN (an inf, a sum beyond float64's range); the caller then scans (:func:`_refuse_nan`),
    finds none and goes on. One running scalar, not a list of per-chunk sums: small tensors kept alive across the
    chunk loop pinned the heap between the 1 MiB chunk buffers (a chunked merge of 8M elements took ~50 MiB more)."""

    __slots__ = ("total",)

    def __init__(self, like: Tensor):
        self.total = torch.zeros((), dtype=torch.float64, device=like.device)

    def add(self, t: Tensor) -> None:
        self.total += t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)

    def clean(self) -> bool:
        return self.total.device.type == "meta" or bool(torch.isfinite(self.total))


def _with_base(models: Sequence[Tensor]) -> list[str]:
    """The names :func:`_refuse_nan` gives ``[base, *models]``."""
    return ["base"] + [f"models[{i}]" for i in range(len(models))]


def _no_nan(*tensors: Tensor) -> bool:
    """Whether none of ``tensors`` holds a NaN, told by sums (see :class:`_NaNWatch`): False may be an inf."""
    watch = _NaNWatch(tensors[0])
    for t in tensors:
        watch.add(t)
    return watch.clean()


def _tensor_args(args, kwargs):
    """The input tensors of a merge call (``out=``, keyword-only, holds the result)."""
    for a in (*args, *(v for k, v in kwargs.items() if k != "out")):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


# --------------------------------------------------------------------------- checks


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_tensors(tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    if len(tensors) == 0:
        raise ValueError("tensors must hold at least one tensor (one per model), got an empty sequence")
    first = tensors[0]
    for t, name in zip(tensors, names):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {names[0]} has shape {tuple(first.shape)}"
            )
        if t.device != first.device:
            # no merge moves tensors between devices: mixed inputs raised torch's unnamed "Expected all
            # tensors to be on the same device" in some methods, copied silently in others
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}; "
                             "move every input to one device")


def _check_models(base: Tensor, models: Sequence[Tensor]) -> None:
    if isinstance(models, Tensor):
        raise TypeError("models must be a sequence of tensors (one per model), not a single tensor")
    if len(models) == 0:
        raise ValueError("models must hold at least one fine-tuned tensor, got an empty sequence")
    _check_tensors([base, *models], ["base"] + [f"models[{i}]" for i in range(len(models))])


def _per_model(value, n: int, name: str, default: float | None = None) -> list[float]:
    """Broadcast a scalar or check a per-model sequence of floats."""
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        value = default
    if isinstance(value, Tensor):
        value = value.tolist()
    if is_real(value):  # Python or NumPy scalar, not a bool
        out = [float(value)] * n
    else:
        if isinstance(value, (str, bytes)):  # list("0.5") would be read character by character
            raise TypeError(f"{name} must be a number or one number per model, got {value!r}")
        value = [value] if isinstance(value, bool) else list(value)
        if any(isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be a number or one number per model, not a bool, got {value!r}")
        # 0-d tensors / NumPy arrays and one-element tensors are numbers too
        value = [v.item() if getattr(v, "ndim", None) == 0 or (isinstance(v, Tensor) and v.numel() == 1) else v
                 for v in value]
        if not all(is_real(v) for v in value):  # float("1e3") would accept a string from a config
            raise TypeError(f"{name} must be a number or one number per model, got {value!r}")
        out = [float(v) for v in value]
        if len(out) != n:
            raise ValueError(f"{name} has {len(out)} entries but there are {n} models")
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _densities(density, n: int, required: bool = False) -> list[float]:
    """``density`` per model, each in [0, 1]; None is 1 (keep all) unless ``required`` (a method without a
    default, where a None from a recipe or a helper would otherwise drop nothing without a word)."""
    if density is None and required:
        raise ArgumentTypeError("density: expected a number in [0, 1] or one per model, got None")
    out = _per_model(density, n, "density", 1.0)
    for d in out:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {d}")
    return out


def _number(value, name: str, minimum: float | None = None) -> float:
    """``value`` (a real number or a one-element tensor) as a finite Python float, else an error naming it."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return check_finite_number(value, name, minimum)


def _check_out_dtype(out_dtype) -> None:
    """``TypeError`` unless ``out_dtype`` is None or a floating-point ``torch.dtype`` (a merge rounded to an
    integer dtype would silently truncate every weight)."""
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")


def _check_options(normalize, lambda_, out_dtype) -> tuple[bool, float]:
    """Check the options every task-vector method shares: ``(normalize, lambda_)`` as Python values.

    A truthy string such as ``"false"`` would switch ``normalize`` on, and a NaN ``lambda_`` would
    reach every output element, so both are refused here rather than merged silently."""
    normalize = as_bool(normalize, "normalize")
    _check_out_dtype(out_dtype)
    return normalize, _number(lambda_, "lambda_")


# --------------------------------------------------------------------------- plain averages


@torch.no_grad()
@_finite_float16
def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Weighted average of whole models ("model soup").

    .. math:: \theta = \frac{\sum_i w_i \theta_i}{\sum_i w_i}
              \quad(\text{or } \sum_i w_i\theta_i \text{ with } normalize=False)

    Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
    models improves accuracy without increasing inference time", arXiv:2203.05482.

    Args:
        tensors: one tensor per model, any shape, all the same shape.
        weights: one weight per model; equal weights when omitted.
        normalize: divide by ``Σ w_i``.

    Raises:
        ValueError: empty input, mismatched shapes, wrong number of weights,
            ``normalize=True`` with weights summing to 0, or a NaN in any tensor (whatever its weight).
        TypeError: non-floating tensors.
    """
    if isinstance(tensors, Tensor):
        raise TypeError("tensors must be a sequence of tensors (one per model), not a single tensor")
    _check_tensors(tensors, [f"tensors[{i}]" for i in range(len(tensors))])
    normalize = as_bool(normalize, "normalize")
    _check_out_dtype(out_dtype)
    w = _per_model(weights, len(tensors), "weights", 1.0)
    total = math.fsum(w)
    if normalize and abs(total) < 1e-8:
        raise ValueError(f"weights sum to {total}; cannot normalize (pass normalize=False)")
    wd = _work_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=wd, device=tensors[0].device)
    for t, wi in zip(tensors, w):
        out.add_(t.to(wd), alpha=wi)
    if not _no_nan(out):  # a NaN input is NaN in out, whatever its weight (NaN·0 is NaN)
        _refuse_nan(tensors, [f"tensors[{i}]" for i in range(len(tensors))], "linear")
    if normalize:  # by the weights summed as mergekit sums them: rounded to the work dtype, a tensor sum in it
        # (an exact sum rounded once differed by an ulp); the exact one where that rounding cancels to 0
        out.div_(float(torch.tensor(w, dtype=wd).sum()) or total)
    return out.to(out_dtype or tensors[0].dtype)


# --------------------------------------------------------------------------- task vectors


@torch.no_grad()
@_finite_float16
def combine_deltas(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Add weighted task vectors to the base, optionally with TIES sign election.

    Without consensus (task arithmetic):

    .. math:: \theta = \theta_0 + \lambda \frac{\sum_i w_i\delta_i}{Z},\quad Z=\sum_i w_i

    With ``consensus="sum"`` (TIES): per element the elected sign is
    ``γ = sign(Σ_i w_i δ_i)`` (``+`` on ties), the mask is ``m_i = [sign(w_iδ_i) = γ]``
    (zeros never agree) and

    .. math:: \theta = \theta_0 + \lambda \frac{\sum_i m_i w_i\delta_i}{Z},\quad
              Z = \sum_i m_i w_i \;(\text{1 where it is 0})

    ``consensus="count"`` elects the sign by the number of models instead of mass.
    ``Z`` is used only when ``normalize=True``; a whole-model ``Σ w_i`` smaller than
    1e-8 is replaced by 1 (mergekit does the same).

    Args:
        base: ``θ_0``, any shape.
        deltas: the (already sparsified) task vectors, same shape as ``base``, in
            the working dtype (float32/float64).
        weights: ``w_i`` (scalar or one per delta).

    Returns:
        The merged tensor in ``out_dtype`` (default ``base.dtype``).

    Raises:
        ValueError: no deltas, a delta shaped unlike ``base`` (naming it), not one finite weight per
            delta, a NaN / infinite ``lambda_``, an unknown ``consensus``, or a NaN in ``base`` or a delta (the
            sign election would drop it unseen).
        TypeError: non-floating tensors, a non-bool ``normalize``, a non-floating ``out_dtype``.
    """
    if isinstance(deltas, Tensor):
        raise TypeError("deltas must be a sequence of tensors (one per model), not a single tensor")
    if len(deltas) == 0:
        raise ValueError("deltas must hold at least one task vector, got an empty sequence")
    _check_tensors([base, *deltas], ["base"] + [f"deltas[{i}]" for i in range(len(deltas))])
    weights = _per_model(weights, len(deltas), "weights")
    normalize, lambda_ = _check_options(normalize, lambda_, out_dtype)
    wd = _work_dtype(base)
    if not _no_nan(base, *deltas):  # the sign election would drop a NaN unseen
        _refuse_nan([base, *deltas], ["base", *(f"deltas[{i}]" for i in range(len(deltas)))], "combine_deltas")
    return _combine(base, [d.to(wd) * w for d, w in zip(deltas, weights)], weights, consensus, normalize, lambda_,
                    out_dtype)


def _combine(base, weighted, weights, consensus, normalize, lambda_, out_dtype=None) -> Tensor:
    """:func:`combine_deltas` on already weighted deltas ``w_i δ_i`` that it may overwrite."""
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"consensus must be None, 'sum' or 'count', got {consensus!r}")
    wd = weighted[0].dtype
    if consensus is None:
        mixed = weighted[0].clone() if len(weighted) == 1 else torch.stack(weighted).sum(dim=0)
        # the weights rounded to the work dtype and added in it one by one, as mergekit forms its divisor (and as the
        # consensus branch below does): the exact sum rounded once was an ulp off mergekit's for some weights
        total = torch.zeros((), dtype=wd)
        for w in weights:
            total += w
        divisor = float(total) or math.fsum(weights)  # (the exact sum where the rounded one cancels to 0)
        if abs(divisor) < 1e-8:
            divisor = 1.0
        if normalize:
            mixed /= divisor
    else:
        if consensus == "sum":
            total = weighted[0].clone()
            for d in weighted[1:]:
                total += d
        else:
            total = weighted[0].sign()
            for d in weighted[1:]:
                total += d.sign()
        positive = total >= 0
        del total
        mixed = divisor = None
        for d, w in zip(weighted, weights):
            agree = torch.where(positive, d > 0, d < 0)
            disagree = agree.logical_not_()
            d.masked_fill_(disagree, 0.0)  # the disagreeing entries drop out of the mean
            if mixed is None:
                mixed, divisor = d, torch.full_like(d, w).masked_fill_(disagree, 0.0)
            else:
                mixed += d
                divisor += torch.full_like(d, w).masked_fill_(disagree, 0.0)
            del agree
        divisor.masked_fill_(divisor == 0, 1.0)
        if normalize:
            mixed /= divisor
    if lambda_ != 1.0:
        mixed *= lambda_
    mixed += base  # in place, base promoted element-wise: equal to base.to(wd) + mixed
    return mixed.to(out_dtype or base.dtype)  # the one rounding


@torch.no_grad()
def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    r"""Boolean mask keeping the ``k = max(1, ⌊density·n⌋)`` largest ``|δ|``.

    The TIES "trim" step. Ties at the threshold are broken by position (the
    earlier element wins), i.e. the order of a stable descending sort; the
    selection itself runs in O(n) with ``kthvalue``. ``density = 1`` keeps
    everything, ``density = 0`` nothing.

    Args:
        delta: a task vector, any shape (``n`` elements).
        density: fraction of elements to keep.

    Returns:
        A ``bool`` tensor shaped like ``delta``.

    Raises:
        ValueError: ``density`` is not a finite number (NaN has no rank to keep)
            or lies outside [0, 1] (a percentage such as 20 would keep everything).
    """
    density = _number(density, "density")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0.0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mag = delta.detach().abs().reshape(-1).float()
    threshold = _kth_largest(mag, k)
    keep = mag > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        tied = (mag == threshold).nonzero().squeeze(1)
        keep[tied[:missing]] = True
    return keep.reshape(delta.shape)


def _kth_largest(values: Tensor, k: int) -> Tensor:
    """Exact ``k``-th largest entry of a 1-D tensor, usually without a full selection pass.

    A fixed-seed sample brackets the answer between two sample quantiles; the
    exact value is then selected among the few entries inside the bracket. If the
    bracket misses (it has a probability far below 1e-6), fall back to ``kthvalue``
    over everything. Either way the result is exact.
    """
    n = values.numel()
    if n <= 1 << 18:
        return torch.kthvalue(values, n - k + 1).values
    s = 1 << 16
    idx = torch.randint(n, (s,), generator=torch.Generator(device=values.device).manual_seed(0), device=values.device)
    sample = values[idx].sort().values
    q = (n - k + 0.5) / n  # where the answer sits, as an ascending fraction
    margin = 6.0 * math.sqrt(s * q * (1 - q)) + 32
    lo = sample[max(0, int(q * s - margin))]
    hi = sample[min(s - 1, int(q * s + margin))]
    above = int(torch.count_nonzero(values > hi))
    band = values[(values >= lo) & (values <= hi)]
    if above < k <= above + band.numel():
        return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(values, n - k + 1).values


@torch.no_grad()
def dare_mask(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Bernoulli(``density``) keep-mask shaped like ``delta`` (the DARE drop step).

    Raises:
        ValueError: ``density`` is not a number in [0, 1].
    """
    (density,) = _densities(density, 1, required=True)
    probs = torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    return torch.bernoulli(probs, generator=generator).bool()


@torch.no_grad()
def della_mask(
    delta: Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""DELLA's MagPrune: keep probabilities that grow with the magnitude rank.

    Within each row (the last dimension; a 1-D tensor is one row) the elements
    are ranked by ``|δ|``; with ``r̂ ∈ [0, 1]`` the normalised rank (0 = smallest)
    the keep probability is ``p = density − ε + 2ε·r̂``, so the mean keep rate is
    ``density`` and large entries survive more often.

    Returns:
        ``(mask, keep_prob)``, both shaped like ``delta``.

    Raises:
        ValueError: unless ``ε >= 0``, ``0 < density − ε`` and ``density + ε < 1``.
    """
    density, epsilon = _number(density, "density"), _number(epsilon, "epsilon", minimum=0)
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(
            f"DELLA needs 0 < density - epsilon and density + epsilon < 1, got density={density}, epsilon={epsilon}"
        )
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    width = rows.shape[-1]
    ranks = rows.abs().float().argsort(dim=-1, stable=True).argsort(dim=-1).float()
    rank01 = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    keep_prob = (density - epsilon) + 2.0 * epsilon * rank01
    mask = torch.bernoulli(keep_prob, generator=generator).bool()
    return mask.reshape(delta.shape), keep_prob.reshape(delta.shape)


@torch.no_grad()
@_finite_float16
def task_arithmetic(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""Task arithmetic: add weighted task vectors to the base.

    .. math:: \theta = \theta_0 + \lambda\,\frac{\sum_i w_i(\theta_i-\theta_0)}{Z},
              \quad Z = \textstyle\sum_i w_i \text{ if normalize else } 1

    Paper: Ilharco et al., "Editing Models with Task Arithmetic", arXiv:2212.04089.
    Defaults (``weights=1``, ``normalize=False``) follow mergekit's ``task_arithmetic``.

    Args:
        base: ``θ_0``, any shape.
        models: the fine-tuned ``θ_i``, same shape as ``base``.
        weights: ``w_i`` (scalar or one per model), default 1.
        normalize: divide by ``Σ w_i`` (left as 1 when that sum is ~0).
        lambda_: global scale of the merged task vector.
        out: optional preallocated result (contiguous, ``base``'s shape, ``out_dtype``).

    Raises:
        ValueError: no models, mismatched shapes (naming the offending tensor),
            wrong number of weights, a NaN in ``base`` or a model. TypeError: non-floating tensors.
    """
    _check_models(base, models)
    w = _per_model(weights, len(models), "weights", 1.0)
    normalize, lambda_ = _check_options(normalize, lambda_, out_dtype)
    return _chunked(base, models, w, lambda d, i, s: d, None, normalize, lambda_, out_dtype, out,
                    where="task_arithmetic")


@torch.no_grad()
@_finite_float16
def ties(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    *,
    density: Sequence[float] | float = 1.0,
    consensus: Consensus = "sum",
    normalize: bool = True,
    lambda_: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""TIES-Merging: trim, elect sign, disjoint mean.

    1. Trim: keep the top-``density`` fraction of each ``δ_i`` by magnitude
       (:func:`magnitude_mask`).
    2. Elect: ``γ = sign(Σ_i w_i δ̂_i)`` per element (``+`` when the sum is 0).
    3. Disjoint mean over the models that agree with ``γ``:

    .. math:: \theta = \theta_0 + \lambda\frac{\sum_i m_i w_i\hat\delta_i}{\sum_i m_i w_i},
              \quad m_i = [\operatorname{sign}(w_i\hat\delta_i) = \gamma]

    Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging
    Models", arXiv:2306.01708. Matches mergekit's ``ties`` (sign elected by the
    weighted mass, ``normalize=True`` by default, a zero divisor replaced by 1).
    Only ties *at* the trim threshold may resolve differently: we keep the
    earliest positions, mergekit keeps whatever an unstable ``argsort`` returns.

    Cost: with float32 arithmetic (16/32-bit inputs) the thresholds come from an
    exact radix selection and the merge runs over cache-sized chunks with bitwise
    masks (O(n), ~12 MiB of scratch whatever the size); the result equals the
    plain ``where``/``masked_fill_`` formulation, used for float64, bit for bit.

    Args:
        base: ``θ_0``, any shape.
        models: the fine-tuned ``θ_i``.
        weights: ``w_i`` (scalar or per model), default 1.
        density: fraction kept by the trim step (scalar or per model).
        consensus: ``"sum"`` (by mass, the paper) or ``"count"`` (by votes).
        normalize: divide by the agreeing weight mass.
        lambda_: scale of the merged task vector.
        out: optional preallocated result (contiguous, ``base``'s shape, ``out_dtype``).

    Raises:
        ValueError: bad density (outside [0, 1]), weights, shapes or consensus; a NaN in ``base`` or in any
            model, whatever its density (mergekit's TIES writes NaN there; the sign election here used to drop it
            and return a finite merge, wrong at that element).
    """
    _check_models(base, models)
    w = _per_model(weights, len(models), "weights", 1.0)
    normalize, lambda_ = _check_options(normalize, lambda_, out_dtype)
    dens = _densities(density, len(models))
    if consensus not in ("sum", "count"):
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    dest, result = _dest(out, base, out_dtype or base.dtype)
    if _work_dtype(base) == torch.float32 and base.numel() > 0:
        if _ties_float32(base, models, w, dens, consensus, normalize, lambda_, dest):
            return result
    _ties_reference(base, models, w, dens, consensus, normalize, lambda_, out=dest)
    return result


def _ties_reference(base, models, w, dens, consensus, normalize, lambda_, out_dtype=None, out=None) -> Tensor | None:
    """TIES with float/bool torch ops; the definition the float32 fast path must match bit for bit."""
    wd = _work_dtype(base)
    # Trim thresholds need each whole task vector once; everything after is element-wise and
    # runs chunk by chunk, so the float32 scratch is ~one tensor instead of ~five.
    trims = []
    for m, rho in zip(models, dens):
        if rho >= 1.0 or base.numel() == 0:
            trims.append(None)
            continue
        mag = m.to(wd, copy=True).reshape(-1)
        mag.sub_(base.reshape(-1)).abs_()
        k = max(1, int(rho * mag.numel())) if rho > 0 else 0
        if k == 0:
            trims.append((math.inf, 0))
            continue
        thr = _kth_largest(mag, k)
        trims.append((float(thr), k - int(torch.count_nonzero(mag > thr))))  # ties at thr to keep
        del mag

    def trim(d: Tensor, i: int, s: int) -> Tensor:
        if trims[i] is None:
            return d
        thr, tied_left = trims[i]
        mag = d.abs()
        keep = mag > thr
        if tied_left > 0:
            tied = (mag == thr).nonzero().squeeze(1)[:tied_left]
            keep[tied] = True
            trims[i] = (thr, tied_left - tied.numel())
        return d.masked_fill_(keep.logical_not_(), 0.0)

    return _chunked(base, models, w, trim, consensus, normalize, lambda_, out_dtype, out, where="ties")


# The float32 TIES path avoids torch's bool-mask kernels: on CPU `where`, `masked_fill_` and
# boolean indexing cost ~5 ns per element against ~0.3-0.5 ns for plain arithmetic. Masks are
# instead int32 words of all ones / all zeros applied with a bitwise AND, or float 0/1 factors,
# and every pass runs over chunks small enough to stay in cache, in preallocated buffers.
_FAST_CHUNK = 1 << 18
_ABS_BITS = 0x7FFFFFFF  # clears the sign bit of a float32 viewed as int32
_TOP_BINS = 1 << 15  # top 16 bits of a non-negative float32: exponent and 7 mantissa bits
_INF_TOP = 0x7F80  # top 16 bits of +inf; bins from here on hold inf or NaN
_RADIX_MIN = 1 << 16  # below this many elements one kthvalue is cheaper than two 32K/64K-bin histograms


def _kth_bin(hist: Tensor, k: int) -> tuple[int, int]:
    """Bin holding the ``k``-th largest value counted by ``hist`` (bin ``i`` counts value ``i``),
    and how many values lie in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))
    b = hist.numel() - 1 - j
    return b, int(from_top[j]) - int(hist[b])


def _trim_thresholds(flat_b: Tensor, flat_m: list[Tensor], ks: list[int | None], step: int):
    """Exact ``k``-th largest ``|m_i − b|`` per model, as a float32 bit pattern, by radix selection.

    Returns, per model, ``(threshold bits, elements equal to it to keep)`` (``None`` where nothing is
    trimmed; ``k = 0`` drops everything), or ``None`` when some trimmed task vector holds inf or NaN.
    See :func:`_order_stats`.
    """
    stats = _order_stats(flat_b, flat_m, [[k] if k else [] for k in ks], step)
    if stats is None:
        return None
    out: list[tuple[int, int] | None] = []
    for k, st in zip(ks, stats):
        if k is None:
            out.append(None)
        elif k == 0:
            out.append((0x7F800000, 0))
        else:
            bits, greater, _ = st[0]
            out.append((bits, k - greater))
    return out


def _order_stats(flat_b: Tensor, flat_m: list[Tensor], ks: list[list[int]], step: int):
    """The ``k``-th largest ``|m_i − b|`` (float32) for every ``k`` in ``ks[i]``, by radix selection.

    Non-negative float32 values order like their bit patterns read as integers, so two counting
    passes find any order statistic exactly: a histogram of the top 16 bits picks the bin that holds
    it, a histogram of the low 16 bits inside that bin picks the value. O(n), no sort, no
    whole-tensor scratch. Returns, per model, one ``(bits, greater, equal)`` per requested ``k``
    (``1 <= k <= n``): the value's bit pattern and how many elements are larger than / equal to it;
    or ``None`` when a model with requests holds inf or NaN.
    """
    n = flat_b.numel()
    live = [i for i, kk in enumerate(ks) if kk]
    out: list[list[tuple[int, int, int]]] = [[] for _ in ks]
    if not live:
        return out
    # |δ| is computed in the working dtype and then rounded to float32 (what the selection orders by)
    wd = torch.float64 if any(t.dtype == torch.float64 for t in [flat_b, *flat_m]) else torch.float32
    if n <= _RADIX_MIN:
        bw = flat_b.to(wd)
        for i in live:
            mag = torch.sub(flat_m[i], bw).float().abs_()
            if not bool(torch.isfinite(mag).all()):
                return None
            for k in ks[i]:
                thr = torch.kthvalue(mag, n - k + 1).values
                out[i].append((int(thr.view(torch.int32)), int(torch.count_nonzero(mag > thr)),
                               int(torch.count_nonzero(mag == thr))))
        return out
    bw, dw, d = torch.empty(step, dtype=wd), torch.empty(step, dtype=wd), torch.empty(step)
    bits = torch.empty(step, dtype=torch.int32)

    def counts(minlength: int, keys) -> dict:
        """Histograms over all chunks: ``keys(i, |δ| bits)`` yields (label, key tensor) pairs."""
        hist: dict = {}
        for s in range(0, n, step):
            L = min(step, n - s)
            bw[:L].copy_(flat_b[s : s + L])
            for i in live:
                if wd == torch.float32:  # widen, then subtract: ~2x faster than one mixed-dtype sub
                    d[:L].copy_(flat_m[i][s : s + L]).sub_(bw[:L])
                else:
                    d[:L].copy_(torch.sub(flat_m[i][s : s + L], bw[:L], out=dw[:L]))
                ab = torch.bitwise_and(d[:L].view(torch.int32), _ABS_BITS, out=bits[:L])
                for label, key in keys(i, ab):
                    h = torch.bincount(key, minlength=minlength)
                    hist[label] = h if label not in hist else hist[label].add_(h)
        return hist

    top = counts(_TOP_BINS, lambda i, ab: [(i, ab.bitwise_right_shift_(16))])
    if any(int(top[i][_INF_TOP:].sum()) for i in live):
        return None
    picked = {(i, k): _kth_bin(top[i], k) for i in live for k in ks[i]}
    bins = {i: sorted({picked[(i, k)][0] for k in ks[i]}) for i in live}
    # keys 1..65536 are the low 16 bits + 1 of the values in the picked bin; 0 and 65537 collect the rest
    def low_keys(i, ab):  # in place for the last (usually only) bin
        return [((i, b), (ab.sub_ if j == len(bins[i]) - 1 else ab.sub)((b << 16) - 1).clamp_(0, 65537))
                for j, b in enumerate(bins[i])]

    low = counts(65538, low_keys)
    for i in live:
        for k in ks[i]:
            bin_, above = picked[(i, k)]
            hist = low[(i, bin_)][1:65537]
            lo, above_in_bin = _kth_bin(hist, k - above)
            out[i].append(((bin_ << 16) | lo, above + above_in_bin, int(hist[lo])))
    return out


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _ties_float32(base, models, w, dens, consensus, normalize, lambda_, dest) -> bool:
    """:func:`_ties_reference` for float32 arithmetic, bit for bit, in ~1/5 of its time.

    Returns False before writing anything (the caller falls back to the reference, which refuses a NaN) for float64
    inputs or when a trimmed task vector holds inf/NaN. Chunks whose weighted task vectors are not all finite (where
    0/1 factors would not behave like masks) are merged by the reference formulas, after a NaN among them is refused.
    """
    if any(m.dtype == torch.float64 for m in models) or base.device.type != "cpu":
        return False
    n = base.numel()
    step = min(_FAST_CHUNK, n)
    flat_b = base.reshape(-1)
    flat_m = [m.reshape(-1) for m in models]
    ks = [None if rho >= 1.0 else (max(1, int(rho * n)) if rho > 0 else 0) for rho in dens]
    trims = _trim_thresholds(flat_b, flat_m, ks, step)
    if trims is None:
        return False
    tied_left = [t[1] if t is not None else 0 for t in trims]
    b32, total, sign, agree, mixed, div = (torch.empty(step) for _ in range(6))
    ones = torch.ones(step)
    deltas = [torch.empty(step) for _ in models]
    abs_bits, keep = torch.empty(step, dtype=torch.int32), torch.empty(step, dtype=torch.int32)
    for s in range(0, n, step):
        L = min(step, n - s)
        b = b32[:L]
        b.copy_(flat_b[s : s + L])
        es, ties_at = [], []
        for i, (m, wi) in enumerate(zip(flat_m, w)):
            d = deltas[i][:L].copy_(m[s : s + L]).sub_(b)  # widen, then subtract (faster than a mixed sub)
            ties_at.append(None)
            if trims[i] is not None:
                thr = trims[i][0]
                ab = torch.bitwise_and(d.view(torch.int32), _ABS_BITS, out=abs_bits[:L])
                k = torch.sub(ab, thr, out=keep[:L]).neg_().bitwise_right_shift_(31)  # -1 where |d| > thr, else 0
                if tied_left[i] > 0:  # the first positions at the threshold are kept too
                    idx = (ab == thr).nonzero().squeeze(1)[: tied_left[i]]
                    k[idx] = -1
                    tied_left[i] -= idx.numel()
                    ties_at[i] = idx
                d.view(torch.int32).bitwise_and_(k)
            es.append(d.mul_(wi))
        t = total[:L]
        if consensus == "sum":
            torch.add(es[0], es[1], out=t) if len(es) > 1 else t.copy_(es[0])
            for e in es[2:]:
                t += e
            finite = math.isfinite(float(t.sum()))
        else:
            torch.sign(es[0], out=t)
            for e in es[1:]:
                t += e.sign()
            # one model's +inf and another's -inf: math.fsum raised its own ValueError ('-inf + inf in fsum')
            finite = all(math.isfinite(float(e.sum())) for e in es)
        dst = dest.chunk(s, L)
        if not finite:
            if any(bool(torch.isnan(e).any()) for e in es):  # e keeps a NaN of δ (density 1, or 0: k = 0 bits)
                _refuse_nan([base, *models], _with_base(models), "ties")
            dst.copy_(_ties_chunk_reference(flat_b[s : s + L], [m[s : s + L] for m in flat_m], w, trims,
                                            ties_at, consensus, normalize, lambda_, dst.dtype))
            dest.put(s, dst)
            continue
        # elected sign g = +1 where the total is >= 0, else -1 (a -0 total only arises when every
        # w_i δ_i is 0, which then agrees with neither sign anyway)
        g = torch.copysign(ones[:L], t, out=sign[:L])
        mix, dv, a = mixed[:L], div[:L], agree[:L]
        for i, (e, wi) in enumerate(zip(es, w)):
            torch.mul(e, g, out=a).relu_().sign_()  # 1 where w_i δ_i is non-zero with the elected sign, else 0
            if i == 0:
                torch.mul(e, a, out=mix)
                if normalize:
                    torch.mul(a, wi, out=dv)
            else:
                mix.addcmul_(e, a)  # e·a is exact, so fused or not this is the reference's sum
                if normalize:
                    dv.add_(a, alpha=wi)
        mix.add_(0.0)  # a sum of zeros comes out +0, like the reference's masked_fill_(…, 0.0)
        if normalize:
            z = torch.abs(dv, out=a).sign_().sub_(1.0).neg_()  # 1 where the agreeing weight is 0, else 0
            mix.div_(dv.add_(z))
        if lambda_ != 1.0:
            mix.mul_(lambda_)
        torch.add(mix, b, out=dst)  # the one rounding
        dest.put(s, dst)
    return True


def _ties_chunk_reference(b, ms, w, trims, ties_at, consensus, normalize, lambda_, out_dtype) -> Tensor:
    """One chunk of :func:`_ties_reference`, given the thresholds and the tied positions it keeps."""
    deltas = []
    for m, wi, trim, idx in zip(ms, w, trims, ties_at):
        d = m.to(torch.float32, copy=True).sub_(b)
        if trim is not None:
            keep = d.abs() > _bits_to_float(trim[0])
            if idx is not None:
                keep[idx] = True
            d.masked_fill_(keep.logical_not_(), 0.0)
        deltas.append(d.mul_(wi))
    return _combine(b, deltas, w, consensus, normalize, lambda_, out_dtype)


def _chunked(base, models, weights, trim, consensus, normalize, lambda_, out_dtype=None, out=None,
             step: int | None = None, where: str = "merge") -> Tensor | None:
    """Apply ``trim(δ_chunk, model index, chunk start)`` + :func:`_combine` over consecutive chunks of
    the flattened tensors (in order), writing each merged chunk to ``out`` (see :func:`_dest`).

    A NaN in ``base`` or a model raises :func:`_refuse_nan`'s ``ValueError`` once every chunk is written: each
    untrimmed ``δ`` chunk is summed (a NaN there would otherwise vanish wherever a trim or the sign election drops
    it), and the sums are looked at together, one host sync for the whole tensor.
    """
    wd = _work_dtype(base)
    dest, result = _dest(out, base, out_dtype or base.dtype)
    flat_b = base.reshape(-1)
    flat_m = [m.reshape(-1) for m in models]
    step = step or _CHUNK
    watch = _NaNWatch(base)
    for s in range(0, flat_b.numel(), step):
        b = flat_b[s : s + step].to(wd)  # widened once per chunk (exact), not once per model
        deltas = []
        for i, (m, wi) in enumerate(zip(flat_m, weights)):
            d = m[s : s + step].to(wd, copy=True).sub_(b)
            watch.add(d)
            deltas.append(trim(d, i, s).mul_(wi))
        dst = dest.chunk(s, b.numel())
        dst.copy_(_combine(b, deltas, weights, consensus, normalize, lambda_, dst.dtype))
        dest.put(s, dst)
    if not watch.clean():
        _refuse_nan([base, *models], _with_base(models), where)
    return result


def _streams(generator: torch.Generator | None, draws: list[int], prepass=None) -> list[torch.Generator | None]:
    """One generator per model, each in the state where drawing model after model would start it.

    The masks used to be drawn for every element of model 0, then of model 1, ... from one generator;
    the chunked methods draw chunk by chunk, alternating models, so each model gets a stream of its
    own started at the same place, and the masks come out the same bit for bit (a Bernoulli draw
    consumes one 32-bit value per element, in element order, however the draws are chunked).
    ``draws[i]``: elements model ``i`` draws for (0: none). ``prepass(i, g)``, when given, consumes
    exactly model ``i``'s draws from ``g`` (computing from them, e.g. L1 norms); without it they are
    skipped by drawing into scratch, except the last model's, whose stream is the caller's generator
    itself. Either way the caller's generator ends where drawing everything would leave it.
    """
    g = generator if generator is not None else torch.default_generator
    live = [i for i, n in enumerate(draws) if n]
    out: list[torch.Generator | None] = [None] * len(draws)
    for i in live:
        if prepass is None and i == live[-1]:
            out[i] = g
            break
        out[i] = torch.Generator(device=g.device)
        out[i].set_state(g.get_state())
        if prepass is not None:
            prepass(i, g)
        else:
            _skip(g, draws[i])
    return out


def _skip(g: torch.Generator, n: int) -> None:
    """Consume the random numbers of ``n`` Bernoulli draws (one 32-bit value each) from ``g``."""
    step = min(n, _CHUNK)
    probs, scratch = torch.full((step,), 0.5), torch.empty(step)
    for s in range(0, n, step):
        L = min(step, n - s)
        torch.bernoulli(probs[:L], generator=g, out=scratch[:L])


def _random_trim(base, models, dens, rescale, generator, step, draw):
    """The per-chunk ``trim`` of DARE / DELLA: drop entries at random, then rescale.

    ``draw(i, d, g) -> (kept, keep_prob)`` draws model ``i``'s keep mask for the chunk ``d`` of its
    task vector, on the CPU from the CPU generator ``g``, and returns it on ``d``'s device.
    ``rescale="l1"`` needs each whole task vector's L1 norm before and after dropping, so the masks
    are drawn twice: once in a first pass for the norms (summed per chunk in float32,
    across chunks in float64) and again, from the same generator states, while merging.
    """
    if rescale not in (None, "inverse", "l1"):
        raise ValueError(f"rescale must be None, 'inverse' or 'l1', got {rescale!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        # the masks are drawn on the CPU (then moved to the tensors' device), so that one seed gives one merge
        # on every device and the per-model streams of _streams hold exactly (CUDA's Philox advances by launch)
        raise ValueError(f"generator must be a CPU torch.Generator (masks are drawn on the CPU and moved to the "
                         f"tensors' device), got one on {generator.device}")
    n = base.numel()
    wd = _work_dtype(base)
    flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
    draws = [n if 0.0 < rho < 1.0 else 0 for rho in dens]
    factors: dict[int, float | None] = {}

    def l1_prepass(i: int, g: torch.Generator) -> None:
        before = after = 0.0
        for s in range(0, n, step):
            d = flat_m[i][s : s + step].to(wd, copy=True).sub_(flat_b[s : s + step])
            kept, _ = draw(i, d, g)
            before += float(d.abs().sum())
            after += float(torch.where(kept, d, 0.0).abs_().sum())
        factors[i] = None if before < 1e-7 or after < 1e-7 else before / after

    gens = _streams(generator, draws, l1_prepass if rescale == "l1" else None)

    def trim(d: Tensor, i: int, s: int) -> Tensor:
        if not draws[i]:
            return d if dens[i] >= 1.0 else d.zero_()
        kept, keep_prob = draw(i, d, gens[i])
        d = torch.where(kept, d, 0.0)
        if rescale == "inverse":
            return d / keep_prob
        if rescale == "l1" and factors[i] is not None:
            return d * factors[i]
        return d

    return trim


@torch.no_grad()
@_finite_float16
def dare(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    *,
    density: Sequence[float] | float,
    consensus: Consensus | None = None,
    rescale: Rescale | None = "inverse",
    normalize: bool = False,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""DARE: drop each delta entry with probability ``p = 1 − density``, rescale.

    .. math:: \hat\delta_i = \frac{m_i \odot \delta_i}{1-p},\quad m_i\sim\text{Bernoulli}(1-p)

    then combine like task arithmetic (``consensus=None``, "DARE linear") or like
    TIES (``consensus="sum"``, "DARE-TIES"). ``rescale="l1"`` instead rescales each
    ``δ̂_i`` to the L1 norm of ``δ_i`` (what mergekit's ``dare_*`` methods do).

    Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", arXiv:2311.03099.

    Runs over chunks of the flattened tensors (scratch bounded by a chunk, not by the tensor). The
    masks are those of :func:`dare_mask` on each whole task vector, model after model, from
    ``generator`` (see :func:`_streams`); the L1 norms of ``rescale="l1"`` are summed per chunk.

    Args:
        density: keep probability ``1 − p`` (scalar or per model), in [0, 1].
        generator: seeded CPU ``torch.Generator`` for reproducible masks (default: torch's global CPU
            generator). The masks are drawn on the CPU and moved to the tensors' device, so one seed gives
            one merge on every device.
        Others as in :func:`ties`.

    Raises:
        ValueError: as :func:`ties` (a NaN input included), or a ``generator`` that is not on the CPU.
        TypeError: a ``generator`` that is not a ``torch.Generator``.
    """
    _check_models(base, models)
    w = _per_model(weights, len(models), "weights", 1.0)
    normalize, lambda_ = _check_options(normalize, lambda_, out_dtype)
    dens = _densities(density, len(models), required=True)
    step = _CHUNK
    probs = {i: torch.full((min(step, base.numel()),), rho) for i, rho in enumerate(dens) if 0.0 < rho < 1.0}

    def draw(i, d, g):  # drawn on the CPU: a CPU mask in torch.where with a CUDA d raised a device error
        return torch.bernoulli(probs[i][: d.numel()], generator=g).bool().to(d.device), dens[i]

    trim = _random_trim(base, models, dens, rescale, generator, step, draw)
    return _chunked(base, models, w, trim, consensus, normalize, lambda_, out_dtype, out, step, where="dare")


@torch.no_grad()
@_finite_float16
def breadcrumbs(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    *,
    density: Sequence[float] | float,
    gamma: Sequence[float] | float = 0.01,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""Model Breadcrumbs: drop both tails of each task vector.

    With ``n`` elements sorted by ``|δ|`` (ties by position), drop the
    ``⌊γ n⌋`` largest (outliers) and then the smallest, so that ``⌊density·n⌋``
    elements remain (fewer outliers are dropped when ``density + γ > 1``). The
    surviving deltas are combined as in task arithmetic, or TIES with
    ``consensus="sum"``.

    Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks", arXiv:2312.06795. Parametrised like mergekit's
    ``breadcrumbs`` (``density``, ``gamma``).

    Cost: no sort. The two boundary values (ascending ranks ``a`` and ``a + keep − 1`` of |δ| as
    float32) come from the radix selection of :func:`ties`, then one chunked pass keeps what lies
    between them, and of the elements equal to a boundary the ones a stable sort would put inside
    (by position). Task vectors with inf fall back to a whole-tensor sort; a NaN in any input raises
    ``ValueError`` naming it.
    """
    _check_models(base, models)
    gammas = _per_model(gamma, len(models), "gamma")
    bad = [g for g in gammas if not 0.0 <= g <= 1.0]
    if bad:
        raise ValueError(f"gamma must be in [0, 1], got {bad[0]}")
    w = _per_model(weights, len(models), "weights", 1.0)
    normalize, lambda_ = _check_options(normalize, lambda_, out_dtype)
    dens = _densities(density, len(models), required=True)
    n = base.numel()
    flat_b, flat_m = base.reshape(-1), [m.reshape(-1) for m in models]
    bounds: list[tuple[int, int, int] | None] = []  # per trimmed model: first kept ascending rank, count
    for rho, gamma in zip(dens, gammas):
        if rho >= 1.0 or n == 0:
            bounds.append(None)
            continue
        keep_n = int(rho * n)
        bounds.append((max(0, n - keep_n - int(gamma * n)), keep_n))
    ks = [[n - b[0], n - b[0] - b[1] + 1] if b is not None and b[1] > 0 else [] for b in bounds]
    stats = _order_stats(flat_b, flat_m, ks, min(_FAST_CHUNK, max(n, 1)))
    wd = _work_dtype(base)
    rules: dict[int, list] = {}  # model -> [lo bits, hi bits, equal-to-lo to skip, equal-to-hi to take]
    whole: dict[int, Tensor] = {}  # masks of task vectors with inf/NaN (sorted as a whole)
    for i, b in enumerate(bounds):
        if b is None or b[1] == 0:
            continue
        if stats is None:
            d = flat_m[i].to(wd) - flat_b.to(wd)
            order = d.abs().float().sort(stable=True).indices
            whole[i] = torch.zeros(n, dtype=torch.bool, device=d.device)
            whole[i][order[b[0] : b[0] + b[1]]] = True
            continue
        (lo, g_lo, e_lo), (hi, g_hi, e_hi) = stats[i]
        first, last = b[0], b[0] + b[1] - 1  # kept ascending ranks; elements below lo: n - g_lo - e_lo
        skip = first - (n - g_lo - e_lo)
        take = b[1] if lo == hi else last - (n - g_hi - e_hi) + 1
        rules[i] = [lo, hi, skip, take]

    def trim(d: Tensor, i: int, s: int) -> Tensor:
        b = bounds[i]
        if b is None:
            return d
        if b[1] == 0:
            return d.zero_()
        if i in whole:
            return torch.where(whole[i][s : s + d.numel()], d, 0.0)
        lo, hi, skip, take = rules[i]
        ab = (d.float() if d.dtype != torch.float32 else d).view(torch.int32) & _ABS_BITS
        keep = (ab > lo) & (ab < hi)
        at_lo = (ab == lo).nonzero().squeeze(1)
        used = min(skip, at_lo.numel())
        rules[i][2] -= used
        if lo == hi:
            kept = at_lo[used : used + take]
            rules[i][3] -= kept.numel()
        else:
            keep[at_lo[used:]] = True
            kept = (ab == hi).nonzero().squeeze(1)[:take]
            rules[i][3] -= kept.numel()
        keep[kept] = True
        return torch.where(keep, d, 0.0)

    return _chunked(base, models, w, trim, consensus, normalize, lambda_, out_dtype, out, where="breadcrumbs")


@torch.no_grad()
@_finite_float16
def della(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    *,
    density: Sequence[float] | float,
    epsilon: float = 0.15,
    consensus: Consensus | None = "sum",
    rescale: Rescale | None = "inverse",
    normalize: bool = True,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""DELLA-Merging: magnitude-ranked adaptive drop, then TIES-style fusion.

    Each entry is kept with probability ``p_k = density − ε + 2ε·r̂`` where ``r̂``
    is its normalised magnitude rank in its row (:func:`della_mask`); kept
    entries are rescaled by ``1/p_k`` (``rescale="inverse"``, the paper) or the
    whole task vector back to its L1 norm (``"l1"``, mergekit). Sign election
    and disjoint mean follow (set ``consensus=None`` for "DELLA linear").

    Paper: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging
    through Magnitude-Based Sampling", arXiv:2406.11617.

    Runs over chunks of whole rows (the last dimension; a 1-D tensor is one row), so scratch is
    bounded by a chunk, not by the tensor; masks as :func:`della_mask` on each whole task vector,
    model after model, from ``generator`` (a CPU generator, as in :func:`dare`: the masks are drawn
    on the CPU and moved to the tensors' device).

    Raises:
        ValueError: unless ``ε >= 0`` (a negative one would keep small entries more often than large ones),
            ``0 < density − ε`` and ``density + ε < 1`` (for 0 < density < 1; density 0
            drops the model's task vector, 1 keeps it whole), a ``generator`` not on the CPU, or a NaN in
            ``base`` or a model.
        TypeError: ``density=None``.
    """
    _check_models(base, models)
    w = _per_model(weights, len(models), "weights", 1.0)
    normalize, lambda_ = _check_options(normalize, lambda_, out_dtype)
    dens = _densities(density, len(models), required=True)
    epsilon = _number(epsilon, "epsilon", minimum=0)  # a negative one inverted MagPrune: small entries kept more
    for rho in dens:  # density 0 drops the model, as mergekit's della_magprune gives a zero task vector
        if 0.0 < rho < 1.0 and not (0.0 < rho - epsilon and rho + epsilon < 1.0):
            raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon < 1, got density={rho}, "
                             f"epsilon={epsilon}")
    width = base.shape[-1] if base.dim() > 0 else 1
    step = max(1, _CHUNK // max(width, 1)) * max(width, 1)

    def draw(i, d, g):  # ranked and drawn on the CPU (a CUDA d with the CPU generator raised a device error)
        kept, keep_prob = della_mask(d.reshape(-1, width).cpu(), dens[i], epsilon, g)
        return kept.reshape(-1).to(d.device), keep_prob.reshape(-1).to(d.device, d.dtype)

    trim = _random_trim(base, models, dens, rescale, generator, step, draw)
    return _chunked(base, models, w, trim, consensus, normalize, lambda_, out_dtype, out, step, where="della")


# --------------------------------------------------------------------------- spherical


@torch.no_grad()
@_finite_float16
def slerp(
    a: Tensor,
    b: Tensor,
    t: float,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""Spherical linear interpolation of two flattened tensors.

    With ``â = a/‖a‖``, ``b̂ = b/‖b‖`` and ``Ω = arccos(â·b̂)``:

    .. math:: \operatorname{slerp}(a, b; t) = \frac{\sin((1-t)\Omega)}{\sin\Omega}\,a
              + \frac{\sin(t\Omega)}{\sin\Omega}\,b

    (the coefficients are applied to the un-normalised ``a`` and ``b``).
    **Fallback:** when ``|â·b̂| > dot_threshold`` (default 0.9995, i.e. the
    vectors are within ~1.8° of colinear or antipodal) ``sin Ω`` is too small to
    divide by, and plain lerp ``(1−t)a + t b`` is returned instead. Norms below
    ``eps`` count as 1. ``t = 0`` gives ``a``, ``t = 1`` gives ``b``.

    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; used
    for weights by mergekit's ``slerp`` (``a`` = base model), same formula and
    thresholds.

    Cost: two passes over the inputs. The first reads each chunk once and reduces ``a·a``, ``b·b``
    and ``a·b`` together in float64 (a product of two float32 values is exact there), so
    ``â·b̂ = a·b / (‖a‖‖b‖)`` is correct to ~1e-16 whatever torch's thread count; the coefficients
    follow in float64, rounded once to the working dtype, and the second pass writes
    ``c_a a + c_b b`` in the working dtype. mergekit instead makes three passes (the two norms, then
    the dot product of the normalised tensors, float32 reductions and coefficients): the two agree
    up to float32 rounding of ``â·b̂``, which ``acos`` amplifies by ``1/sin Ω`` for near-colinear
    tensors. On a 32000×2048 bf16 pair at cos Ω = 0.995 our float32 result is within 5.2e-7 of the
    formula in float64, mergekit 0.1.5's within 7.5e-5 (torch 2.13 CPU, 2 and 16 threads alike);
    rounded to bf16, 0.22% of mergekit's elements and 30 of ours (0.00005%) differ by one ulp from
    the float64 formula rounded to bf16.

    Args:
        a, b: same shape, any (flattened internally).
        t: interpolation factor (any real; usually in [0, 1]).
        out: optional preallocated result (contiguous, ``a``'s shape, ``out_dtype``).

    Returns:
        The interpolated tensor, shape of ``a``, dtype ``out_dtype`` (default ``a.dtype``).

    Raises:
        ValueError: a NaN in ``a`` or ``b`` (seen in ``a·a`` / ``b·b``; it made the cosine read as -1, so a plain
            lerp came back, where mergekit's result is NaN throughout), or a non-finite ``t``.
    """
    _check_tensors([a, b], ["a", "b"])
    t = _number(t, "t")  # a NaN t would give a NaN merge with no error
    dot_threshold = _number(dot_threshold, "dot_threshold")
    eps = _number(eps, "eps", minimum=0.0)
    _check_out_dtype(out_dtype)
    wd = _work_dtype(a)
    dest, result = _dest(out, a, out_dtype or a.dtype)
    x, y = a.reshape(-1), b.reshape(-1)
    n = x.numel()
    if n == 0:
        return result
    xx, yy, xy = _gram(x, y)
    if math.isnan(xx) or math.isnan(yy):  # a sum of squares is NaN only where an input is
        _refuse_nan([a, b], ["a", "b"], "slerp")
    norm_a, norm_b = math.sqrt(xx), math.sqrt(yy)
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    cos = min(1.0, max(-1.0, xy / (norm_a * norm_b)))
    tt = torch.tensor(t, dtype=wd)
    # decided in the working dtype, as mergekit; |cos| = 1 only reaches here with dot_threshold >= 1 (sin Ω = 0)
    if abs(float(torch.tensor(cos, dtype=wd))) > dot_threshold or abs(cos) == 1.0:
        coef_a, coef_b = 1 - tt, tt
    else:
        # From the float64 cosine in float64, rounded once to the working dtype: float32 acos and sin
        # would add ~1e-7 relative to each coefficient, as much as the output's own rounding (on
        # test_methods' (33, 21) float32 pair, output 4.5e-7 from the formula instead of 2.7e-7).
        omega = math.acos(cos)
        coef_a = torch.tensor(math.sin((1 - t) * omega) / math.sin(omega), dtype=wd)
        coef_b = torch.tensor(math.sin(t * omega) / math.sin(omega), dtype=wd)
    _write_combination(x, y, float(coef_a), float(coef_b), wd, dest)  # float(): exact, a working-dtype value
    return result


def _gram(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """``(x·x, y·y, x·y)`` of two flat tensors, reduced chunk by chunk in float64.

    A float32 torch.dot adds each thread's share in one running float32 sum, so its error grows with
    the share: with 2 threads (CPU CI) the (300, 257) bf16 pair of tests/merging/test_methods.py had
    a·a 3.8e-6 relative low, a cosine 65 float32 ulps off and a SLERP output 3.4e-6 from the float64
    formula (mergekit: 2.6e-6); with 16 threads 4e-7. In float64 (a product of two float32 values is
    exact there) the three sums came out exact at every thread count (output 4.1e-7). This pass takes
    ~56 instead of ~33 us per 64K-element bf16 chunk (one thread), what a float32 mul + pairwise sum takes.
    """
    n = x.numel()
    step = min(_SLERP_CHUNK, max(n, 1))
    bx = torch.empty(step, dtype=torch.float64, device=x.device)
    by = torch.empty_like(bx)
    xx = yy = xy = 0.0
    for s in range(0, n, step):
        L = min(step, n - s)
        cx, cy = bx[:L].copy_(x[s : s + L]), by[:L].copy_(y[s : s + L])
        xx += float(torch.dot(cx, cx))
        yy += float(torch.dot(cy, cy))
        xy += float(torch.dot(cx, cy))
    return xx, yy, xy


def _write_combination(x: Tensor, y: Tensor, ca: float, cb: float, wd: torch.dtype, dest) -> None:
    """Write ``ca·x + cb·y`` (flat tensors, arithmetic in ``wd``) to ``dest`` chunk by chunk (see :func:`_dest`),
    through two reused buffers: scratch bounded by a chunk, whatever the tensor size."""
    n = x.numel()
    step = min(_SLERP_CHUNK, max(n, 1))
    bx = torch.empty(step, dtype=wd, device=x.device)
    by = torch.empty_like(bx)
    for s in range(0, n, step):
        L = min(step, n - s)
        dst = dest.chunk(s, L)
        torch.add(bx[:L].copy_(x[s : s + L]).mul_(ca), by[:L].copy_(y[s : s + L]).mul_(cb), out=dst)
        dest.put(s, dst)


@torch.no_grad()
@_finite_float16
def chipalign(
    instruct: Tensor,
    domain: Tensor,
    lam: float,
    *,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""ChipAlign geodesic interpolation: directions on the sphere, norms apart.

    Project both weights onto the unit sphere, interpolate the directions along
    the great circle and the norms geometrically:

    .. math::
        \bar W_k = W_k/\|W_k\|_F,\quad \Theta = \arccos\langle\bar W_I,\bar W_D\rangle

        W = \|W_I\|^{1-\lambda}\|W_D\|^{\lambda}\left(
            \frac{\sin((1-\lambda)\Theta)}{\sin\Theta}\bar W_I +
            \frac{\sin(\lambda\Theta)}{\sin\Theta}\bar W_D\right)

    ``λ = 0`` returns the instruction model, ``λ = 1`` the domain model. When
    ``sin Θ`` is ~0 (colinear directions) the direction is lerped and
    re-normalised. A zero tensor has no direction; then the other one's is used.

    Cost and precision as :func:`slerp`: one pass reduces ``‖W_I‖²``, ``‖W_D‖²`` and ``⟨W_I, W_D⟩``
    together in float64, the whole formula folds into one float64 coefficient per input, rounded
    once to the working dtype, and a second pass writes ``c_I W_I + c_D W_D`` chunk by chunk. Float32
    reductions (what this did before) put ``cos Θ`` off by float32 rounding, which ``arccos`` amplifies
    for the near-colinear weights of two fine-tunes of one model: on a 4096×2048 bf16 pair at
    cos Θ = 0.9987 the float32 output was 3.0e-5 (relative to its largest element) from the formula
    in float64 and 0.06% of the bf16 elements were off by one ulp; now 8.8e-8 and 0.0002%.

    Paper: Deng, Bai & Ren, "ChipAlign: Instruction Alignment in Large Language
    Models for Chip Design via Geodesic Interpolation", arXiv:2412.19819.

    Args:
        instruct: ``W_I`` from the instruction-aligned model, any shape.
        domain: ``W_D`` from the domain (e.g. chip) model, same shape.
        lam: ``λ``, weight of the domain model, in [0, 1].

    Raises:
        ValueError: ``lam`` outside [0, 1], or a NaN in either tensor (naming it).
    """
    _check_tensors([instruct, domain], ["instruct", "domain"])
    lam = _number(lam, "lam")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    eps = _number(eps, "eps", minimum=0.0)
    _check_out_dtype(out_dtype)
    wd = _work_dtype(instruct)
    dest, result = _dest(None, instruct, out_dtype or instruct.dtype)
    x, y = instruct.reshape(-1), domain.reshape(-1)
    xx, yy, xy = _gram(x, y)
    if math.isnan(xx) or math.isnan(yy):
        _refuse_nan([instruct, domain], ["instruct", "domain"], "chipalign")
    ni, nd = math.sqrt(xx), math.sqrt(yy)
    if ni <= eps and nd <= eps:
        return result.zero_()
    # a tensor without a direction takes the other one's: cos Θ = 1
    cos = min(1.0, max(-1.0, xy / (ni * nd))) if ni > eps and nd > eps else 1.0
    theta = math.acos(cos)
    if math.sin(theta) < 1e-6:  # lerp the directions, re-normalised: ‖(1−λ)ū_I + λū_D‖² from cos Θ
        length = math.sqrt(max(0.0, (1 - lam) ** 2 + lam**2 + 2 * lam * (1 - lam) * cos))
        c_i, c_d = (1 - lam) / max(length, eps), lam / max(length, eps)
    else:
        c_i, c_d = math.sin((1 - lam) * theta) / math.sin(theta), math.sin(lam * theta) / math.sin(theta)
    norm = max(ni, eps) ** (1 - lam) * max(nd, eps) ** lam
    # W = norm (c_I W_I/‖W_I‖ + c_D W_D/‖W_D‖): one coefficient per raw tensor, from float64, rounded once
    if ni > eps and nd > eps:
        ca, cb = norm * c_i / ni, norm * c_d / nd
    elif ni > eps:
        ca, cb = norm * (c_i + c_d) / ni, 0.0
    else:
        ca, cb = 0.0, norm * (c_i + c_d) / nd
    ca, cb = (float(torch.tensor(c, dtype=wd)) for c in (ca, cb))
    _write_combination(x, y, ca, cb, wd, dest)
    return result


@torch.no_grad()
@_finite_float16
def karcher(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Weighted Karcher (Riemannian) mean of the tensors' directions, times their mean norm.

    With unit directions ``u_i = θ_i/‖θ_i‖`` and weights ``α_i`` normalised to sum
    to 1, the Karcher mean ``μ`` on the sphere minimises ``Σ α_i d(μ, u_i)²``
    (``d`` = geodesic distance). It is found by the fixed-point iteration

    .. math:: v = \sum_i \alpha_i \frac{\phi_i}{\sin\phi_i}(u_i - \cos\phi_i\,\mu),\;
              \phi_i = \arccos\langle\mu,u_i\rangle,\qquad
              \mu \leftarrow \cos\|v\|\,\mu + \sin\|v\|\,\frac{v}{\|v\|}

    starting from the normalised weighted average, until ``‖v‖ < tol``. The
    result is ``(Σ α_i ‖θ_i‖) μ``. Zero tensors (norm < tol) have no direction and
    are left out of the direction average.

    Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure
    Appl. Math. 1977; as a merge method in mergekit's ``karcher``.

    Args:
        tensors: one tensor per model, same shape.
        weights: ``α_i`` (normalised internally), equal when omitted. mergekit 0.1.5's ``karcher`` accepts a
            ``weight`` per model and ignores it (equal weights always): the two agree bit for bit at equal
            weights only.

    Raises:
        ValueError: bad weights or options, or a NaN in any tensor (seen in its norm; naming it).
    """
    if isinstance(tensors, Tensor):
        raise TypeError("tensors must be a sequence of tensors (one per model), not a single tensor")
    _check_tensors(tensors, [f"tensors[{i}]" for i in range(len(tensors))])
    if not is_int(max_iter) or max_iter < 0:
        kind = ValueError if is_int(max_iter) else ArgumentTypeError
        raise kind(f"max_iter must be an integer >= 0, got {max_iter!r}")
    tol = _number(tol, "tol", minimum=0.0)
    _check_out_dtype(out_dtype)
    names = [f"tensors[{i}]" for i in range(len(tensors))]
    if len(tensors) == 1:
        if not _no_nan(tensors[0]):
            _refuse_nan(tensors, names, "karcher")
        return tensors[0].to(out_dtype or tensors[0].dtype, copy=True)
    alpha = _per_model(weights, len(tensors), "weights", 1.0)
    if any(a < 0 for a in alpha) or math.fsum(alpha) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {alpha}")
    total = math.fsum(alpha)
    alpha = [a / total for a in alpha]
    wd = _work_dtype(tensors[0])
    flat = [t.to(wd).reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    if not _no_nan(*norms):  # a NaN norm comes from a NaN element (an inf one from inf: passed on)
        _refuse_nan(tensors, names, "karcher")
    scale = sum(a * n for a, n in zip(alpha, norms))
    live = [(a, f / n) for a, f, n in zip(alpha, flat, norms) if n > tol]
    if not live:
        return torch.zeros_like(tensors[0], dtype=out_dtype or tensors[0].dtype)
    live_total = math.fsum(a for a, _ in live)
    live = [(a / live_total, u) for a, u in live]
    mu = sum(a * u for a, u in live)
    mu_norm = torch.linalg.vector_norm(mu)
    mu = live[0][1].clone() if mu_norm < tol else mu / mu_norm
    for _ in range(max_iter):
        v = torch.zeros_like(mu)
        for a, u in live:
            cos_phi = torch.dot(mu, u).clamp(-1.0, 1.0)
            phi = torch.acos(cos_phi)
            if phi < tol:
                continue
            v += a * (phi / torch.sin(phi)) * (u - cos_phi * mu)
        v_norm = torch.linalg.vector_norm(v)
        if v_norm < tol:
            break
        mu = torch.cos(v_norm) * mu + torch.sin(v_norm) * (v / v_norm)
        mu = mu / torch.linalg.vector_norm(mu)
    return (scale * mu).reshape(tensors[0].shape).to(out_dtype or tensors[0].dtype)


@torch.no_grad()
@_finite_float16
def model_stock(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    filter_wise: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Model Stock: interpolate the fine-tuned average toward the base by angle.

    With ``N`` fine-tuned models, ``cos θ`` the mean pairwise cosine between the
    task vectors ``δ_i = θ_i − θ_0``:

    .. math:: t = \frac{N\cos\theta}{1 + (N-1)\cos\theta},\qquad
              \theta = t\,\frac{1}{N}\sum_i\theta_i + (1-t)\,\theta_0

    ``t`` is set to 0 (the base is kept) where the denominator vanishes, and a cosine with a zero task
    vector counts as 0. Unlike mergekit, which divides by the norm product clamped at 1e-6, the cosine
    does not shrink for small task vectors (the same numbers where the product is at least 1e-6).
    ``filter_wise=True`` computes one ``t`` per row (last dimension) instead of
    one per tensor.

    Paper: Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned
    models", arXiv:2403.19522.

    Raises:
        ValueError: fewer than 2 fine-tuned models (no angle to measure), or a NaN in ``base`` or a model
            (its cosine was read as 0; mergekit's merge is NaN throughout).
    """
    _check_models(base, models)
    filter_wise = as_bool(filter_wise, "filter_wise")
    _check_out_dtype(out_dtype)
    if len(models) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {len(models)}")
    wd = _work_dtype(base)
    shape = base.shape
    if filter_wise and base.dim() >= 1:
        to_rows = lambda t: t.to(wd).reshape(-1, shape[-1]) if base.dim() > 1 else t.to(wd).reshape(1, -1)  # noqa: E731
    else:
        to_rows = lambda t: t.to(wd).reshape(1, -1)  # noqa: E731
    b = to_rows(base)
    ws = [to_rows(m) for m in models]
    deltas = [w - b for w in ws]
    if not _no_nan(*deltas):  # a NaN δ gave a cosine of 0 (den > 0 is False for NaN)
        _refuse_nan([base, *models], _with_base(models), "model_stock")
    cos = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            # mergekit clamps the norm product at 1e-6, which shrinks the cosine of small task vectors
            # (rows of a filter-wise merge, a small learning rate); only a zero product is left out here
            den = torch.linalg.vector_norm(deltas[i], dim=-1) * torch.linalg.vector_norm(deltas[j], dim=-1)
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cos.append(torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(models)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, 0.0, n * c / torch.where(singular, 1.0, den))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * b).reshape(shape).to(out_dtype or base.dtype)
