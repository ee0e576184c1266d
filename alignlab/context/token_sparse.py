"""Token-sparse fine-tuning: only the informative tokens enter the backward pass.

In the spirit of "LeMo: Enabling LEss Token Involvement for MOre Context
Fine-tuning" (Wang et al., arXiv:2501.09767). For a token-wise block ``f``
(an MLP, a projection) applied to hidden states ``h`` of shape
``(batch, seq, hidden)``, pick a set ``K`` of tokens per sequence by a score
and a keep ratio ``ρ`` (``|K| = ⌈ρ · n⌉``), then

    y_t = f(h_t)                      for t ∈ K   (recorded for autograd)
    y_t = stopgrad(f(h_t))            for t ∉ K   (run under no_grad)

The forward values are unchanged; the activations that ``f`` saves for its
backward (e.g. the ``(tokens, intermediate)`` tensors of a gated MLP) exist
only for the kept tokens, so activation memory of the wrapped blocks falls
linearly with ``ρ``. Gradients are exact for the kept tokens' contributions:
``∂L/∂θ = Σ_{t∈K} J_t(θ)^T ∂L/∂y_t`` and ``∂L/∂h_t = J_t^T ∂L/∂y_t`` for
``t ∈ K``; dropped tokens contribute nothing through ``f`` (a residual
connection around ``f`` still carries their gradient).

``f`` must be token-wise (row ``t`` of the output depends only on row ``t``
of the input); attention is not, so wrap MLPs and projections, not attention
layers. Scores: :func:`attention_information_scores` (mean attention a token
receives, LeMo's information measure) or the default hidden-state norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from alignlab._checks import check_number_in_range, ratio_fraction

__all__ = [
    "TokenSparse",
    "apply_token_sparsity",
    "attention_information_scores",
    "select_tokens",
    "set_token_mask",
    "token_sparse_apply",
]

Scorer = Callable[[torch.Tensor], torch.Tensor]


def select_tokens(
    scores: torch.Tensor, keep_ratio: float, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean keep-mask ``(batch, seq)``: the ``⌈ρ · n_b⌉`` highest-scoring valid tokens of each row.

    ``n_b`` counts the row's valid tokens (``attention_mask`` 1/True, all if
    ``None``; ``ρ`` read as the nearest fraction with a denominator up to 10⁶, so 0.28 of 25 tokens is 7); padding
    is never kept, and ranks after every valid token (a ``-inf`` score included). Ties go to the earlier position.
    Raises ``ValueError`` for ``keep_ratio`` outside ``(0, 1]``, shape mismatch, or a NaN score on a
    valid token (a sort ranks NaN above +inf, so it would be kept first; there is no rank to give it).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, seq), got shape {tuple(scores.shape)}")
    keep_ratio = check_number_in_range(keep_ratio, "keep_ratio", 0, 1, low_open=True)
    valid = torch.ones_like(scores, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if valid.shape != scores.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != scores shape {tuple(scores.shape)}")
    n_nan = int((torch.isnan(scores) & valid).sum())  # a host sync, as token_sparse_apply's nonzero has anyway
    if n_nan:
        raise ValueError(f"scores must not be NaN on a valid token ({n_nan} found)")
    n_valid = valid.sum(dim=1)
    # ⌈n ρ⌉ in integers, with ρ as the nearest small fraction: 0.28 · 25 is 7.000000000000001 in floats (8 kept)
    ratio = ratio_fraction(keep_ratio)
    k = (n_valid * ratio.numerator + ratio.denominator - 1) // ratio.denominator
    # by score (ties: the earlier position), then padding after every valid token, a valid -inf included
    order = torch.argsort(scores.detach().float(), dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(valid.gather(1, order).to(torch.uint8), dim=1, descending=True,
                                          stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < k[:, None]) & valid


def attention_information_scores(
    attn_weights: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean attention each token receives: ``s_j = mean_h Σ_{i ∈ R_j} A_{h,i,j} / |R_j|``, ``R_j`` the
    queries that may attend key ``j`` (causally, and both real under ``attention_mask``).

    ``attn_weights``: ``(batch, heads, q_len, k_len)`` softmax probabilities
    (e.g. ``output_attentions=True``). The normaliser counts the queries
    allowed to see key ``j`` (causal ⇒ ``q_len - j`` without padding), so
    late tokens are not penalised for having fewer readers; rows of padded
    queries are ignored whatever they hold (NaN included). Returns
    ``(batch, k_len)``; padded keys get ``-inf``.
    """
    if attn_weights.dim() != 4:
        raise ValueError(f"attn_weights must be (batch, heads, q_len, k_len), got {tuple(attn_weights.shape)}")
    b, heads, q_len, k_len = attn_weights.shape
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=attn_weights.device).tril(k_len - q_len)
    if attention_mask is not None:
        am = attention_mask.bool()
        if am.shape != (b, k_len):
            raise ValueError(f"attention_mask must be (batch, k_len)=({b}, {k_len}), got {tuple(am.shape)}")
        allowed = causal[None] & am[:, -q_len:, None] & am[:, None, :]  # (batch, q_len, k_len)
        readers = allowed.sum(dim=1)
        # padded query rows hold whatever the model wrote there (uniform, or NaN after an all -inf row): only
        # readers count, selected rather than multiplied by 0 (0 * NaN is NaN); summing heads first keeps the
        # selected copy (batch, q_len, k_len)
        per_query = attn_weights.float().sum(dim=1)
        received = torch.where(allowed, per_query, 0.0).sum(dim=1) / heads
    else:
        readers = causal.sum(dim=0).expand(b, k_len)
        received = attn_weights.float().sum(dim=2).mean(dim=1)  # (batch, k_len)
    scores = received / readers.clamp_min(1)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool(), -math.inf)
    return scores


