"""LoKr / KronA: Kronecker-product adapters.

KronA: Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter",
arXiv 2212.10650; LoKr: Yeh et al., "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859. The update is a
Kronecker product of two small factors::

    y = W x + b + s·(W₁ ⊗ W₂) x,     W₁: (out₁, in₁), W₂: (out₂, in₂),  s = α / r

with ``out = out₁·out₂`` and ``in = in₁·in₂`` chosen by :func:`factorization`
(the most balanced split, the smaller factor at most ``decompose_factor``).
``W₂`` (and ``W₁`` with ``decompose_both``) is itself low-rank, ``W₂ = W₂ₐ W₂ᵦ`` of rank
``r``, whenever ``r < max(out₂, in₂)/2``; otherwise it is a full matrix (KronA is
the all-full case). ``W₁`` starts at zero so the layer starts equal to the base.

The product is never formed in the forward pass: with ``x`` reshaped to
``X (in₁, in₂)``, ``(W₁ ⊗ W₂) vec(X) = vec(W₁ X W₂ᵀ)``. Mergeable:
``ΔW = s·kron(W₁, W₂)``. Trainable parameters per layer:
``out₁·in₁`` (or ``r(out₁+in₁)``) + ``out₂·in₂`` (or ``r(out₂+in₂)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, is_int
from alignlab.adapters.base import AdapterLayer
from alignlab.adapters.config import (_pattern_value, as_bool, check_modules_to_save, check_patterns, check_positive_int,
                                      check_positive_number, check_target_spec, check_task_type, task_type_from_file,
                                      with_task_heads)
from alignlab.adapters.inject import layers_holding
from alignlab.adapters.io import peft_field, peft_header, peft_targets, refuse_unsupported

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # PEFT's names


def _check_decompose_factor(factor) -> int:
    if not is_int(factor) or factor == 0 or factor < -1:
        kind = ValueError if is_int(factor) else ArgumentTypeError
        raise kind(f"decompose_factor must be -1 or a positive integer, got {factor!r}")
    return int(factor)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension``, ``m ≤ n``, ``m + n`` smallest, and ``m ≤ factor`` when ``factor > 0``.

    A ``factor`` that divides ``dimension`` is taken as ``m`` directly, even above ``√dimension``
    (LyCORIS' and PEFT's rule, kept so that files are interchangeable).

    Raises:
        TypeError / ValueError: ``dimension`` not an int >= 0, ``factor`` not an int.
    """
    if not is_int(dimension) or dimension < 0:
        raise (ValueError if is_int(dimension) else TypeError)(
            f"dimension must be an int >= 0, got {dimension!r}")
    if not is_int(factor):
        raise TypeError(f"factor must be an int (<= 0: no bound), got {factor!r}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if dimension == 0:  # a linear without inputs or outputs: (0, 1), m ≤ n, as PEFT splits it (files interchange)
        return 0, 1
    limit = dimension if factor <= 0 else factor
    best = (1, dimension)
    for m in range(2, math.isqrt(dimension) + 1):
        if dimension % m == 0 and m <= limit:
            best = (m, dimension // m)
    return best


class LoKrLinear(AdapterLayer):
    """A linear layer with LoKr adapters; see the module docstring for the math.

    Args:
        base: ``nn.Linear`` ``(..., in) -> (..., out)``; frozen.
        r: rank of the low-rank factors.
        alpha: scaling numerator (``s = α/r``).
        decompose_both: make ``W₁`` low-rank too when ``r < max(out₁, in₁)/2``.
        decompose_factor: upper bound on the smaller factor of each split (``-1``: balanced).
        adapter_name: name of the first adapter.
        init_zero: ``W₁ = 0`` at the start (identity); ``False`` draws every factor at random.
    Raises:
        TypeError/ValueError: not a linear base, bad rank or alpha, a ``decompose_factor`` that is neither -1 nor a
            positive int (as :class:`LoKrConfig`); ``decompose_both`` or ``init_zero`` neither a bool nor a NumPy bool.
    """

    mergeable = True
    linear_base = True
    adapter_stores = {"r": dict, "scaling": dict, **dict.fromkeys(FACTORS, nn.ParameterDict)}

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, decompose_both: bool = False,
                 decompose_factor: int = -1, adapter_name: str = "default", init_zero: bool = True) -> None:
        super().__init__(base)
        self.add_adapter(adapter_name, r, alpha, decompose_both, decompose_factor, init_zero)
        self.active_adapters = [adapter_name]

    def shapes(self, decompose_factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((out₁, in₁), (out₂, in₂))`` of the factors."""
        out1, out2 = factorization(self.out_features, decompose_factor)
        in1, in2 = factorization(self.in_features, decompose_factor)
        return (out1, in1), (out2, in2)

    def add_adapter(self, name: str, r: int = 8, alpha: float = 8.0, decompose_both: bool = False,
                    decompose_factor: int = -1, init_zero: bool = True) -> None:
        self._check_new_adapter(name)
        r = check_positive_int(r, "r")
        alpha = check_positive_number(alpha, "alpha")
        decompose_both, init_zero = as_bool(decompose_both, "decompose_both"), as_bool(init_zero, "init_zero")
        decompose_factor = _check_decompose_factor(decompose_factor)  # 0 or 3.5 gave a split of its own making
        (out1, in1), (out2, in2) = self.shapes(decompose_factor)
        dtype, device = self._adapter_dtype_device()

        def new(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

        full1 = not (decompose_both and r < max(out1, in1) / 2)
        full2 = not (r < max(out2, in2) / 2)
        if full1:
            self.lokr_w1[name] = new(out1, in1)
        else:
            self.lokr_w1_a[name], self.lokr_w1_b[name] = new(out1, r), new(r, in1)
        if full2:
            self.lokr_w2[name] = new(out2, in2)
        else:
            self.lokr_w2_a[name], self.lokr_w2_b[name] = new(out2, r), new(r, in2)
        self.r[name], self.scaling[name] = r, float(alpha) / r
        with torch.no_grad():
            for key in FACTORS:
                if name in getattr(self, key):
                    nn.init.kaiming_uniform_(getattr(self, key)[name], a=math.sqrt(5))
            if init_zero:  # the first factor of W₁ is zero: ΔW = 0
                (self.lokr_w1[name] if full1 else self.lokr_w1_a[name]).zero_()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key)[name] for key in FACTORS if name in getattr(self, key)}

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W₁, W₂)``, each formed from its low-rank factors where it has them."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        w2 = self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·kron(W₁, W₂)`` in fp32 (fp64 for fp64 factors), ``(out, in)``."""
        self._check_name(name)
        w1, w2 = self.factors(name)
        dt = torch.promote_types(w1.dtype, torch.float32)
        return self.scaling[name] * torch.kron(w1.to(dt), w2.to(dt))

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s·(W₁ ⊗ W₂) x`` as ``s·vec(W₁ X W₂ᵀ)``: ``x (..., in) -> (..., out)`` in the adapter dtype."""
        w1, w2 = self.factors(name)
        xs = x.to(w1.dtype).reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        y = torch.matmul(torch.matmul(w1, xs), w2.T)  # W₁ X W₂ᵀ: (..., out₁, out₂)
        return self.scaling[name] * y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, active={self.active_adapters}"


@dataclass
class LoKrConfig:
    """Settings for ``inject(model, LoKrConfig(...))``.

    Args:
        r: rank of the low-rank factors (large ``r`` gives full factors: KronA).
        alpha: scaling numerator, ``s = α/r``.
        target_modules / exclude_modules: as in ``LoRAConfig``.
        rank_pattern / alpha_pattern: ``{regex: value}`` overrides as in ``LoRAConfig``.
        decompose_both: also factor ``W₁`` into rank ``r``.
        decompose_factor: bound on the smaller factor of each dimension split (``-1``: balanced).
        init_zero: start at ``ΔW = 0``.
        modules_to_save: modules trained in full next to the factors, as in ``LoRAConfig``.
        task_type: PEFT's task type, as in ``LoRAConfig`` (``"SEQ_CLS"`` etc. also train the model's head).
    Raises:
        TypeError/ValueError: bad rank, alpha, factor or targets; ``decompose_both`` or ``init_zero``
            that is not a bool.
    """

    peft_type = "LOKR"
    regex_patterns = True  # rank_pattern / alpha_pattern are {regex: value}, as LoRA's: inject warns about unused keys

    r: int = 8
    alpha: float = 8.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    decompose_both: bool = False
    decompose_factor: int = -1
    init_zero: bool = True
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        self.task_type = check_task_type(self.task_type)
        self.r = check_positive_int(self.r, "r")
        self.alpha = check_positive_number(self.alpha, "alpha")
        self.rank_pattern, self.alpha_pattern = check_patterns(self.rank_pattern, self.alpha_pattern)
        self.decompose_both = as_bool(self.decompose_both, "decompose_both")  # written to adapter_config.json
        self.init_zero = as_bool(self.init_zero, "init_zero")
        self.decompose_factor = _check_decompose_factor(self.decompose_factor)
        check_target_spec(self.target_modules, self.exclude_modules)

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> LoKrLinear:
        return LoKrLinear(module, _pattern_value(self.rank_pattern, name, self.r), _pattern_value(self.alpha_pattern, name, self.alpha),
                          self.decompose_both, self.decompose_factor, adapter_name, self.init_zero)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, LoKrLinear):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a LoKr adapter to it")
        layer.add_adapter(adapter_name, _pattern_value(self.rank_pattern, name, self.r), _pattern_value(self.alpha_pattern, name, self.alpha),
                          self.decompose_both, self.decompose_factor, self.init_zero)

    # -- PEFT format --------------------------------------------------------------------------------
    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, LoKrLinear)
        return {
            **peft_header("LOKR"), "task_type": self.task_type,
            "r": self.r, "alpha": self.alpha, "target_modules": sorted(layers),
            "exclude_modules": None, "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "decompose_both": self.decompose_both, "decompose_factor": self.decompose_factor, "rank_dropout": 0.0,
            "module_dropout": 0.0, "rank_dropout_scale": False, "use_effective_conv2d": False, "init_weights": True,
            "modules_to_save": with_task_heads(model, self), "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def from_peft(cls, raw: dict) -> "LoKrConfig":
        refuse_unsupported(raw, "LoKr", (("rank_dropout", 0.0), ("module_dropout", 0.0), ("layers_to_transform", None)))
        config = cls(r=peft_field(raw, "r", "int"), alpha=peft_field(raw, "alpha", "number", 8.0), target_modules=peft_targets(raw),
                     exclude_modules=raw.get("exclude_modules"), rank_pattern=dict(raw.get("rank_pattern") or {}),
                     alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                     decompose_both=peft_field(raw, "decompose_both", "bool", False),
                     decompose_factor=peft_field(raw, "decompose_factor", "int", -1),
                     modules_to_save=raw.get("modules_to_save") or None)
        return task_type_from_file(config, raw)
