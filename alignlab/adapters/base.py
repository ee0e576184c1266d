"""What every adapter layer shares: a frozen base module plus named adapters.

An :class:`AdapterLayer` wraps one leaf module (``base_layer``) of the user's
model. It holds any number of named adapters, of which a subset is *active*;
it can be *disabled* (then it runs the base alone, e.g. as the DPO reference
policy) and, where the method allows, *merged* into the base weight.
Injection, save/load and the model-level helpers in ``inject.py`` only talk to
this interface, so every adapter family plugs into the same machinery.
"""

from __future__ import annotations

import abc
import copy
import itertools
import sys
import warnings
from typing import Iterable

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError


def hf_embedding(model: nn.Module, getter: str = "get_input_embeddings") -> nn.Module | None:
    """``model.get_input_embeddings()`` (or another ``getter`` of transformers' models), or None where the model has
    no such method or it cannot name one module (a two-tower model such as ``CLIPModel`` raises
    ``NotImplementedError``, which leaked out of the callers that asked)."""
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    try:
        return get()
    except (AttributeError, NotImplementedError):
        return None


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (GPT-2, GPT, ...): a linear map whose
    weight is stored transposed, ``(in, out)``, computing ``y = x W + b``.

    Looked up in ``sys.modules`` so that alignlab never imports ``transformers`` itself: a model
    holding a ``Conv1D`` has imported it already.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Whether adapters of the linear families can wrap ``module``: ``nn.Linear``, a quantized
    linear (e.g. ``NF4Linear``) or ``transformers``' ``Conv1D`` (or an adapter layer that passes such a
    base's weight through, see :func:`weight_holder`)."""
    module = weight_holder(module)
    return isinstance(module, nn.Linear) or is_quantized(module) or is_conv1d(module)


def weight_holder(base: nn.Module) -> nn.Module:
    """The module holding the weight an adapter over ``base`` reads and writes: ``base`` itself, or the linear
    inside an adapter layer that passes its base's weight through (``passes_base_weight``: trainable token rows
    under a LoRA on a tied output head, as PEFT nests them)."""
    while isinstance(base, AdapterLayer) and base.passes_base_weight:
        base = base.base_layer
    return base


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (see :func:`is_linear_like`)."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def fan_in_fan_out(layers: Iterable[nn.Module]) -> bool:
    """PEFT's ``fan_in_fan_out`` for a saved adapter: True where an adapted base is a ``Conv1D``.

    PEFT derives the flag from each layer's type when it builds the layer (and corrects a config
    that says otherwise, with a warning), so alignlab writes the value PEFT would and ignores it
    when reading: the adapter tensors are ``(…, in)`` / ``(out, …)`` for either storage.
    """
    return any(is_conv1d(getattr(layer, "base_layer", layer)) for layer in layers)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense ``(out, in)`` tensor, whatever its storage.

    ``nn.Linear`` returns its parameter; a quantized base (e.g. ``NF4Linear``) returns a
    dequantized temporary through its ``dequantize()`` method; a ``Conv1D`` (weight stored
    ``(in, out)``) returns a contiguous transposed copy (a temporary too: write back with
    :func:`set_dense_weight_`). Through an adapter layer that passes its base's weight, that base's
    (:func:`weight_holder`).
    """
    base = weight_holder(base)
    if hasattr(base, "dequantize"):
        return base.dequantize()
    if is_conv1d(base):
        return base.weight.T.contiguous()
    return base.weight


def merge_weight(base: nn.Module) -> torch.Tensor:
    """The base weight a merge adds to, ``(out, in)``: :func:`dense_weight`, except that a quantized base is
    dequantized in fp32 (its exact values) rather than its compute dtype, so that ``W + ΔW`` is rounded once,
    by the re-quantization (a bf16 copy would round the base, the sum and the block maxima first)."""
    return base.dequantize(torch.float32) if is_quantized(base) else dense_weight(base)


def refuse_float16_merge(merged: torch.Tensor, inputs: Iterable[torch.Tensor], adapter_name: str, where: str = "") -> None:
    """``ValueError`` if a merge into a float16 base gave an inf that none of ``inputs`` (the base weight,
    the adapter's tensors) had: ``W + ΔW`` is formed in fp32 and can leave float16's range (±65504), and
    the rounding would write inf into the model. Checked before anything is written, with the same check
    (and wording) as the merge methods of :mod:`alignlab.merging`."""
    from alignlab.merging.methods import _refuse_float16_inf  # not at import time: keeps `import alignlab.adapters` light

    _refuse_float16_inf(merged, inputs, f"merging adapter {adapter_name!r}{where}",
                        "merge into a bfloat16 (float32's range) or float32 copy of the base, or check the adapter's "
                        "weights / scale")


def is_quantized(base: nn.Module) -> bool:
    return hasattr(base, "dequantize") and hasattr(base, "load_dense_weight_")


def set_dense_weight_(base: nn.Module, weight: torch.Tensor) -> None:
    """Write a dense ``(out, in)`` weight back into the base (re-quantizing a quantized base,
    transposing into a ``Conv1D``'s ``(in, out)`` storage)."""
    base = weight_holder(base)
    if is_quantized(base):
        base.load_dense_weight_(weight)
    else:
        with torch.no_grad():
            base.weight.copy_(weight.T if is_conv1d(base) else weight)


# Layers hold their adapters by name in ModuleDict / ParameterDict entries, which torch refuses to register
# under a name the dict already has as an attribute ("half", "train", "keys", ...).
_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))


