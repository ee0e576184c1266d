"""Merging LoRA adapters on their low-rank factors.

A LoRA adapter on a linear layer ``W (out, in)`` is a pair ``A (r, in)``,
``B (out, r)`` and a scale ``s`` (``α/r``, or ``α/√r`` for rsLoRA); the layer
computes ``W x + s·B A x`` (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685). The functions here work on those factors
directly, so several adapters can be folded into a base or combined into one
adapter without materialising more than needed.

All combination functions return ``(A, B)`` with scale 1 (the input scales are
absorbed into the factors) in float32 (float64 if the inputs are float64).
The same conventions as :func:`alignlab.adapters.add_weighted_adapter`
(and PEFT's ``add_weighted_adapter``) apply.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from alignlab._checks import check_finite_number, check_positive_int
from alignlab.merging.methods import _per_model, _refuse_float16_inf

__all__ = ["fold_lora", "lora_cat", "lora_delta", "lora_linear", "lora_svd"]


def _wd(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_pair(a: Tensor, b: Tensor, where: str) -> None:
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):  # (A, B) pairs given as As fail .dim() unnamed
        raise TypeError(f"{where}: A and B must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{where}: expected A (r, in) and B (out, r), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"{where}: rank mismatch, A has {a.shape[0]} rows but B has {b.shape[1]} columns")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"{where}: LoRA factors must be floating point, got {a.dtype} and {b.dtype}")


def _scale(scale) -> float:
    """``scale`` as a Python float; a NaN or infinite scale would reach every folded weight."""
    if isinstance(scale, Tensor) and scale.numel() == 1:
        scale = scale.item()
    return check_finite_number(scale, "scale")


def _check_many(As: Sequence[Tensor], Bs: Sequence[Tensor], weights, scales) -> tuple[list[float], list[float]]:
    if isinstance(As, Tensor) or isinstance(Bs, Tensor):
        raise TypeError("As and Bs must be sequences of tensors (one per adapter), not single tensors")
    if len(As) == 0 or len(As) != len(Bs):
        raise ValueError(f"need the same positive number of A and B factors, got {len(As)} and {len(Bs)}")
    for i, (a, b) in enumerate(zip(As, Bs)):
        _check_pair(a, b, f"adapter {i}")
        if a.shape[1] != As[0].shape[1] or b.shape[0] != Bs[0].shape[0]:
            raise ValueError(
                f"adapter {i} maps {a.shape[1]} -> {b.shape[0]} features but adapter 0 maps "
                f"{As[0].shape[1]} -> {Bs[0].shape[0]}"
            )
    n = len(As)
    for name, value in (("weights", weights), ("scales", scales)):
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) != n:
            raise ValueError(f"{name} needs one entry per adapter ({n}), got {len(value)}")
    # a number or one finite number per adapter: not a bool, not a string read character by character
    return _per_model(weights, n, "weights", 1.0), _per_model(scales, n, "scales", 1.0)


def lora_delta(a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``ΔW = s·B A`` with shape ``(out, in)``, in float32 (float64 for float64 factors)."""
    _check_pair(a, b, "lora_delta")
    scale = _scale(scale)
    wd = _wd(a)
    return (b.to(wd) @ a.to(wd)) * scale


def fold_lora(weight: Tensor, a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """Fold an adapter into its base weight: ``W' = W + s·B A``.

    Args:
        weight: ``W (out, in)``; the result keeps its dtype (the sum is formed in float32).
        a: ``A (r, in)``. b: ``B (out, r)``. scale: ``s``.

    Raises:
        ValueError: shapes that do not chain (naming which), a NaN or infinite ``scale``, or a float16
            ``weight`` whose folded values leave float16's range (±65504: they would round to inf) although
            ``weight``, ``a`` and ``b`` are finite; fold into ``weight.bfloat16()`` or ``weight.float()``.
        TypeError: a non-floating ``weight`` (folding into integers would truncate it).
    """
    _check_pair(a, b, "fold_lora")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"fold_lora: weight must be a floating-point tensor, got {getattr(weight, 'dtype', weight)!r}")
    if weight.dim() != 2 or weight.shape != (b.shape[0], a.shape[1]):
        raise ValueError(
            f"fold_lora: weight has shape {tuple(weight.shape)} but B A has shape {(b.shape[0], a.shape[1])}"
        )
    wd = _wd(weight)
    folded = (weight.to(wd) + lora_delta(a, b, scale).to(wd)).to(weight.dtype)
    _refuse_float16_inf(folded, (weight, a, b), "fold_lora",
                        "fold into a bfloat16 (float32's range) or float32 weight, or check the factors / scale")
    return folded


