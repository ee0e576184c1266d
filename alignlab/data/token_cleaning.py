"""Token cleaning: drop uninformative supervised tokens from the SFT loss.

"Token Cleaning: Fine-Grained Data Selection for LLM Supervised
Fine-Tuning", Pang et al., ICML 2025, arXiv:2502.01968. Each supervised
token ``x_j`` (context ``x_<j``) gets the influence score

    I(x_j) = ℓ(x_j | x_<j; θ_base) - ℓ(x_j | x_<j; θ_ref),   ℓ = -log p,

how much easier the token became for a reference model ``θ_ref`` (trained on
good data) than for the base model. Tokens the reference has not learned any
better (``I ≈ 0`` or negative: common phrases, noise) carry little task
information; the top ``keep_ratio`` of tokens by ``I`` keep their labels, the
others are set to ``-100``.

* **fixed-model** cleaning: one pass with a fixed base and a fixed
  reference; the paper ranks globally over the data set — compute a
  threshold with :func:`influence_threshold` over (a sample of) the data,
  or rank per batch / per sequence.
* **self-evolving** cleaning: the reference is the model being trained (or
  its latest snapshot): at each round the current model scores the next
  chunk of data against the fixed base, and the cleaned chunk trains it
  further. :class:`TokenCleaner` takes the current model at call time.

Labels follow the ``transformers`` convention: ``labels[b, t]`` is the token
at ``t``, predicted from logits at ``t - 1``; ``-100`` means no loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, check_number_in_range, ratio_fraction
from alignlab.data.sft import IGNORE_INDEX
from alignlab.eval.eval_mode import eval_mode

__all__ = [
    "TokenCleaner",
    "clean_labels",
    "influence_threshold",
    "token_influence",
    "token_losses",
]


@torch.no_grad()
def token_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token NLL ``-log p(labels[b,t] | input_ids[b,<t])``, shape ``(batch, seq)``, float32.

    ``NaN`` where ``labels == -100``, at ``t = 0``, where a 2-D ``attention_mask`` is 0 at ``t`` (a pad,
    whatever its label: ``labels = input_ids.clone()`` labels pads too) or at ``t - 1`` (the first real
    token of a left-padded row has no context) and, with ``(batch, seq)``
    ``position_ids``, where ``position_ids[b, t] == 0`` (a packed sample's first token). ``model(input_ids, ...)``
    must return an object with ``.logits`` ``(batch, seq, vocab)`` or the
    logits tensor itself; ``position_ids`` are forwarded (packed rows). Without them, a 2-D
    ``attention_mask`` gives each real token the count of real tokens before it as its position
    (``cumsum - 1``, as ``transformers``' ``generate`` does), so a left-padded row scores as the same row
    unpadded also under absolute position embeddings (GPT-2), where the model's own ``0 … seq-1``
    would shift it by the padding; the model must then take ``position_ids``.
    Raises ``ValueError`` on shape mismatch or float ``labels``.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must be equal "
                         "(batch, seq) shapes")
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
        kwargs["use_cache"] = False  # transformers only derives packed masks without a KV cache
    elif attention_mask is not None and attention_mask.dim() == 2:
        kwargs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # a pad's is never scored
    out = model(input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(input_ids.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:  # True/False: no token ids
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    target = labels[:, 1:].long()  # cross_entropy takes int64 targets only; int32 labels (Arrow) are as good
    valid = target != IGNORE_INDEX
    if attention_mask is not None and attention_mask.dim() == 2:
        # a pad is no token to score, whatever its label (labels = input_ids.clone() labels the pads too:
        # right padding scored the first pad of each row, from the last real token); and a token is
        # predicted from the position before it: after a pad (left padding) there is no context
        real = attention_mask.to(device=valid.device).bool()
        valid &= real[:, 1:] & real[:, :-1]
    if position_ids is not None and position_ids.shape == labels.shape:
        # a packed row: a sample's first token (position 0) would be predicted from the previous sample
        valid &= position_ids[:, 1:].to(device=valid.device) != 0
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target.masked_fill(~valid, 0), reduction="none"
    )
    result = torch.full(labels.shape, math.nan, dtype=torch.float32, device=labels.device)
    result[:, 1:] = nll.masked_fill(~valid, math.nan)
    return result


def token_influence(
    base: nn.Module,
    reference: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Influence ``ℓ_base - ℓ_ref`` per token, ``(batch, seq)``; ``NaN`` on unsupervised positions."""
    return token_losses(base, input_ids, labels, attention_mask, position_ids) - token_losses(
        reference, input_ids, labels, attention_mask, position_ids
    )


