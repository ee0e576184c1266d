r"""Knowledge-distillation losses: token-level divergences and a fused chunked form.

With student logits :math:`z_s`, teacher logits :math:`z_t`, temperature
:math:`\tau`, :math:`p_s = \mathrm{softmax}(z_s/\tau)`,
:math:`p_t = \mathrm{softmax}(z_t/\tau)`, per token:

* forward KL :math:`\mathrm{KL}(p_t\|p_s) = \sum_v p_t(\log p_t - \log p_s)`
  (Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531);
* reverse KL :math:`\mathrm{KL}(p_s\|p_t)` (Gu et al., "MiniLLM", arXiv:2306.08543);
* generalised JSD with :math:`m = \beta p_t + (1-\beta) p_s`:
  :math:`\beta\,\mathrm{KL}(p_t\|m) + (1-\beta)\,\mathrm{KL}(p_s\|m)`
  (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes" (GKD), arXiv:2306.13649). As in TRL and Liger-Kernel,
  ``beta=0`` means forward KL and ``beta=1`` reverse KL exactly (the mixture
  formula itself tends to 0 at both ends);
* total variation :math:`\tfrac12\sum_v |p_s - p_t|` (Wen et al., "f-Divergence
  Minimization for Sequence-Level Knowledge Distillation", arXiv:2307.15190).

No :math:`\tau^2` factor is applied; multiply by it yourself to keep Hinton's
gradient scale.

Reductions over tokens with per-token weights :math:`w` (a padding mask or
float weights): ``"mean"`` :math:`\sum w_i L_i / \sum w_i` (0 when every weight
is 0), ``"sum"`` :math:`\sum w_i L_i`, ``"none"`` :math:`w_i L_i` per token.
Float weights must be finite and ``>= 0`` (checked, one device sync per call).

Entries of zero probability contribute nothing (:math:`0 \log 0 = 0`), so ``-inf`` logits
(a top-k or vocabulary-masked teacher, or the same entries ``-inf`` in both) give the finite
limit with finite gradients. Tokens of weight 0 are ignored whatever they hold (``inf``, NaN), unless the
weights require grad: then :math:`\partial L/\partial w_i` is the token's divergence :math:`L_i` at
:math:`w_i = 0` too (as ``linear_cross_entropy``'s ``token_weights``), so every token is computed and must be
finite.

:func:`fused_linear_distill_loss` takes the student's last hidden state and
``lm_head`` weight and either teacher logits or the teacher's hidden state and
weight, and walks the tokens in chunks so that only ``(chunk, vocab)`` logits
ever exist. Its per-row work runs in a Triton kernel on CUDA
(:mod:`alignlab.kernels.distill`) and in PyTorch elsewhere.
"""

from __future__ import annotations

import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_token_id, is_finite_real, is_int, is_real
from alignlab.kernels.dispatch import use_triton
from alignlab.losses.fused_rl import _packed_positions
from alignlab.losses.logprobs import (
    _check_ignore_index,
    _fp16_grad_unit,
    _row_chunks,
    accumulate_weight_grad,
    scale_grads_,
)

KINDS = ("forward_kl", "reverse_kl", "jsd", "tv")
REDUCTIONS = ("mean", "sum", "none")
# fp32 chunk of distill_loss on CUDA: its torch row work holds about eight fp32 temporaries of a chunk
_CUDA_DIVERGENCE_CHUNK_BYTES = 64 * 2**20

__all__ = [
    "KINDS",
    "distill_loss",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "total_variation",
    "fused_linear_distill_loss",
    "distill_rows_torch",
    "sequence_divergence",
    "sequence_kd_labels",
    "sequence_kd_loss",
]


# --------------------------------------------------------------------------- checks


