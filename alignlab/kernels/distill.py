"""Triton row kernel for token-level distillation divergences.

One program handles one token (one row of a ``(chunk, vocab)`` block of
student logits ``s`` and teacher logits ``t``) in three sweeps over the vocab:

1. online log-sum-exp of ``s / tau`` and ``t / tau``;
2. the divergence ``L`` of the row and ``S = sum_v h_v``, where ``h`` is the
   derivative of ``L`` with respect to ``log p_s`` (see below);
3. (only when a gradient is wanted) ``dL/ds = scale * (h - p_s * S) / tau``.

The per-divergence ``h`` (``m = beta p_t + (1 - beta) p_s``):

=====================  ========================================  ==============================
divergence             ``L``                                     ``h = dL/d log p_s``
=====================  ========================================  ==============================
forward KL             ``sum p_t (log p_t - log p_s)``           ``-p_t``
reverse KL             ``sum p_s (log p_s - log p_t)``           ``p_s (log p_s - log p_t + 1)``
generalised JSD(beta)  ``beta KL(p_t||m) + (1-beta) KL(p_s||m)``  ``(1-beta) p_s (log p_s - log m)``
total variation        ``1/2 sum |p_s - p_t|``                   ``1/2 p_s sign(p_s - p_t)``
=====================  ========================================  ==============================

The gradient may be written over the student logits themselves (``grad_out`` is
``student_logits``): sweep 3 stores each block where it has just loaded it, with
the same layout, so every element is read before it is overwritten by the same
thread. The fused loss relies on this to need no second ``(chunk, vocab)`` buffer.

The launcher :func:`distill_rows` validates shapes; callers reach it through
:mod:`alignlab.losses.distill`, which dispatches with
:func:`alignlab.kernels.dispatch.use_triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignlab._checks import is_finite_real, is_real
from alignlab.kernels.dispatch import interpreting
from alignlab.kernels.launch import next_power_of_2

FORWARD_KL, REVERSE_KL, JSD, TV = 0, 1, 2, 3
KIND_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD, "tv": TV}


@triton.jit
def _terms(ls, lt, beta, KIND: tl.constexpr):
    """Per-element loss term ``el``, ``h = dL/d log p_s`` and ``p_s`` from the log-probs (table above).

    A term whose leading probability is 0 is 0 (``0 log 0 = 0``), whatever the logs hold: ``-inf``
    logits (top-k or vocabulary-masked distributions) give finite losses and gradients.
    """
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    if KIND == 0:
        el = tl.where(pt > 0.0, pt * (lt - ls), 0.0)
        h = -pt
    elif KIND == 1:
        h = tl.where(ps > 0.0, ps * (ls - lt + 1.0), 0.0)
        el = tl.where(ps > 0.0, ps * (ls - lt), 0.0)
    elif KIND == 2:
        m = beta * pt + (1.0 - beta) * ps
        lm = tl.where(m > 0.0, tl.log(tl.maximum(m, 1e-30)), 0.0)
        h = tl.where(ps > 0.0, (1.0 - beta) * ps * (ls - lm), 0.0)
        el = tl.where(pt > 0.0, beta * pt * (lt - lm), 0.0) + h
    else:
        diff = ps - pt
        el = 0.5 * tl.abs(diff)
        h = 0.5 * ps * tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    return el, h, ps


@triton.jit
def _distill_rows_kernel(
    S,
    s_stride,
    T,
    t_stride,
    DZ,
    dz_stride,
    LOSS,
    SCALE,
    KEEP,
    V,
    inv_tau,
    beta,
    KIND: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    t_row = T + row * t_stride
    offs = tl.arange(0, BLOCK)
    # A dropped row (KEEP 0) reads nothing: it is taken as all-zero logits (loss 0, gradient 0),
    # whatever its memory holds.
    if HAS_KEEP:
        n_live = tl.where(tl.load(KEEP + row) != 0, V, 0)
    else:
        n_live = V

    # Sweep 1: per-lane online max / rescaled sum, folded into one LSE at the end.
    ms = tl.full([BLOCK], float("-inf"), tl.float32)
    mt = tl.full([BLOCK], float("-inf"), tl.float32)
    ds = tl.zeros([BLOCK], tl.float32)
    dt = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        inb = cols < V
        ld = cols < n_live
        s = tl.where(inb, tl.load(s_row + cols, mask=ld, other=0.0).to(tl.float32) * inv_tau, float("-inf"))
        t = tl.where(inb, tl.load(t_row + cols, mask=ld, other=0.0).to(tl.float32) * inv_tau, float("-inf"))
        ms_new = tl.maximum(ms, s)
        mt_new = tl.maximum(mt, t)
        safe_s = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        safe_t = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        ds = ds * tl.exp(ms - safe_s) + tl.exp(s - safe_s)
        dt = dt * tl.exp(mt - safe_t) + tl.exp(t - safe_t)
        ms = ms_new
        mt = mt_new
    max_s = tl.max(ms, axis=0)
    max_t = tl.max(mt, axis=0)
    lse_s = max_s + tl.log(tl.sum(ds * tl.exp(ms - max_s), axis=0))
    lse_t = max_t + tl.log(tl.sum(dt * tl.exp(mt - max_t), axis=0))

    # Sweep 2: the divergence and S = sum(h).
    loss_acc = tl.zeros([BLOCK], tl.float32)
    h_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        inb = cols < V
        ld = cols < n_live
        ls = tl.load(s_row + cols, mask=ld, other=0.0).to(tl.float32) * inv_tau - lse_s
        lt = tl.load(t_row + cols, mask=ld, other=0.0).to(tl.float32) * inv_tau - lse_t
        el, h, _ = _terms(ls, lt, beta, KIND)
        loss_acc += tl.where(inb, el, 0.0)
        h_acc += tl.where(inb, h, 0.0)
    row_loss = tl.sum(loss_acc, axis=0)
    if HAS_KEEP:
        row_loss = tl.where(n_live > 0, row_loss, 0.0)
    tl.store(LOSS + row, row_loss)
    h_sum = tl.sum(h_acc, axis=0)

    # Sweep 3: the gradient with respect to the raw student logits.
    if HAS_GRAD:
        g = tl.load(SCALE + row).to(tl.float32) * inv_tau
        if HAS_KEEP:
            g = tl.where(n_live > 0, g, 0.0)  # exactly 0 for a dropped row, whatever its scale
        dz_row = DZ + row * dz_stride
        for start in range(0, V, BLOCK):
            cols = start + offs
            inb = cols < V
            ld = cols < n_live
            ls = tl.load(s_row + cols, mask=ld, other=0.0).to(tl.float32) * inv_tau - lse_s
            lt = tl.load(t_row + cols, mask=ld, other=0.0).to(tl.float32) * inv_tau - lse_t
            _, h, ps = _terms(ls, lt, beta, KIND)  # the unused loss term is compiled away
            dz = g * (h - ps * h_sum)
            tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=inb)


def _block_size(vocab: int) -> tuple[int, int]:
    if interpreting():
        return min(64, next_power_of_2(max(vocab, 1))), 1
    return min(4096, max(16, next_power_of_2(vocab))), 8


def distill_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row divergence and (optionally) its gradient with respect to the student logits.

    Args:
        student_logits: ``(rows, vocab)`` float32/float16/bfloat16, unit stride along the vocab.
        teacher_logits: ``(rows, vocab)`` float32/float16/bfloat16, unit stride along the vocab.
        kind: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"tv"``.
        beta: JSD mixing weight (ignored by the other kinds).
        temperature: ``tau`` in ``softmax(z / tau)``.
        grad_scale: ``(rows,)`` per-row factor on the gradient; required with ``grad_out``.
        grad_out: ``(rows, vocab)`` float output for ``dL/ds`` (times ``grad_scale``), unit stride
            along the vocab. It may be ``student_logits`` itself (the gradient replaces the logits).
        keep: ``(rows,)`` bool; a row where it is False is not read and counts as all-zero logits
            (divergence 0, gradient 0), whatever it holds (``inf``/NaN of masked tokens).

    Returns:
        ``(rows,)`` float32 divergence of each row (unscaled).

    Raises:
        ValueError: on mismatched shapes or devices, unsupported dtypes, non-unit vocab stride, an unknown ``kind``,
            ``grad_scale`` without ``grad_out``, a ``temperature`` that is not a finite number > 0, a ``beta``
            outside [0, 1].
    """
    if keep is not None and (keep.shape != student_logits.shape[:1] or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool tensor of shape ({student_logits.shape[0]},), got "
                         f"{keep.dtype} of shape {tuple(keep.shape)}")
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {sorted(KIND_CODES)}, got {kind!r}")
    if not is_finite_real(temperature) or temperature <= 0:  # 0 was a ZeroDivisionError, a negative one accepted
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not is_real(beta) or not 0.0 <= beta <= 1.0:  # the JSD mixture weight; NaN fails the range
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if student_logits.dim() != 2 or student_logits.dtype not in floats:
        raise ValueError(
            f"student_logits must be a 2-D float32/float16/bfloat16 tensor (rows, vocab), got "
            f"{student_logits.dtype} of shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape or teacher_logits.dtype not in floats:
        raise ValueError(
            f"teacher_logits must be float32/float16/bfloat16 of shape {tuple(student_logits.shape)}, got "
            f"{teacher_logits.dtype} of shape {tuple(teacher_logits.shape)}"
        )
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along the vocab dimension")
    for name, t in (("teacher_logits", teacher_logits), ("grad_scale", grad_scale), ("grad_out", grad_out),
                    ("keep", keep)):
        # the kernel takes raw pointers: another device's tensor was read as this one's memory
        if t is not None and t.device != student_logits.device:
            raise ValueError(f"{name} must be on the student_logits' device {student_logits.device}, got {t.device}")
    if grad_scale is not None and grad_out is None:  # it was ignored: no gradient, no error
        raise ValueError("grad_scale is taken together with grad_out (the gradient's destination)")
    rows, vocab = student_logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return loss
    has_grad = grad_out is not None
    if has_grad:
        if grad_scale is None or grad_scale.shape != (rows,):
            raise ValueError("grad_scale must be a (rows,) tensor when grad_out is given")
        if grad_out.shape != student_logits.shape or (vocab > 1 and grad_out.stride(1) != 1):
            raise ValueError("grad_out must be (rows, vocab) with unit stride along the vocab")
        if grad_out.dtype not in floats:
            raise ValueError(f"grad_out must be float32/float16/bfloat16, got {grad_out.dtype}")
        grad_scale = grad_scale.to(torch.float32).contiguous()
    else:
        grad_out = student_logits
        grad_scale = loss
    block, warps = _block_size(vocab)
    _distill_rows_kernel[(rows,)](
        student_logits,
        student_logits.stride(0),
        teacher_logits,
        teacher_logits.stride(0),
        grad_out,
        grad_out.stride(0),
        loss,
        grad_scale,
        loss if keep is None else keep.to(torch.int8).contiguous(),
        vocab,
        1.0 / float(temperature),
        float(beta),
        KIND=KIND_CODES[kind],
        HAS_GRAD=has_grad,
        HAS_KEEP=keep is not None,
        BLOCK=block,
        num_warps=warps,
        # No fused multiply-adds: sweeps 2 and 3 then round log p identically, so that the sign of a
        # tie in TV (p_s = p_t, e.g. a one-token vocabulary) cannot differ between loss and gradient.
        enable_fp_fusion=False,
    )
    return loss