def lora_cat(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Exact combination by concatenating the factors along the rank.

    .. math:: A = \begin{bmatrix} w_1 s_1 A_1 \\ \vdots \\ w_n s_n A_n \end{bmatrix},\quad
              B = [B_1 \cdots B_n],\qquad BA = \sum_i w_i s_i B_i A_i

    The rank of the result is ``Σ r_i``.

    Returns:
        ``(A (Σr, in), B (out, Σr))``, scale 1.
    """
    w, s = _check_many(As, Bs, weights, scales)
    wd = _wd(As[0])
    a = torch.cat([wi * si * ai.to(wd) for ai, wi, si in zip(As, w, s)], dim=0)
    b = torch.cat([bi.to(wd) for bi in Bs], dim=1)
    return a, b


def lora_linear(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Linear combination of the factors themselves (PEFT's ``combination_type="linear"``).

    .. math:: A = \sum_i \operatorname{sign}(w_i)\sqrt{|w_i s_i|}\,A_i,\qquad
              B = \sum_i \sqrt{|w_i s_i|}\,B_i

    Cheap and rank-preserving, but ``BA`` contains the cross terms ``B_i A_j``:
    it equals ``Σ w_i s_i B_i A_i`` only when the adapters share a factor (e.g.
    the same ``B``). All adapters must have the same rank.
    """
    w, s = _check_many(As, Bs, weights, scales)
    ranks = {a.shape[0] for a in As}
    if len(ranks) != 1:
        raise ValueError(f"lora_linear needs adapters of equal rank, got ranks {sorted(ranks)}")
    wd = _wd(As[0])
    roots = [math.sqrt(abs(wi * si)) for wi, si in zip(w, s)]
    a = sum(math.copysign(r, wi) * ai.to(wd) for r, wi, ai in zip(roots, w, As))
    b = sum(r * bi.to(wd) for r, bi in zip(roots, Bs))
    return a, b


def lora_svd(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    rank: int,
    weights: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Best rank-``rank`` adapter for ``ΔW = Σ w_i s_i B_i A_i`` (truncated SVD).

    Never forms the ``(out, in)`` matrix: with ``B_c = [B_1 ⋯ B_n] = Q_B R_B`` and
    ``A_c^T = Q_A R_A`` (thin QR, ``R = Σ r_i``), ``ΔW = Q_B (R_B R_A^T) Q_A^T``, so
    the SVD of the small ``R × R`` core ``U S V^T`` gives ``ΔW``'s. Then

    .. math:: B = Q_B U_k S_k^{1/2},\qquad A = S_k^{1/2} V_k^T Q_A^T

    which by Eckart–Young minimises ``‖BA − ΔW‖_F`` over rank-``k`` products.
    If ``ΔW`` has fewer than ``rank`` singular values the factors are zero-padded.

    Returns:
        ``(A (rank, in), B (out, rank))``, scale 1.

    Raises:
        ValueError: ``rank < 1`` or inconsistent factors.
        TypeError: ``rank`` not an int (2.0 included; an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    check_positive_int(rank, "rank")  # not True, not 2.0 from a config that meant something else
    a_c, b_c = lora_cat(As, Bs, weights, scales)
    q_b, r_b = torch.linalg.qr(b_c)  # (out, m), (m, R)
    q_a, r_a = torch.linalg.qr(a_c.T)  # (in, m'), (m', R)
    u, sv, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, sv.numel())
    root = sv[:k].sqrt()
    a = a_c.new_zeros(rank, a_c.shape[1])
    b = b_c.new_zeros(b_c.shape[0], rank)
    a[:k] = root[:, None] * (vh[:k] @ q_a.T)
    b[:, :k] = (q_b @ u[:, :k]) * root
    return a, b