def _check_kind(kind: str, beta: float) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not is_real(beta) or not 0.0 <= beta <= 1.0:  # Python or NumPy real, not a bool; NaN fails the range
        kind = ValueError if is_real(beta) else ArgumentTypeError
        raise kind(f"beta must be a number in [0, 1], got {beta!r}")
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _check_common(temperature: float, reduction: str) -> float:
    """``temperature`` as a Python float; :class:`ArgumentTypeError` for a temperature that is no real number,
    ``ValueError`` for one that is not finite and > 0, or a bad reduction."""
    if not is_finite_real(temperature) or temperature <= 0:  # inline: every call runs it
        kind = ValueError if is_real(temperature) else ArgumentTypeError
        raise kind(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return float(temperature)


def _check_device(ref: torch.Tensor, **tensors) -> None:
    """``ValueError`` naming the first given tensor that is not on ``ref``'s device (a meta-device student
    weight gave a loss read from an unwritten buffer instead of an error)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            raise ValueError(f"{name} must be on the student's device {ref.device}, got {t.device}")


def _weights(mask: torch.Tensor | None, lead_shape: torch.Size, device, dtype) -> torch.Tensor:
    """Per-token weights from a bool/int/float ``mask``.

    Non-bool masks are checked to be finite and ``>= 0``; that check reads one flag back from the
    device (one sync per call). Bool masks need no check and cost no sync.
    """
    if mask is None:
        return torch.ones(lead_shape, device=device, dtype=dtype)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != lead_shape:
        raise ValueError(f"mask must have shape {tuple(lead_shape)} (the logits without the vocab dim), got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real-valued, got {mask.dtype}")
    if mask.dtype != torch.bool and mask.numel():
        bad = (mask < 0) | ~torch.isfinite(mask) if mask.is_floating_point() else mask < 0
        if bool(bad.any()):
            raise ValueError("mask weights must be finite and >= 0 (a bool padding mask or float token weights)")
    return mask.to(device=device, dtype=dtype)


def _reduce(per_token: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    weighted = per_token * w
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = w.sum()
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


# --------------------------------------------------------------------------- token level


def _xlog_ratio(p: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``p * (la - lb)`` elementwise with ``0 log 0 = 0``: entries where ``p == 0`` give 0 whatever
    ``la``/``lb`` hold (``-inf`` for a top-k or vocabulary-masked distribution), and their gradient is 0."""
    live = p > 0
    return p * (torch.where(live, la, 0.0) - torch.where(live, lb, 0.0))


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "jsd",
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token-level distillation divergence between student and teacher logits.

    Computed in float32 (float64 for a float64 student) a chunk of rows at a time; under autograd only the two
    logits tensors are kept and the backward recomputes each chunk, so no fp32 ``(tokens, vocab)`` copy is made
    or kept. The gradient is written in the student's dtype.

    Args:
        student_logits: ``(..., vocab)``, e.g. ``(batch, seq, vocab)``; gradients flow into it.
        teacher_logits: same shape; treated as a constant (detached).
        kind: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"tv"`` (see module docstring).
        beta: JSD mixing weight in ``[0, 1]``.
        temperature: ``tau > 0``.
        mask: ``(...)`` bool padding mask or float per-token weights; ``None`` weighs all tokens 1. Weights that
            require grad get ``dL/dw_i = L_i`` at ``w_i = 0`` as well (their tokens are computed, not skipped).
        reduction: ``"mean"`` (over weights), ``"sum"`` or ``"none"`` (``(...)`` weighted per token).

    Returns:
        Scalar, or ``(...)`` for ``reduction="none"``, in float32 (float64 for float64 input).

    Raises:
        ValueError: mismatched shapes or devices, an empty vocabulary, unknown ``kind``/``reduction``, ``beta`` outside
            ``[0, 1]``, ``temperature`` not finite and > 0, negative or non-finite ``mask`` weights.
        TypeError: non-tensor inputs or mask; ``beta`` or ``temperature`` not a real number (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or not x.is_floating_point() or x.shape[-1] == 0:  # no vocabulary: no distribution
            raise ValueError(f"{name} must be a floating tensor of shape (..., vocab) with vocab >= 1, "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must match"
        )
    _check_device(student_logits, teacher_logits=teacher_logits)
    kind = _check_kind(kind, beta)
    beta = float(beta)
    temperature = _check_common(temperature, reduction)
    compute = torch.promote_types(student_logits.dtype, torch.float32)
    w = _weights(mask, student_logits.shape[:-1], student_logits.device, compute)
    # a weight that requires grad is differentiated at 0 as well (dL/dw_i = L_i): its token is not skipped
    keep = None if mask is None or w.requires_grad else w != 0
    per_token = _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), keep, kind, beta, temperature)
    return _reduce(per_token, w, reduction)


