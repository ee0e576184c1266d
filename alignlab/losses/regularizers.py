r"""Regularisers against catastrophic forgetting: EWC (offline and online) and L2-SP.

Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic
forgetting in neural networks", arXiv:1612.00796) anchors every parameter to its
value :math:`\theta^*` after the previous task, weighted by the diagonal of the
Fisher information :math:`F`:

.. math::  \Omega(\theta) = \frac{\lambda}{2} \sum_i F_i (\theta_i - \theta^*_i)^2 .

:func:`estimate_fisher` estimates :math:`F_i = \mathbb{E}_x \mathbb{E}_y
[(\partial_{\theta_i} \log p_\theta(y\mid x))^2]` from a data loader, either with
the data's own labels ("empirical" Fisher) or with labels sampled from the model
("true" Fisher; see Kunstner et al., "Limitations of the Empirical Fisher
Approximation", arXiv:1905.12558, for why they differ). Online EWC (Schwarz et
al., "Progress & Compress", arXiv:1805.06370) keeps one running Fisher,
:math:`F \leftarrow \gamma F + F_{\text{new}}`, and moves the anchor to the
newest parameters (:meth:`EWC.consolidate`).

L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning
with Convolutional Networks", arXiv:1802.01483) pulls fine-tuned weights towards
the pretrained ones and decays parameters that have no pretrained value:

.. math::  \Omega(w) = \frac{\alpha}{2} \sum_{\text{layers } l} \sum_i a_{l,i}
           (w_{l,i} - w^0_{l,i})^2 + \frac{\beta}{2} \lVert w_{\text{new}} \rVert^2 ,

where :math:`a` are optional layer-wise (one number per parameter name pattern)
or element-wise (a tensor shaped like the parameter) weights.

On a LoRA model (:func:`alignlab.adapters.inject`) the trainable parameters are the factors, so plain L2-SP pulls
:math:`A` to :math:`A_0` and :math:`B` to :math:`B_0` separately. With ``lora_delta=True`` each adapter of a
:class:`~alignlab.adapters.lora.LoRALinear` is instead held to its effective weight at the start:

.. math::  \frac{\alpha}{2}\, a\, s^2 \lVert B A - B_0 A_0 \rVert_F^2 ,

the L2-SP term of :math:`W_0 + sBA` against :math:`W_0 + sB_0A_0` (the base is frozen), computed from
:math:`2r \times 2r` Gram matrices without forming the ``(out, in)`` product.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from alignlab._checks import (ArgumentTypeError, as_bool, check_finite_number, check_number_in_range,
                              check_positive_int, is_int, is_real)
from alignlab.eval.eval_mode import eval_mode

__all__ = ["estimate_fisher", "ewc_penalty", "EWC", "l2sp_penalty", "L2SP", "lora_delta_sq"]

Weight = Union[float, torch.Tensor]
Weights = Union[None, float, Mapping[str, Weight], Callable[[str, torch.Tensor], Weight]]


def _named_trainable(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if names is None:
        return params
    names = _patterns(names, "params")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params names not found among the model's trainable parameters: {missing[:5]}")
    return {n: params[n] for n in names}


def _same_mapping(batch: Mapping, items: dict) -> Mapping:
    """``items`` in ``batch``'s mapping type where it builds from a dict (a ``BatchEncoding``, whose ``forward``
    may read ``batch.input_ids``), else a plain dict."""
    if type(batch) is dict:
        return items
    try:
        return type(batch)(items)
    except (TypeError, ValueError):  # a mapping type with another constructor
        return items


def _split_examples(batch: Any) -> list:
    """Split a batch (tensor, tuple/list or dict of tensors sharing dim 0) into single examples."""
    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(batch.shape[0])]

    def batched(v: Any) -> bool:  # a 0-d tensor (a count, a temperature) goes to every example as it is
        return isinstance(v, torch.Tensor) and v.dim() > 0

    if isinstance(batch, Mapping):
        sizes = {v.shape[0] for v in batch.values() if batched(v)}
        if len(sizes) != 1:
            raise ValueError("per_example=True needs every tensor in a dict batch to share its first dimension")
        n = sizes.pop()
        return [_same_mapping(batch, {k: v[i : i + 1] if batched(v) else v for k, v in batch.items()})
                for i in range(n)]
    if isinstance(batch, (tuple, list)):
        sizes = {v.shape[0] for v in batch if batched(v)}
        if len(sizes) != 1:
            raise ValueError("per_example=True needs every tensor in a tuple batch to share its first dimension")
        n = sizes.pop()
        return [type(batch)(v[i : i + 1] if batched(v) else v for v in batch) for i in range(n)]
    raise TypeError(f"per_example=True cannot split a batch of type {type(batch).__name__}; pass per_example=False")


def _logits_and_labels(out: Any, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check what ``forward`` returned: float logits ``(..., classes)``, integer labels ``(...)`` in range."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError(f"forward must return a pair of tensors (logits, labels), got {type(out).__name__}")
    logits, labels = out
    if not logits.is_floating_point():
        raise TypeError(f"forward's logits must be a floating-point tensor, got dtype {logits.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"forward's labels must be an integer tensor (class ids), got dtype {labels.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"forward must return logits (..., classes) and labels (...); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    # one sync per example, against a gather that fails with an index error (a device assert on CUDA)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= logits.shape[-1]))
    if bool(bad.any()):
        raise ValueError(f"forward's labels must lie in [0, {logits.shape[-1]}) or equal ignore_index={ignore_index}, "
                         f"got {labels[bad][0].item()}")
    return logits, labels


def estimate_fisher(
    model: nn.Module,
    data: Iterable,
    forward: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
    *,
    mode: str = "empirical",
    per_example: bool = True,
    num_batches: int | None = None,
    samples: int = 1,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    params: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    r"""Diagonal Fisher information of ``model`` averaged over the examples of ``data``.

    For each example :math:`x` the log-likelihood is
    :math:`\ell = \sum_j \log \mathrm{softmax}(z_j)[y_j]` over its non-ignored
    positions :math:`j` (tokens, or the single class of a classifier), and the
    estimate is :math:`F_i = \frac{1}{N}\sum_x (\partial_{\theta_i} \ell)^2`, :math:`N` counting every example
    (one whose labels are all ``ignore_index`` adds 0 and still counts: filter such examples out to leave them out).
    ``model`` runs in eval mode (no dropout; each submodule's mode is restored after) with gradients enabled,
    also when called inside ``torch.no_grad()``.  The log-softmax runs in at least float32 (float64 logits
    stay float64).

    Args:
        model: the network; its trainable parameters (``requires_grad``) get a Fisher entry.
        data: an iterable of batches (a ``DataLoader``, a list, a generator).
        forward: ``forward(model, batch) -> (logits, labels)`` with ``logits`` ``(..., classes)``
            and ``labels`` ``(...)`` long, ``ignore_index`` where no target (e.g. shifted LM
            logits ``(batch, seq-1, vocab)`` and labels ``(batch, seq-1)``).
        mode: ``"empirical"`` uses the batch's labels; ``"true"`` samples labels from the
            model's own predictive distribution at the non-ignored positions.
        per_example: split each batch along dim 0 and square per-example gradients (the
            definition). ``False`` squares whole-batch gradients of the summed log-likelihood
            -- cheaper, but a different (biased) estimator; the division is then by batches.
        num_batches: stop after this many batches (``None``: the whole iterable).
        samples: labels drawn per example in ``"true"`` mode (Monte-Carlo average); must stay 1 in
            ``"empirical"`` mode.
        ignore_index: label value without a target.
        generator: RNG for ``"true"`` mode (seed it for reproducibility).
        params: restrict to these parameter names (one string is one name).

    Returns:
        ``{name: tensor shaped like the parameter}`` in float32 (float64 for float64 parameters).

    Raises:
        ValueError: unknown ``mode``, ``samples < 1``, ``samples > 1`` with ``mode="empirical"``, empty
            ``data``, logits/labels shape mismatch, a label outside ``[0, classes)`` other than
            ``ignore_index``, a model without trainable parameters.
        TypeError: ``model`` is not a module, ``data`` is one batch (a dict or a tensor) rather than an iterable
            of batches, a batch cannot be split per example, ``per_example`` not a bool,
            ``forward`` not callable or not returning ``(float logits, integer labels)``, ``ignore_index``,
            ``samples`` or ``num_batches`` not an int (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError``
            too).
        RuntimeError: called inside ``torch.inference_mode()`` (no gradients can be taken there).
    """
    if mode not in ("empirical", "true"):
        raise ValueError(f"mode must be 'empirical' or 'true', got {mode!r}")
    per_example = as_bool(per_example, "per_example")  # "no" would select the other estimator
    samples = check_positive_int(samples, "samples")
    if samples != 1 and mode == "empirical":  # the data's labels: nothing to draw, the argument would do nothing
        raise ValueError(f"samples={samples} draws labels in mode='true' only; mode='empirical' uses the data's labels")
    num_batches = check_positive_int(num_batches, "num_batches", allow_none=True)
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not callable(forward):
        raise TypeError(f"forward must be a callable (model, batch) -> (logits, labels), got {type(forward).__name__}")
    if isinstance(data, (Mapping, torch.Tensor, str)):  # iterated, one batch would give its keys or its rows
        raise TypeError(f"data must be an iterable of batches (a DataLoader, a list), got a {type(data).__name__}; "
                        "wrap a single batch in a list")
    if torch.is_inference_mode_enabled():  # enable_grad below cannot leave inference mode
        raise RuntimeError("estimate_fisher needs gradients: call it outside torch.inference_mode()")
    named = _named_trainable(model, params)
    if not named:
        raise ValueError("no parameters to estimate a Fisher for: params is empty or the model has none trainable")
    fisher = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in named.items()}
    plist = list(named.values())
    count = 0
    # enable_grad: the Fisher is often taken right after an evaluation, inside torch.no_grad()
    with eval_mode(model), torch.enable_grad():  # eval: dropout would give the Fisher of thinned networks
        # islice: breaking at batch num_batches would first pull one batch more out of a shared iterator
        for batch in itertools.islice(data, num_batches):
            units = _split_examples(batch) if per_example else [batch]
            for unit in units:
                logits, labels = _logits_and_labels(forward(model, unit), ignore_index)
                # only the positions with a target (no log-softmax, no draw over padding: a NaN or inf logit there
                # stopped torch.multinomial in "true" mode); float64 logits stay float64
                valid = labels != ignore_index
                rows = logits[valid]
                logp = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
                for _ in range(samples if mode == "true" else 1):
                    if mode == "true":
                        target = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(-1)
                    else:
                        target = labels[valid].long()  # gather takes int64 (or int32) indices only: int16 labels failed
                    ll = logp.gather(-1, target.unsqueeze(-1)).sum()
                    grads = torch.autograd.grad(ll, plist, retain_graph=mode == "true", allow_unused=True)
                    weight = 1.0 / samples if mode == "true" else 1.0
                    for (n, _), g in zip(named.items(), grads):
                        if g is not None:
                            fisher[n].add_(g.to(fisher[n].dtype).square(), alpha=weight)
                count += 1
    if count == 0:
        raise ValueError("data yielded no batches; cannot estimate a Fisher")
    for f in fisher.values():
        f.div_(count)
    return fisher


# a parameter whose shape changed after its anchor was copied: most often a vocabulary grown for new tokens
_RESIZED = " (resized since the anchor was taken, e.g. by resize_token_embeddings?)"


def _check_tensor_mapping(mapping: Any, arg: str) -> None:
    if not isinstance(mapping, Mapping):
        hint = " (dict(model.named_parameters()) for a model)" if isinstance(mapping, nn.Module) else ""
        raise TypeError(f"{arg} must be a mapping {{name: tensor}}{hint}, got {type(mapping).__name__}")
    for name, t in mapping.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}[{name!r}] must be a torch.Tensor, got {type(t).__name__}")


def ewc_penalty(
    params: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    lam: float = 1.0,
) -> torch.Tensor:
    r"""``lam / 2 * sum_i F_i (theta_i - theta*_i)^2`` over the names in ``fisher``.

    Args:
        params: current parameters ``{name: tensor}`` (gradients flow into them).
        anchor: ``theta*`` with the same names and shapes (treated as constants).
        fisher: diagonal Fisher ``F`` with the same names and shapes.
        lam: ``lambda >= 0``.

    Returns:
        scalar tensor (0 when ``fisher`` is empty).

    The sum runs in at least float32 (the parameters' dtype if wider), also for a bf16 model.

    Raises:
        ValueError: a name of ``fisher`` missing from ``params``/``anchor``, a shape mismatch, ``lam`` negative,
            NaN or infinite.
        TypeError: ``params``, ``anchor`` or ``fisher`` not a mapping of tensors; ``lam`` not a real number (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    lam = check_finite_number(lam, "lam", minimum=0)  # a NaN lam would pass "< 0" and poison the loss
    for label, m in (("params", params), ("anchor", anchor), ("fisher", fisher)):
        _check_tensor_mapping(m, label)
    total = None
    for name, f in fisher.items():
        if name not in params or name not in anchor:
            raise ValueError(f"parameter {name!r} of fisher is missing from params or anchor")
        p, a = params[name], anchor[name]
        if p.shape != f.shape or a.shape != f.shape:
            resized = a.shape == f.shape  # the parameter alone changed: EWC cannot tell which entries are new
            hint = (f"{_RESIZED}: give EWC an anchor and a Fisher of the parameter's shape (EWC.load_state_dict; "
                    "entries with Fisher 0 are unconstrained)") if resized else ""
            raise ValueError(f"shape mismatch for {name!r}: param {tuple(p.shape)}, anchor {tuple(a.shape)}, "
                             f"fisher {tuple(f.shape)}{hint}")
        # in at least float32, whatever the three dtypes: a bf16 difference squared in bf16 lost bits, and an
        # integer Fisher truncated the squared difference to an integer (0 for a small step)
        dtype = torch.promote_types(torch.promote_types(p.dtype, f.dtype), torch.float32)
        diff = p.to(dtype) - a.detach().to(p.device, dtype)
        term = (f.to(p.device, dtype) * diff.square()).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


def _check_fisher_values(name: str, f: torch.Tensor) -> None:
    """A Fisher is a mean of squares: a NaN, an inf or a negative entry would poison or invert the penalty."""
    if f.is_complex() or f.dtype == torch.bool:
        raise TypeError(f"fisher[{name!r}] must be a real-valued tensor, got dtype {f.dtype}")
    if f.is_meta:
        raise ValueError(f"fisher[{name!r}] is on the meta device: it has no values")
    if f.is_floating_point() and not bool(torch.isfinite(f).all()):
        raise ValueError(f"fisher[{name!r}] has NaN or infinite entries")
    if bool((f < 0).any()):
        raise ValueError(f"fisher[{name!r}] has negative entries; a diagonal Fisher is >= 0")


class EWC:
    """Elastic Weight Consolidation state: anchor parameters + diagonal Fisher (buffers).

    >>> ewc = EWC(model, fisher, lam=100.0)              # doctest: +SKIP
    >>> loss = task_loss + ewc.penalty(model)             # doctest: +SKIP
    >>> ewc.consolidate(model, new_fisher, gamma=0.9)     # online EWC after the next task

    Args:
        model: the network; the anchor is a detached copy of its current parameters named in ``fisher``.
        fisher: ``{name: tensor}`` from :func:`estimate_fisher`.
        lam: ``lambda >= 0``.

    Raises:
        ValueError: as :func:`ewc_penalty`, checked at construction; a Fisher entry that is negative, NaN or
            infinite somewhere (e.g. from an overflowing fp16 estimate); a parameter on the meta device.
        TypeError: ``fisher`` not a mapping of real-valued tensors.
    """

    def __init__(self, model: nn.Module, fisher: Mapping[str, torch.Tensor], lam: float = 1.0):
        self.lam = check_finite_number(lam, "lam", minimum=0)
        self.names = list(fisher)
        self._fisher: dict[str, torch.Tensor] = {}
        self._anchor: dict[str, torch.Tensor] = {}
        self._set(model, fisher)

    def _set(self, model: nn.Module, fisher: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_tensor_mapping(fisher, "fisher")
        params = dict(model.named_parameters())
        for name, f in fisher.items():  # every check first: a refused consolidate leaves the state as it was
            if name not in params:
                raise ValueError(f"fisher names parameter {name!r}, which the model does not have")
            if params[name].shape != f.shape:
                raise ValueError(f"fisher[{name!r}] has shape {tuple(f.shape)}, parameter has {tuple(params[name].shape)}")
            if params[name].is_meta:
                raise ValueError(f"parameter {name!r} is on the meta device: it has no values to anchor to")
            _check_fisher_values(name, f)
        for name, f in fisher.items():
            self._fisher[name] = f.detach().clone()
            self._anchor[name] = params[name].detach().clone()

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        return dict(self._fisher)

    @property
    def anchor(self) -> dict[str, torch.Tensor]:
        return dict(self._anchor)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lam/2 * sum F (theta - theta*)^2`` for the model's current parameters (scalar)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters())
        return ewc_penalty(params, self._anchor, self._fisher, self.lam)

    def consolidate(self, model: nn.Module, fisher: Mapping[str, torch.Tensor], gamma: float = 1.0) -> None:
        """Online EWC update: ``F <- gamma F + F_new`` and ``theta* <- theta`` (current params).

        ``gamma=1`` accumulates Fishers of all past tasks with the newest anchor; Progress &
        Compress uses ``gamma < 1`` to forget old tasks' importance gradually.

        Raises:
            ValueError: ``gamma`` outside ``[0, 1]`` or Fisher names/shapes differing from the stored ones.
            TypeError: ``fisher`` not a mapping of tensors, ``model`` not a module; ``gamma`` not a real number
                (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
        """
        gamma = check_number_in_range(gamma, "gamma", 0, 1)  # once per task, not per step: no need to inline it
        _check_tensor_mapping(fisher, "fisher")  # a string was "not the same names", a list value an AttributeError
        if set(fisher) != set(self._fisher):
            raise ValueError("consolidate needs a Fisher over the same parameter names as before")
        merged = {}
        for name, f in fisher.items():
            old = self._fisher[name]
            if f.shape != old.shape:
                raise ValueError(f"fisher[{name!r}] shape {tuple(f.shape)} != stored {tuple(old.shape)}")
            merged[name] = gamma * old + f.to(old.device, old.dtype)
        self._set(model, merged)

    def state_dict(self) -> dict[str, Any]:
        """``{"lam", "fisher", "anchor"}`` as plain tensors (``torch.save``-able)."""
        return {"lam": self.lam, "fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, Mapping) or set(state) != {"lam", "fisher", "anchor"}:
            kind = ValueError if isinstance(state, Mapping) else ArgumentTypeError
            raise kind("state must be a mapping with keys 'lam', 'fisher', 'anchor'")
        lam = state["lam"]
        check_finite_number(lam, "state['lam']", minimum=0)
        _check_tensor_mapping(state["fisher"], "state['fisher']")
        _check_tensor_mapping(state["anchor"], "state['anchor']")
        if set(state["fisher"]) != set(state["anchor"]):
            raise ValueError("state['fisher'] and state['anchor'] must name the same parameters")
        for name, f in state["fisher"].items():
            if f.shape != state["anchor"][name].shape:
                raise ValueError(f"state['fisher'][{name!r}] has shape {tuple(f.shape)}, "
                                 f"state['anchor'][{name!r}] has {tuple(state['anchor'][name].shape)}")
            _check_fisher_values(name, f)
        self.lam = float(lam)
        self._fisher = {k: v.clone() for k, v in state["fisher"].items()}
        self._anchor = {k: v.clone() for k, v in state["anchor"].items()}
        self.names = list(self._fisher)


def _weight_for(name: str, param: torch.Tensor, weights: Weights) -> Weight | None:
    """Regularisation weight of one parameter; ``None`` means 'not regularised'."""
    if weights is None:
        return 1.0
    if is_real(weights):
        return float(weights)
    if callable(weights) and not isinstance(weights, Mapping):
        return _check_weight(name, weights(name, param))
    for pattern, value in weights.items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return _check_weight(name, value)
    return None


def _check_weight(name: str, value: Any) -> Weight | None:
    """A factor ``a`` from a mapping or callable: a tensor (not read back: that would sync), None, or a
    number >= 0 (a negative one rewards moving away from ``w0``, whatever the sign of ``alpha``)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if not is_real(value):
        raise TypeError(f"weights for {name!r} must be a number, a tensor or None, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weights for {name!r} must be a finite number >= 0, got {value!r}")
    return float(value)


def _patterns(value: Any, arg: str) -> list[str]:
    """Names or patterns as a list; one string is one pattern (iterating it would give its characters)."""
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{arg} must be a string or an iterable of strings, got {type(value).__name__}") from None
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{arg} must hold strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return items


def l2sp_penalty(
    params: Mapping[str, torch.Tensor],
    pretrained: Mapping[str, torch.Tensor],
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    weights: Weights = None,
) -> torch.Tensor:
    r"""L2-SP: ``alpha/2 sum a (w - w0)^2`` over pretrained params + ``beta/2 ||w_new||^2``.

    Args:
        params: current parameters ``{name: tensor}``.
        pretrained: starting-point values ``w0``; names absent here count as "new" (``beta`` term).
        alpha: strength of the pull to the pretrained weights (``>= 0``).
        beta: plain weight decay on new parameters (``>= 0``).
        weights: per-parameter factor ``a`` on the ``alpha`` term: ``None`` (1 everywhere), a float,
            a mapping from names or ``fnmatch`` patterns (``"model.layers.0.*"``, first match wins)
            to a float (layer-wise) or a tensor broadcastable to the parameter (element-wise), or a
            callable ``(name, param) -> float | tensor``. With a mapping, a pretrained parameter that
            matches no pattern is not regularised. Numbers must be finite and ``>= 0``; tensors are not
            read back (that would cost a device sync per call).

    Returns:
        scalar tensor, in at least float32 (a bf16 model's differences are squared in float32).

    Raises:
        ValueError: ``alpha``/``beta`` negative, NaN or infinite, shape mismatch with ``pretrained`` or a weight tensor, a
            weight number that is negative, NaN or infinite.
        TypeError: ``weights`` (or one of its values) of an unsupported type; ``params``/``pretrained`` not a
            mapping of tensors; ``alpha``/``beta`` not a real number (an :class:`~alignlab.ArgumentTypeError`,
            a ``ValueError`` too).
    """
    for label, v in (("alpha", alpha), ("beta", beta)):
        check_finite_number(v, label, minimum=0)
    if weights is not None and not is_real(weights) and not isinstance(weights, Mapping) and not callable(weights):
        raise TypeError(f"weights must be None, a float, a mapping or a callable, got {type(weights).__name__}")
    if is_real(weights) and (not math.isfinite(weights) or weights < 0):
        raise ValueError(f"weights must be a finite number >= 0, got {weights!r}")
    _check_tensor_mapping(params, "params")
    _check_tensor_mapping(pretrained, "pretrained")
    alpha, beta = float(alpha), float(beta)
    sp = None
    new = None
    for name, p in params.items():
        dtype = torch.promote_types(p.dtype, torch.float32)  # as ewc_penalty: no squares in bf16
        if name in pretrained:
            w0 = pretrained[name]
            if w0.shape != p.shape:
                raise ValueError(f"pretrained[{name!r}] has shape {tuple(w0.shape)}, parameter has {tuple(p.shape)}"
                                 f"{_RESIZED}: build L2SP after resizing, or give it a w0 of the new shape "
                                 "(L2SP.load_state_dict)")
            a = _weight_for(name, p, weights)
            if a is None:
                continue
            sq = (p.to(dtype) - w0.detach().to(p.device, dtype)).square()
            if isinstance(a, torch.Tensor):
                try:
                    sq = torch.broadcast_to(a.to(p.device, dtype), p.shape) * sq
                except RuntimeError as exc:
                    raise ValueError(f"weight tensor for {name!r} does not broadcast to {tuple(p.shape)}") from exc
            else:
                sq = float(a) * sq
            term = sq.sum()
            sp = term if sp is None else sp + term
        elif beta:
            term = p.to(dtype).square().sum()
            new = term if new is None else new + term
    zero = torch.zeros(())
    return 0.5 * alpha * (zero if sp is None else sp) + 0.5 * beta * (zero if new is None else new)


def lora_delta_sq(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    r"""``||B A - B0 A0||_F^2`` for ``a, a0 (r, in)`` and ``b, b0 (out, r)``, without the ``(out, in)`` product.

    With :math:`U = [B - B_0,\ B_0]` ``(out, 2r)`` and :math:`V = [A;\ A - A_0]` ``(2r, in)``,
    :math:`UV = BA - B_0A_0` and :math:`\lVert UV \rVert_F^2 = \sum (U^\top U) \odot (V V^\top)`. Every
    product in that sum holds a difference from the start, so near the start (PiSSA's large :math:`B_0 A_0`)
    the terms are small. They can still cancel where ``A`` and ``B`` moved a lot without moving ``B A`` (a
    rescaling ``B G, G^{-1} A``): there the result is the true value up to ~1e-7 of ``||(B - B_0) A||^2`` in
    float32, and may come out slightly below 0. Sums in at least float32.

    Raises:
        TypeError: a factor that is not a floating-point tensor.
        ValueError: ``a`` not 2-D, ``b`` not ``(out, r)`` for ``a``'s ``r``, or ``a0`` / ``b0`` not of ``a``'s /
            ``b``'s shape (a broadcastable start gave a wrong number without a word).
    """
    for name, t in (("a", a), ("b", b), ("a0", a0), ("b0", b0)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if a.dim() != 2:
        raise ValueError(f"a must be (r, in), got {tuple(a.shape)}")
    if b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"b must be (out, r) with r = {a.shape[0]} (a's rows), got {tuple(b.shape)}")
    for name, t, like, like_name in (("a0", a0, a, "a"), ("b0", b0, b, "b")):
        if t.shape != like.shape:
            raise ValueError(f"{name} must have {like_name}'s shape {tuple(like.shape)}, got {tuple(t.shape)}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b, a0, b0 = a.to(dtype), b.to(dtype), a0.detach().to(a.device, dtype), b0.detach().to(a.device, dtype)
    u = torch.cat([b - b0, b0], dim=1)
    v = torch.cat([a, a - a0], dim=0)
    return ((u.T @ u) * (v @ v.T)).sum()


def _lora_pairs(model: nn.Module, anchored: Mapping[str, torch.Tensor]) -> list[tuple[str, str, str, float]]:
    """``(layer name, name of A, name of B, s)`` for every adapter of a ``LoRALinear`` whose A and B are both in
    ``anchored``."""
    from alignlab.adapters.lora import LoRALinear  # here: the regularisers import nothing of adapters otherwise

    pairs = []
    for prefix, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        dot = f"{prefix}." if prefix else ""
        for adapter in layer.adapter_names():
            a, b = f"{dot}lora_A.{adapter}.weight", f"{dot}lora_B.{adapter}.weight"
            if a in anchored and b in anchored:
                pairs.append((prefix, a, b, float(layer.scaling[adapter])))
    return pairs


class L2SP:
    """Keeps a detached copy of the starting weights and returns the L2-SP penalty of a model.

    >>> reg = L2SP(model, alpha=0.01, beta=0.01, weights={"lm_head.*": 0.0})  # doctest: +SKIP
    >>> loss = task_loss + reg(model)                                       # doctest: +SKIP

    Args:
        model: its current trainable parameters become the pretrained reference ``w0``.
        alpha, beta, weights: as :func:`l2sp_penalty`.
        exclude: names or patterns of parameters to treat as new (``beta`` term), e.g. a fresh head; one
            string is one pattern.
        lora_delta: for every adapter of a ``LoRALinear`` whose ``A`` and ``B`` are both trainable (and not
            excluded), penalise the update of the effective weight, ``alpha/2 * a * s^2 ||B A - B0 A0||_F^2``
            (:func:`lora_delta_sq`), instead of ``A`` and ``B`` each against its start. ``a`` is looked up (and a
            callable ``weights`` called with the base weight) under ``<layer>.base_layer.weight``, the name
            of the weight the update is added to; it must be a number, as the ``(out, in)`` update an element-wise
            factor would need is never formed. Each adapter of a layer is its own term; other adapter
            families (DoRA's magnitude vector too) keep the per-parameter terms. For a DoRA adapter the term is
            on the direction's update ``s B A`` (its weight is ``m (W + s B A) / ||W + s B A||``, which this does
            not hold). Default False: the factors.

    Raises:
        ValueError, TypeError: as :func:`l2sp_penalty`, checked at construction; ``exclude`` not strings; a
            model without trainable parameters, or one of them on the meta device; ``lora_delta`` not a bool; (in the call) a tensor factor
            for a ``lora_delta`` term.
    """

    def __init__(self, model: nn.Module, *, alpha: float = 1.0, beta: float = 0.0, weights: Weights = None,
                 exclude: str | Iterable[str] = (), lora_delta: bool = False):
        exclude = _patterns(exclude, "exclude")
        lora_delta = as_bool(lora_delta, "lora_delta")
        l2sp_penalty({}, {}, alpha=alpha, beta=beta, weights=weights)  # validate arguments now
        # Python floats: a NumPy alpha in state_dict() made the file unreadable to torch.load (weights_only)
        self.alpha, self.beta, self.weights = float(alpha), float(beta), weights
        trainable = _named_trainable(model)
        if not trainable:  # w0 would be empty: after unfreezing, every weight would count as new, none pulled back
            raise ValueError("model has no trainable parameters (requires_grad) to take w0 from: build L2SP after "
                             "unfreezing the parameters to fine-tune")
        self.pretrained = {
            n: p.detach().clone()
            for n, p in trainable.items()
            if not any(n == e or fnmatch.fnmatchcase(n, e) for e in exclude)
        }
        meta = [n for n, p in self.pretrained.items() if p.is_meta]
        if meta:  # a model not materialised yet (deferred init): its w0 would hold no values
            raise ValueError(f"parameters on the meta device have no values to start from: {meta[:5]}")
        if isinstance(weights, Mapping):
            for pattern, value in weights.items():
                _check_weight(pattern, value)
        self.lora_pairs = _lora_pairs(model, self.pretrained) if lora_delta else []

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = _named_trainable(model)
        if not self.lora_pairs:
            return l2sp_penalty(params, self.pretrained, alpha=self.alpha, beta=self.beta, weights=self.weights)
        paired = {n for _, a, b, _ in self.lora_pairs for n in (a, b)}
        rest = {n: p for n, p in params.items() if n not in paired}
        total = l2sp_penalty(rest, self.pretrained, alpha=self.alpha, beta=self.beta, weights=self.weights)
        factors = dict(model.named_parameters())  # frozen ones too: a factor frozen after construction still counts
        for layer, a, b, scale in self.lora_pairs:
            if a not in factors or b not in factors:
                raise ValueError(f"lora_delta: the model has no {a if a not in factors else b!r} any more")
            term = f"{layer}.base_layer.weight" if layer else "base_layer.weight"
            base = model.get_submodule(layer).base_layer.weight if callable(self.weights) else None
            factor = _weight_for(term, base, self.weights)
            if factor is None:
                continue
            if isinstance(factor, torch.Tensor):
                raise ValueError(f"weights for {term!r} (a lora_delta term) must be a number: the (out, in) update "
                                 "an element-wise factor needs is never formed")
            sq = lora_delta_sq(factors[a], factors[b], self.pretrained[a], self.pretrained[b])
            total = total + (0.5 * self.alpha * factor * scale**2) * sq
        return total

    def state_dict(self) -> dict[str, Any]:
        """``{"alpha", "beta", "pretrained"}`` (``torch.save``-able). ``weights`` (possibly a callable) is not
        in it: pass it to the constructor again."""
        return {"alpha": self.alpha, "beta": self.beta, "pretrained": dict(self.pretrained)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: a resumed run must not take its starting point from the
        fine-tuned model it reloads (the penalty would restart at 0, anchored to the wrong weights)."""
        if not isinstance(state, Mapping) or set(state) != {"alpha", "beta", "pretrained"}:
            kind = ValueError if isinstance(state, Mapping) else ArgumentTypeError
            raise kind("state must be a mapping with keys 'alpha', 'beta', 'pretrained'")
        _check_tensor_mapping(state["pretrained"], "state['pretrained']")
        l2sp_penalty({}, {}, alpha=state["alpha"], beta=state["beta"])  # validates both
        missing = [n for _, a, b, _ in self.lora_pairs for n in (a, b) if n not in state["pretrained"]]
        if missing:
            raise ValueError(f"state['pretrained'] lacks the LoRA factors this L2SP(lora_delta=True) holds to their "
                             f"start: {missing[:4]}")
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.pretrained = {k: v.detach().clone() for k, v in state["pretrained"].items()}
