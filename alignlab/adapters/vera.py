"""VeRA: vector-based random matrix adaptation.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454.
One pair of frozen random matrices ``A (r, in_max)`` and ``B (out_max, r)`` is shared
by every adapted layer; each layer trains only two scaling vectors::

    y = W x + b + Λ_b B Λ_d A x,      Λ_b = diag(b) (out,),  Λ_d = diag(d) (r,)

where a layer uses the top-left ``(r, in)`` / ``(out, r)`` slices of the shared
matrices. ``b`` starts at zero (identity at the start), ``d`` at ``d_initial``.
``A`` and ``B`` are Kaiming-uniform draws from a generator seeded with
``projection_prng_key``, so they can be regenerated instead of stored.
Trainable parameters per layer: ``out + r``. Mergeable: ``ΔW = Λ_b B Λ_d A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignlab._checks import is_int
from alignlab.adapters.base import AdapterLayer, fan_in_fan_out, linear_features
from alignlab.adapters.config import (check_dropout, check_nonzero_number, check_modules_to_save, check_positive_int, check_target_spec,
                                      check_task_type, task_type_from_file, with_task_heads)
from alignlab.adapters.inject import layers_holding
from alignlab.adapters.io import peft_field, peft_header, peft_targets, refuse_unsupported

PREFIX = "base_model."


def _check_seed(seed, arg: str) -> int:
    """``seed`` as a Python int in the range ``torch.Generator.manual_seed`` takes, ``[-2⁶³, 2⁶⁴)``: a larger one
    failed when the projections were drawn, with torch's 'Overflow when unpacking long long' naming nothing."""
    if not is_int(seed):
        raise TypeError(f"{arg} must be an int seed, got {seed!r}")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"{arg} must be in [-2**63, 2**64) (torch.Generator's seed range), got {seed!r}")
    return int(seed)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator, device=None) -> torch.Tensor:
    bound = math.sqrt(6.0 / shape[1])  # gain √2, fan_in = shape[1]: bound = √3·√2/√fan_in
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)


# why d_initial = 0 is refused (VeRALinear and VeRAConfig)
_ZERO_D = "b starts at 0, so with d = 0 too the adapter adds nothing and neither vector gets a gradient, ever"