class _ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence of student logits ``s (..., vocab)`` from teacher logits ``t`` (same shape), in fp32
    (fp64 for fp64 students) a chunk of rows at a time by :func:`distill_rows_torch`.

    Only a chunk is ever upcast, and autograd keeps the two given logits tensors themselves: the backward
    recomputes each chunk and writes ``g·dL/ds`` (the closed form of :func:`distill_rows_torch`) in the student's
    dtype, so neither pass holds an fp32 ``(tokens, vocab)`` tensor (plain autograd through the log-softmaxes kept
    several). Rows outside ``keep`` give 0 and a zero gradient whatever they hold. The backward is made of
    differentiable ops on the saved student logits, so a second derivative (``create_graph=True``) is the true one.
    """

    @staticmethod
    def forward(ctx, s, t, keep, kind, beta, temperature):
        out = torch.zeros(s.shape[:-1], dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)
        for at in _row_chunks(s, cuda_budget=_CUDA_DIVERGENCE_CHUNK_BYTES):
            out[at], _ = distill_rows_torch(s[at], t[at], kind, beta, temperature, None,
                                            None if keep is None else keep[at])
        ctx.save_for_backward(s, t, keep)
        ctx.opts = (kind, beta, temperature)
        return out

    @staticmethod
    def backward(ctx, grad):
        s, t, keep = ctx.saved_tensors
        kind, beta, temperature = ctx.opts
        out = torch.zeros_like(s, memory_format=torch.contiguous_format)
        for at in _row_chunks(s, cuda_budget=_CUDA_DIVERGENCE_CHUNK_BYTES):
            _, dz = distill_rows_torch(s[at], t[at], kind, beta, temperature, grad[at],
                                       None if keep is None else keep[at])
            out[at] = dz.to(s.dtype)
        return out, None, None, None, None, None


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean") -> torch.Tensor:
    """``KL(p_t || p_s)`` per token; see :func:`distill_loss` for arguments and shapes."""
    return distill_loss(student_logits, teacher_logits, "forward_kl", temperature=temperature, mask=mask, reduction=reduction)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean") -> torch.Tensor:
    """``KL(p_s || p_t)`` per token; see :func:`distill_loss` for arguments and shapes."""
    return distill_loss(student_logits, teacher_logits, "reverse_kl", temperature=temperature, mask=mask, reduction=reduction)


def generalized_jsd(
    student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean"
) -> torch.Tensor:
    """Generalised JSD(beta) of GKD (arXiv:2306.13649); see :func:`distill_loss`."""
    return distill_loss(
        student_logits, teacher_logits, "jsd", beta=beta, temperature=temperature, mask=mask, reduction=reduction
    )


def total_variation(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean") -> torch.Tensor:
    """``1/2 sum |p_s - p_t|`` per token; see :func:`distill_loss` for arguments and shapes."""
    return distill_loss(student_logits, teacher_logits, "tv", temperature=temperature, mask=mask, reduction=reduction)


# --------------------------------------------------------------------------- fused chunked form


def distill_rows_torch(
    s: torch.Tensor,
    t: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    grad_scale: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference of :func:`alignlab.kernels.distill.distill_rows`.

    Takes ``(rows, vocab)`` logits ``s`` (student) and ``t`` (teacher) (any leading shape in place of ``rows``),
    returns the per-row divergence ``(rows,)`` and, when ``grad_scale`` ``(rows,)`` is given,
    ``grad_scale[:, None] * dL/ds`` ``(rows, vocab)`` computed in closed form:
    ``dL/ds = (h - p_s * sum(h)) / tau`` with ``h = dL/d log p_s`` (see the kernel module).
    Rows where ``keep`` ``(rows,)`` is False count as all-zero logits (loss 0, gradient 0).
    """
    inv_tau = 1.0 / temperature
    compute = torch.promote_types(s.dtype, torch.float32)
    if keep is not None:
        s, t = s.masked_fill(~keep[..., None], 0.0), t.masked_fill(~keep[..., None], 0.0)
    ls = torch.log_softmax(s.to(compute) * inv_tau, dim=-1)
    lt = torch.log_softmax(t.to(compute) * inv_tau, dim=-1)
    ps, pt = ls.exp(), lt.exp()
    # Entries with probability 0 (-inf logits) contribute 0 to the sums (0 log 0 = 0).
    if kind == "forward_kl":
        loss = _xlog_ratio(pt, lt, ls).sum(-1)
        h = -pt
    elif kind == "reverse_kl":
        term = _xlog_ratio(ps, ls, lt)
        loss = term.sum(-1)
        h = term + ps
    elif kind == "jsd":
        m = beta * pt + (1.0 - beta) * ps
        lm = torch.where(m > 0, m.log(), torch.zeros_like(m))
        h = (1.0 - beta) * _xlog_ratio(ps, ls, lm)
        loss = beta * _xlog_ratio(pt, lt, lm).sum(-1) + h.sum(-1)
    else:
        diff = ps - pt
        loss = 0.5 * diff.abs().sum(-1)
        h = 0.5 * ps * torch.sign(diff)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    if grad_scale is None:
        return loss, None
    scale = grad_scale.to(compute) if keep is None else torch.where(keep, grad_scale.to(compute), 0.0)
    dz = (h - ps * h.sum(-1, keepdim=True)) * (scale * inv_tau)[..., None]
    return loss, dz


class _UnflatRows:
    """Rows ``start:end`` of ``(batch, seq, vocab)`` teacher logits that have no flat ``(-1, vocab)`` view (the
    causal shift ``logits[:, :-1]``), put together one chunk at a time: ``reshape`` would copy all of them."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __getitem__(self, rows: slice) -> torch.Tensor:
        seq = self.logits.shape[1]
        parts, r = [], rows.start
        while r < rows.stop:
            b, i = divmod(r, seq)
            j = min(seq, i + rows.stop - r)
            parts.append(self.logits[b, i:j])
            r += j - i
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _chunk_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    teacher: tuple,
    start: int,
    end: int,
    kind: str,
    beta: float,
    temperature: float,
    grad_scale: torch.Tensor | None,
    out: torch.Tensor | None = None,
):
    """Divergence of rows ``start:end`` and, with ``grad_scale``, ``dL/dz`` over the chunk's logits.

    The student logits ``x W^T`` are formed in ``x.dtype`` (into ``out`` when given, a
    ``(end - start, vocab)`` buffer), as the model's own ``lm_head`` would give them; the divergence
    is computed from them in float32. With ``grad_scale`` the gradient replaces the logits in
    place and that buffer is returned.
    """
    s = torch.mm(x[start:end], w.t(), out=out)
    # masked rows: whatever the given teacher logits hold there is dropped, and a NaN / inf upstream gradient there
    # (reduction="none") is not multiplied into dz, from where dW = dz^T x would carry NaN · 0 into every weight
    keep = None if teacher[-1] is None else teacher[-1][start:end]
    if teacher[0] == "logits":
        t = teacher[1][start:end]
    else:  # a teacher's logits in its own dtype, as its forward would give them
        t = teacher[1][start:end] @ teacher[2].t()
    scale = None if grad_scale is None else grad_scale[start:end]
    # the kernel reads float32/float16/bfloat16: a float64 student or teacher (teacher_logits may be any float) takes the reference
    if torch.float64 not in (s.dtype, t.dtype) and use_triton(s, t):
        from alignlab.kernels.distill import distill_rows

        loss = distill_rows(s, t, kind, beta=beta, temperature=temperature, grad_scale=scale,
                            grad_out=None if scale is None else s, keep=keep)
        return loss, None if scale is None else s
    loss, dz = distill_rows_torch(s, t, kind, beta, temperature, scale, keep)
    if dz is None:
        return loss, None
    return loss, s.copy_(dz)


def _default_chunks(n: int, vocab: int, itemsize: int, teacher_itemsize: int, weight_grad: bool) -> tuple[int, int]:
    """Rows per logits chunk and per gradient GEMM.

    Without a weight gradient: chunks of about 192 MiB of student + teacher logits, each gradient
    written over its own logits. With one: the student logits of about 256 MiB of rows are kept
    (their gradients written in place) before ``dx = dz W`` and ``dW += dz^T x`` run over all of
    them at once, because the weight-gradient GEMM has the rows as its inner dimension and is
    slow and memory-bound (a read-modify-write of ``dW``) for short ones; the teacher's logits are
    formed half of those rows at a time (about 128 MiB for a 16-bit teacher).
    """

    def fit(budget: int, row_bytes: int) -> int:
        rows = budget // max(row_bytes, 1)
        if rows >= 128:
            rows -= rows % 64  # GEMM-friendly row counts
        return max(1, min(n, rows))

    if not weight_grad:
        rows = fit(192 * 2**20, (itemsize + teacher_itemsize) * vocab)
        return rows, rows
    grad_rows = fit(256 * 2**20, itemsize * vocab)
    rows = max(1, grad_rows // 2) if grad_rows >= 2 and teacher_itemsize else grad_rows
    return rows, max(rows, grad_rows - grad_rows % rows)


def _resolve_chunks(n, vocab, itemsize, teacher_itemsize, weight_grad, chunk_size, grad_chunk_size) -> tuple[int, int]:
    """``(rows, grad_rows)`` from the user's ``chunk_size``/``grad_chunk_size`` (``None`` = default)."""
    d_rows, d_grad = _default_chunks(n, vocab, itemsize, teacher_itemsize, weight_grad)
    if chunk_size is None and grad_chunk_size is None:
        return d_rows, d_grad
    rows = chunk_size if chunk_size is not None else min(d_rows, grad_chunk_size)
    grad = grad_chunk_size if grad_chunk_size is not None else (d_grad if weight_grad else rows)
    return rows, max(rows, grad - grad % rows)


