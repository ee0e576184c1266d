"""DoRA: weight-decomposed low-rank adaptation.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.
The adapted weight is split into a magnitude vector ``m`` (one entry per output
row) and a direction::

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row

``‖·‖_row`` is the L2 norm of each output row (PEFT's "column norm" of the
``(in, out)`` view). As in the paper's §4.3, the norm is treated as a constant
in backward (detached): gradients reach ``m``, ``A`` and ``B`` through the
numerator only, which saves memory and matches PEFT's numerics.

A row whose ``W + s·B·A`` is all zero (a pruned or padding row of the base) has no
direction: its factor ``m / ‖·‖`` is taken as 0 (:func:`dora_gain`), so the row gives
the bias alone and no gradient. PEFT divides 0 by 0 there, and the NaN reaches every
gradient of the model through ``∂L/∂x``.

The norm is computed *without* forming ``W + s·B·A``: row by row,

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·⟨B_i, (W Aᵀ)_i⟩ + s²·B_i (A Aᵀ) B_iᵀ,

which needs only ``(out, r)`` and ``(r, r)`` products, so a forward pass holds
at most one dense ``(out, in)`` temporary (the fp32 view of a half-precision
or dequantized base weight) and none at all for an fp32 base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dora_weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms ``‖W + s·B·A‖`` in fp32 (fp64 for fp64 inputs), shape ``(out,)``; no dense temporary for fp32 ``W``.
    Under ``torch.autocast`` too (it is off inside: it ran these products in 16 bits, twice the fp32 error).

    Args:
        weight: base weight ``(out, in)``.
        a: LoRA ``A`` ``(r, in)``.
        b: LoRA ``B`` ``(out, r)``.
        scale: LoRA scaling ``s``.
    """
    device = weight.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):  # autocast would run the products below in 16 bits
            return dora_weight_norm(weight, a, b, scale)
    dt = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    w, a, b = weight.to(dt), a.to(dt), b.to(dt)
    w_sq = torch.linalg.vector_norm(w, dim=1).square()
    wa = F.linear(a, w).T  # (out, r) = W Aᵀ
    cross = (b * wa).sum(dim=1)
    quad = ((b @ (a @ a.T)) * b).sum(dim=1)
    return (w_sq + 2.0 * scale * cross + scale * scale * quad).clamp_min(0.0).sqrt()


def dora_gain(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / norm`` per row in ``norm``'s dtype, and 0 where ``norm`` is 0 (an all-zero row of ``W + s·B·A``);
    differentiable in ``m`` with a zero gradient on those rows (no 0 · inf)."""
    zero = norm == 0
    return (magnitude.to(norm.dtype) / norm.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)


def dora_delta(
    x: torch.Tensor,
    base_out: torch.Tensor,
    weight,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """What DoRA adds to the base output: ``(g - 1)·(W x) + g·s·B A x`` with ``g = m / ‖W + sBA‖``.

    Args:
        x: adapter input ``(..., in)`` (after dropout), in the adapter dtype.
        base_out: ``W x`` *without bias* for this same ``x``, ``(..., out)``.
        weight: base weight ``(out, in)``, dense or an ``NF4Tensor`` (the norm kernel reads it packed).
        a, b: LoRA factors ``(r, in)``, ``(out, r)``.
        scale: LoRA scaling ``s``.
        magnitude: ``m``, ``(out,)``.
    Returns:
        ``(..., out)`` in ``x``'s dtype.
    """
    from alignlab.kernels.dora import dora_row_norm

    with torch.no_grad():
        norm = dora_row_norm(weight, a.detach(), b.detach(), scale)
    g = dora_gain(magnitude, norm).to(x.dtype)
    lora_out = F.linear(F.linear(x, a), b) * scale
    return (g - 1) * base_out.to(x.dtype) + g * lora_out


def dora_merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor,
                       unmerged: torch.Tensor | None = None):
    """Fold DoRA into the base: returns ``(W', norm)`` with ``W' = m ⊙ (W + sBA)/norm`` in ``weight``'s dtype.

    ``norm = ‖W₀ + sBA‖_row`` is taken on ``unmerged`` (``W₀``, the base without any merged adapter;
    default ``weight``), as forward takes it. When other adapters were merged first, ``weight`` holds
    them (``W = W₀ + ΔW_other``) and forward computed ``m/‖W₀ + sBA‖ ⊙ (W₀ + ΔW_other + sBA) x``.

    Computed in fp32 (fp64 for an fp64 weight) and rounded once, so a bf16 merge loses no more than one
    rounding. ``norm`` is returned so the merge can be undone exactly in that precision.
    """
    dt = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(dt, copy=True)
    norm = dora_weight_norm(w if unmerged is None else unmerged, a, b, scale)
    w.addmm_(b.to(dt), a.to(dt), alpha=scale)
    w.mul_(dora_gain(magnitude.to(dt), norm).to(dt).unsqueeze(1))
    return w.to(weight.dtype), norm


def check_dora_unmergeable(magnitude: torch.Tensor, norm: torch.Tensor, what: str = "") -> None:
    """``ValueError`` if a row has ``m`` 0 and a non-zero norm: the merge zeroed it and its base weights are gone
    (any leading shape, e.g. ``(E, out)`` for experts; ``what`` names the weight in the message)."""
    lost = (magnitude == 0) & (norm.to(magnitude.device) != 0)  # norms kept at merge time stay where they were
    if lost.any():
        rows = [i[0] if len(i) == 1 else tuple(i) for i in lost.nonzero().tolist()]  # (expert, row) for experts
        raise ValueError(f"cannot unmerge{what}: rows {rows[:8]}{' ...' if len(rows) > 8 else ''} have magnitude 0, "
                         "so the merge zeroed them and their base weights cannot be recovered; reload the base weights")


def kept_merge_norm(norms: dict, key, what: str = "") -> torch.Tensor:
    """The row norms a DoRA merge kept under ``key`` for its unmerge (``what`` names the adapter in the message).

    Raises:
        ValueError: they were dropped by a ``load_state_dict`` that changed the merged layer: a merged weight
            ``m ⊙ V/‖V‖`` does not tell ``V = W₀ + s·B A`` (any row scale of ``V`` merges to it), so the loaded base
            cannot be unmerged.
    """
    norm = norms.get(key)
    if norm is None:
        raise ValueError(f"cannot unmerge DoRA adapter{what}: load_state_dict changed the merged layer, and a merged "
                         "DoRA weight m ⊙ V/‖V‖ does not determine its base (any row scale of V = W₀ + s·B A merges "
                         "to it); load the unmerged base and adapter instead")
    return norm


def dora_unmerged_weight(
    merged: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Invert :func:`dora_merged_weight`: ``W = W' ⊙ norm/m − sBA``.

    A row with ``norm`` 0 had ``W = −sBA`` (its merged row is 0): that is what comes back. A row with ``m`` 0 and a
    non-zero norm was zeroed by the merge and its weights are gone: ``ValueError`` (nothing is changed).
    """
    dt = torch.promote_types(merged.dtype, torch.float32)  # as the merge: fp32, or fp64 for fp64
    m = magnitude.to(dt)
    norm = norm.to(m.device)  # kept at merge time: the model may have moved since (merge on CPU, unmerge on GPU)
    check_dora_unmergeable(m, norm)
    w = merged.to(dt, copy=True)
    w.mul_((norm.to(dt) / m.masked_fill(m == 0, 1.0)).unsqueeze(1))  # m == 0 here only where norm == 0
    w.addmm_(b.to(dt), a.to(dt), alpha=-scale)
    return w.to(merged.dtype)
