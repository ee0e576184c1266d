"""Fused linear cross-entropy: the SFT loss straight from the last hidden state.

For tokens ``t`` with label ``y_t != ignore_index``, logits ``Z_t = W h_t + b``,
optional soft cap ``z_t = c tanh(Z_t / c)`` (Gemma 2, arXiv:2408.00118), else
``z_t = Z_t``, and ``lse_t = log sum_v exp(z_{t,v})``:

    l_t = (1 - eps) (lse_t - z_{t,y_t}) + eps (lse_t - mean_v z_{t,v}) + zeta lse_t^2

``eps`` is label smoothing exactly as ``torch.nn.functional.cross_entropy``
defines it (Szegedy et al., "Rethinking the Inception Architecture",
arXiv:1512.00567); ``zeta lse^2`` is the z-loss of PaLM (arXiv:2204.02311).
With per-token weights ``w_t`` (default 1) and ``N`` = number of non-ignored tokens:

    reduction="none": w_t l_t per token (0 where ignored)
    reduction="sum":  sum_t w_t l_t
    reduction="mean": sum_t w_t l_t / N     (0 when N = 0, where PyTorch gives NaN)

Note ``mean`` divides by the token count, not by ``sum_t w_t``.

The ``(tokens, vocab)`` logits are never built in full: this runs on the chunked
engine of :mod:`alignlab.losses.logprobs` (one engine for log-probs and
cross-entropy). For ``mean``/``sum`` the upstream gradient is a scalar, so the
gradients are computed **during the forward pass**: per chunk, one matmul for the
logits, one kernel for the fp32 log-sum-exp that overwrites the chunk with
``dL/dZ``, and two matmuls for ``dL/dh`` and ``dL/dW``; three matmuls in all
(Liger-Kernel's scheme, arXiv:2410.10989). Backward only scales them by the
upstream scalar. ``reduction="none"`` cannot know its upstream gradient early: it
keeps the log-sum-exp and recomputes each chunk in backward (four matmuls).

Gradient accumulation: to make ``k`` micro-batches equal one big batch, do not
average per-micro-batch means; sum each micro-batch (``reduction="sum"``) and
divide by the token count of the whole step, :func:`count_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from alignlab._checks import check_finite_number
from alignlab.losses.logprobs import (
    _check_ignore_index,
    check_linear_inputs,
    default_chunk_rows,
    linear_chunked_pass,
    scale_grads_,
    scatter_rows,
    select_scored_rows,
)

__all__ = ["CrossEntropyOutput", "count_tokens", "linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
# With gradients computed in the forward pass, dL/dW (vocab x hidden) is read and written
# once per chunk: larger chunks than the log-prob default pay off (see docs/losses-logprobs.md).
_CE_CUDA_CHUNK_BYTES = 2**30


class CrossEntropyOutput(NamedTuple):
    """What :func:`linear_cross_entropy` returns.

    Attributes:
        loss: 0-dim float32 for ``"mean"``/``"sum"``; labels-shaped float32 for ``"none"``
            (float64 for float64 inputs). Differentiable.
        n_tokens: 0-dim int64 tensor, the number of labels that are not ``ignore_index``
            (not differentiable); use it (summed over micro-batches / ranks) to normalise.
    """

    loss: torch.Tensor
    n_tokens: torch.Tensor


def _row_loss(st, smoothing: float, z_loss: float) -> torch.Tensor:
    loss = st.lse - st.target
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (st.lse - st.mean)
    if z_loss:
        loss = loss + z_loss * st.lse.square()
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weights, labels, reduction, ignore_index,
                smoothing, z_loss, softcap, chunk_size, grad_enabled):
        n_all = labels.numel()
        index, h, y = select_scored_rows(hidden, labels, ignore_index, weight.shape[0])
        n = y.numel()
        if chunk_size is None:
            chunk_size = default_chunk_rows(n, weight.shape[0], hidden.element_size(), hidden.device,
                                            cuda_budget=_CE_CUDA_CHUNK_BYTES)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w_rows = None
        if token_weights is not None:
            w_rows = token_weights.reshape(-1)
            w_rows = (w_rows if index is None else w_rows.index_select(0, index)).to(acc)
        need = ctx.needs_input_grad[:3]
        # Under torch.no_grad() needs_input_grad still reports requires_grad: ask grad mode too.
        eager = reduction != "none" and grad_enabled and any(need)
        # labels_checked: select_scored_rows checked them (one host read), not once more per pass
        opts = dict(chunk_size=chunk_size, want_mean=smoothing > 0, smoothing=smoothing,
                    z_loss=z_loss, softcap=softcap, labels_checked=True)
        norm = 1.0 / max(n, 1) if reduction == "mean" else 1.0
        ctx.post = 1.0
        if eager:
            gs = w_rows if w_rows is not None else torch.ones(n, dtype=acc, device=h.device)
            # fp16 would flush p_v / N (~1e-9 for a 128k vocab) to zero: keep 1/N out of it, and out of the stored
            # gradients too (they would be subnormal for a mean over many tokens, beyond a loss scale's repair):
            # backward multiplies by 1/N and the upstream gradient in one go.
            if hidden.dtype == torch.float16:
                ctx.post = norm
            else:
                gs = gs * norm
            st, gh, gw, gb = linear_chunked_pass(
                h, weight, y, bias, grad_scale=gs, need_hidden_grad=need[0],
                need_weight_grad=need[1], need_bias_grad=need[2], **opts,
            )
            ctx.grads = (gh, gw, gb)
        else:
            st, _, _, _ = linear_chunked_pass(h, weight, y, bias, **opts)
            ctx.grads = None
        row_loss = _row_loss(st, smoothing, z_loss)
        weighted = row_loss * w_rows if w_rows is not None else row_loss
        if reduction == "none":
            loss = scatter_rows(weighted, index, n_all).view(labels.shape)
        else:
            loss = weighted.sum() * norm
        n_tokens = torch.tensor(n, dtype=torch.int64, device=hidden.device)
        ctx.mark_non_differentiable(n_tokens)
        ctx.save_for_backward(hidden, weight, bias, token_weights, labels, st.lse, row_loss)
        ctx.opts = (reduction, ignore_index, norm, opts, index)
        return loss, n_tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_n):
        hidden, weight, bias, token_weights, labels, lse, row_loss = ctx.saved_tensors
        reduction, ignore_index, norm, opts, index = ctx.opts
        need_h, need_w, need_b, need_tw = ctx.needs_input_grad[:4]
        n_all = labels.numel()
        acc = lse.dtype
        if reduction == "none":
            g = grad_loss.reshape(-1)
            g_rows = (g if index is None else g.index_select(0, index)).to(acc)
        else:
            g_rows = (grad_loss.to(acc) * norm).expand(row_loss.shape)
        grad_tw = None
        if need_tw:
            grad_tw = scatter_rows(g_rows * row_loss, index, n_all).view(labels.shape).to(token_weights.dtype)
        gh = gw = gb = None
        if ctx.grads is not None:
            # Computed in forward for a unit upstream gradient (fp16: without the mean's 1/N); hand them over
            # (dropping our reference lets autograd adopt dL/dW without a copy) and scale if needed.
            gh, gw, gb = scale_grads_(ctx.grads, grad_loss, ctx.post)
            ctx.grads = None
        elif need_h or need_w or need_b:
            # reduction="none", or a second backward through a retained graph: recompute.
            _, h, y = select_scored_rows(hidden, labels, ignore_index, weight.shape[0])
            post = None
            if reduction == "none":
                gs = g_rows
            elif hidden.dtype == torch.float16:  # as in forward: keep 1/N out of the fp16 logits
                gs, post = grad_loss.to(acc).expand(row_loss.shape), norm
            else:
                gs = g_rows
            if token_weights is not None:
                tw = token_weights.reshape(-1)
                gs = gs * (tw if index is None else tw.index_select(0, index)).to(acc)
            _, gh, gw, gb = linear_chunked_pass(
                h, weight, y, bias, grad_scale=gs.contiguous(), lse=lse, need_hidden_grad=need_h,
                need_weight_grad=need_w, need_bias_grad=need_b, **dict(opts, want_mean=False),
            )
            if post is not None and post != 1.0:
                gh, gw, gb = (t.mul_(post) if t is not None else None for t in (gh, gw, gb))
        grad_hidden = scatter_rows(gh, index, n_all).view(hidden.shape) if need_h and gh is not None else None
        grad_weight = gw if need_w else None
        grad_bias = gb.to(bias.dtype) if need_b and gb is not None else None
        return grad_hidden, grad_weight, grad_bias, grad_tw, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> CrossEntropyOutput:
    """Token cross-entropy of ``lm_head(hidden)`` without materialising the full logits.

    Same numbers as ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=...,
    label_smoothing=...)`` (plus ``z_loss * lse^2`` per token, per-token weights and the
    soft cap, see the module docstring), computed chunk by chunk with an fp32 log-sum-exp.
    Rows whose label is ``ignore_index`` cost no compute.

    Args:
        hidden: ``(batch, seq, hidden)`` (any leading shape) last hidden state, fp16/bf16/fp32/fp64.
        weight: ``(vocab, hidden)`` lm_head weight, same dtype. A weight with
            ``requires_grad=False`` (frozen head, LoRA) skips its gradient matmul.
        labels: ``(batch, seq)`` targets aligned with ``hidden`` (shift first for causal LMs).
        bias: optional ``(vocab,)``.
        ignore_index: label value of unscored positions.
        reduction: ``"mean"`` (over non-ignored tokens), ``"sum"`` or ``"none"``.
        label_smoothing: ``eps`` in ``[0, 1]``.
        z_loss: ``zeta >= 0``, weight of ``lse^2``.
        logit_softcap: soft cap ``c > 0`` or None.
        token_weights: optional ``(batch, seq)`` float weights ``w_t`` (may require grad), used as given: no check
            of their values (it would cost a device sync per call), so a negative weight ascends that token's loss
            (as unlikelihood-style objectives want) and a NaN makes the loss NaN. The distillation losses, whose
            weights are never meant to be negative, check theirs.
        chunk_size: rows of logits per chunk (default: 1 GiB of logits on CUDA, e.g. 4096 rows
            of a 128k bf16 vocabulary; 32 MiB on CPU). Larger chunks read and write ``dL/dW``
            fewer times (faster); smaller ones use less memory (256 rows: Liger's footprint).

    Returns:
        :class:`CrossEntropyOutput` ``(loss, n_tokens)``.

    Raises:
        TypeError: non-float hidden/weight/token_weights, non-integer labels, mismatched dtypes,
            ``label_smoothing``/``z_loss``/``logit_softcap`` not a real number.
        ValueError: mismatched shapes/devices, labels outside ``[0, vocab)``, unknown
            ``reduction``, ``label_smoothing`` outside ``[0, 1]``, ``z_loss < 0``, ``logit_softcap <= 0``,
            any of the three NaN or infinite.

    Example:
        >>> out = linear_cross_entropy(model.model(ids).last_hidden_state[:, :-1],
        ...                            model.lm_head.weight, ids[:, 1:])
        >>> out.loss.backward()
    """
    check_linear_inputs(hidden, weight, labels, bias, chunk_size)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # NaN passed the old `float(z_loss) < 0` test, and an infinite cap gives inf * tanh(0) = NaN logits
    if not 0.0 <= check_finite_number(label_smoothing, "label_smoothing") <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_finite_number(z_loss, "z_loss", minimum=0.0)
    if logit_softcap is not None and not check_finite_number(logit_softcap, "logit_softcap") > 0.0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or not token_weights.is_floating_point():
            raise TypeError("token_weights must be a floating-point tensor")
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights must have the labels' shape {tuple(labels.shape)}, "
                             f"got {tuple(token_weights.shape)}")
        if token_weights.device != labels.device:
            raise ValueError("token_weights must be on the labels' device")
    softcap = float(logit_softcap) if logit_softcap is not None else None
    loss, n_tokens = _LinearCrossEntropy.apply(
        hidden, weight, bias, token_weights, labels, reduction, ignore_index,
        float(label_smoothing), float(z_loss), softcap, chunk_size, torch.is_grad_enabled(),
    )
    return CrossEntropyOutput(loss, n_tokens)


def count_tokens(labels: torch.Tensor | Sequence[torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """Number of scored labels over one tensor or all micro-batches of an optimizer step.

    The normaliser that makes gradient accumulation exact: with micro-batches ``m``,

        L = sum_m sum_{t in m} w_t l_t / N_step,   N_step = count_tokens([y_m for m in step])

    i.e. ``(linear_cross_entropy(h_m, W, y_m, reduction="sum").loss / N_step).backward()`` per
    micro-batch gives the gradient of the big-batch ``reduction="mean"`` loss. Averaging
    per-micro-batch means instead over-weights short micro-batches. Under data parallelism,
    all-reduce (sum) ``N_step`` over ranks as well and scale by the world size if the
    framework averages gradients across ranks.

    Args:
        labels: a label tensor, or a sequence of them (one per micro-batch).
        ignore_index: label value of unscored positions.

    Returns:
        0-dim int64 tensor (on the labels' device).

    Raises:
        TypeError: a non-tensor or non-integer label tensor, ``ignore_index`` not an int (1.5 counted every
            label, ignored ones too); ValueError: an empty sequence.
    """
    _check_ignore_index(ignore_index)
    if not isinstance(labels, (torch.Tensor, Iterable)):  # an int or None: list() raised without the name
        raise TypeError(f"labels must be a tensor or a sequence of tensors, got {type(labels).__name__}")
    items = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if not items:
        raise ValueError("labels must be a tensor or a non-empty sequence of tensors")
    total = None
    for y in items:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"labels must be integer tensors, got {getattr(y, 'dtype', type(y))}")
        c = (y != ignore_index).sum()
        total = c if total is None else total + c.to(total.device)
    return total
