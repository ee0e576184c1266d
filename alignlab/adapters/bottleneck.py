"""Bottleneck adapters (serial Houlsby / Pfeiffer, parallel) and AdapterFusion.

A bottleneck adapter is a small residual MLP with ``m = hidden / reduction_factor``::

    f(z) = s · (W_up σ(W_down z + b_down) + b_up),   W_down: (m, hidden), W_up: (hidden, m)

* serial -- Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
  arXiv 1902.00751: after a sub-layer ``g``, ``h = g(x) + f(g(x))``, placed after the
  attention and the feed-forward blocks (``placement="houlsby"``); Pfeiffer et al.
  keep only the one after the feed-forward block (``placement="pfeiffer"``).
* parallel -- He et al., "Towards a Unified View of Parameter-Efficient Transfer
  Learning", arXiv 2110.04366: ``h = g(x) + f(x)`` (``placement="parallel"``, by
  default on the feed-forward block, with ``s = 4`` in the paper).

``W_up`` and ``b_up`` start at zero, so an adapter starts as the identity. Trainable
parameters per adapted block: ``2·hidden·m + m + hidden``. The wrapped block is any
module returning ``(batch, seq, hidden)`` or a tuple whose first entry is that
(HF attention modules), so adapters are placed with ``target_modules=["self_attn",
"mlp"]`` on Llama-style models. Not mergeable (``σ`` is non-linear).

AdapterFusion -- Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition
for Transfer Learning", arXiv 2005.00247. With frozen adapters ``f_1..f_N`` at a
block, a trainable attention over their outputs ``a_i = f_i(·)``::

    α = softmax_i( (Q h)·(K a_i) / T ),     h' = h + Σ_i α_i · V a_i

``Q, K ~ N(0, 0.02²)`` (uniform weights at the start) and ``V = I`` (the start is the
average of the adapters). Parameters per block: ``3·(hidden² + hidden)``. Inject with
``inject(model, AdapterFusionConfig(adapters=[...]), "fusion")`` then
``set_adapter(model, "fusion")``: only the fusion layers train.

PEFT has neither; files use ``peft_type = "ALIGNLAB_BOTTLENECK"`` / ``"ALIGNLAB_FUSION"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, is_int
from alignlab.adapters.base import AdapterLayer, is_linear_like, linear_features
from alignlab.adapters.config import (as_bool, check_nonzero_number, check_positive_int, check_positive_number,
                                      check_target_spec, name_matches)
from alignlab.adapters.inject import layers_holding, modules_outside_adapters
from alignlab.adapters.io import own_format_config, own_format_dict

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"houlsby": ["self_attn", "mlp"], "pfeiffer": ["mlp"], "parallel": ["mlp"]}


def _check_fusion_adapters(adapters) -> list[str]:
    if not isinstance(adapters, (list, tuple)) or len(adapters) < 2 or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"adapters must list at least two bottleneck adapter names, got {adapters!r}")
    return list(adapters)


# why scaling = 0 is refused (BottleneckLayer and BottleneckConfig)
_ZERO_SCALING = "the adapter output is multiplied by it, so with 0 the adapter adds nothing and its weights get no gradient"


class FusionLayer(nn.Module):
    """Attention over adapter outputs at one block (see the module docstring).

    Raises ``ValueError``/``TypeError`` naming the argument, as :class:`AdapterFusionConfig` does: ``hidden`` not a
    positive int, fewer than two ``adapters`` names, a ``temperature`` that is not a positive finite number.
    """

    def __init__(self, hidden: int, adapters: list[str], temperature: float = 1.0) -> None:
        super().__init__()
        hidden = check_positive_int(hidden, "hidden")
        self.adapters = _check_fusion_adapters(adapters)
        self.temperature = float(check_positive_number(temperature, "temperature"))
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(hidden))
            nn.init.zeros_(self.value.bias)

    def forward(self, h: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """``h (..., hidden)``, ``outputs (..., N, hidden)`` → fused ``(..., hidden)``."""
        q = self.query(h).unsqueeze(-2)
        scores = (q * self.key(outputs)).sum(-1) / self.temperature
        weights = scores.softmax(dim=-1).unsqueeze(-1)
        return (weights * self.value(outputs)).sum(-2)


def _misfit_sides(linear: nn.Module, hidden: int, parallel: bool) -> dict:
    """The sides of a linear-like block that are not ``hidden`` wide, ``{"output" / "input": width}``: the adapter adds
    to its output and a parallel one reads its input (a k_proj or up_proj target failed at the first forward)."""
    in_features, out_features = linear_features(linear)
    sides = {"output": out_features, **({"input": in_features} if parallel else {})}
    return {side: w for side, w in sides.items() if w != hidden}


class BottleneckLayer(AdapterLayer):
    """A block (attention / feed-forward module) followed or paralleled by bottleneck adapters.

    Args:
        base: the block; its output is ``(..., hidden)`` or a tuple starting with it.
        hidden: hidden size.
        bottleneck: ``m`` (> 0).
        non_linearity: one of ``relu``, ``gelu``, ``silu``/``swish``, ``tanh``.
        parallel: read the block *input* (He et al.) instead of its output (Houlsby).
        scaling: ``s``.
        adapter_name: name of the first adapter.
    Raises:
        ValueError: ``hidden`` or ``bottleneck`` not a positive int, an unknown non-linearity, a ``scaling`` that is
            NaN, infinite or 0; a linear ``base`` whose output (and, ``parallel``, input) is not ``hidden`` wide.
        TypeError: ``parallel`` is neither a bool nor a NumPy bool; ``scaling`` not a real number; ``hidden`` or
            ``bottleneck`` not an int (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """

    def __init__(self, base: nn.Module, hidden: int, bottleneck: int, non_linearity: str = "relu",
                 parallel: bool = False, scaling: float = 1.0, adapter_name: str = "default") -> None:
        super().__init__(base)
        self.hidden = check_positive_int(hidden, "hidden")
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.add_adapter(adapter_name, bottleneck, non_linearity, parallel, scaling)
        self.active_adapters = [adapter_name]

    @property
    def in_features(self) -> int:
        return self.hidden

    @property
    def out_features(self) -> int:
        return self.hidden

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys()) + list(self.adapter_fusion.keys())

    def add_adapter(self, name: str, bottleneck: int, non_linearity: str = "relu", parallel: bool = False, scaling: float = 1.0) -> None:
        self._check_new_adapter(name)
        bottleneck = check_positive_int(bottleneck, "bottleneck size")
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {non_linearity!r}")
        parallel = as_bool(parallel, "parallel")  # "no" would read the block input instead of its output
        scaling = check_nonzero_number(scaling, "scaling", _ZERO_SCALING)  # NaN would reach every output
        base = self.base_layer
        wrong = _misfit_sides(base, self.hidden, parallel) if is_linear_like(base) else {}
        if wrong:  # (as BottleneckConfig.prepare refuses it for inject)
            raise ValueError(f"hidden={self.hidden} does not fit the base layer, a linear whose "
                             + " and ".join(f"{side} is {w}" for side, w in wrong.items()) + " wide: "
                             + ("a parallel adapter reads its input and adds to its output"
                                if parallel else "the adapter adds to its output"))
        dtype, device = self._adapter_dtype_device()
        down = nn.Linear(self.hidden, bottleneck, device=device, dtype=dtype)
        up = nn.Linear(bottleneck, self.hidden, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = ACTIVATIONS[non_linearity]()
        self.parallel[name], self.scaling[name] = parallel, float(scaling)

    def add_fusion(self, name: str, adapters: list[str], temperature: float = 1.0) -> None:
        self._check_new_adapter(name)
        missing = [a for a in adapters if a not in self.adapter_down]
        if missing:
            raise ValueError(f"AdapterFusion needs bottleneck adapters {missing}, which this layer lacks")
        dtype, device = self._adapter_dtype_device()
        self.adapter_fusion[name] = FusionLayer(self.hidden, adapters, temperature).to(device=device, dtype=dtype)

    def delete_adapter(self, name: str) -> None:
        self._check_name(name)
        users = [f for f, layer in self.adapter_fusion.items() if name in layer.adapters]
        if users:
            raise ValueError(f"adapter {name!r} is used by fusion {users}; delete the fusion first")
        if name in self.adapter_fusion:
            del self.adapter_fusion[name]
        else:
            for store in (self.adapter_down, self.adapter_up, self.adapter_act):
                del store[name]
            self.parallel.pop(name)
            self.scaling.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.adapter_fusion:
            return {f"adapter_fusion.{k}": v for k, v in self.adapter_fusion[name].named_parameters()}
        return {f"adapter_{kind}.{k}": v for kind in ("down", "up")
                for k, v in getattr(self, f"adapter_{kind}")[name].named_parameters()}

    def adapter_output(self, name: str, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """``f(z)`` with ``z`` the block input (parallel) or output (serial), ``(..., hidden)``."""
        if self.parallel[name]:
            if x is None:
                raise ValueError("parallel adapters need the block input (positional or hidden_states=)")
            z = x
        else:
            z = h
        down = self.adapter_down[name]
        z = z.to(down.weight.dtype)
        return self.scaling[name] * self.adapter_up[name](self.adapter_act[name](down(z)))

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        names = [] if self.disabled else [n for n in self.active_adapters if n in self.adapter_names()]
        if not names:
            return out
        h = out[0] if isinstance(out, tuple) else out
        x = kwargs.get("hidden_states", args[0] if args else None)
        delta = 0
        for name in names:
            if name in self.adapter_fusion:
                fusion = self.adapter_fusion[name]
                outputs = torch.stack([self.adapter_output(a, h, x) for a in fusion.adapters], dim=-2)
                delta = delta + fusion(h.to(outputs.dtype), outputs)
            else:
                delta = delta + self.adapter_output(name, h, x)
        h = (h + delta).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _find_blocks(model: nn.Module, spec, exclude) -> list[str]:
    return [name for name, _ in modules_outside_adapters(model, BottleneckLayer)
            if name_matches(spec, name) and not (exclude is not None and name_matches(exclude, name))]


@dataclass
class BottleneckConfig:
    """Settings for ``inject(model, BottleneckConfig(...))``.

    Args:
        reduction_factor: ``m = hidden // reduction_factor`` (must be ``≤ hidden``).
        non_linearity: ``relu`` (Houlsby/Pfeiffer), ``gelu``, ``silu``, ``tanh``.
        placement: ``"houlsby"`` (serial after attention and FFN), ``"pfeiffer"`` (serial after
            FFN), ``"parallel"`` (He et al., beside the FFN).
        scaling: ``s`` (He et al. use 4 for parallel adapters).
        target_modules: blocks to adapt (names/suffixes or regex); default from ``placement``
            (Llama-style names, ``self_attn`` / ``mlp``: each must name a block of the model).
        exclude_modules: blocks to skip.
        hidden_size: block width; default ``model.config.hidden_size``.
    Raises:
        ValueError: ``reduction_factor`` not a positive number or larger than the hidden size,
            unknown placement or non-linearity, a NaN, infinite or zero ``scaling``, a ``hidden_size`` that is not a
            positive int, no hidden size available, a default placement block the model lacks.
        TypeError: ``scaling`` is not a real number.
    """

    peft_type = "ALIGNLAB_BOTTLENECK"

    reduction_factor: float = 16
    non_linearity: str = "relu"
    placement: str = "houlsby"
    scaling: float = 1.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        self.reduction_factor = check_positive_number(self.reduction_factor, "reduction_factor")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        self.scaling = check_nonzero_number(self.scaling, "scaling", _ZERO_SCALING)
        if self.hidden_size is not None:  # 2.7 reached int() in prepare (a 2-wide block), "4096" a comparison
            if not is_int(self.hidden_size) or self.hidden_size < 1:
                kind = ValueError if is_int(self.hidden_size) else ArgumentTypeError
                raise kind(f"hidden_size must be None or a positive int, got {self.hidden_size!r}")
            self.hidden_size = int(self.hidden_size)
        self._default_targets = self.target_modules is None
        if self._default_targets:
            self.target_modules = list(PLACEMENTS[self.placement])
        # 5 failed at inject with "'int' object is not iterable"; blocks are never picked by "all-linear"
        check_target_spec(self.target_modules, self.exclude_modules, allow_all_linear=False)
        self._hidden: int | None = None

    def find_targets(self, model: nn.Module) -> list[str]:
        if self._default_targets:
            # the placement's Llama-style block names: on GPT-2 ("attn") or OPT (no "mlp") only some would
            # match, and "houlsby" would quietly adapt one block kind of the two
            missing = [t for t in self.target_modules if not _find_blocks(model, [t], None)]
            if missing:
                raise ValueError(f"placement={self.placement!r} adapts the blocks named {self.target_modules}, and this model "
                                 f"has no {missing}: pass target_modules= with its attention / feed-forward block names "
                                 "(e.g. GPT-2: ['attn', 'mlp'])")
        return _find_blocks(model, self.target_modules, self.exclude_modules)

    def prepare(self, model: nn.Module, targets: list[str], adapter_name: str) -> None:
        hidden = self.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
        if not hidden:
            raise ValueError("BottleneckConfig: pass hidden_size= (the model has no config.hidden_size)")
        if self.reduction_factor > hidden:
            raise ValueError(f"reduction_factor={self.reduction_factor} is larger than the hidden size {hidden}: the bottleneck would be empty")
        for name in targets:
            block = model.get_submodule(name)
            block = block.base_layer if isinstance(block, BottleneckLayer) else block
            if is_linear_like(block):
                wrong = _misfit_sides(block, int(hidden), self.placement == "parallel")
                if wrong:
                    raise ValueError(f"hidden size {hidden} does not fit {name!r}, a linear whose "
                                     + " and ".join(f"{side} is {w}" for side, w in wrong.items())
                                     + f" wide: a {self.placement} adapter adds to its output"
                                     + (" and reads its input" if self.placement == "parallel" else "")
                                     + "; target a block (or linear) that maps to the hidden size")
                continue
            # a block of width `hidden` reads or writes it through some linear: a file from a model of another
            # width (its hidden_size is written there) would load and fail at the first forward
            widths = {w for m in block.modules() if is_linear_like(m) for w in linear_features(m)}
            if widths and int(hidden) not in widths:
                raise ValueError(f"hidden size {hidden} does not fit block {name!r}, whose linears are {sorted(widths)} wide "
                                 "(an adapter saved from a model of another width, or a wrong hidden_size=)")
        self._hidden = int(hidden)

    def bottleneck(self) -> int:
        return max(1, int(self._hidden // self.reduction_factor))

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> BottleneckLayer:
        return BottleneckLayer(module, self._hidden, self.bottleneck(), self.non_linearity,
                               self.placement == "parallel", self.scaling, adapter_name)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, BottleneckLayer):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a bottleneck adapter to it")
        layer.add_adapter(adapter_name, self.bottleneck(), self.non_linearity, self.placement == "parallel", self.scaling)

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, BottleneckLayer)
        hidden = next(iter(layers.values())).hidden
        return own_format_dict(self.peft_type, BottleneckConfig(
            self.reduction_factor, self.non_linearity, self.placement, self.scaling, sorted(layers), None, hidden))

    @classmethod
    def from_peft(cls, raw: dict) -> "BottleneckConfig":
        # hidden_size reaches int() in prepare: 2.7 would build 2-wide adapters
        return own_format_config(cls, raw, (("reduction_factor", "number"), ("scaling", "number"), ("hidden_size", "int")))


@dataclass
class AdapterFusionConfig:
    """Settings for ``inject(model, AdapterFusionConfig(adapters=[...]), "fusion")``.

    Args:
        adapters: names of bottleneck adapters already in the model (at least two).
        temperature: softmax temperature ``T``.
    Raises:
        ValueError: fewer than two adapters, non-positive temperature; at inject time, adapters
            the model lacks.
    """

    peft_type = "ALIGNLAB_FUSION"

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.adapters = _check_fusion_adapters(self.adapters)
        self.temperature = check_positive_number(self.temperature, "temperature")

    def find_targets(self, model: nn.Module) -> list[str]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}
        names = [n for n, m in layers.items() if all(a in m.adapter_down for a in self.adapters)]
        if not names:
            present = sorted({a for m in layers.values() for a in m.adapter_down})
            raise ValueError(f"no block holds all of {self.adapters}; bottleneck adapters in this model: {present}")
        return names

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> nn.Module:
        raise ValueError(f"module {name!r} has no bottleneck adapters to fuse")

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, BottleneckLayer):
            raise ValueError(f"module {name!r} holds a {type(layer).__name__}, not bottleneck adapters")
        layer.add_fusion(adapter_name, self.adapters, self.temperature)

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        return own_format_dict(self.peft_type, self)

    @classmethod
    def from_peft(cls, raw: dict) -> "AdapterFusionConfig":
        return own_format_config(cls, raw, (("temperature", "number"),))


def fused_parameters(hidden: int) -> int:
    """Fusion parameters per block: ``3·(hidden² + hidden)``."""
    return 3 * (hidden * hidden + hidden)


def bottleneck_parameters(hidden: int, reduction_factor: float) -> int:
    """Adapter parameters per block: ``2·hidden·m + m + hidden``, ``m = hidden // reduction_factor``."""
    m = max(1, int(hidden // reduction_factor))
    return 2 * hidden * m + m + hidden


__all__ = ["AdapterFusionConfig", "BottleneckConfig", "BottleneckLayer", "FusionLayer", "bottleneck_parameters",
           "fused_parameters"]
