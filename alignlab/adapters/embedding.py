"""Adapters on token embeddings: LoRA on ``nn.Embedding`` and training selected token rows.

**LoRA on an embedding** (Hu et al., *LoRA*, arXiv 2106.09685, as PEFT lays it out). With the
frozen table ``E (V, H)`` and token ids ``t``::

    y = E[t] + s · (Aᵀ[t]) Bᵀ,      A: (r, V), B: (H, r),  s = α/r (α/√r with rsLoRA)

i.e. ``ΔE = s · (B A)ᵀ``, shape ``(V, H)``. As in PEFT, ``A`` starts at zero and ``B ~ N(0, 1)``
(so the layer starts equal to the base), no dropout is applied to the ids, and the tensors are
saved as ``<module>.lora_embedding_A`` ``(r, V)`` and ``<module>.lora_embedding_B`` ``(H, r)``.

**Trainable token rows** (PEFT's ``trainable_token_indices``): for a few token ids ``I`` (e.g.
new special tokens) the layer holds their rows ``D (|I|, H)`` as a trainable parameter, starting
as copies of ``E[I]``, and reads them instead of the frozen table::

    y = D[slot(t)] if t ∈ I else E[t]

so only those rows get gradients and change; the ``V - |I|`` others stay frozen and no
``(V, H)`` gradient is ever formed. Saved as ``<module>.token_adapter.trainable_tokens_delta``
``(|I|, H)`` (the rows themselves, not a difference, as PEFT stores them).

**Tied input / output embeddings.** With trainable rows, an output head (``nn.Linear``) whose
weight *is* the embedding's parameter gets a tied layer sharing ``D``: its logits for the ids in
``I`` are ``x Dᵀ`` (plus the head's bias), so input and output stay tied through training, merging
and saving (only the embedding's copy is written, as PEFT does). A LoRA on such a head takes the tied layer
under it (whichever of the two was injected first), as PEFT nests them: ``logits = x W'ᵀ + s·B A x``, ``W'`` the
table with ``D`` in its rows (merging writes ``D``, then ``ΔW``, into the head, untied). LoRA on a tied embedding changes
the input side only; the head keeps computing with the frozen table (PEFT's default), and merging
unties the two with a warning (see :func:`alignlab.adapters.merge`). With ``ensure_weight_tying``
the head gets a :class:`TiedLoRAHead` instead: ``logits = x Eᵀ + s·(x B) A``, the embedding's own
factors, and merging writes ``ΔE`` once into the shared table.

Both layers scale their contribution by the base's ``embed_scale`` when it has one (Gemma's
scaled word embedding), as the base itself does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignlab._checks import as_bool, check_positive_int, check_positive_number, check_token_id
from alignlab.adapters.base import AdapterLayer, SavedModule, hf_embedding
from alignlab.adapters.lora import check_adapter_dtype

__all__ = ["LoRAEmbedding", "TiedLoRAHead", "TrainableTokensLayer", "check_heads_can_tie", "check_token_indices",
           "tie_lora_heads"]


def _embed_scale(base: nn.Module) -> torch.Tensor | float | None:
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"embed_scale of {type(base).__name__} must be a scalar, got shape {tuple(scale.shape)}")
    return scale


def _scaled(y: torch.Tensor, scale) -> torch.Tensor:
    if scale is None:
        return y
    return y * (scale.to(y.dtype) if isinstance(scale, torch.Tensor) else scale)


def check_token_indices(indices, arg: str = "trainable_token_indices") -> list[int]:
    """``indices`` as a list of distinct non-negative ints; ``TypeError`` / ``ValueError`` naming ``arg``."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (list, tuple)):
        raise TypeError(f"{arg} must be a list of token ids, got {type(indices).__name__}")
    if not indices:
        raise ValueError(f"{arg} must name at least one token id")
    for i in indices:
        check_token_id(i, arg)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{arg} must not repeat a token id, got {list(indices)}")
    return [int(i) for i in indices]