def token_sparse_apply(fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:
    """``fn`` over all tokens of ``hidden`` ``(batch, seq, hidden)``, autograd only through ``keep``.

    ``fn`` is token-wise and is called on ``(n_tokens, hidden)`` matrices.
    ``keep``: bool ``(batch, seq)``. Returns ``(batch, seq, out)``, equal in
    value to ``fn(hidden)``. Raises ``ValueError`` on shape/dtype mismatch.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, hidden), got shape {tuple(hidden.shape)}")
    if keep.dtype != torch.bool or keep.shape != hidden.shape[:2]:
        raise ValueError(f"keep must be a bool tensor of shape {tuple(hidden.shape[:2])}, got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    kept_idx = keep.nonzero(as_tuple=True)
    drop_idx = (~keep).nonzero(as_tuple=True)
    y_keep = fn(hidden[kept_idx])
    if y_keep.dim() != 2 or y_keep.shape[0] != kept_idx[0].numel():
        raise ValueError(f"fn must map (tokens, hidden) to (tokens, out), got output shape {tuple(y_keep.shape)}")
    with torch.no_grad():
        y_drop = fn(hidden[drop_idx])
    out = torch.empty(*hidden.shape[:2], y_keep.shape[-1], dtype=y_keep.dtype, device=y_keep.device)
    out[drop_idx] = y_drop.to(out.dtype)
    # out-of-place index_put keeps y_keep in the graph and saves only the indices
    return out.index_put(kept_idx, y_keep)


class TokenSparse(nn.Module):
    """Wrap a token-wise ``module`` so only a ``keep_ratio`` share of tokens is trained through it.

    In training mode with grad enabled, the keep-set comes from ``self.keep``
    (a bool ``(batch, seq)`` mask set by the caller, e.g. from
    :func:`attention_information_scores` + :func:`select_tokens`) when not
    ``None``, else from ``scorer(hidden)`` (default: L2 norm of the token's
    input) via :func:`select_tokens`, restricted to ``self.valid`` when set
    (the batch's attention mask, see :func:`set_token_mask`: padding is never
    kept and ``ρ`` counts each row's real tokens). The module gets the chosen
    tokens as one sequence, ``(1, tokens, hidden)``, so blocks that want
    ``(batch, seq, hidden)`` (transformers' MoE blocks) work too. In eval mode, under
    ``no_grad`` or with ``keep_ratio == 1`` it is the plain module. Raises ``ValueError`` for a ``keep_ratio``
    outside ``(0, 1]`` and ``TypeError`` for a ``scorer`` that is not callable.

    The wrapper takes the place of ``module`` without adding a level to the module tree: it shares
    the block's parameters, buffers and children, so every name (``named_modules``, the state
    dict, adapter files, FSDP2) is the one the plain model has; the block's own attributes are
    read through it, its state-dict layout is its own, and ``self.module`` is the block itself.
    """

    def __init__(self, module: nn.Module, keep_ratio: float, scorer: Scorer | None = None):
        if scorer is not None and not callable(scorer):  # else the first training forward fails, naming nothing
            raise TypeError(f"scorer must be a callable (hidden (batch, seq, hidden) -> scores (batch, seq)) or None, "
                            f"got {type(scorer).__name__}")
        super().__init__()
        # held outside the module tree: a child 'module' put '.module' into every name below it, so adapters
        # saved from a token-sparse model matched nothing in a plain one (PEFT dropped them silently)
        self.__dict__["module"] = module
        self.__dict__["scorer"] = scorer
        for shared in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, shared, getattr(module, shared))
        self.training = module.training
        self.keep_ratio = keep_ratio
        self.keep: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("module")
            if module is None:
                raise
            return getattr(module, name)  # the block's plain attributes (hidden_size, top_k, ...)

    def train(self, mode: bool = True) -> TokenSparse:
        super().train(mode)  # the shared children follow; the block itself is no child
        self.module.training = mode
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.module._save_to_state_dict(destination, prefix, keep_vars)  # its own key layout (e.g. NF4Linear's)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.module._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    @property
    def keep_ratio(self) -> float:
        """``ρ`` in ``(0, 1]``; checked when set (between steps too), so a 1.5 is refused, not read as dense."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self._keep_ratio = check_number_in_range(value, "keep_ratio", 0, 1, low_open=True)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self.training or not torch.is_grad_enabled() or hidden.dim() != 3:
            return self.module(hidden, *args, **kwargs)
        keep = self.keep
        if keep is None:
            if self.keep_ratio >= 1.0:
                return self.module(hidden)
            scores = self.scorer(hidden) if self.scorer is not None else hidden.detach().float().norm(dim=-1)
            valid = None if self.valid is None else self.valid.to(scores.device)
            keep = select_tokens(scores, self.keep_ratio, valid)
        return token_sparse_apply(self._on_tokens, hidden, keep.to(hidden.device))

    def _on_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # (tokens, hidden) as one sequence: MoE blocks (Mixtral, Qwen2-MoE) unpack (batch, seq, hidden) from their input
        return self.module(tokens[None])[0]


def apply_token_sparsity(model: nn.Module, keep_ratio: float, targets: Iterable[str] = ("mlp",),
                         scorer: Scorer | None = None) -> list[str]:
    """Wrap every submodule whose name ends with one of ``targets`` in :class:`TokenSparse`, in place.

    ``targets``: module names (a single string is one name). Returns the wrapped
    names. Raises ``ValueError`` if nothing matched, ``TypeError`` if a target is
    not a string or ``scorer`` is not callable; nothing is wrapped then. Names are
    unchanged (see :class:`TokenSparse`). Undo by putting each wrapper's ``.module``
    back in its place, or by reloading; set ``keep_ratio`` on the wrappers to change
    it between steps.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)  # not its characters
    if not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be module names (strings), got {targets!r}")
    names = [
        name for name, m in model.named_modules()
        if name and not isinstance(m, TokenSparse) and name.split(".")[-1] in targets
    ]
    if not names:
        raise ValueError(f"no submodule named one of {targets} found")
    from alignlab.adapters.base import AdapterLayer

    for name in names:  # checked before anything is wrapped
        if isinstance(model.get_submodule(name), AdapterLayer):
            # its adapter would sit inside the wrapper, where save_adapter / merge do not look for it
            raise ValueError(f"targets: {name!r} is an adapter layer; token sparsity wraps a block or a plain layer "
                             "(e.g. 'mlp', whose adapted linears stay visible), not an adapted one")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, TokenSparse(getattr(owner, child), keep_ratio, scorer))
    return names


def set_token_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> int:
    """Give every :class:`TokenSparse` in ``model`` the batch's ``attention_mask`` (``(batch, seq)``, 1/True
    for real tokens) for its scorer's selection, or ``None`` to clear it; call it per batch, before the
    forward. Returns how many wrappers were set.

    Raises:
        TypeError: ``attention_mask`` is neither a 2-D tensor nor None.
    """
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise TypeError(f"attention_mask must be a (batch, seq) tensor or None, got {got}")
    mask = None if attention_mask is None else attention_mask.bool()
    n = 0
    for m in model.modules():
        if isinstance(m, TokenSparse):
            m.valid = mask
            n += 1
    return n
