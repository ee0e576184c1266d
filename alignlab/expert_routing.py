"""The routed expert MLP of a mixture-of-experts block, shared by the dense and the quantized experts.

An MoE block sends token ``t`` to ``k`` experts (``top_k_index (T, k)``, weights ``top_k_weights (T, k)``) and
adds their outputs:

    y_t = Σ_slots  w_{t,k} · post_norm( W^down_e  g(W^gate_up_e x_t + b_e) + b'_e ),     e = the slot's expert,

``g`` the block's gate (``_apply_gate``: ``act_fn(gate) * up`` for Mixtral and Qwen3-MoE, gpt-oss's clamped
GLU), or ``act_fn(W^up_e x_t + b_e)`` for experts without a gate (``has_gate`` False). The ``(token, slot)``
pairs are sorted by expert first (:class:`ExpertGroups`), so that each expert's rows are contiguous and
every projection is one pass over the groups.

Two modules run this loop: :class:`~alignlab.adapters.experts.ExpertLoRA` (grouped matmuls plus the
low-rank terms) and :class:`~alignlab.quant.NF4Experts` (one NF4 matmul per routed expert). Each owns its
projection ``W_e x`` and how the weighted rows go back to the tokens; :func:`expert_mlp` owns the rest.
This module imports neither, so :mod:`alignlab.quant` does not load :mod:`alignlab.adapters`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from alignlab._checks import check_positive_int

__all__ = ["ExpertGroups", "expert_mlp", "add_expert_bias", "check_routing", "forward_overridden_by"]


class ExpertGroups(NamedTuple):
    """The ``(token, slot)`` pairs of one call sorted by expert: ``ids (S,)`` the expert of each sorted row,
    ``perm (S,)`` the flat slot index (``token·k + slot``) each sorted row came from, ``offsets (E,)`` int32
    cumulative row counts (``grouped_mm``'s ``offs``). Ids ``>= E`` (expert-parallel sentinels) sort last and
    are counted in no group."""

    ids: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_routing(cls, top_k_index: torch.Tensor, num_experts: int) -> "ExpertGroups":
        """The groups of ``top_k_index (T, k)`` over ``num_experts`` experts.

        Raises ``ValueError`` naming ``num_experts`` unless it is an integer > 0: ``True`` would count one
        expert, and 0 or a float failed inside ``histc``.
        """
        num_experts = check_positive_int(num_experts, "num_experts")
        ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        # offsets[e] = #ids < e + 1, read off the sorted ids: exact and without a device-to-host sync (bincount
        # sizes its output from the data). Not histc: its float bins put expert E - 2's rows into E - 1's group
        # from about 4100 experts on.
        bounds = torch.arange(1, num_experts + 1, device=ids.device, dtype=ids.dtype)
        return cls(ids, perm, torch.searchsorted(ids, bounds, out_int32=True))


def forward_overridden_by(experts: nn.Module) -> type | None:
    """The subclass whose own ``forward`` replaces the expert loop ``@use_experts_implementation`` put on a base
    class of ``experts``, or None.

    Both :class:`~alignlab.adapters.experts.ExpertLoRA` and :class:`~alignlab.quant.NF4Experts` stand in for the
    decorated loop (:func:`expert_mlp`); a subclass that wraps it in code of its own (transformers' ``ErgoExperts``:
    one row per route, then a per-expert norm before the weighted sum) would silently lose that code. The
    decorated forward is recognised by the ``__wrapped__`` that ``functools.wraps`` leaves on it.
    """
    classes = type(experts).__mro__
    for i, cls in enumerate(classes):
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        if hasattr(forward, "__wrapped__"):
            return None  # the decorated loop itself runs
        decorated = any(hasattr(c.__dict__.get("forward"), "__wrapped__") for c in classes[i + 1:])
        return cls if decorated else None
    return None


def check_routing(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  hidden_size: int, num_experts: int | None = None) -> None:
    """Refuse an experts call whose tensors do not fit together: ``hidden_states`` floating ``(T, hidden_size)``,
    ``top_k_index`` int64/int32 ``(T, k)``, ``top_k_weights`` ``(T, k)``.

    Shapes and dtypes always (no host sync); without it a 1-D index or weights of another shape gave an output of
    the wrong shape or an ``IndexError`` deep in the loop. Expert ids are range-checked only where they are
    host memory: a CPU ``top_k_index`` outside ``torch.compile`` (one ``aminmax``). On an accelerator the check
    would be a device-to-host sync on every call, and under compile a data-dependent branch, so there ids are
    taken as given. The range is ``0 <= id < num_experts``; with ``num_experts`` None only ``id >= 0``, for a
    module that reads ids ``>= E`` as expert-parallel sentinels that route nowhere.

    Raises:
        TypeError: a tensor of the wrong kind or dtype (a float or uint8 index would be read as a mask).
        ValueError: the shapes do not fit, naming the argument; an expert id out of range (CPU).
    """
    for arg, t in (("hidden_states", hidden_states), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a tensor, got {type(t).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating-point tensor, got dtype {hidden_states.dtype}")
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must hold int64 or int32 expert ids, got dtype {top_k_index.dtype}")
    if not top_k_weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a floating-point tensor, got dtype {top_k_weights.dtype}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != hidden_size:
        raise ValueError(f"hidden_states must be (tokens, {hidden_size}), got shape {tuple(hidden_states.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"top_k_index must be (tokens, k) with tokens = {hidden_states.shape[0]} (hidden_states' rows), "
                         f"got shape {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, "
                         f"got {tuple(top_k_weights.shape)}")
    if top_k_index.device.type == "cpu" and top_k_index.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(top_k_index))
        if low < 0 or (num_experts is not None and high >= num_experts):
            bad = low if low < 0 else high
            want = f"in [0, {num_experts})" if num_experts is not None else ">= 0"
            raise ValueError(f"top_k_index must hold expert ids {want}, got {bad}")


def add_expert_bias(experts: nn.Module, name: str, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``y + b_e`` for rows ``y (S, out)`` of experts ``ids (S,)``, where the block has ``has_bias`` and a
    ``<name>_bias (E, out)``; ``y`` unchanged otherwise."""
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    return y if bias is None else y + bias[ids].to(y.dtype)


def expert_mlp(experts: nn.Module, x: torch.Tensor, project: Callable[[str, torch.Tensor], torch.Tensor],
               gated: bool) -> torch.Tensor:
    """The expert MLP on rows ``x (S, H)`` sorted by expert → ``(S, H)``, before the routing weights.

    ``project(name, rows)`` is ``W_e x + b_e`` of expert weight ``name`` on the sorted rows (the caller's
    matmul, adapters and bias). ``gated``: the first projection is a fused ``gate_up_proj`` and goes through
    ``experts._apply_gate``; else ``up_proj`` through ``experts.act_fn``. The block's
    ``post_expert_norm`` follows where ``has_post_expert_norm`` is set.
    """
    if gated:
        h = experts._apply_gate(project("gate_up_proj", x))
    else:
        h = experts.act_fn(project("up_proj", x))
    y = project("down_proj", h)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y