def _check_ratio(keep_ratio: float) -> float:
    """``keep_ratio`` as a Python float: a real number in [0, 1] (NumPy scalars too; a bool, NaN are not)."""
    return check_number_in_range(keep_ratio, "keep_ratio", 0, 1)


def _keep_count(n: int, keep_ratio: float) -> int:
    """``⌈ρ · n⌉`` with ``ρ`` as :func:`~alignlab._checks.ratio_fraction` reads it (``0.07 · 100`` keeps 7, a
    float32 0.6 of 20 keeps 12), as :func:`alignlab.context.select_tokens` counts."""
    return math.ceil(n * ratio_fraction(keep_ratio))


def _check_threshold(threshold: float) -> float:
    """``threshold`` as a Python float: a real number, ±inf included (:func:`influence_threshold` returns
    inf to keep nothing); not a bool, and not NaN, which ``scores >= NaN`` would turn into dropping every token."""
    return check_number_in_range(threshold, "threshold", -math.inf, math.inf)


def clean_labels(
    labels: torch.Tensor,
    scores: torch.Tensor,
    keep_ratio: float | None = None,
    scope: Literal["batch", "sequence"] = "batch",
    threshold: float | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """New labels keeping only the most informative supervised tokens.

    Either ``threshold`` (keep ``scores >= threshold``, e.g. a data-set-wide
    value from :func:`influence_threshold`) or ``keep_ratio``: keep the top
    ``⌈ρ · n⌉`` supervised tokens by score, ranked over the whole batch
    (``scope="batch"``) or within each sequence (``"sequence"``): each row, or,
    given the ``(batch, seq)`` ``position_ids`` of packed rows, each sample (a
    sample starts where the positions restart at 0), so a packed batch keeps
    the tokens its samples keep unpacked. Ties go to the
    earlier token. Positions already ``-100`` stay so; NaN scores are
    dropped. ``labels``/``scores``: ``(batch, seq)``. Returns a new tensor.
    Raises ``ValueError`` if neither or both of ``keep_ratio`` and
    ``threshold`` are given, if ``threshold`` is NaN or not a number (then an
    :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too), on
    shape mismatch, or for ``position_ids`` that are not an integer tensor
    of the labels' shape.
    """
    if labels.shape != scores.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)} must have equal shapes")
    if (keep_ratio is None) == (threshold is None):
        raise ValueError("give exactly one of keep_ratio and threshold")
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.shape != labels.shape
                                     or position_ids.is_floating_point() or position_ids.dtype == torch.bool):
        kind = ValueError if isinstance(position_ids, torch.Tensor) else ArgumentTypeError
        raise kind(f"position_ids must be an integer tensor of the labels' shape {tuple(labels.shape)}, got "
                   f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
    supervised = (labels != IGNORE_INDEX) & ~torch.isnan(scores)
    if threshold is not None:
        keep = supervised & (scores >= _check_threshold(threshold))
        return labels.masked_fill(~keep, IGNORE_INDEX)
    keep_ratio = _check_ratio(keep_ratio)
    if scope not in ("batch", "sequence"):
        raise ValueError(f"scope must be 'batch' or 'sequence', got {scope!r}")
    device = scores.device
    # the group each token is ranked in: the batch, a row, or a packed sample of a row
    if scope == "batch":
        groups = torch.zeros(labels.numel(), dtype=torch.long, device=device)
    else:
        groups = torch.arange(labels.shape[0], device=device)[:, None] * (labels.shape[1] + 1)
        if position_ids is not None:
            groups = groups + (position_ids.to(device) == 0).long().cumsum(dim=1)
        groups = torch.unique(groups.expand(labels.shape).flatten(), return_inverse=True)[1]
    sup = supervised.flatten().to(device)
    masked = scores.flatten().float().masked_fill(~sup, -math.inf)
    # by score, best first (ties: earlier token first), then every supervised token before every other one (a
    # supervised score of -inf tied with the -inf of the unsupervised: an earlier unsupervised position took its
    # slot, and keep_ratio=1 dropped it), then by group, keeping that order inside each group
    order = torch.argsort(masked, descending=True, stable=True)
    order = order[torch.argsort((~sup[order]).to(torch.int8), stable=True)]
    order = order[torch.argsort(groups[order], stable=True)]
    sizes = torch.bincount(groups)
    starts = sizes.cumsum(0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device) - starts[groups[order]]
    counts = torch.bincount(groups, weights=sup.double()).long().tolist()
    ks = {n: _keep_count(n, keep_ratio) for n in set(counts)}
    k = torch.tensor([ks[n] for n in counts], dtype=torch.long, device=device)
    keep = ((rank < k[groups]) & sup).reshape(labels.shape)
    return labels.masked_fill(~keep.to(labels.device), IGNORE_INDEX)


def influence_threshold(scores: Iterable[torch.Tensor], keep_ratio: float) -> float:
    """Global threshold so that a share ``keep_ratio`` of all finite scores is ``>=`` it.

    ``scores``: an iterable of score tensors (e.g. one per batch, NaN =
    unsupervised) — the data-set-wide ranking of fixed-model cleaning. Holds
    the finite scores in memory (4 bytes each). Raises ``ValueError`` if no
    finite score is seen.
    """
    keep_ratio = _check_ratio(keep_ratio)
    pool = [s[torch.isfinite(s)].float().flatten().cpu() for s in scores]
    flat = torch.cat(pool) if pool else torch.empty(0)
    if flat.numel() == 0:
        raise ValueError("no finite score found")
    k = _keep_count(flat.numel(), keep_ratio)
    if k == 0:
        return math.inf
    return float(torch.topk(flat, k).values[-1])


def _row_positions(batch) -> torch.Tensor | None:
    """The batch's ``(batch, seq)`` ``position_ids`` (packed rows: ``scope="sequence"`` ranks per sample), else None."""
    position_ids = batch.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape == batch["labels"].shape:
        return position_ids
    return None


class TokenCleaner:
    """Apply token cleaning to batches (``input_ids``, ``labels``, optional mask / positions).

    Args:
        base: the base model ``θ_base`` (usually the pre-trained model), frozen.
        reference: the fixed reference model (``mode="fixed"``); ``None`` in
            ``"self_evolving"`` mode, where the current model is passed to
            :meth:`__call__`.
        keep_ratio / scope / threshold: as in :func:`clean_labels` (``threshold`` wins over
            ``keep_ratio``); checked here, so a bad value fails before any model runs. A batch's
            ``(batch, seq)`` ``position_ids`` go to :func:`clean_labels` too: ``scope="sequence"``
            ranks each packed sample on its own.

    Raises:
        ValueError: an unknown ``mode``, a reference that does not suit it, or a bad ``keep_ratio``,
            ``scope`` or ``threshold`` (neither given included).
    """

    def __init__(
        self,
        base: nn.Module,
        reference: nn.Module | None = None,
        mode: Literal["fixed", "self_evolving"] = "fixed",
        keep_ratio: float | None = 0.6,
        scope: Literal["batch", "sequence"] = "batch",
        threshold: float | None = None,
    ):
        if mode not in ("fixed", "self_evolving"):
            raise ValueError(f"mode must be 'fixed' or 'self_evolving', got {mode!r}")
        if mode == "fixed" and reference is None:
            raise ValueError("mode='fixed' needs a reference model")
        if mode == "self_evolving" and reference is not None:
            raise ValueError("mode='self_evolving' takes the current model at call time; pass reference=None")
        if threshold is not None:
            keep_ratio, threshold = None, _check_threshold(threshold)
        elif keep_ratio is None:
            raise ValueError("give keep_ratio or threshold")
        else:
            keep_ratio = _check_ratio(keep_ratio)
            if scope not in ("batch", "sequence"):
                raise ValueError(f"scope must be 'batch' or 'sequence', got {scope!r}")
        self.base, self.reference, self.mode = base, reference, mode
        self.keep_ratio, self.scope, self.threshold = keep_ratio, scope, threshold

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """Influence scores ``(batch, seq)`` for ``batch``; ``model`` = current model in self-evolving mode."""
        reference = self._reference(model)
        # eval_mode puts back each submodule's own mode (a block the caller froze in eval stays in eval)
        with eval_mode(self.base), eval_mode(reference):
            return token_influence(self.base, reference, batch["input_ids"], batch["labels"],
                                   batch.get("attention_mask"), batch.get("position_ids"))

    def __call__(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """The cleaned label tensor for ``batch`` (the input is not modified)."""
        return clean_labels(batch["labels"], self.scores(batch, model), self.keep_ratio, self.scope, self.threshold,
                            position_ids=_row_positions(batch))

    def _reference(self, model: nn.Module | None) -> nn.Module:
        if self.mode == "fixed":
            if model is not None:
                raise ValueError("mode='fixed' uses its own reference; do not pass a model")
            return self.reference
        if model is None:
            raise ValueError("mode='self_evolving' needs the current model: cleaner(batch, model)")
        return model