class VeRAProjections(nn.Module):
    """The frozen shared matrices ``A (r, in_max)`` and ``B (out_max, r)`` (buffers, not saved in ``state_dict``:
    ``seed`` gives them). Built on the ``meta`` device (deferred init), they are drawn again from ``seed`` when the
    module leaves it (``to_empty``, as FSDP2's deferred init does too), since no state dict brings them back.

    Raises ``ValueError`` naming the argument unless ``r``, ``in_max`` and ``out_max`` are positive ints (``r = 0``
    divided by zero in the Kaiming bound) and ``seed`` an int in ``[-2⁶³, 2⁶⁴)`` (``TypeError`` for a non-int).
    """

    def __init__(self, r: int, in_max: int, out_max: int, seed: int) -> None:
        super().__init__()
        r, in_max, out_max = (check_positive_int(v, a) for v, a in ((r, "r"), (in_max, "in_max"), (out_max, "out_max")))
        self.seed = _check_seed(seed, "seed")
        a, b = self._draw(r, in_max, out_max, None)
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)

    def _draw(self, r: int, in_max: int, out_max: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` then ``B`` from one stream seeded by ``seed`` (on ``device``; None: the default device)."""
        g = torch.Generator().manual_seed(self.seed)
        return _kaiming_uniform((r, in_max), g, device), _kaiming_uniform((out_max, r), g, device)

    def _apply(self, fn, recurse=True):
        # leaving meta, the projections are drawn again; so are they at a later move while they still hold the values
        # drawn then (version counters unchanged: the same values a move would carry): the module is shared by the
        # adapted layers, so to_empty's recursion reaches it once per layer, and each visit after the first turns the
        # drawn tensors into uninitialized ones again. Values written since (a loaded vera_A / vera_B) just move
        a, b, drawn = self.A, self.B, self.__dict__.get("_drawn")
        redraw = a.is_meta or (drawn is not None and drawn[0] is a and drawn[2] is b
                               and (drawn[1], drawn[3]) == (a._version, b._version))
        out = super()._apply(fn, recurse)
        if redraw and not self.A.is_meta:
            a, b = self._draw(self.A.shape[0], self.A.shape[1], self.B.shape[0], "cpu")
            with torch.no_grad():
                self.A.copy_(a)
                self.B.copy_(b)
            self.__dict__["_drawn"] = (self.A, self.A._version, self.B, self.B._version)
        else:  # never drawn again (nor keeping the tensors it names alive)
            self.__dict__.pop("_drawn", None)
        return out


class VeRALinear(AdapterLayer):
    """A linear layer with VeRA adapters; see the module docstring for the math.

    Args:
        base: ``nn.Linear`` ``(..., in) -> (..., out)``; frozen.
        projections: the shared :class:`VeRAProjections` (at least ``in``/``out`` wide, ``r`` rows).
        r: rank (``≤`` the projections' rank).
        dropout: dropout on the adapter input.
        d_initial: initial value of ``d``.
        adapter_name: name of the first adapter.
    Raises:
        TypeError/ValueError: not a linear base, projections too small, a rank that is not a positive int, a
            dropout outside ``[0, 1)``, a ``d_initial`` that is not a finite non-zero number (the checks of
            :class:`VeRAConfig`, so a layer built by hand is held to them too).
    """

    mergeable = True
    linear_base = True
    adapter_stores = {"vera_lambda_b": nn.ParameterDict, "vera_lambda_d": nn.ParameterDict, "vera_dropout": nn.ModuleDict,
                      "projections": nn.ModuleDict, "r": dict}

    def __init__(self, base: nn.Module, projections: VeRAProjections, r: int, dropout: float = 0.0,
                 d_initial: float = 0.1, adapter_name: str = "default") -> None:
        super().__init__(base)
        self.add_adapter(adapter_name, projections, r, dropout, d_initial)
        self.active_adapters = [adapter_name]

    def add_adapter(self, name: str, projections: VeRAProjections, r: int, dropout: float = 0.0, d_initial: float = 0.1) -> None:
        self._check_new_adapter(name)
        r = check_positive_int(r, "r")
        dropout = check_dropout(dropout)
        d_initial = check_nonzero_number(d_initial, "d_initial", _ZERO_D)
        if projections.A.shape[1] < self.in_features or projections.B.shape[0] < self.out_features or projections.A.shape[0] < r:
            raise ValueError(f"shared projections A{tuple(projections.A.shape)}, B{tuple(projections.B.shape)} are too small "
                             f"for a ({self.out_features}, {self.in_features}) layer of rank {r}")
        dtype, device = self._adapter_dtype_device()
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=dtype))
        self.vera_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projections[name] = projections.to(device)
        self.r[name] = r

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b[name], "vera_lambda_d": self.vera_lambda_d[name]}

    def _factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        proj, r = self.projections[name], self.r[name]
        return proj.A[:r, : self.in_features].to(dtype), proj.B[: self.out_features, :r].to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``Λ_b B Λ_d A`` in fp32 (fp64 for fp64 vectors), ``(out, in)``."""
        self._check_name(name)
        dt = torch.promote_types(self.vera_lambda_b[name].dtype, torch.float32)
        a, b = self._factors(name, dt)
        lb, ld = self.vera_lambda_b[name].to(dt), self.vera_lambda_d[name].to(dt)
        return (lb[:, None] * b) @ (ld[:, None] * a)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``Λ_b B Λ_d A dropout(x)``: ``x (..., in) -> (..., out)`` in the adapter dtype."""
        lb, ld = self.vera_lambda_b[name], self.vera_lambda_d[name]
        a, b = self._factors(name, lb.dtype)
        h = self.vera_dropout[name](x.to(lb.dtype))
        return lb * F.linear(ld * F.linear(h, a), b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, active={self.active_adapters}"


@dataclass
class VeRAConfig:
    """Settings for ``inject(model, VeRAConfig(...))``.

    Args:
        r: rank of the shared projections (VeRA uses far larger ranks than LoRA, e.g. 256).
        target_modules / exclude_modules: as in ``LoRAConfig``.
        dropout: dropout on the adapter input.
        d_initial: initial value of the ``d`` vectors (``b`` starts at zero).
        projection_prng_key: seed of the shared random matrices.
        modules_to_save: modules trained in full next to the vectors, as in ``LoRAConfig``.
        task_type: PEFT's task type, as in ``LoRAConfig`` (``"SEQ_CLS"`` etc. also train the model's head).
    Raises:
        TypeError/ValueError: non-positive rank, bad dropout, a ``d_initial`` that is not a finite
            non-zero number, a ``projection_prng_key`` that is not an int in ``[-2⁶³, 2⁶⁴)``, malformed targets.
    """

    peft_type = "VERA"

    r: int = 256
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        self.task_type = check_task_type(self.task_type)
        self.r = check_positive_int(self.r, "r")
        self.dropout = check_dropout(self.dropout)
        self.d_initial = check_nonzero_number(self.d_initial, "d_initial", _ZERO_D)
        self.projection_prng_key = _check_seed(self.projection_prng_key, "projection_prng_key")
        check_target_spec(self.target_modules, self.exclude_modules)
        self._projections: VeRAProjections | None = None
        self._save_projection = True  # False for a PEFT file that relies on regenerating A and B from the seed

    def prepare(self, model: nn.Module, targets: list[str], adapter_name: str) -> None:
        """Draw the shared projections, as wide as the widest target layer."""
        shapes = []
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            in_features, out_features = linear_features(base)
            shapes.append((out_features, in_features))
        # at least 1 wide: where every target lacks inputs (or outputs) each reads an empty slice of it, and a
        # width of 0 has no Kaiming bound (PEFT divides by it: ZeroDivisionError)
        out_max, in_max = max(1, *(s[0] for s in shapes)), max(1, *(s[1] for s in shapes))
        self._projections = VeRAProjections(self.r, in_max, out_max, self.projection_prng_key)

    def _shared(self) -> VeRAProjections:
        if self._projections is None:
            raise ValueError("VeRAConfig.prepare(model, targets, name) must run before layers are built (inject does it)")
        return self._projections

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> VeRALinear:
        return VeRALinear(module, self._shared(), self.r, self.dropout, self.d_initial, adapter_name)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, VeRALinear):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a VeRA adapter to it")
        layer.add_adapter(adapter_name, self._shared(), self.r, self.dropout, self.d_initial)

    # -- PEFT format --------------------------------------------------------------------------------
    def extra_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        layers = layers_holding(model, adapter_name, VeRALinear)
        if not layers or not self._save_projection:
            return {}
        proj = next(iter(layers.values())).projections[adapter_name]
        return {f"{PREFIX}vera_A": proj.A, f"{PREFIX}vera_B": proj.B}

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, VeRALinear)
        return {
            **peft_header("VERA"), "task_type": self.task_type,
            "r": self.r, "target_modules": sorted(layers), "vera_dropout": self.dropout,
            "d_initial": self.d_initial, "projection_prng_key": self.projection_prng_key, "save_projection": self._save_projection,
            "fan_in_fan_out": fan_in_fan_out(layers.values()), "bias": "none", "modules_to_save": with_task_heads(model, self), "init_weights": True,
            "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def from_peft(cls, raw: dict) -> "VeRAConfig":
        refuse_unsupported(raw, "VeRA", (("bias", "none"), ("layers_to_transform", None)))
        config = cls(r=peft_field(raw, "r", "int"), target_modules=peft_targets(raw),
                     exclude_modules=raw.get("exclude_modules"), dropout=peft_field(raw, "vera_dropout", "number", 0.0),
                     d_initial=peft_field(raw, "d_initial", "number", 0.1),
                     projection_prng_key=peft_field(raw, "projection_prng_key", "int", 0),
                     modules_to_save=raw.get("modules_to_save") or None)
        config._save_projection = peft_field(raw, "save_projection", "bool", True)
        return task_type_from_file(config, raw)