class LoRAEmbedding(AdapterLayer):
    """``nn.Embedding`` (or a subclass such as a scaled word embedding) with LoRA adapters.

    ``y = E[t] + s · Aᵀ[t] Bᵀ`` (see the module docstring); ``t (...)`` int ids → ``(..., H)``.
    Several named adapters may live side by side; the active ones are summed.

    Args:
        base: the embedding to adapt (frozen), weight ``(V, H)``.
        r, alpha, use_rslora: rank and scaling (``s = α/r``, or ``α/√r``).
        adapter_name: name of the first adapter.
        adapter_dtype: dtype of ``A``/``B``; default fp32 over a 16-bit table, else the table's dtype.

    Raises:
        TypeError: ``base`` is not an ``nn.Embedding``, ``use_rslora`` is neither a bool nor a NumPy bool, or
            ``adapter_dtype`` is neither None nor a floating-point dtype.
        ValueError: bad rank or alpha.
    """

    mergeable = True
    adapter_stores = {"lora_embedding_A": nn.ParameterDict, "lora_embedding_B": nn.ParameterDict}

    @property
    def keeps_ties(self) -> bool:
        """With a :class:`TiedLoRAHead` on the tied head, merging writes into the shared table (no untying)."""
        return bool(self.__dict__.get("_tied_heads"))

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, use_rslora: bool = False,
                 adapter_name: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"base must be an nn.Embedding, got {type(base).__name__}")
        super().__init__(base)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.add_adapter(adapter_name, r, alpha, use_rslora, adapter_dtype)
        self.active_adapters = [adapter_name]

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def add_adapter(self, name: str, r: int = 8, alpha: float = 8.0, use_rslora: bool = False,
                    adapter_dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` with ``A = 0``, ``B ~ N(0, 1)`` (inactive until listed in ``active_adapters``)."""
        self._check_new_adapter(name)
        r = check_positive_int(r, "r")
        alpha = check_positive_number(alpha, "alpha")
        use_rslora = as_bool(use_rslora, "use_rslora")  # bool("no") is True: it would switch rsLoRA scaling on
        check_adapter_dtype(adapter_dtype)
        weight = self.base_layer.weight
        if adapter_dtype is None:
            adapter_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        v, h = weight.shape
        a = torch.zeros(r, v, dtype=adapter_dtype, device=weight.device)
        b = torch.randn(h, r, dtype=torch.float32).to(device=weight.device, dtype=adapter_dtype)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.r[name], self.alpha[name], self.use_rslora[name] = r, float(alpha), use_rslora
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for store in (self.r, self.alpha, self.scaling, self.use_rslora):
            store.pop(name, None)

    def is_dora(self, name: str) -> bool:
        return False

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        base = self.base_layer
        # the base's padding row and frequency scaling shape the gradient of A as they do the table's (as in PEFT)
        delta = F.embedding(x, a.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq) @ b.T
        delta = delta * self.scaling[name]
        return _scaled(delta, _embed_scale(self.base_layer))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔE = s · (B A)ᵀ`` in fp32 (fp64 for fp64 factors), ``(V, H)`` (without ``embed_scale``, which the base
        applies)."""
        self._check_name(name)
        b, a = self.lora_embedding_B[name], self.lora_embedding_A[name]
        dt = torch.promote_types(b.dtype, torch.float32)
        return self.scaling[name] * (b.to(dt) @ a.to(dt)).T

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's keys, relative to this layer: ``lora_embedding_A`` ``(r, V)``, ``lora_embedding_B`` ``(H, r)``."""
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, s={self.scaling[n]:g}" for n in self.adapter_names()]
        return f"num_embeddings={self.in_features}, dim={self.out_features}, adapters=[{'; '.join(parts)}], active={self.active_adapters}"


class TiedLoRAHead(AdapterLayer):
    """The output head tied to a :class:`LoRAEmbedding`, carrying that embedding's LoRA (PEFT's
    ``ensure_weight_tying``): with the head's weight the table ``E (V, H)``, ``ΔE = s·(B A)ᵀ`` gives

        logits = x Eᵀ + s · (x B) A,      x (..., H) → (..., V)

    with the embedding's own ``A (r, V)`` and ``B (H, r)`` (no parameters of its own). PEFT writes them as the
    head's ``lora_A.weight = Bᵀ (r, H)`` and ``lora_B.weight = Aᵀ (V, r)``; so does :meth:`peft_tensors`.

    Raises:
        TypeError: ``base`` is not an ``nn.Linear`` or ``source`` not a :class:`LoRAEmbedding`.
    """

    mergeable = True
    keeps_ties = True
    adapter_stores = {"tied_adapters": dict}

    def __init__(self, base: nn.Module, source: LoRAEmbedding, adapter_name: str = "default") -> None:
        if not isinstance(base, nn.Linear) or not isinstance(source, LoRAEmbedding):
            raise TypeError(f"a tied LoRA head needs an nn.Linear head and a LoRAEmbedding, got {type(base).__name__} "
                            f"and {type(source).__name__}")
        super().__init__(base)
        self._source = [source]  # a plain list: the embedding is saved and moved as its own module
        source.__dict__.setdefault("_tied_heads", []).append(self)
        self.add_adapter(adapter_name)
        self.active_adapters = [adapter_name]

    @property
    def source(self) -> LoRAEmbedding:
        return self._source[0]

    def add_adapter(self, name: str) -> None:
        """Mirror the embedding's adapter ``name`` (raises ``ValueError`` if it has none)."""
        self._check_new_adapter(name)
        if name not in self.source.adapter_names():
            raise ValueError(f"the tied embedding has no adapter {name!r}")
        self.tied_adapters[name] = None

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        src = self.source
        return src.lora_embedding_A[name], src.lora_embedding_B[name], src.scaling[name]

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b, s = self._factors(name)
        return (x.to(b.dtype) @ b) @ a * s

    def delta_weight(self, name: str) -> torch.Tensor:
        self._check_name(name)
        return self.source.delta_weight(name)

    def _shares_table(self) -> bool:
        return self.base_layer.weight is self.source.base_layer.weight

    def _merge_one(self, name: str) -> None:
        if not self._shares_table():  # a shared table is written once, by the embedding's merge
            super()._merge_one(name)

    def _unmerge_one(self, name: str) -> None:
        if not self._shares_table():
            super()._unmerge_one(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if not self.adapter_names() and self in self.source.__dict__.get("_tied_heads", []):
            self.source.__dict__["_tied_heads"].remove(self)  # about to be unwrapped: the table may untie again

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's keys for the tied head: ``lora_A.weight`` = ``Bᵀ`` ``(r, H)``, ``lora_B.weight`` = ``Aᵀ`` ``(V, r)``
        (views of the embedding's factors: loading writes the same values into them)."""
        a, b, _ = self._factors(name)
        return {"lora_A.weight": b.T, "lora_B.weight": a.T}


def check_heads_can_tie(model: nn.Module, targets: list[str]) -> None:
    """Refuse, before ``inject`` changes anything, what :func:`tie_lora_heads` could not tie: an ``nn.Linear`` whose
    weight is the table of an embedding in ``targets`` but that is a target too or already holds an adapter layer.

    Raises:
        ValueError: naming the head and the embedding.
    """
    modules = dict(model.named_modules())
    bases = {n: m.base_layer if isinstance(m, AdapterLayer) else m for n, m in modules.items()}
    for emb_name in targets:
        if not isinstance(bases[emb_name], nn.Embedding):
            continue
        for n, m in modules.items():
            head = bases[n]
            if isinstance(m, TiedLoRAHead) or not isinstance(head, nn.Linear) or head.weight is not bases[emb_name].weight:
                continue
            if n in targets:
                raise ValueError(f"ensure_weight_tying: the head {n!r} tied to {emb_name!r} is a LoRA target too; "
                                 "leave it out of target_modules (it carries the embedding's update)")
            if isinstance(m, AdapterLayer):
                raise ValueError(f"ensure_weight_tying: the head {n!r} tied to {emb_name!r} holds a {type(m).__name__}")


def tie_lora_heads(model: nn.Module, adapter_name: str, active: bool) -> list[str]:
    """Give every ``nn.Linear`` whose weight is the table of a :class:`LoRAEmbedding` holding ``adapter_name``
    a :class:`TiedLoRAHead` for it; returns the heads' names.

    Raises:
        ValueError: such a head already holds another adapter layer.
    """
    from alignlab.adapters.inject import _set_submodule

    modules = dict(model.named_modules())
    sources = [(n, m) for n, m in modules.items() if isinstance(m, LoRAEmbedding) and adapter_name in m.adapter_names()]
    inside = tuple(p + "." for p, m in modules.items() if p and isinstance(m, (AdapterLayer, SavedModule)))
    heads = []
    for emb_name, emb in sources:
        table = emb.base_layer.weight
        for n, m in modules.items():
            if not n or n.startswith(inside) and not isinstance(m, TiedLoRAHead):
                continue
            base = m.base_layer if isinstance(m, AdapterLayer) else m
            if not isinstance(base, nn.Linear) or base.weight is not table:
                continue
            if isinstance(m, TiedLoRAHead):
                m.add_adapter(adapter_name)
            elif isinstance(m, (AdapterLayer, SavedModule)):
                raise ValueError(f"ensure_weight_tying: the head {n!r} tied to {emb_name!r} holds a {type(m).__name__}")
            else:
                m = TiedLoRAHead(m, emb, adapter_name)
                m.active_adapters = []
                _set_submodule(model, n, m)
            if active:
                m.set_active(m.active_adapters + [adapter_name])
            heads.append(n)
    return heads


class _Rows(nn.Module):
    """The frozen originals and index tensors of one adapter's rows (buffers: they follow device moves, and
    are not part of the state dict).

    Built on the ``meta`` device (deferred init), the index tensors are made again from ``indices`` when the module
    leaves it (``to_empty``), and the originals, which nothing holds then, are marked ``stale`` until the layer's
    ``load_state_dict`` reads them from the loaded table (merging refuses stale ones: unmerging would write
    whatever memory held)."""

    def __init__(self, indices: list[int], original: torch.Tensor, num_rows: int) -> None:
        super().__init__()
        self.indices = tuple(indices)
        self.ids = frozenset(indices)
        self.stale = False
        idx, slot = self._index_tensors(num_rows, original.device)
        self.register_buffer("index", idx, persistent=False)
        self.register_buffer("slot", slot, persistent=False)  # token id -> row of D, or -1
        self.register_buffer("original", original.detach().clone(), persistent=False)

    def _index_tensors(self, num_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(self.indices, dtype=torch.long, device=device)
        slot = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        slot[idx] = torch.arange(len(self.indices), device=device)
        return idx, slot

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "indices" not in self.__dict__:  # pickled by an alignlab that kept the ids in the index tensor alone
            self.indices, self.stale = tuple(self.index.tolist()), False

    def _apply(self, fn, recurse=True):
        was_meta = self.index.is_meta
        out = super()._apply(fn, recurse)
        if not self.index.is_meta:  # remade from the ids at each move (they hold nothing else): mends a to_empty
            idx, slot = self._index_tensors(self.slot.shape[0], self.index.device)
            with torch.no_grad():
                self.index.copy_(idx)
                self.slot.copy_(slot)
            self.stale = self.stale or was_meta  # to_empty: the new tensors hold whatever memory held
        return out


class TrainableTokensLayer(AdapterLayer):
    """Train only the rows ``I`` of an embedding (or of a tied output head); see the module docstring.

    On an ``nn.Embedding``: ``y = D[slot(t)]`` for ids in ``I``, ``E[t]`` otherwise. On an
    ``nn.Linear`` head ``(V, H)``: ``logits = x Eᵀ + b`` with the columns of ``I`` recomputed as
    ``x Dᵀ + b[I]``. ``tied_to`` makes this layer use another layer's ``D`` parameters (same objects):
    such a layer writes nothing to the adapter file.

    Args:
        base: ``nn.Embedding`` ``(V, H)`` or ``nn.Linear`` with ``out_features = V``.
        indices: distinct token ids in ``[0, V)``.
        adapter_name: name of the first adapter.
        tied_to: the layer on the tied embedding, whose rows this one shares.
        adapter_dtype: dtype of ``D``; default fp32 over a 16-bit table, else the table's dtype.

    Raises:
        TypeError: ``base`` is neither, or ``adapter_dtype`` is neither None nor a floating-point dtype.
        ValueError: bad or out-of-range ``indices``.
    """

    mergeable = True
    keeps_ties = True  # merging writes the rows into the shared table: both tied modules should see them
    adapter_stores = {"trainable_tokens_delta": nn.ParameterDict, "token_rows": nn.ModuleDict}

    @property
    def passes_base_weight(self) -> bool:
        """On a head: a :class:`~alignlab.adapters.lora.LoRALinear` may wrap this layer, and its merge writes into the
        head's weight (after this layer wrote the rows there: :func:`alignlab.adapters.merge` merges it first)."""
        return isinstance(self.base_layer, nn.Linear)

    def __init__(self, base: nn.Module, indices: list[int], adapter_name: str = "default",
                 tied_to: "TrainableTokensLayer | None" = None, adapter_dtype: torch.dtype | None = None) -> None:
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable token rows need an nn.Embedding or a tied nn.Linear head, got {type(base).__name__}")
        super().__init__(base)
        # a plain list hides the other layer from named_modules / state_dict (its rows are saved there)
        self._tied = [tied_to] if tied_to is not None else []
        self.register_load_state_dict_post_hook(TrainableTokensLayer._load_originals)
        self.add_adapter(adapter_name, indices, adapter_dtype)
        self.active_adapters = [adapter_name]

    @property
    def tied_to(self) -> "TrainableTokensLayer | None":
        return self._tied[0] if self._tied else None

    @property
    def num_rows(self) -> int:
        w = self.base_layer.weight
        return int(w.shape[0])

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings if isinstance(self.base_layer, nn.Embedding) else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim if isinstance(self.base_layer, nn.Embedding) else self.base_layer.out_features

    def token_indices(self, name: str) -> list[int]:
        """The token ids adapter ``name`` trains."""
        self._check_name(name)
        return list(self.token_rows[name].indices)

    def add_adapter(self, name: str, indices: list[int], adapter_dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` training rows ``indices`` (for a tied layer: share the tied layer's ``name``)."""
        self._check_new_adapter(name)
        indices = check_token_indices(indices)
        check_adapter_dtype(adapter_dtype)
        bad = [i for i in indices if i >= self.num_rows]
        if bad:
            raise ValueError(f"trainable_token_indices: ids {bad} are out of range for a table of {self.num_rows} rows")
        weight = self.base_layer.weight
        original = weight.detach()[torch.tensor(indices, device=weight.device)]
        tied = self.tied_to
        if tied is not None:
            if name not in tied.adapter_names() or tied.token_indices(name) != indices:
                raise ValueError(f"tied layer has no adapter {name!r} with the same token ids")
            rows = tied.trainable_tokens_delta[name]
        else:
            if adapter_dtype is None:
                adapter_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            rows = nn.Parameter(original.to(adapter_dtype).clone())
        self.trainable_tokens_delta[name] = rows
        self.token_rows[name] = _Rows(indices, original, self.num_rows)

    def set_active(self, names: list[str]) -> None:
        names = [n for n in names if n in self.adapter_names()]
        seen: set[int] = set()
        for n in names:
            ids = set(self.token_indices(n))
            if ids & seen:
                raise ValueError(f"adapters {names} train overlapping token ids ({sorted(ids & seen)[:5]}); "
                                 "activate adapters with disjoint trainable_token_indices")
            seen |= ids
        self.active_adapters = names

    def _live(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.trainable_tokens_delta and n not in self.merged_adapters]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        for name in self._live():
            rows, meta = self.trainable_tokens_delta[name], self.token_rows[name]
            if isinstance(self.base_layer, nn.Embedding):
                slot = meta.slot[x]
                picked = rows[slot.clamp(min=0)]
                pad = self.base_layer.padding_idx
                if pad is not None and pad in meta.ids:  # the padding row gets no gradient
                    picked = torch.where((x == pad).unsqueeze(-1), picked.detach(), picked)
                picked = _scaled(picked.to(out.dtype), _embed_scale(self.base_layer))
                out = torch.where((slot >= 0).unsqueeze(-1), picked, out)
            else:
                bias = self.base_layer.bias
                cols = F.linear(x.to(out.dtype), rows.to(out.dtype), None if bias is None else bias[meta.index])
                out = out.index_copy(out.dim() - 1, meta.index, cols)
        return out

    # -- merge: the rows are written into the table (and put back from the frozen originals) -----------
    @staticmethod
    def _load_originals(self, incompatible_keys) -> None:
        """``load_state_dict`` post-hook: rows whose originals went stale leaving the meta device (see ``_Rows``)
        take them from the table just loaded."""
        w = self.base_layer.weight
        for rows in self.token_rows.values():
            if rows.stale and not w.is_meta:
                with torch.no_grad():
                    rows.original.copy_(w.detach()[rows.index])
                rows.stale = False

    def _refuse_stale(self, names: list[str]) -> None:
        """``ValueError`` where adapter rows among ``names`` have stale originals (see ``_Rows``): unmerging would
        write whatever memory held."""
        for name in names:
            if name in self.token_rows and self.token_rows[name].stale:
                raise ValueError(f"adapter {name!r}: the original rows are unknown (the layer left the meta device and "
                                 "no state dict was loaded since): load_state_dict the model's weights before merging")

    def _merge_one(self, name: str) -> None:
        w = self.base_layer.weight
        w.index_copy_(0, self.token_rows[name].index, self.trainable_tokens_delta[name].detach().to(w.dtype))

    def _unmerge_one(self, name: str) -> None:
        w = self.base_layer.weight
        meta = self.token_rows[name]
        w.index_copy_(0, meta.index, meta.original.to(w.dtype))

    def _check_mergeable(self, names: list[str]) -> None:
        self._refuse_stale(names)
        seen: set[int] = set()
        for n in list(self.merged_adapters) + names:
            ids = set(self.token_indices(n))
            if ids & seen:
                raise ValueError(f"adapter {n!r} trains token ids another merged adapter wrote; merge disjoint ones")
            seen |= ids

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """``token_adapter.trainable_tokens_delta`` ``(|I|, H)``; nothing for a tied layer (PEFT saves one copy)."""
        if self.tied_to is not None:
            return {}
        return {"token_adapter.trainable_tokens_delta": self.trainable_tokens_delta[name]}

    def extra_repr(self) -> str:
        parts = [f"{n}: {len(self.token_rows[n].index)} rows" for n in self.adapter_names()]
        tied = ", tied" if self.tied_to is not None else ""
        return f"adapters=[{'; '.join(parts)}]{tied}, active={self.active_adapters}"


# -- where trainable rows go (LoRAConfig.trainable_token_indices) -----------------------------------------
def _input_embedding_name(model: nn.Module) -> str:
    emb = hf_embedding(model)  # None for a model with two towers (CLIPModel): no single one
    names = [n for n, m in model.named_modules() if n and emb is not None and m is emb]
    if not names:
        names = [n for n, m in model.named_modules() if n == "embed_tokens" or n.endswith(".embed_tokens")]
    if len(names) != 1:
        raise ValueError("trainable_token_indices: found no single input embedding (get_input_embeddings() or a module "
                         f"named embed_tokens; got {names}); pass {{module name: [ids]}} instead")
    return names[0]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensLayer) else module


def _head_base(module: nn.Module) -> nn.Module:
    """The linear a (tied) head computes with: through a LoRA on the head and the token rows under it."""
    from alignlab.adapters.lora import LoRALinear

    return _base(module.base_layer if isinstance(module, LoRALinear) else module)


def token_row_plan(model: nn.Module, spec, lora_targets=(), ensure_weight_tying: bool = False
                   ) -> list[tuple[str, list[int], list[str]]]:
    """``[(module name, token ids, names of the modules tied to it)]`` for ``trainable_token_indices`` = ``spec``.

    ``spec`` is a list of ids (for the input embedding: ``get_input_embeddings()``, else the module
    named ``embed_tokens``) or ``{module name or dotted suffix: ids}``. As in PEFT, only the model's input
    embedding shares its rows: with every other module over its table (an ``nn.Linear`` head or another
    ``nn.Embedding`` whose weight is that parameter: a tied ``lm_head``, transformers 5's T5 ``encoder.embed_tokens``
    / ``decoder.embed_tokens`` beside ``shared``), which then take no rows of their own; a tied module named in
    ``spec`` with the same ids is covered so. With other ids (or when the input embedding is not in ``spec``)
    every named module trains rows of its own and nothing is tied, as PEFT does without ``ensure_weight_tying``.

    Raises:
        ValueError: a name matches no module, a target is not an ``nn.Embedding`` / ``nn.Linear`` (or
            already holds another adapter, e.g. LoRA in ``lora_targets``), ids are out of range, one module is
            given two sets of ids, or tied modules get different ids under ``ensure_weight_tying``.
    """
    from alignlab.adapters.config import name_matches

    if isinstance(spec, dict):
        wanted = {str(k): check_token_indices(v, f"trainable_token_indices[{k!r}]") for k, v in spec.items()}
    else:
        wanted = {_input_embedding_name(model): check_token_indices(spec)}
    modules = dict(model.named_modules())
    wrappers = tuple(p + "." for p, m in modules.items() if p and isinstance(m, AdapterLayer))
    rows_of: dict[str, list[int]] = {}
    for key, ids in wanted.items():
        names = [n for n in modules if n and name_matches([key], n) and not n.startswith(wrappers)]
        if not names:
            raise ValueError(f"trainable_token_indices: no module named {key!r} in this model")
        for name in names:
            module = modules[name]
            if name in lora_targets or (isinstance(module, AdapterLayer) and not isinstance(module, TrainableTokensLayer)):
                raise ValueError(f"trainable_token_indices: {name!r} also gets a {type(module).__name__ if isinstance(module, AdapterLayer) else 'LoRA'} "
                                 "adapter; a module takes either trainable token rows or LoRA (as in PEFT)")
            if not isinstance(_base(module), (nn.Embedding, nn.Linear)):
                raise ValueError(f"trainable_token_indices: {name!r} is a {type(module).__name__}, expected an nn.Embedding "
                                 "or an nn.Linear output head")
            rows = int(_base(module).weight.shape[0])
            bad = [i for i in ids if i >= rows]
            if bad:
                raise ValueError(f"trainable_token_indices: ids {bad} are out of range for {name!r} ({rows} rows); "
                                 "for new tokens, call model.resize_token_embeddings(len(tokenizer)) before inject")
            if name in rows_of and rows_of[name] != ids:
                raise ValueError(f"trainable_token_indices: {name!r} is selected twice, with ids {rows_of[name]} and {ids}")
            rows_of[name] = ids
    source = _input_embedding_name_or_none(model)
    if source in rows_of:
        tied = _tied_heads(modules, source)
        mismatch = [n for n in tied if n in rows_of and rows_of[n] != rows_of[source]]
        if mismatch and ensure_weight_tying:
            raise ValueError(f"trainable_token_indices: ensure_weight_tying, but {mismatch[0]!r} (tied to {source!r}) gets "
                             f"ids {rows_of[mismatch[0]]} and {source!r} gets {rows_of[source]}; give tied modules the same ids")
        if not mismatch:
            return [(n, ids, tied if n == source else []) for n, ids in rows_of.items() if n not in tied]
    return [(n, ids, []) for n, ids in rows_of.items()]


def _input_embedding_name_or_none(model: nn.Module) -> str | None:
    try:
        return _input_embedding_name(model)
    except ValueError:
        return None


def _tied_heads(modules: dict[str, nn.Module], name: str) -> list[str]:
    from alignlab.adapters.lora import LoRALinear

    weight = _base(modules[name]).weight
    inside = tuple(p + "." for p, m in modules.items() if p and isinstance(m, (AdapterLayer, SavedModule)))
    heads = []
    for n, m in modules.items():
        if not n or n == name or n.startswith(inside):
            continue
        if isinstance(m, SavedModule) and getattr(_base(m.original_module), "weight", None) is weight:
            raise ValueError(f"trainable_token_indices: the head {n!r} tied to {name!r} is trained in full "
                             "(modules_to_save); leave it out of one of the two")
        # a head, or another embedding module over the same table (transformers 5's T5: encoder.embed_tokens and
        # decoder.embed_tokens share shared.weight, and they, not shared, run in forward), as PEFT ties them; a LoRA on
        # the head takes the rows under it (PEFT nests them so)
        base = _head_base(m)
        if isinstance(m, AdapterLayer) and not isinstance(m, (TrainableTokensLayer, LoRALinear)):
            base = getattr(m, "base_layer", None)
            if isinstance(base, (nn.Linear, nn.Embedding)) and base.weight is weight:
                raise ValueError(f"trainable_token_indices: the head {n!r} tied to {name!r} holds a {type(m).__name__}; "
                                 "its rows could not follow the trained token rows")
            continue
        if isinstance(base, (nn.Linear, nn.Embedding)) and base.weight is weight:
            if isinstance(m, LoRALinear) and any(m.is_dora(a) for a in m.adapter_names()):
                raise ValueError(f"trainable_token_indices: the head {n!r} tied to {name!r} holds a DoRA adapter, whose "
                                 "weight norm would not see the trained token rows; use plain LoRA on the head")
            heads.append(n)
    return heads


def add_trainable_tokens(model: nn.Module, spec, adapter_name: str, active: bool,
                         adapter_dtype: torch.dtype | None = None, ensure_weight_tying: bool = False) -> None:
    """Wrap (or extend) the modules ``spec`` selects with :class:`TrainableTokensLayer` adapter ``adapter_name``
    (active there if ``active``), tied heads included; see :func:`token_row_plan` for ``spec`` and what raises."""
    from alignlab.adapters.inject import _set_submodule
    from alignlab.adapters.lora import LoRALinear

    def put(name: str, make, extend) -> None:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):  # LoRA on a tied head: the rows go under it, as PEFT nests them
            name, module = f"{name}.base_layer", module.base_layer
        if isinstance(module, TrainableTokensLayer):
            extend(module)
        else:
            module = make(module)
            module.active_adapters = []
            _set_submodule(model, name, module)
        if active:
            module.set_active(module.active_adapters + [adapter_name])

    for name, ids, heads in token_row_plan(model, spec, ensure_weight_tying=ensure_weight_tying):
        put(name, lambda m: TrainableTokensLayer(m, ids, adapter_name, adapter_dtype=adapter_dtype),
            lambda m: m.add_adapter(adapter_name, ids, adapter_dtype))
        layer = model.get_submodule(name)
        for head in heads:
            def extend(m, layer=layer):
                m._tied = [layer]
                m.add_adapter(adapter_name, ids)
            put(head, lambda m, layer=layer: TrainableTokensLayer(m, ids, adapter_name, tied_to=layer), extend)