def check_adapter_name(name: str) -> None:
    """:class:`~alignlab.ArgumentTypeError` unless ``name`` is a str; ``ValueError`` for an empty one, one holding a
    ``.`` (a module path separator) or naming an attribute of the dicts that hold the adapters."""
    if not isinstance(name, str) or not name or "." in name:
        kind = ValueError if isinstance(name, str) else ArgumentTypeError
        raise kind(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in _DICT_ATTRIBUTES:
        raise ValueError(f"adapter name {name!r} is an attribute of torch's ModuleDict / ParameterDict, which hold "
                         "the adapters by name; pick another name")


class AdapterLayer(nn.Module, abc.ABC):
    """Base class: ``base_layer`` + named adapters; subclasses add the math.

    The bookkeeping every family shares lives here: a subclass declares its per-adapter containers
    in ``adapter_stores`` (``{attribute: nn.ModuleDict | nn.ParameterDict | dict}``, keyed by adapter
    name; the first holds every adapter, the others may hold some), which the constructor creates,
    and gets :meth:`adapter_names` and :meth:`delete_adapter`; ``add_adapter`` starts with
    :meth:`_check_new_adapter` and allocates with :meth:`_adapter_dtype_device`. An additive
    family (``y = base(x) + Σ Δ_name(x)``) only defines :meth:`delta_output`; others override
    ``forward``.
    """

    #: subclasses that wrap a single linear map set this; other bases then raise ``TypeError``
    linear_base = False
    #: a layer another adapter may wrap in place of its linear base, reading and writing that base's weight
    #: (see :func:`weight_holder`)
    passes_base_weight = False
    #: the per-adapter containers, ``{attribute: container type}``, the first holding every adapter
    adapter_stores: dict[str, type] = {}

    def __init__(self, base_layer: nn.Module) -> None:
        if self.linear_base and not is_linear_like(base_layer):
            raise TypeError("base must be nn.Linear, a quantized linear (e.g. NF4Linear) or transformers' Conv1D, "
                            f"got {type(base_layer).__name__}")
        super().__init__()
        for p in base_layer.parameters():  # the base is frozen; only adapter parameters train
            p.requires_grad_(False)
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        for attr, kind in self.adapter_stores.items():
            setattr(self, attr, kind())

    @property
    def in_features(self) -> int:
        return linear_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.base_layer)[1]

    #: whether ``layer.weight`` reads through to the base layer's weight; every family wrapping one linear map
    #: (``linear_base``) does, and BitFit, which leaves the weight as it is
    exposes_base_weight = False

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's own frozen weight (not ``W + ΔW``), as PEFT's layers expose it.

        Model code reads a linear's ``.weight`` for its dtype: T5's feed-forward (also mT5, UMT5, LongT5,
        Switch, Pix2Struct, ...) casts its input to ``self.wo.weight.dtype`` in every forward, so without this an
        adapter on ``wo`` (PEFT's default (IA)³ target on T5, or ``"all-linear"``) failed with ``AttributeError``.
        Code that *computes* with it bypasses the adapter, as it does with PEFT. Layers that exist to change an
        embedding or output table (embedding LoRA, trainable token rows, a tied LoRA head), block wrappers and
        any adapter on the model's output head (``output_head``, set by ``inject``) do not expose it:
        ``AttributeError``, so that e.g. ``fused_linear_dpo(h, model.lm_head.weight, ...)`` on an adapted head
        fails instead of silently using the frozen table.
        """
        # an AttributeError here reaches nn.Module.__getattr__, which raises its own "has no attribute 'weight'"
        if not (self.linear_base or self.exposes_base_weight) or getattr(self, "output_head", False):
            raise AttributeError("weight")
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds (the keys of the first of ``adapter_stores``)."""
        return list(self._first_store().keys())

    def _first_store(self):
        if not self.adapter_stores:
            raise NotImplementedError(f"{type(self).__name__} declares no adapter_stores: it must define adapter_names")
        return getattr(self, next(iter(self.adapter_stores)))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from every one of ``adapter_stores`` (raises ``ValueError`` if absent or merged)."""
        self._check_name(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        for attr in self.adapter_stores:
            store = getattr(self, attr)
            if name in store:
                del store[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _check_new_adapter(self, name: str) -> None:
        """Refuse a malformed or taken name, or adding while merged (``ValueError``)."""
        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged:
            raise ValueError("cannot add an adapter while adapters are merged; unmerge first")

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device | None]:
        """Dtype and device of new adapter tensors: the base's device, and its dtype where that is
        fp32/fp64; fp32 master weights over a 16-bit or quantized base (as PEFT keeps them)."""
        # a quantized base may hold only buffers (packed uint8 weights): take the device from either
        ref = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers()), None)
        if ref is None:
            return torch.float32, None
        full = ref.dtype in (torch.float32, torch.float64) and not is_quantized(self.base_layer)
        return (ref.dtype if full else torch.float32), ref.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ delta_output(name, x)`` over the active, unmerged adapters; ``(..., in) -> (..., out)``."""
        out = self.base_layer(x)
        if self.disabled:
            return out
        result, held = out, self._first_store()
        for name in self.active_adapters:
            if name in held and name not in self.merged_adapters:
                result = result + self.delta_output(name, x)
        return result.to(out.dtype)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output (additive families)."""
        raise NotImplementedError(f"{type(self).__name__} defines its own forward")

    #: whether ``merge`` can fold this method into the base; additive methods only define ``delta_weight``
    mergeable = False

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base, each in fp32 (fp64 for an fp64 base and
        adapter) with one rounding.

        Raises:
            ValueError: the method is not mergeable, an adapter is unknown or already merged,
                or adapters are disabled; a float16 base whose merged values would leave float16's
                range (inf) — that adapter is not merged, those before it in ``adapter_names`` stay merged.
        """
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} adapters cannot be merged into the base weight")
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for name in names:
            self._check_name(name)
            if name in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is already merged; merging twice would apply it twice")
        if self.disabled:
            raise ValueError("cannot merge while adapters are disabled")
        self._check_mergeable(names)
        if is_quantized(self.base_layer):
            # the default filter shows a location's warning once (once per calling line, not per layer)
            warnings.warn("merging into a quantized base re-quantizes W + ΔW, so the merged layer differs from "
                          "base + adapter by that rounding; unmerge() puts the packed weight from before the "
                          "merge back exactly", UserWarning, stacklevel=2)
        if not self.merged_adapters:
            self._premerge_weight = self._base_snapshot()
        with torch.no_grad():
            for name in names:
                self._merge_one(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo ``merge``, last merged first (exact up to one rounding of the base dtype; exact for a
        quantized base, whose packed weight from before the merge is restored). After a ``load_state_dict`` that
        changed the merged layer, the loaded adapter is taken out of the loaded base (a DoRA adapter refuses:
        ``ValueError``)."""
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} adapters cannot be unmerged")
        if not self.merged_adapters:
            raise ValueError("no adapter is merged; nothing to unmerge")
        snapshot = getattr(self, "_premerge_weight", None)
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                if snapshot is None:
                    self._unmerge_one(name)  # may refuse (DoRA rows a merge zeroed): the adapter stays merged
                else:
                    self._forget_merge(name)
                self.merged_adapters.pop()
            if snapshot is not None:
                self._restore_base(snapshot)
                self._premerge_weight = None

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # torch calls this before the children load, so they still hold what the merge wrote. A state that changes
        # a merged layer is read as a merged one (as PEFT does): unmerge then takes the loaded adapter out of the
        # loaded base, and what the merge kept for the old weights (a quantized base's packed weight, DoRA's row
        # norms) is dropped; restoring the old base under a new state gave a model neither state describes
        if self.merged_adapters and self._state_changes(state_dict, prefix):
            self._premerge_weight = None
            for name in self.merged_adapters:
                self._forget_merge(name)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _state_changes(self, state_dict, prefix: str) -> bool:
        """Whether loading ``state_dict`` would change a tensor this layer (base included) holds."""
        for key, held in self.state_dict(prefix=prefix, keep_vars=True).items():
            new = state_dict.get(key)
            if isinstance(new, torch.Tensor) and isinstance(held, torch.Tensor) and (
                    new.shape != held.shape or not torch.equal(new.to(held.device, held.dtype), held.detach())):
                return True
        return False

    def _base_snapshot(self):
        """What ``unmerge`` puts back instead of subtracting, or None: a quantized base cannot be un-merged
        by arithmetic (re-quantizing W + ΔW − ΔW moves the codes), so its packed weight from before the
        first merge is kept (0.5 byte a weight)."""
        return self.base_layer.quant_weight if hasattr(self.base_layer, "quant_weight") else None

    def _restore_base(self, snapshot) -> None:
        """Put back what :meth:`_base_snapshot` kept."""
        self.base_layer.load_quant_weight_(snapshot)

    def _forget_merge(self, name: str) -> None:
        """Drop what ``_merge_one`` kept for undoing ``name`` (when the base is restored wholesale)."""

    def delta_weight(self, name: str) -> torch.Tensor:
        """The additive update ``ΔW`` of adapter ``name`` in fp32, ``(out, in)`` (additive methods)."""
        raise ValueError(f"{type(self).__name__} adapters have no additive weight update")

    def _check_mergeable(self, names: list[str]) -> None:
        """Method-specific refusals, raised before anything is changed."""

    def _merge_one(self, name: str) -> None:
        snapshot, earlier = getattr(self, "_premerge_weight", None), self.merged_adapters
        if snapshot is not None and earlier and all(map(self._merges_additively, earlier)):
            # a quantized base: its packed weight from before the first merge plus every merged ΔW, quantized
            # once; adding to the re-quantized weight rounded to NF4 once more per adapter merged
            delta = sum(self.delta_weight(n) for n in earlier) + self.delta_weight(name)
            w = snapshot.to(delta.device).dequantize(torch.float32)
        else:
            w = merge_weight(self.base_layer)
            delta = self.delta_weight(name)
        merged = (w + delta).to(w.dtype)  # in fp32 at least (delta is): an fp64 base is not rounded to fp32
        refuse_float16_merge(merged, (w, delta), name)
        set_dense_weight_(self.base_layer, merged)

    def _merges_additively(self, name: str) -> bool:
        """Whether merging ``name`` added ``delta_weight(name)`` to the base (:meth:`_merge_one` as written here)."""
        return True

    def _unmerge_one(self, name: str) -> None:
        w = dense_weight(self.base_layer)
        set_dense_weight_(self.base_layer, (w - self.delta_weight(name)).to(w.dtype))

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names()]

    def _check_name(self, name: str) -> None:
        if name not in self.adapter_names():
            raise ValueError(f"adapter {name!r} not found; this layer has {self.adapter_names()}")


class SavedModule(nn.Module):
    """A module trained in full next to the adapters (PEFT's ``modules_to_save``).

    Keeps the original module frozen and one trainable copy per adapter name, so
    ``disabled()`` and switching adapters still see the untouched original.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def running_module(self) -> nn.Module:
        """The module forward runs: the first active adapter's copy, else (disabled, none active) the original."""
        copies = self._modules["modules_to_save"]
        if not self.disabled:
            for name in self.active_adapters:
                if name in copies:
                    return copies[name]
        return self._modules["original_module"]

    def forward(self, *args, **kwargs):
        return self.running_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Model code reads attributes of the wrapped module (``lm_head.weight``, e.g. for a fused loss); as in
        # PEFT they are those of the module forward runs, so a loss built from them trains the active copy.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "disabled" not in self.__dict__:   # still in __init__ (or being unpickled)
                return getattr(self._modules["original_module"], name)
            return getattr(self.running_module(), name)
