"""ALPS-style attention-head selection: train only the heads that fine-tuning moves most.

Chen et al., "ALPS: Attention Localization and Pruning Strategy for Efficient
Alignment of Large Language Models", arXiv 2505.18799. The idea: a short probe
fine-tune reveals which attention heads the task changes; restricting later
training to the top ~10% of heads (the rest frozen) costs a tenth of the
attention parameters and forgets less.

Per head ``(l, h)`` of a Llama-style attention block, the head's own parameters are
the rows ``h·d … (h+1)·d`` of ``W_q`` and the same columns of ``W_o`` (``d`` = head
dim; keys/values are shared by a group under GQA). The score compares the base
and probe-tuned parameters ``θ, θ'`` of the head:

* ``"wasserstein"`` (default): 1-D Wasserstein-1 distance between the two empirical
  weight distributions, ``W₁ = mean |sort(θ) − sort(θ')|``;
* ``"l2"``: relative change ``‖θ' − θ‖ / ‖θ‖``.

:func:`select_heads` runs the probe on a copy of the model (the model passed in is
untouched) and returns the top ``fraction`` of heads; :func:`restrict_to_heads`
freezes everything except the attention projections and masks the gradient rows
(``W_q``, ``W_k``, ``W_v``) and columns (``W_o``) of the unselected heads.
This is not an adapter: the selected slices of the base weights are trained in place.
Use an optimizer without decoupled weight decay on these matrices (``weight_decay=0``):
decay would still shrink the masked slices. Adam/SGD leave zero-gradient entries unchanged.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, check_number_in_range, check_positive_int, check_positive_number, is_int


@dataclass(frozen=True)
class AttentionBlock:
    """Where one attention block's projections live and its head layout."""

    name: str
    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Llama-style attention modules (with ``q_proj``/``k_proj``/``v_proj``/``o_proj``), in model order.

    Raises:
        ValueError: no such module, or head counts missing from ``model.config``.
    """
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    blocks = []
    for name, module in model.named_modules():
        if all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            heads = getattr(module, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
            kv = getattr(module, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or heads
            head_dim = getattr(module, "head_dim", None) or (getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None))
            if not heads or not head_dim:
                raise ValueError(f"{name}: cannot tell the number of heads / head dim (no model.config)")
            blocks.append(AttentionBlock(name, module, int(heads), int(kv), int(head_dim)))
    if not blocks:
        raise ValueError("no attention block with q_proj/k_proj/v_proj/o_proj found in this model")
    return blocks


def _weight(proj: nn.Module) -> torch.Tensor:
    return proj.base_layer.weight if hasattr(proj, "base_layer") else proj.weight


def _head_params(block: AttentionBlock, head: int) -> torch.Tensor:
    d = block.head_dim
    q = _weight(block.module.q_proj)[head * d:(head + 1) * d]
    o = _weight(block.module.o_proj)[:, head * d:(head + 1) * d]
    return torch.cat([q.reshape(-1), o.reshape(-1)]).detach().float()


def head_scores(base: nn.Module, tuned: nn.Module, metric: str = "wasserstein") -> torch.Tensor:
    """How much each head moved between ``base`` and ``tuned``: ``(num_layers, num_heads)``.

    Raises:
        ValueError: unknown metric, or models with different attention layouts.
    """
    if metric not in ("wasserstein", "l2"):
        raise ValueError(f"metric must be 'wasserstein' or 'l2', got {metric!r}")
    a, b = attention_blocks(base), attention_blocks(tuned)
    if [(x.num_heads, x.head_dim) for x in a] != [(x.num_heads, x.head_dim) for x in b]:
        raise ValueError("base and tuned models have different attention layouts")
    scores = torch.zeros(len(a), a[0].num_heads)
    for i, (x, y) in enumerate(zip(a, b)):
        for h in range(x.num_heads):
            p, q = _head_params(x, h), _head_params(y, h)
            if metric == "wasserstein":
                scores[i, h] = (p.sort().values - q.sort().values).abs().mean()
            else:
                scores[i, h] = (q - p).norm() / p.norm().clamp_min(1e-12)
    return scores


def _check_fraction(fraction) -> None:
    # True is 1 (every head) and "0.1" fails deep in a comparison: both are a caller's mistake
    check_number_in_range(fraction, "fraction", 0, 1, low_open=True)


def top_heads(scores: torch.Tensor, fraction: float = 0.1) -> list[tuple[int, int]]:
    """The ``⌈fraction · #heads⌉`` highest-scoring ``(layer, head)`` pairs, best first.

    ``scores`` is ``(layers, heads)``, as :func:`head_scores` returns it. Raises ``ValueError`` for a bad
    ``fraction``, ``scores`` of another shape, or a non-finite score (``topk`` ranks NaN above every number); a
    ``fraction`` that is no number or ``scores`` that are no tensor raise :class:`~alignlab.ArgumentTypeError`, a
    ``TypeError`` too.
    """
    _check_fraction(fraction)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.numel() == 0:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        kind = ValueError if isinstance(scores, torch.Tensor) else ArgumentTypeError
        raise kind(f"scores must be a non-empty (layers, heads) tensor, got {got}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite: a NaN score (a diverged tuned model) would be ranked first")
    k = max(1, int(torch.tensor(fraction * scores.numel()).ceil().item()))
    flat = scores.flatten().topk(k).indices.tolist()
    return [(i // scores.shape[1], i % scores.shape[1]) for i in flat]


def select_heads(
    model: nn.Module,
    data: Iterable[dict],
    fraction: float = 0.1,
    steps: int = 20,
    lr: float = 1e-4,
    metric: str = "wasserstein",
) -> list[tuple[int, int]]:
    """Probe-fine-tune the attention projections of a copy of ``model`` and return the top heads.

    Args:
        model: an HF causal LM (its ``forward(**batch)`` returns ``.loss``); not modified.
        data: batches (dicts with ``input_ids``, ``labels``, ...); up to ``steps`` are used.
        fraction: share of heads to keep (ALPS: 0.1).
        steps / lr: length and Adam learning rate of the probe.
        metric: see :func:`head_scores`.
    Returns:
        ``[(layer_index, head_index), ...]`` best first.
    Raises:
        ValueError: bad fraction/steps, an lr that is not a positive finite number, empty data, batches without
            a loss, a probe that diverged (non-finite weights, so non-finite scores), or a quantized attention
            projection (the probe trains them).
    """
    steps = check_positive_int(steps, "steps")
    _check_fraction(fraction)
    # lr = 0 moved no head: every score 0, and the "top" heads an arbitrary pick
    check_positive_number(lr, "lr")
    probe = copy.deepcopy(model).train()
    params = _attention_parameters(probe)
    for p in probe.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    used = 0
    for batch in itertools.islice(data, steps):
        out = probe(**batch)
        if getattr(out, "loss", None) is None:
            raise ValueError("the model returned no loss: batches must carry labels")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        used += 1
    if not used:
        raise ValueError("data yielded no batches")
    scores = head_scores(model, probe, metric)
    if not bool(torch.isfinite(scores).all()):  # topk ranks NaN first: the diverged heads would be "selected"
        raise ValueError(f"the probe diverged (non-finite weights after {used} steps at lr={lr}): lower lr")
    return top_heads(scores, fraction)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _trainable_weight(block: AttentionBlock, proj: str) -> nn.Parameter:
    """The dense weight of ``block``'s projection ``proj``, which ALPS trains in place.

    Raises:
        ValueError: a quantized projection (an ``NF4Linear``'s ``weight`` is a dequantizing view of frozen codes: the
            probe's backward failed inside torch, and ``restrict_to_heads`` left nothing trainable).
    """
    w = _weight(getattr(block.module, proj))
    if not isinstance(w, nn.Parameter) or not w.is_floating_point():
        raise ValueError(f"{block.name}.{proj} is quantized ({type(getattr(block.module, proj)).__name__}): ALPS trains "
                         "the selected slices of the attention weights in place, and a quantized weight cannot train; "
                         "keep the attention projections dense (quantize_model(..., skip=['q_proj', 'k_proj', "
                         "'v_proj', 'o_proj'])) or train an adapter on them instead")
    return w


def _attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [_trainable_weight(b, p) for b in attention_blocks(model) for p in _PROJECTIONS]


def _row_mask(n_rows: int, heads: set[int], d: int, device) -> torch.Tensor:
    mask = torch.zeros(n_rows, 1, device=device)
    for h in heads:
        mask[h * d:(h + 1) * d] = 1.0
    return mask


def _chosen_heads(blocks: list[AttentionBlock], heads: Iterable[tuple[int, int]]) -> dict[int, set[int]]:
    """``{layer: {head, ...}}`` from ``(layer, head)`` pairs, each checked against ``blocks``."""
    chosen: dict[int, set[int]] = {}
    for pair in heads:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_int(i) for i in pair)):
            ints = isinstance(pair, (tuple, list)) and all(is_int(i) for i in pair)
            kind = ValueError if ints else ArgumentTypeError  # (1, 2, 3) is a wrong value, ("1", 2) the wrong kind
            raise kind(f"heads must be (layer, head) pairs of ints, got {pair!r}")
        layer, head = (int(i) for i in pair)
        if not (0 <= layer < len(blocks) and 0 <= head < blocks[layer].num_heads):
            raise ValueError(f"head ({layer}, {head}) is outside the model ({len(blocks)} layers × {blocks[0].num_heads} heads)")
        chosen.setdefault(layer, set()).add(head)
    return chosen


def restrict_to_heads(model: nn.Module, heads: Iterable[tuple[int, int]]) -> list[torch.utils.hooks.RemovableHandle]:
    """Train only the selected heads: freeze the rest of the model, mask the other heads' gradients.

    Query/output slices of a selected head train; key/value rows train for every KV group that
    holds a selected head (GQA). Returns the hook handles (``h.remove()`` to lift the masks).

    Raises:
        ValueError: an entry that is not a ``(layer, head)`` pair of ints, or one outside the model (an entry that is
            no sequence of ints is an :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too); a quantized
            attention projection (nothing of it can train), before the model is changed.
    """
    blocks = attention_blocks(model)
    chosen = _chosen_heads(blocks, heads)
    _attention_parameters(model)  # refuses a quantized projection before anything is frozen
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for i, b in enumerate(blocks):
        sel = chosen.get(i, set())
        group = b.num_heads // b.num_kv_heads
        kv_sel = {h // group for h in sel}
        for proj, selected, transpose in (("q_proj", sel, False), ("k_proj", kv_sel, False), ("v_proj", kv_sel, False), ("o_proj", sel, True)):
            w = _weight(getattr(b.module, proj))
            if not selected:
                continue
            w.requires_grad_(True)
            n = w.shape[1] if transpose else w.shape[0]
            mask = _row_mask(n, selected, b.head_dim, w.device).to(w.dtype)
            mask = mask.T if transpose else mask
            handles.append(w.register_hook(lambda g, m=mask: g * m))
    return handles


def selected_parameter_count(model: nn.Module, heads: Iterable[tuple[int, int]]) -> int:
    """Trainable numbers under :func:`restrict_to_heads`: ``Σ_sel 2·d·hidden + Σ_kv-groups 2·d·hidden``.

    Raises the errors :func:`restrict_to_heads` raises for ``heads`` (a head outside the model was counted, or
    silently left out, instead of refused).
    """
    blocks = attention_blocks(model)
    chosen = _chosen_heads(blocks, heads)
    total = 0
    for i, b in enumerate(blocks):
        sel = chosen.get(i, set())
        group = b.num_heads // b.num_kv_heads
        hidden = _weight(b.module.q_proj).shape[1]
        total += 2 * b.head_dim * hidden * (len(sel) + len({h // group for h in sel}))
    return total
