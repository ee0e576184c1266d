"""Adaptive-rank LoRA: AdaLoRA and SoRA.

Both write the update in SVD-like form with a per-rank scalar::

    y = W x + b + s · P diag(λ) Q x,     Q: (r, in), λ: (r,), P: (out, r)

* AdaLoRA -- Zhang et al., "AdaLoRA: Adaptive Budget Allocation for
  Parameter-Efficient Fine-Tuning", arXiv 2303.10512. ``λ = 0`` and ``P, Q ~ N(0, 0.02²)``
  at the start, ``s = α / (r + 10⁻⁵)`` (PEFT's convention). The importance of each
  triplet ``(P_{:,i}, λ_i, Q_{i,:})`` is ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)``,
  with ``s(w) = Ī(w)·Ū(w)``, ``I = |w·∂L/∂w|`` smoothed by EMAs::

      Ī ← β₁ Ī + (1−β₁) I,      Ū ← β₂ Ū + (1−β₂) |I − Ī|

  A cubic schedule lowers the total budget from ``Σ r_init`` to ``target_r · #layers``
  between ``tinit`` and ``total_step − tfinal``; every ``deltaT`` steps the lowest
  scores are masked (``λ_i ← 0``). :class:`AdaLoRAAllocator` is the step hook you
  call after ``optimizer.step()`` and before ``zero_grad()`` (it reads the gradients); add
  :func:`orthogonal_regularizer` ``· orth_reg_weight`` to the loss
  (``R = mean over factors of ‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F``).
* SoRA -- Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models",
  arXiv 2311.11696. ``λ`` is a gate (starts at 1, ``P = 0``, ``Q`` Kaiming),
  ``s = α/r``, and after every optimizer step a proximal L1 update
  (:func:`sora_proximal_step`) soft-thresholds it::

      λ ← sign(λ) · max(|λ| − η·ξ, 0)

  which drives gates to exactly zero and so prunes ranks (:func:`active_ranks`);
  :func:`prune_ranks` then drops them from the tensors (also for AdaLoRA after allocation).

Trainable parameters per layer: ``r(in + out + 1)``. Mergeable: ``ΔW = s·P diag(λ) Q``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, check_number_in_range, is_finite_real, is_int
from alignlab.adapters.base import AdapterLayer, fan_in_fan_out
from alignlab.adapters.config import (check_dropout, check_finite_number, check_nonzero_number, check_modules_to_save, check_positive_int,
                                      check_positive_number, check_target_spec, check_task_type, task_type_from_file,
                                      with_task_heads)
from alignlab.adapters.inject import layers_holding
from alignlab.adapters.io import own_format_config, own_format_dict, peft_field, peft_header, peft_targets, refuse_lora_variants, refuse_unsupported


class AdaLoRALinear(AdapterLayer):
    """A linear layer with SVD-form adapters ``s·P diag(λ) Q`` (AdaLoRA and SoRA).

    Args:
        base: ``nn.Linear`` ``(..., in) -> (..., out)``; frozen.
        r: rank of ``P``/``Q`` in this layer.
        scaling: ``s``.
        init: ``"adalora"`` (λ=0, P,Q ~ N(0, 0.02²)) or ``"sora"`` (λ=1, P=0, Q Kaiming).
        dropout: dropout on the adapter input.
        adapter_name: name of the first adapter.
    Raises:
        TypeError/ValueError: not a linear base, a rank that is not an int ``>= 0`` (a pruned layer may hold 0),
            an unknown init, a dropout outside ``[0, 1)``, a ``scaling`` that is not a finite non-zero number.
    """

    mergeable = True
    linear_base = True
    adapter_stores = {"lora_A": nn.ParameterDict, "lora_B": nn.ParameterDict, "lora_E": nn.ParameterDict,
                      "lora_dropout": nn.ModuleDict, "scaling": dict}

    def __init__(self, base: nn.Module, r: int, scaling: float, init: str = "adalora", dropout: float = 0.0,
                 adapter_name: str = "default") -> None:
        super().__init__(base)
        self.add_adapter(adapter_name, r, scaling, init, dropout)
        self.active_adapters = [adapter_name]

    def add_adapter(self, name: str, r: int, scaling: float, init: str = "adalora", dropout: float = 0.0) -> None:
        self._check_new_adapter(name)
        if not is_int(r) or r < 0:
            kind = ValueError if is_int(r) else ArgumentTypeError
            raise kind(f"r must be a non-negative integer, got {r!r}")
        r = int(r)
        if init not in ("adalora", "sora"):
            raise ValueError(f"init must be 'adalora' or 'sora', got {init!r}")
        scaling = check_nonzero_number(scaling, "scaling", "the adapter output is multiplied by it, so with 0 the "
                                       "adapter adds nothing and its weights get no gradient")
        dropout = check_dropout(dropout)
        dtype, device = self._adapter_dtype_device()
        a = torch.empty(r, self.in_features, dtype=dtype, device=device)
        b = torch.empty(self.out_features, r, dtype=dtype, device=device)
        if init == "adalora":
            nn.init.normal_(a, std=0.02)
            nn.init.normal_(b, std=0.02)
            e = torch.zeros(r, 1, dtype=dtype, device=device)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
            e = torch.ones(r, 1, dtype=dtype, device=device)
        self.lora_A[name], self.lora_B[name], self.lora_E[name] = nn.Parameter(a), nn.Parameter(b), nn.Parameter(e)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = float(scaling)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name], "lora_E": self.lora_E[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·P diag(λ) Q`` in fp32 (fp64 for fp64 factors), ``(out, in)``."""
        self._check_name(name)
        dt = torch.promote_types(self.lora_B[name].dtype, torch.float32)
        return self.scaling[name] * (self.lora_B[name].to(dt) @ (self.lora_A[name].to(dt) * self.lora_E[name].to(dt)))

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s·P diag(λ) Q dropout(x)``: ``x (..., in) -> (..., out)`` in the adapter dtype."""
        a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        h = self.lora_dropout[name](x.to(a.dtype))
        return (h @ (a * e).T @ b.T) * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = {n: int(self.lora_A[n].shape[0]) for n in self.adapter_names()}
        return f"in={self.in_features}, out={self.out_features}, r={ranks}, active={self.active_adapters}"


def _check_rank_pattern(pattern, where: str) -> None:
    # kept-rank masks: a "false" string or a 0/1 would count as kept or dropped by truthiness
    if pattern is not None and not (isinstance(pattern, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(b, bool) for b in v) for k, v in pattern.items())):
        raise ValueError(f"{where} must map '<module>.lora_E' names to lists of true/false, got {pattern!r}")


def _check_common(r: int, alpha: float, dropout: float, target_modules, exclude_modules, r_name: str = "r") -> tuple[int, float, float]:
    """``(r, alpha, dropout)`` as Python numbers, so that the config serialises to JSON."""
    check_target_spec(target_modules, exclude_modules)
    return check_positive_int(r, r_name), check_positive_number(alpha, "alpha"), check_dropout(dropout)


@dataclass
class AdaLoRAConfig:
    """Settings for ``inject(model, AdaLoRAConfig(...))`` and :class:`AdaLoRAAllocator`.

    Args:
        init_r: starting rank of every layer; target_r: average final rank.
        alpha: numerator of ``s = α/(init_r + 10⁻⁵)``.
        total_step: number of training steps (needed by the budget schedule).
        tinit / tfinal: warm-up steps at the full budget / final steps at the target budget.
        deltaT: steps between reallocations.
        beta1 / beta2: EMA factors of sensitivity and uncertainty.
        orth_reg_weight: weight of :func:`orthogonal_regularizer` (added by the user's loop).
        target_modules / exclude_modules / dropout: as in ``LoRAConfig``.
        rank_pattern: ``{"<module>.lora_E": [bool] * init_r}`` kept ranks (set when loading a PEFT
            file saved after allocation; such layers hold only the kept ranks).
        modules_to_save: modules trained in full next to the adapter, as in ``LoRAConfig``.
        task_type: PEFT's task type, as in ``LoRAConfig`` (``"SEQ_CLS"`` etc. also train the model's head).
    Raises:
        ValueError: non-positive ranks, ``target_r > init_r``, ``tinit``/``tfinal`` not non-negative
            integers, a schedule that does not fit in ``total_step``, betas not numbers in (0, 1), a NaN,
            infinite or negative ``orth_reg_weight``, a ``rank_pattern`` that is not ``{name: [bool] * init_r}``.
        TypeError: an ``orth_reg_weight`` or a beta that is not a real number, a rank or ``tinit``/``tfinal``/
            ``deltaT`` that is not an int (for these an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """

    peft_type = "ADALORA"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    total_step: int = 1000
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: str | list[str] | None = None
    dropout: float = 0.0
    rank_pattern: dict[str, list[bool]] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        self.task_type = check_task_type(self.task_type)
        self.init_r, self.alpha, self.dropout = _check_common(self.init_r, self.alpha, self.dropout, self.target_modules,
                                                              self.exclude_modules, "init_r")
        if not is_int(self.target_r) or not 0 < self.target_r <= self.init_r:
            kind = ValueError if is_int(self.target_r) else ArgumentTypeError
            raise kind(f"target_r must be an integer in [1, init_r={self.init_r}], got {self.target_r!r}")
        self.target_r = int(self.target_r)
        self.total_step = check_positive_int(self.total_step, "total_step")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                kind = ValueError if is_int(value) else ArgumentTypeError
                raise kind(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"need 0 ≤ tinit, tfinal and tinit + tfinal < total_step, got tinit={self.tinit}, "
                             f"tfinal={self.tfinal}, total_step={self.total_step}")
        self.deltaT = check_positive_int(self.deltaT, "deltaT")
        # β₁ = 0 makes Ī = I, so Ū = |I − Ī| = 0 and every score 0; β = 1 keeps an EMA at its zero start
        for name in ("beta1", "beta2"):
            setattr(self, name, check_number_in_range(getattr(self, name), name, 0, 1, low_open=True, high_open=True))
        # the user's loop multiplies the regularizer by it: NaN would reach the loss, a string fail there
        self.orth_reg_weight = check_finite_number(self.orth_reg_weight, "orth_reg_weight", minimum=0.0)
        _check_rank_pattern(self.rank_pattern, "rank_pattern")
        # one flag per initial rank, as PEFT writes them and reads them (a boolean index over init_r rows): a shorter
        # list gave a layer another rank here and a file PEFT failed to load (IndexError)
        wrong = {k: len(v) for k, v in (self.rank_pattern or {}).items() if len(v) != self.init_r}
        if wrong:
            raise ValueError(f"rank_pattern lists must hold init_r={self.init_r} flags each, got lengths {wrong}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.init_r + 1e-5)

    def _rank(self, name: str) -> int:
        if self.rank_pattern and f"{name}.lora_E" in self.rank_pattern:
            return int(sum(bool(v) for v in self.rank_pattern[f"{name}.lora_E"]))
        return self.init_r

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> AdaLoRALinear:
        return AdaLoRALinear(module, self._rank(name), self.scaling, "adalora", self.dropout, adapter_name)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, AdaLoRALinear):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add an AdaLoRA adapter to it")
        layer.add_adapter(adapter_name, self._rank(name), self.scaling, "adalora", self.dropout)

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, AdaLoRALinear)
        return {
            **peft_header("ADALORA"), "task_type": self.task_type,
            "r": self.init_r, "init_r": self.init_r, "target_r": self.target_r,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": sorted(layers),
            "exclude_modules": None, "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.deltaT,
            "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step, "rank_pattern": self.rank_pattern, "init_lora_weights": True,
            "bias": "none", "fan_in_fan_out": fan_in_fan_out(layers.values()), "modules_to_save": with_task_heads(model, self), "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def from_peft(cls, raw: dict) -> "AdaLoRAConfig":
        refuse_unsupported(raw, "AdaLoRA", (("bias", "none"), ("use_dora", False), ("use_rslora", False),
                                            ("layers_to_transform", None), ("trainable_token_indices", None)))
        refuse_lora_variants(raw, "AdaLoRA")
        rank_pattern = raw.get("rank_pattern") or None
        _check_rank_pattern(rank_pattern, "adapter_config.json: rank_pattern")
        config = cls(init_r=peft_field(raw, "init_r", "int"), target_r=peft_field(raw, "target_r", "int"),
                     alpha=peft_field(raw, "lora_alpha", "number", 8.0), total_step=peft_field(raw, "total_step", "int"),
                     tinit=peft_field(raw, "tinit", "int", 0), tfinal=peft_field(raw, "tfinal", "int", 0),
                     deltaT=peft_field(raw, "deltaT", "int", 1), beta1=peft_field(raw, "beta1", "number", 0.85),
                     beta2=peft_field(raw, "beta2", "number", 0.85),
                     orth_reg_weight=peft_field(raw, "orth_reg_weight", "number", 0.5),
                     target_modules=peft_targets(raw), exclude_modules=raw.get("exclude_modules"),
                     dropout=peft_field(raw, "lora_dropout", "number", 0.0), rank_pattern=rank_pattern,
                     modules_to_save=raw.get("modules_to_save") or None)
        return task_type_from_file(config, raw)


def _svd_layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoRALinear]:
    """The AdaLoRA/SoRA layers holding ``adapter_name``; a name none holds is a ``ValueError`` (a typo, or the
    default name after ``inject(..., "adalora")``, would otherwise regularize or prune nothing, silently)."""
    layers = layers_holding(model, adapter_name, AdaLoRALinear)
    if not layers:
        present = sorted({n for _, l in model.named_modules() if isinstance(l, AdaLoRALinear) for n in l.adapter_names()})
        raise ValueError(f"adapter_name={adapter_name!r}: no AdaLoRA/SoRA layer holds it; this model's AdaLoRA/SoRA "
                         f"adapters: {present}")
    return layers


def _refuse_merged(layers: dict[str, AdaLoRALinear], adapter_name: str, what: str) -> None:
    """``ValueError`` when ``adapter_name`` is merged into a layer: changing its ``λ`` there would make ``unmerge``
    subtract another ``ΔW`` than the one merged, leaving the base weight changed for good."""
    merged = [n for n, l in layers.items() if adapter_name in l.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged (e.g. {merged[0]!r}); unmerge before {what}")


def orthogonal_regularizer(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """``mean over P, Q of ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F`` across the AdaLoRA layers (a scalar; 0 when every rank
    is pruned). Raises ``ValueError`` when no AdaLoRA layer holds ``adapter_name``."""
    terms = []
    for layer in _svd_layers(model, adapter_name).values():
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if a.numel() == 0:
            continue
        for cov in (a @ a.T, b.T @ b):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


class AdaLoRAAllocator:
    """AdaLoRA's budget schedule and importance-based rank masking (the user's step hook).

    >>> alloc = AdaLoRAAllocator(model, config)                        # doctest: +SKIP
    >>> loss = task_loss + config.orth_reg_weight * orthogonal_regularizer(model)
    >>> loss.backward(); optimizer.step(); alloc.step(global_step); optimizer.zero_grad()

    Args:
        model: a model with AdaLoRA adapter ``adapter_name`` injected.
        config: its :class:`AdaLoRAConfig`.
    Raises:
        TypeError: ``config`` is not an :class:`AdaLoRAConfig`.
        ValueError: the model holds no AdaLoRA layers of that name.
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig, adapter_name: str = "default") -> None:
        if not isinstance(config, AdaLoRAConfig):  # a SoRAConfig has no budget schedule
            raise TypeError(f"config must be an AdaLoRAConfig, got {type(config).__name__}")
        self.config, self.adapter_name = config, adapter_name
        self.layers = layers_holding(model, adapter_name, AdaLoRALinear)
        if not self.layers:
            raise ValueError(f"model holds no AdaLoRA layers for adapter {adapter_name!r}")
        self.initial_budget = sum(l.lora_A[adapter_name].shape[0] for l in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.ipt_avg: dict[tuple[str, str], torch.Tensor] = {}
        self.unc_avg: dict[tuple[str, str], torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None

    def budget(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)``: cubic decay ``b_T + (b_0 − b_T)(1 − (t − t_i)/(T − t_f − t_i))³``."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.initial_budget - self.target_budget) * frac ** 3 + self.target_budget), step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMA of sensitivity ``|w·g|`` and its uncertainty, for every ``P``, ``λ``, ``Q`` entry (needs ``.grad``)."""
        b1, b2 = self.config.beta1, self.config.beta2
        params = [(name, kind, getattr(layer, kind)[self.adapter_name])
                  for name, layer in self.layers.items() for kind in ("lora_A", "lora_B", "lora_E")]
        if all(p.grad is None for _, _, p in params):
            # after zero_grad() (set_to_none) nothing would be scored, and no rank ever masked
            raise ValueError("AdaLoRAAllocator.step reads the adapter's gradients, and none has one: call it after "
                             "backward() and optimizer.step(), before optimizer.zero_grad()")
        for name, kind, p in params:
            key = (name, kind)
            # a layer this batch did not reach has a zero gradient, so zero sensitivity: its EMAs decay as they
            # would for any zero gradient (skipping it left a layer never reached without scores: KeyError when
            # masking, and kept a stale score for one reached only now and then)
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            avg = self.ipt_avg.get(key, torch.zeros_like(p))
            unc = self.unc_avg.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.ipt_avg[key], self.unc_avg[key] = avg, b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, name: str, kind: str) -> torch.Tensor:
        return self.ipt_avg[(name, kind)] * self.unc_avg[(name, kind)]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``λ`` of the ``initial_budget − budget`` least important triplets; returns kept ranks."""
        scores = {}
        for name in self.layers:
            s_e = self._score(name, "lora_E").view(-1)
            s_a = self._score(name, "lora_A").mean(dim=1)
            s_b = self._score(name, "lora_B").mean(dim=0)
            scores[name] = s_e + s_a + s_b
        k = self.initial_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k).values.item() if k > 0 else -math.inf
        pattern = {}
        for name, layer in self.layers.items():
            keep = scores[name] > threshold
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        self.rank_pattern = pattern
        return pattern

    def step(self, global_step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """Call after ``optimizer.step()``, gradients still present: update importance (until the final phase), mask when scheduled.

        Returns ``(budget, rank_pattern or None)``. Raises ``ValueError`` when importance is due and no adapter
        parameter has a gradient (called after ``zero_grad()``), when the layers' ranks changed since this
        allocator was built (``prune_ranks``: build a new allocator for the smaller adapter), or when the adapter
        is merged (masking its ``λ`` then would leave the base weight changed after ``unmerge``).
        """
        _refuse_merged(self.layers, self.adapter_name, "allocating ranks")  # masking λ would corrupt the base
        ranks = sum(l.lora_A[self.adapter_name].shape[0] for l in self.layers.values())
        if ranks != self.initial_budget:  # its scores and budgets are per rank of the layers it was built on
            raise ValueError(f"adapter {self.adapter_name!r} has {ranks} ranks, this allocator was built on {self.initial_budget} "
                             "(prune_ranks since?): build a new AdaLoRAAllocator")
        if global_step < self.config.total_step - self.config.tfinal:
            self.update_importance()
        budget, mask_now = self.budget(global_step)
        mask_now = mask_now or global_step >= self.config.total_step - self.config.tfinal  # final phase: keep the pattern
        pattern = self.mask_to_budget(budget) if mask_now and self.ipt_avg else None
        return budget, pattern


@dataclass
class SoRAConfig:
    """Settings for ``inject(model, SoRAConfig(...))``; prune with :func:`sora_proximal_step`.

    Args:
        r: maximum rank; alpha: ``s = α/r``.
        target_modules / exclude_modules / dropout: as in ``LoRAConfig``.
    Raises:
        ValueError/TypeError: bad rank, alpha, dropout or targets.
    """

    peft_type = "ALIGNLAB_SORA"

    r: int = 8
    alpha: float = 8.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.r, self.alpha, self.dropout = _check_common(self.r, self.alpha, self.dropout, self.target_modules, self.exclude_modules)
        if not isinstance(self.rank_pattern, dict) or not all(is_int(v) and v >= 0 for v in self.rank_pattern.values()):
            ints = isinstance(self.rank_pattern, dict) and all(is_int(v) for v in self.rank_pattern.values())
            kind = ValueError if ints else ArgumentTypeError
            raise kind(f"rank_pattern must map module names to ranks ≥ 0, got {self.rank_pattern!r}")
        self.rank_pattern = {k: int(v) for k, v in self.rank_pattern.items()}

    def _rank(self, name: str) -> int:
        return self.rank_pattern.get(name, self.r)  # exact module names, written by prune_ranks

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> AdaLoRALinear:
        return AdaLoRALinear(module, self._rank(name), self.alpha / self.r, "sora", self.dropout, adapter_name)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, AdaLoRALinear):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a SoRA adapter to it")
        layer.add_adapter(adapter_name, self._rank(name), self.alpha / self.r, "sora", self.dropout)

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, AdaLoRALinear)
        return own_format_dict(self.peft_type, SoRAConfig(self.r, self.alpha, sorted(layers), None, self.dropout,
                                                          dict(self.rank_pattern)))

    @classmethod
    def from_peft(cls, raw: dict) -> "SoRAConfig":
        return own_format_config(cls, raw, (("r", "int"), ("alpha", "number"), ("dropout", "number")))


def _non_negative_finite(value) -> bool:
    return is_finite_real(value) and value >= 0


@torch.no_grad()
def sora_proximal_step(model: nn.Module, lr: float, sparsity: float, adapter_name: str = "default") -> int:
    """SoRA's proximal L1 update on every gate, ``λ ← sign(λ)·max(|λ| − lr·sparsity, 0)``; returns the gates now zero.

    Call after ``optimizer.step()`` (exclude the gates from weight decay). Raises ``ValueError`` on
    an ``lr``/``sparsity`` that is not a non-negative finite number (NaN would turn every gate into NaN),
    when no SoRA layer holds ``adapter_name``, or when it is merged (``unmerge`` would then subtract other gates
    than those merged and leave the base weight changed).
    """
    if not all(_non_negative_finite(v) for v in (lr, sparsity)):
        raise ValueError(f"lr and sparsity must be non-negative finite numbers, got lr={lr!r}, sparsity={sparsity!r}")
    layers = _svd_layers(model, adapter_name)
    _refuse_merged(layers, adapter_name, "the proximal step")  # the gates of a merged adapter sit in W already
    zeros = 0
    for layer in layers.values():
        g = layer.lora_E[adapter_name]
        g.copy_(g.sign() * (g.abs() - lr * sparsity).clamp_min(0.0))
        zeros += int((g == 0).sum())
    return zeros


def active_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """``{module: number of non-zero λ}`` -- the effective rank of each AdaLoRA/SoRA layer (``ValueError`` when none
    holds ``adapter_name``)."""
    return {n: int((l.lora_E[adapter_name] != 0).sum()) for n, l in _svd_layers(model, adapter_name).items()}


@torch.no_grad()
def prune_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Drop the ranks whose ``λ`` is exactly zero, shrinking ``P``, ``λ``, ``Q``; returns the new rank per layer.

    The output is unchanged (a zero ``λ_i`` contributes nothing). The adapter's stored config
    (``adapter_configs(model)[adapter_name]``, a copy of the one given to ``inject``) learns the new
    ranks (AdaLoRA: PEFT's ``rank_pattern`` over ``init_r``; SoRA: ``rank_pattern`` of exact names), so
    the adapter saves and reloads at its pruned size. Rebuild the optimizer afterwards.

    Raises:
        ValueError: the adapter is not AdaLoRA/SoRA, or is merged.
    """
    from alignlab.adapters.inject import CONFIGS_ATTR, adapter_configs, mark_only_adapters_trainable

    configs = adapter_configs(model)
    config = configs.get(adapter_name)
    if not isinstance(config, (AdaLoRAConfig, SoRAConfig)):
        raise ValueError(f"prune_ranks needs an AdaLoRA or SoRA adapter; {adapter_name!r} is {type(config).__name__}")
    layers = layers_holding(model, adapter_name, AdaLoRALinear)
    _refuse_merged(layers, adapter_name, "pruning")
    # this adapter's own copy: one config object may serve several adapters (inject(m, cfg, "a"); inject(m, cfg, "b")),
    # whose files would otherwise claim the ranks pruned here
    config = copy.copy(config)
    configs[adapter_name] = config
    object.__setattr__(model, CONFIGS_ATTR, configs)
    ranks = {}
    for name, layer in layers.items():
        keep = layer.lora_E[adapter_name].view(-1) != 0
        for store, rows in ((layer.lora_A, True), (layer.lora_E, True), (layer.lora_B, False)):
            old = store[adapter_name]
            store[adapter_name] = nn.Parameter((old[keep] if rows else old[:, keep]).clone())
        ranks[name] = int(keep.sum())
        if isinstance(config, AdaLoRAConfig):
            key = f"{name}.lora_E"
            before = (config.rank_pattern or {}).get(key, [True] * config.init_r)
            kept = iter(keep.tolist())
            pattern = dict(config.rank_pattern or {})
            pattern[key] = [bool(b) and next(kept) for b in before]
            config.rank_pattern = pattern
        else:
            config.rank_pattern = {**config.rank_pattern, name: ranks[name]}
    mark_only_adapters_trainable(model)
    return ranks
