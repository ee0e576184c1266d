"""(IA)³: learned rescaling vectors on a frozen linear layer's output or input.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv 2205.05638. A vector ``l`` rescales activations::

    y = l ⊙ (W x + b)          attention keys / values (``l``: (out,))
    y = W (l ⊙ x) + b          feed-forward modules     (``l``: (in,))

``l`` starts at ones, so the adapted model starts equal to the base. Both forms
fold into the weight (``W ← diag(l) W``, ``b ← l ⊙ b``; or ``W ← W diag(l)``),
so (IA)³ is mergeable. Trainable parameters: ``Σ out`` over the key/value
modules plus ``Σ in`` over the feed-forward ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from alignlab.adapters.base import AdapterLayer, fan_in_fan_out, merge_weight, refuse_float16_merge, set_dense_weight_
from alignlab.adapters.config import (_compile, _is_str_list, as_bool, check_modules_to_save, check_target_spec, check_task_type,
                                      name_matches, task_type_from_file, with_task_heads)
from alignlab.adapters.inject import _candidates, layer_targets, layers_holding
from alignlab.adapters.io import peft_header, peft_targets, refuse_unsupported


class IA3Linear(AdapterLayer):
    """A linear layer with named (IA)³ vectors; see the module docstring for the math.

    Args:
        base: ``nn.Linear`` (or quantized linear) ``(..., in) -> (..., out)``; frozen.
        feedforward: scale the input (``l``: ``(in,)``) instead of the output (``l``: ``(out,)``).
        adapter_name: name of the first adapter.
        init_ones: start at ``l = 1`` (identity); ``False`` draws ``l ~ N(0, 1)`` (for tests).
    Raises:
        TypeError: ``base`` is not a linear layer; ``feedforward`` or ``init_ones`` is neither a bool nor a NumPy bool.
    """

    mergeable = True
    linear_base = True
    adapter_stores = {"ia3_l": nn.ParameterDict}

    def __init__(self, base: nn.Module, feedforward: bool = False, adapter_name: str = "default", init_ones: bool = True) -> None:
        super().__init__(base)
        self.feedforward = as_bool(feedforward, "feedforward")  # "no" would scale the input instead of the output
        self.add_adapter(adapter_name, init_ones)
        self.active_adapters = [adapter_name]

    def add_adapter(self, name: str, init_ones: bool = True) -> None:
        self._check_new_adapter(name)
        init_ones = as_bool(init_ones, "init_ones")
        dtype, device = self._adapter_dtype_device()
        n = self.in_features if self.feedforward else self.out_features
        init = torch.ones(n, device=device, dtype=dtype) if init_ones else torch.randn(n, dtype=dtype).to(device)
        self.ia3_l[name] = nn.Parameter(init)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        # PEFT stores (out, 1) for output scaling and (1, in) for input scaling
        vec = self.ia3_l[name]
        return {"ia3_l": vec.view(1, -1) if self.feedforward else vec.view(-1, 1)}

    def _scale(self, names: list[str]) -> torch.Tensor | None:
        scale = None
        for name in names:
            scale = self.ia3_l[name] if scale is None else scale * self.ia3_l[name]
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)``."""
        if self.disabled:
            return self.base_layer(x)
        names = [n for n in self.active_adapters if n in self.ia3_l and n not in self.merged_adapters]
        scale = self._scale(names)
        if scale is None:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)

    def _check_mergeable(self, names: list[str]) -> None:
        for name in names:
            if bool((self.ia3_l[name] == 0).any()):
                raise ValueError(f"adapter {name!r} has zero entries in l; merging it could not be undone")

    def _merge_one(self, name: str) -> None:
        """Fold ``l`` into the weight (and bias for output scaling), in fp32 (fp64 for fp64), rounding once."""
        self._rescale_base(self._wide_l(name), name)

    def _unmerge_one(self, name: str) -> None:
        self._rescale_base(1.0 / self._wide_l(name), name)

    def _wide_l(self, name: str) -> torch.Tensor:
        l = self.ia3_l[name].detach()
        return l.to(torch.promote_types(l.dtype, torch.float32))

    def _base_snapshot(self):
        """``(packed weight, bias)`` of a quantized base from before the first merge, else None: output scaling
        rescales the bias too, and restoring the packed weight alone left the bias multiplied by ``l``."""
        packed = super()._base_snapshot()
        if packed is None:
            return None
        bias = getattr(self.base_layer, "bias", None)
        return packed, None if bias is None or self.feedforward else bias.detach().clone()

    def _restore_base(self, snapshot) -> None:
        packed, bias = snapshot
        super()._restore_base(packed)
        if bias is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(bias)

    def _rescale_base(self, factor: torch.Tensor, name: str) -> None:
        """Scale the base's rows (or columns) by ``factor``; a float16 result beyond float16's range is refused
        before anything is written (``ValueError``, as for the additive families): it would round to inf."""
        w = merge_weight(self.base_layer)  # an NF4 base in fp32: the re-quantization is the one rounding
        new = (w * (factor[None, :] if self.feedforward else factor[:, None])).to(w.dtype)  # in factor's precision
        refuse_float16_merge(new, (w, factor), name)
        bias = getattr(self.base_layer, "bias", None)
        new_bias = None
        if bias is not None and not self.feedforward:
            new_bias = (bias * factor).to(bias.dtype)
            refuse_float16_merge(new_bias, (bias, factor), name, " (bias)")
        set_dense_weight_(self.base_layer, new)
        if new_bias is not None:
            with torch.no_grad():
                bias.copy_(new_bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, feedforward={self.feedforward}, adapters={self.adapter_names()}, active={self.active_adapters}"


DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")


@dataclass
class IA3Config:
    """Settings for ``inject(model, IA3Config(...))``.

    Args:
        target_modules: linear modules to rescale (forms as in ``LoRAConfig``); default: the
            paper's keys, values and the FFN down projection of Llama-style models (each must exist).
        feedforward_modules: the subset of targets whose *input* is rescaled (names/suffixes or regex).
        exclude_modules: targets to skip.
        init_ones: ``l = 1`` at the start (identity). ``False`` draws random vectors.
        modules_to_save: modules trained in full next to the vectors, as in ``LoRAConfig`` (PEFT's files for
            sequence classifiers list the head, ``["classifier", "score"]``).
        task_type: PEFT's task type, as in ``LoRAConfig`` (``"SEQ_CLS"`` etc. also train the model's head).
    Raises:
        TypeError/ValueError: malformed target specs, feedforward modules that are not targets, or
            an ``init_ones`` that is not a bool.
    """

    peft_type = "IA3"

    target_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] = field(default_factory=lambda: ["down_proj"])
    exclude_modules: str | list[str] | None = None
    init_ones: bool = True
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        self.task_type = check_task_type(self.task_type)
        self._default_targets = self.target_modules is None
        if self._default_targets:
            self.target_modules = list(DEFAULT_TARGETS)
        check_target_spec(self.target_modules, self.exclude_modules)
        self.init_ones = as_bool(self.init_ones, "init_ones")
        if isinstance(self.feedforward_modules, str):
            _compile("feedforward_modules", self.feedforward_modules)
        elif not _is_str_list(self.feedforward_modules):
            raise TypeError(f"feedforward_modules must be a regex string or a list of names, got {self.feedforward_modules!r}")
        if _is_str_list(self.feedforward_modules) and _is_str_list(self.target_modules):
            extra = [f for f in self.feedforward_modules
                     if not any(f == t or f.endswith("." + t) or t.endswith("." + f) for t in self.target_modules)]
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; {extra} are not targets")

    def find_targets(self, model: nn.Module) -> list[str]:
        names = layer_targets(model, self)
        if self._default_targets:
            # the paper's keys, values and FFN output under Llama's names: on OPT ("fc2") the FFN vectors
            # would be missing without a word
            linears = [n for n, _ in _candidates(model)]
            missing = [t for t in self.target_modules if not any(name_matches([t], n) for n in linears)]
            if missing and names:
                raise ValueError(f"the default target_modules {self.target_modules} are Llama-style and this model has "
                                 f"no {missing}: pass target_modules= and feedforward_modules= with its names")
        return names

    def is_feedforward(self, name: str) -> bool:
        spec = self.feedforward_modules
        return bool(spec) and name_matches(spec if isinstance(spec, str) else list(spec), name)

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> IA3Linear:
        return IA3Linear(module, self.is_feedforward(name), adapter_name, self.init_ones)

    def prepare(self, model: nn.Module, targets: list[str], adapter_name: str) -> None:
        """Refuse, before any layer changes, a target that already holds (IA)³ vectors on the other side: a layer
        scales its input or its output for all its adapters, so the new vector would silently scale the side
        the first adapter chose (a square layer) or fail to load (another length)."""
        for name in targets:
            layer = model.get_submodule(name)
            if isinstance(layer, IA3Linear) and layer.feedforward != self.is_feedforward(name):
                sides = ("input", "output") if layer.feedforward else ("output", "input")
                raise ValueError(f"module {name!r} already holds (IA)³ adapters {layer.adapter_names()} scaling its "
                                 f"{sides[0]}, and adapter {adapter_name!r} would scale its {sides[1]} (feedforward_modules): "
                                 "a layer scales one side for all its adapters; use the same feedforward_modules")

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, IA3Linear):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add an IA3 adapter to it")
        layer.add_adapter(adapter_name, self.init_ones)

    # -- PEFT format --------------------------------------------------------------------------------
    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, IA3Linear)
        return {
            **peft_header("IA3"), "task_type": self.task_type,
            "target_modules": sorted(layers),
            "feedforward_modules": sorted(n for n, l in layers.items() if l.feedforward),
            "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out(layers.values()), "modules_to_save": with_task_heads(model, self), "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, raw: dict) -> "IA3Config":
        config = cls(target_modules=peft_targets(raw),
                     feedforward_modules=peft_targets(raw, "feedforward_modules", required=False) or [],
                     exclude_modules=raw.get("exclude_modules"), modules_to_save=raw.get("modules_to_save") or None)
        return task_type_from_file(config, raw)