def _run_chunks(x, w, teacher, kind, beta, temperature, grad_scale, chunks, want_dx, want_dw, scale_back=True):
    """One pass over the rows: per-row divergence ``(n,)``, optional grads of x and w, and the factor left in them.

    ``chunks = (rows, grad_rows)``: logits are formed ``rows`` tokens at a time into one buffer of
    ``grad_rows`` rows, where their gradients ``dL/dz`` replace them; once the buffer is full the two
    gradient GEMMs run over it (``dW += dz^T x`` is memory-bound for short inner dimensions).
    float16 gradients are computed for ``grad_scale / unit`` (:func:`_fp16_grad_unit`); with ``scale_back=False``
    they are returned that way, with ``unit`` as the factor still to apply (a 0-dim tensor, else 1.0), so a
    caller that multiplies by an upstream gradient later rounds once (``unit ~ 1/N`` of a mean over many tokens
    would make them subnormal first).
    """
    n, vocab = x.shape[0], w.shape[0]
    rows, grad_rows = chunks
    losses = torch.empty(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    need_grad = want_dx or want_dw
    unit = None
    if need_grad and n and x.dtype == torch.float16:  # fp16 dL/dz of g ~ 1/n would be subnormal or flushed
        unit = _fp16_grad_unit(grad_scale)
        grad_scale = grad_scale / unit
    step = grad_rows if need_grad else rows
    buf = torch.empty(min(step, n), vocab, dtype=x.dtype, device=x.device) if n else None
    dx = torch.empty_like(x) if want_dx else None
    dw = None
    for g0 in range(0, n, step):
        g1 = min(n, g0 + step)
        for start in range(g0, g1, rows):
            end = min(g1, start + rows)
            losses[start:end], _ = _chunk_rows(
                x, w, teacher, start, end, kind, beta, temperature, grad_scale if need_grad else None,
                buf[start - g0 : end - g0],
            )
        if not need_grad:
            continue
        dz = buf[: g1 - g0]
        if want_dx:
            torch.mm(dz, w, out=dx[g0:g1])
        if want_dw:  # the first block writes dW (no zero fill, no read), later ones accumulate
            dw = accumulate_weight_grad(dw, dz, x[g0:g1])
    if unit is not None and scale_back:
        dx = None if dx is None else dx.mul_(unit)
        dw = None if dw is None else dw.mul_(unit)
    if want_dw and dw is None:
        dw = torch.zeros_like(w)
    return losses, dx, dw, (1.0 if unit is None or scale_back else unit)


class _FusedLinearDistill(torch.autograd.Function):
    """Chunked ``lm_head`` + divergence; scalar reductions compute the gradients in forward,
    ``reduction="none"`` recomputes them in backward with the per-token upstream gradient."""

    @staticmethod
    def forward(ctx, x, w, teacher_a, teacher_b, teacher_keep, weights, kind, beta, temperature, reduction, chunks,
                grad_enabled):
        # the rows to keep (None: all) last in both forms
        teacher = ("logits", teacher_a, teacher_keep) if teacher_b is None else ("hidden", teacher_a, teacher_b,
                                                                                   teacher_keep)
        # needs_input_grad reports requires_grad under torch.no_grad() too (an evaluation loop over a trainable
        # head): without asking grad mode, forward ran both gradient GEMMs and held a dW no backward would read
        want_dx = grad_enabled and ctx.needs_input_grad[0]
        want_dw = grad_enabled and ctx.needs_input_grad[1]
        ctx.reduction = reduction
        teacher_itemsize = 0 if teacher_b is None else teacher_b.element_size()
        chunks = _resolve_chunks(x.shape[0], w.shape[0], x.element_size(), teacher_itemsize, want_dw, *chunks)
        ctx.meta = (teacher[0], kind, beta, temperature, chunks)
        ctx.weight_grad = None
        if reduction == "none" or not (want_dx or want_dw):
            losses, _, _, _ = _run_chunks(x, w, teacher, kind, beta, temperature, None, chunks, False, False)
            if reduction == "none":  # backward recomputes the chunks
                ctx.save_for_backward(x, w, weights)
                ctx.teacher_tensors = teacher[1:]
            out = losses * weights if reduction == "none" else _reduce(losses, weights, reduction)
        else:
            if reduction == "sum":
                scale = weights
            else:
                denom = weights.sum()
                scale = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
            losses, dx, dw, unit = _run_chunks(x, w, teacher, kind, beta, temperature, scale, chunks, want_dx,
                                               want_dw, scale_back=False)
            # Handed over by the first backward (not saved: autograd adopts dL/dx as the hidden state's .grad,
            # which a later backward accumulates into in place); a second backward recomputes them. float16 ones
            # still lack their unit, applied together with the upstream gradient (one rounding).
            ctx.grads = (dx, dw)
            ctx.unit = unit
            ctx.save_for_backward(x, w)
            ctx.teacher_tensors = teacher[1:]
            ctx.grad_scale = scale
            out = (losses * scale).sum()
        if ctx.needs_input_grad[5]:  # float token weights that require grad, as distill_loss differentiates them
            denom = weights.sum()
            ctx.weight_grad = (losses, out, torch.where(denom > 0, denom, torch.ones_like(denom)))
        return out

    @staticmethod
    def _weights_grad(ctx, grad_out):
        if ctx.weight_grad is None:
            return None
        losses, out, denom = ctx.weight_grad
        if ctx.reduction != "mean":  # "none": w_i L_i per token, "sum": sum_i w_i L_i
            return grad_out.to(losses.dtype) * losses
        return grad_out.to(losses.dtype) * (losses - out) / denom

    @staticmethod
    @torch.autograd.function.once_differentiable  # create_graph=True: first-order grads, no mm(out=) error
    def backward(ctx, grad_out):
        n_none = (None,) * 10
        gwt = _FusedLinearDistill._weights_grad(ctx, grad_out)
        if gwt is not None:
            n_none = (None, None, None, gwt) + (None,) * 6
        want_dx, want_dw = ctx.needs_input_grad[:2]
        if ctx.reduction != "none":
            if not (want_dx or want_dw):
                return (None, None) + n_none
            grads, ctx.grads = ctx.grads, None
            if grads is None:  # a second backward through a retained graph: recompute
                x, w = ctx.saved_tensors
                form, kind, beta, temperature, chunks = ctx.meta
                teacher = (form,) + tuple(ctx.teacher_tensors)
                dx, dw, unit = _run_chunks(x, w, teacher, kind, beta, temperature, ctx.grad_scale, chunks, want_dx,
                                           want_dw, scale_back=False)[1:]
            else:
                (dx, dw), unit = grads, ctx.unit
            dx, dw = scale_grads_((dx, dw), grad_out, unit)  # ours alone now: scaled in place
            return (dx, dw) + n_none
        x, w, weights = ctx.saved_tensors
        form, kind, beta, temperature, chunks = ctx.meta
        teacher = (form,) + tuple(ctx.teacher_tensors)
        scale = grad_out.to(weights.dtype) * weights
        _, dx, dw, _ = _run_chunks(
            x, w, teacher, kind, beta, temperature, scale, chunks, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return (dx, dw) + n_none


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    grad_chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation divergence from hidden states without materialising full logits.

    Equal (up to float rounding) to
    ``distill_loss(student_hidden @ student_weight.T, teacher_logits, ...)``, where the teacher
    logits are either given or ``teacher_hidden @ teacher_weight.T``: logits are formed in each
    head's dtype (the student's in ``student_weight``'s, the teacher's in ``teacher_weight``'s), as the
    models' own ``lm_head`` layers give them (one rounding after the GEMM's float32 accumulation),
    and the divergence and its gradient are computed from them in float32.
    Tokens are processed ``chunk_size`` rows at a time, so only ``(chunk, vocab)`` logits exist.
    When the student weight needs a gradient, the student logits of ``grad_chunk_size`` rows are
    kept in one buffer, each chunk's gradient ``dL/dz`` written over its own logits, and the
    gradient GEMMs ``dx = dz W`` and ``dW += dz^T x`` run once per full buffer (a long inner
    dimension keeps the weight-gradient GEMM compute-bound). For ``"mean"``/``"sum"`` the
    gradients are computed during forward (so backward is a scale); for ``"none"`` forward
    returns per-token losses and backward recomputes the chunk logits once, weighting each token
    by its upstream gradient.

    Args:
        student_hidden: ``(..., hidden)`` student last hidden state, e.g. ``(batch, seq, hidden)``.
        student_weight: ``(vocab, hidden)`` student ``lm_head`` weight (no bias).
        teacher_logits: ``(..., vocab)`` teacher logits (any float dtype). Give either this or
            ``teacher_hidden`` + ``teacher_weight``. The teacher never receives gradients. A
            ``(batch, seq, vocab)`` view such as ``logits[:, :-1]`` is read chunk by chunk, not copied.
        teacher_hidden: ``(..., teacher_hidden)`` teacher last hidden state.
        teacher_weight: ``(vocab, teacher_hidden)`` teacher ``lm_head`` weight.
        kind, beta, temperature, mask, reduction: as in :func:`distill_loss`.
        chunk_size: rows per logits chunk. Default: half of ``grad_chunk_size`` when the teacher
            logits are computed here and the weight needs a gradient (512 rows at
            ``vocab=128256``, bf16), all of it with given teacher logits, and about 192 MiB of
            student + teacher logits otherwise (384 rows).
        grad_chunk_size: rows of logits kept for one pair of gradient GEMMs, a multiple of
            ``chunk_size`` (rounded down). Default: about 256 MiB of logits when the weight needs
            a gradient (1024 rows at ``vocab=128256``, bf16), else ``chunk_size``. Workspace is
            about ``grad_chunk_size * vocab * itemsize`` plus ``chunk_size * vocab * itemsize``
            for teacher logits computed here.

    Returns:
        Scalar, or ``(...)`` for ``reduction="none"``, in float32 (float64 for float64 input).

    Raises:
        ValueError: inconsistent shapes, tensors off the student's device, both or neither teacher forms, non-float teacher logits / hidden
            states / weight, ``chunk_size`` / ``grad_chunk_size`` < 1, plus the conditions of :func:`distill_loss`.
        TypeError: non-tensor arguments; ``chunk_size`` / ``grad_chunk_size`` neither an int nor None (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too), plus those of :func:`distill_loss`.
    """
    if not isinstance(student_hidden, torch.Tensor) or not isinstance(student_weight, torch.Tensor):
        raise TypeError("student_hidden and student_weight must be torch.Tensors")
    if student_hidden.dim() < 1 or student_weight.dim() != 2:
        raise ValueError("student_hidden must be (..., hidden) and student_weight (vocab, hidden)")
    if not student_hidden.is_floating_point():
        raise ValueError(f"student_hidden must be floating point, got {student_hidden.dtype}")
    if student_weight.shape[1] != student_hidden.shape[-1] or student_weight.shape[0] == 0:
        raise ValueError(
            f"student_weight must be (vocab, {student_hidden.shape[-1]}) with vocab >= 1, "
            f"got {tuple(student_weight.shape)}"
        )
    if student_weight.dtype != student_hidden.dtype:
        raise ValueError(f"student_weight dtype {student_weight.dtype} != student_hidden dtype {student_hidden.dtype}")
    _check_device(student_hidden, student_weight=student_weight, teacher_logits=teacher_logits,
                  teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    kind = _check_kind(kind, beta)
    beta = float(beta)
    temperature = _check_common(temperature, reduction)
    lead = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    has_hidden = teacher_hidden is not None or teacher_weight is not None
    if (teacher_logits is None) == (not has_hidden) or (has_hidden and (teacher_hidden is None or teacher_weight is None)):
        raise ValueError("give either teacher_logits, or both teacher_hidden and teacher_weight")
    x = student_hidden.reshape(-1, student_hidden.shape[-1])
    if teacher_logits is not None:
        if not isinstance(teacher_logits, torch.Tensor):
            raise TypeError("teacher_logits must be a torch.Tensor")
        if not teacher_logits.is_floating_point():  # integer logits would be divided by tau as integers
            raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
        if teacher_logits.shape != (*lead, vocab):
            raise ValueError(f"teacher_logits must have shape {(*lead, vocab)}, got {tuple(teacher_logits.shape)}")
        teacher_a, teacher_b = teacher_logits.detach(), None
        if teacher_a.dim() == 3 and teacher_a.stride(-1) == 1 and not teacher_a.is_contiguous():
            teacher_a = _UnflatRows(teacher_a)
        else:
            teacher_a = teacher_a.reshape(-1, vocab)
            if teacher_a.stride(-1) != 1:
                teacher_a = teacher_a.contiguous()
    else:
        for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if teacher_hidden.shape[:-1] != lead or teacher_hidden.dim() != student_hidden.dim():
            raise ValueError(f"teacher_hidden must have leading shape {tuple(lead)}, got {tuple(teacher_hidden.shape)}")
        if teacher_weight.dim() != 2 or teacher_weight.shape != (vocab, teacher_hidden.shape[-1]):
            raise ValueError(
                f"teacher_weight must be ({vocab}, {teacher_hidden.shape[-1]}), got {tuple(teacher_weight.shape)}"
            )
        # in the teacher head's dtype, as its forward gives them: a float32 teacher rounded to a bf16 student's
        # dtype moved the loss by ~15% for a close student
        teacher_b = teacher_weight.detach()
        teacher_a = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).to(teacher_b.dtype)
    n = x.shape[0]
    for label, v in (("chunk_size", chunk_size), ("grad_chunk_size", grad_chunk_size)):
        if v is not None and (not is_int(v) or v < 1):
            kind = ValueError if is_int(v) else ArgumentTypeError
            raise kind(f"{label} must be a positive int or None, got {v!r}")
    compute = torch.promote_types(x.dtype, torch.float32)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != lead:
            raise ValueError(f"mask must have shape {tuple(lead)}, got {tuple(mask.shape)}")
        mask = mask.reshape(-1)
    weights = _weights(mask, torch.Size([n]), x.device, compute)
    keep = None
    if mask is not None and not weights.requires_grad:  # weights that require grad: every row, as distill_loss
        # Rows of weight 0 are zeroed in a copy of the hidden states (given teacher logits are skipped
        # there row by row, unread by the kernel), so that inf/NaN there reaches neither the loss nor,
        # through dW = dz^T x, the gradient.
        keep = weights != 0
        x = x.masked_fill(~keep[:, None], 0.0)
        if teacher_b is not None:
            teacher_a = teacher_a.masked_fill(~keep[:, None], 0.0)
    out = _FusedLinearDistill.apply(
        x, student_weight, teacher_a, teacher_b, keep, weights, kind, float(beta),
        float(temperature), reduction,
        (chunk_size, grad_chunk_size), torch.is_grad_enabled(),
    )
    return out.reshape(lead) if reduction == "none" else out


# --------------------------------------------------------------------------- sequence level


def sequence_divergence(token_losses: torch.Tensor, mask: torch.Tensor | None = None, *, normalize: bool = True):
    """Per-sequence divergence from per-token values.

    Args:
        token_losses: ``(batch, seq)`` per-token divergence, e.g. ``distill_loss(..., reduction="none")``.
        mask: ``(batch, seq)`` bool/float weights; ``None`` means all ones.
        normalize: divide each sequence's sum by its weight total (0 for an empty sequence).

    Returns:
        ``(batch,)`` tensor.

    Raises:
        ValueError: if ``token_losses`` is not 2-D or ``mask`` has another shape.
        TypeError: ``normalize`` not a bool; ``token_losses`` not a tensor (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    if not isinstance(token_losses, torch.Tensor) or token_losses.dim() != 2:
        kind = ValueError if isinstance(token_losses, torch.Tensor) else ArgumentTypeError
        raise kind("token_losses must be a (batch, seq) tensor")
    normalize = as_bool(normalize, "normalize")
    w = _weights(mask, token_losses.shape, token_losses.device, token_losses.dtype)
    total = (token_losses * w).sum(-1)
    if not normalize:
        return total
    denom = w.sum(-1)
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def sequence_kd_labels(
    sequences: torch.Tensor,
    prompt_lengths: torch.Tensor | list[int],
    *,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Labels for sequence-level KD on teacher generations (Kim & Rush, arXiv:1606.07947).

    The student is trained with cross-entropy on the teacher's own outputs: every position of
    ``sequences`` (the teacher's ``generate`` output, prompt included, right-padded) becomes a
    label except the prompt, padding (the run of ``pad_token_id`` that ends a row; a pad id followed by other tokens
    is a generated token), and anything after the first ``eos_token_id`` of the generated part (the EOS itself
    stays a target).

    Args:
        sequences: ``(batch, seq)`` token ids.
        prompt_lengths: ``(batch,)`` prompt length of each row (prompt left-aligned in the row).
        pad_token_id: id of the padding that ends a row, masked out (``None``: no padding masking).
        eos_token_id: generation stop id, or a list of them (``generation_config.eos_token_id`` of Llama 3
            and others); the first of any ends the row (``None``: keep everything after the prompt).
        ignore_index: label value for masked positions.

    Returns:
        ``(batch, seq)`` long labels, unshifted (pair them with :func:`sequence_kd_loss`).

    Raises:
        ValueError: wrong ranks, a prompt length outside ``[0, seq]`` or not an integer, a ``pad_token_id`` /
            ``eos_token_id`` that is not a non-negative int (a float such as 1.5 matched no token: padding then
            stayed a target), an empty ``eos_token_id`` list.
        TypeError: ``ignore_index`` not an int (1.5 was written as label 1: every masked position a target);
            ``sequences`` not a tensor, ``prompt_lengths`` neither a tensor nor a sequence of numbers (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        kind = ValueError if isinstance(sequences, torch.Tensor) else ArgumentTypeError
        raise kind("sequences must be a (batch, seq) tensor of token ids")
    _check_ignore_index(ignore_index)
    pad_token_id = check_token_id(pad_token_id, "pad_token_id", allow_none=True)
    if isinstance(eos_token_id, (list, tuple)):
        if not eos_token_id:
            raise ValueError("eos_token_id: expected None, a non-negative int or a non-empty list of them, got []")
        eos_ids = [check_token_id(e, "eos_token_id") for e in eos_token_id]
    else:
        eos_ids = None if eos_token_id is None else [check_token_id(eos_token_id, "eos_token_id")]
    try:  # None or a str failed inside torch without the argument's name
        lengths = torch.as_tensor(prompt_lengths, device=sequences.device)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentTypeError(f"prompt_lengths must be a tensor or a sequence of ints, got "
                                f"{type(prompt_lengths).__name__}") from None
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"prompt_lengths must hold integers, got {lengths.dtype}")
    lengths = lengths.long()
    if lengths.shape != (sequences.shape[0],):
        raise ValueError(f"prompt_lengths must have shape ({sequences.shape[0]},), got {tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > sequences.shape[1]).any():
        raise ValueError("prompt_lengths must lie in [0, seq]")
    pos = torch.arange(sequences.shape[1], device=sequences.device)[None, :]
    keep = pos >= lengths[:, None]
    first_eos = None
    if eos_ids is not None:
        is_eos = torch.isin(sequences, torch.tensor(eos_ids, device=sequences.device)) & keep
        seen = is_eos.long().cumsum(-1)
        first_eos = is_eos & (seen == 1)
        # Positions strictly after the first generated EOS are dropped.
        keep = keep & ~((seen - is_eos.long()) > 0)
    if pad_token_id is not None:
        # padding is the run of pad ids that ends the row: a pad id generated before other tokens is a token (it
        # was masked too, and with it whole stretches of a random teacher's output)
        pad = (sequences == pad_token_id).long()
        pad = torch.flip(torch.cumprod(torch.flip(pad, [-1]), -1), [-1]).bool()
        if first_eos is not None:  # pad_token_id == an EOS id: the first generated EOS stays a target
            pad = pad & ~first_eos
        keep = keep & ~pad
    labels = sequences.clone().long()
    labels[~keep] = ignore_index
    return labels


class _ShiftedNLL(torch.autograd.Function):
    """``nll[b, i] = logsumexp(z[b, i]) − z[b, i, y[b, i]]`` for logits ``z (B, S, V)`` and shifted targets ``y``
    ``(B, S − 1)`` (0 where ``valid`` is False), in fp32 (fp64 for fp64 logits) a chunk of rows at a time.

    Only a chunk is ever upcast, and the backward recomputes its chunk from the saved logits, so neither pass
    holds an fp32 ``(tokens, vocab)`` copy (``F.cross_entropy`` on the upcast logits kept two). The gradient
    ``g·(softmax(z) − onehot(y))`` is written in the logits' dtype, zero on the last position and on rows that are
    not ``valid`` (NaN logits there reach neither pass). The backward is made of differentiable ops on the saved
    input, so a second derivative (``create_graph=True``) is the true one.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        nll = torch.zeros(target.shape, dtype=acc, device=logits.device)
        for at in _row_chunks(logits[:, :-1]):  # the positions that predict a next token
            z = logits[at].to(acc)
            picked = z.gather(-1, target[at].unsqueeze(-1)).squeeze(-1)
            nll[at] = torch.where(valid[at], torch.logsumexp(z, dim=-1) - picked, 0.0)
        ctx.save_for_backward(logits, target, valid)
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target, valid = ctx.saved_tensors
        acc = torch.promote_types(logits.dtype, torch.float32)
        out = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        for at in _row_chunks(logits[:, :-1]):  # the positions that predict a next token
            keep = valid[at].unsqueeze(-1)
            z = torch.where(keep, logits[at].to(acc), 0.0)  # finite rows: the zero scale below then zeroes them
            y = target[at].unsqueeze(-1)
            dz = torch.softmax(z, dim=-1).scatter_add(-1, y, torch.full(y.shape, -1.0, dtype=acc, device=z.device))
            scale = torch.where(keep, grad[at].unsqueeze(-1).to(acc), 0.0)
            out[at] = (dz * scale).to(logits.dtype)
        return out, None, None


def sequence_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of the student on teacher-generated targets.

    ``student_logits[:, i]`` predicts ``labels[:, i + 1]`` (the usual causal shift is done here):
    ``nll_i = logsumexp(z_i) − z_{i, y_{i+1}}`` in fp32 (fp64 for fp64 logits), a chunk of rows at a time, so no
    fp32 copy of the ``(batch, seq, vocab)`` logits is made or kept for the backward (it recomputes each chunk;
    the gradient is written in the logits' dtype).

    Padding-free batches: pass the packed ``(1, total, vocab)`` logits, ``(1, total)`` labels and their
    ``cu_seqlens`` (e.g. from ``alignlab.data.cu_seq_lens_from_position_ids``); the shift then never scores
    a sequence's first token from the previous sequence's last position, so the loss equals the padded
    batch's.  Gradient accumulation: ``reduction="sum"`` divided by the scored targets of the whole step
    (``count_tokens`` of ``labels[:, 1:]`` over micro-batches and ranks) sums to the big batch's mean.

    Args:
        student_logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` from :func:`sequence_kd_labels`.
        ignore_index: masked label value.
        reduction: ``"mean"`` over target tokens, ``"sum"``, or ``"none"`` (``(batch,)`` summed
            negative log-likelihood per sequence; ``(n_seq,)`` with ``cu_seqlens``).
        cu_seqlens: ``(n_seq + 1,)`` boundaries of a packed batch.

    Raises:
        ValueError: on shape mismatch, labels off the logits' device, unknown ``reduction``, a bad ``cu_seqlens`` or a packed batch whose
            leading dimension is not 1; a label outside ``[0, vocab)`` that is not ``ignore_index`` (checked for
            CPU labels outside ``torch.compile``; elsewhere it would cost a host sync per call).
        TypeError: non-float ``student_logits``, non-integer ``labels``, ``ignore_index`` not an int.
    """
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, got {getattr(student_logits, 'dtype', None)}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {getattr(labels, 'dtype', None)}")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError("student_logits must be (batch, seq, vocab) and labels (batch, seq)")
    _check_device(student_logits, labels=labels)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_ignore_index(ignore_index)
    target = labels[:, 1:].long()  # gather takes int64 indices only (int32 token ids are common)
    seq_of_target = None
    if cu_seqlens is not None:
        if labels.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, labels must be packed (1, total), got {tuple(labels.shape)}")
        total = labels.shape[1]
        _packed_positions(cu_seqlens, total)  # validates cu_seqlens against the packed length
        cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
        starts = cu[1:-1]
        starts = starts[(starts > 0) & (starts < total)]
        target = target.clone()
        target[0, starts - 1] = ignore_index  # a sequence's first token has no prediction inside it
        seq_of_target = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])[1:]
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    vocab = student_logits.shape[-1]
    # labels are host memory on CPU: range-checked there (gather's own IndexError names nothing); on CUDA the
    # check would be a host sync per call
    if safe.is_cpu and safe.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(safe))
        if low < 0 or high >= vocab:
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {low if low < 0 else high}")
    nll = _ShiftedNLL.apply(student_logits, safe, valid)
    if reduction == "none":
        if seq_of_target is not None:
            return nll.new_zeros(cu.numel() - 1).index_add(0, seq_of_target, nll[0])
        return nll.sum(-1)
    total_nll = nll.sum()
    if reduction == "sum":
        return total_nll
    return total_nll / valid.sum().clamp(min=1)
