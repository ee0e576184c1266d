"""BitFit: train only the bias terms.

Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning
for Transformer-based Masked Language-models", arXiv 2106.10199. Every weight is
frozen; only biases move. Written as a trainable offset ``δ`` on a frozen bias::

    y = f(x) + δ,      δ ∈ R^{out}, δ = 0 at the start

which trains exactly the same function as unfreezing ``b`` (``b + δ``) but keeps the
original bias for ``disabled()`` and lets several named bias sets coexist. A module
with no bias (Llama's linears) gets a new one, so BitFit also applies to bias-free
models. Mergeable: ``b ← b + δ`` (a bias-less ``nn.Linear`` gains a bias parameter).
Trainable parameters: ``Σ out`` over the selected modules (the paper's subset
variant trains only the query and FFN-intermediate biases: select them with
``target_modules``).

PEFT has no BitFit; files use ``peft_type = "ALIGNLAB_BITFIT"`` (versioned).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from alignlab.adapters.base import AdapterLayer, is_linear_like, is_quantized, linear_features, refuse_float16_merge
from alignlab.adapters.config import check_target_spec, matching_entry, name_matches
from alignlab.adapters.inject import _output_head_names, layers_holding, modules_outside_adapters
from alignlab.adapters.io import own_format_config, own_format_dict


def _bias_size(module: nn.Module) -> int | None:
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter):
        return bias.numel()
    if is_linear_like(module):
        return linear_features(module)[1]
    return None


class BitFitLayer(AdapterLayer):
    """Any module with a bias, plus named trainable bias offsets added where the module adds its bias.

    Args:
        base: a module with a ``bias`` parameter (``nn.Linear``, ``nn.LayerNorm``, ...) or a
            bias-less ``nn.Linear``; frozen. Output ``(..., out)``, or ``(N, C, *)`` for a convolution or a
            batch / group / instance norm, whose offsets are per channel as their biases are.
        adapter_name: name of the first bias set.
    Raises:
        TypeError: the module has neither a bias nor ``out_features``.
    """

    mergeable = True
    exposes_base_weight = True  # the weight is left as it is (T5 reads ``wo.weight.dtype``)
    adapter_stores = {"bitfit_bias": nn.ParameterDict}

    def __init__(self, base: nn.Module, adapter_name: str = "default") -> None:
        size = _bias_size(base)
        if size is None:
            raise TypeError(f"BitFit needs a module with a bias or an nn.Linear, got {type(base).__name__}")
        super().__init__(base)
        self.size = size
        self._added_bias = False  # merge created the base bias (bias-less linear)
        self.add_adapter(adapter_name)
        self.active_adapters = [adapter_name]

    @property
    def out_features(self) -> int:
        return self.size

    def add_adapter(self, name: str) -> None:
        self._check_new_adapter(name)
        dtype, device = self._adapter_dtype_device()
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.size, device=device, dtype=dtype))

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"bitfit_bias": self.bitfit_bias[name]}

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        names = [n for n in self.active_adapters if n in self.bitfit_bias and n not in self.merged_adapters]
        if not names:
            return out
        delta = sum(self.bitfit_bias[n] for n in names)
        return (out + self._along_bias(delta, out)).to(out.dtype)

    def _along_bias(self, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``δ`` shaped to broadcast over ``out`` as the base adds its own bias: along the channel dim of a
        convolution or batch / group / instance norm (``(N, C, *)``; broadcast over the last dim, ``δ`` was added
        across the width, a shape error or, where width equals channels, silently wrong), as the bias's own
        shape over the last dims otherwise (linears, LayerNorm of any ``normalized_shape``)."""
        base = self.base_layer
        if isinstance(base, nn.modules.conv._ConvNd):
            return delta.view(-1, *[1] * len(base.kernel_size))
        if isinstance(base, nn.modules.instancenorm._InstanceNorm):  # (N, C, *) or unbatched (C, *)
            return delta.view(-1, *[1] * (base._get_no_batch_dim() - 1))
        if isinstance(base, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):  # (N, C, *)
            return delta.view(-1, *[1] * (out.dim() - 2))
        bias = getattr(base, "bias", None)
        return delta.view(bias.shape) if isinstance(bias, nn.Parameter) else delta

    def _check_mergeable(self, names: list[str]) -> None:
        if is_quantized(self.base_layer):
            raise ValueError("BitFit offsets cannot be merged into a quantized base")

    def _merge_one(self, name: str) -> None:
        base = self.base_layer
        bias = getattr(base, "bias", None)
        if bias is None:  # a bias-free linear gets one while merged
            w = base.weight
            bias = torch.zeros(self.size, device=w.device, dtype=w.dtype)
        new = (bias + self._wide_offset(name, bias)).to(bias.dtype)
        refuse_float16_merge(new, (bias, self.bitfit_bias[name]), name, " (bias)")  # before anything is written
        if getattr(base, "bias", None) is None:
            base.bias = nn.Parameter(new, requires_grad=False)
            self._added_bias = True
            # one warning per process (one call site): merge_and_unload then save_pretrained writes these biases, and
            # from_pretrained of a config without them (Llama: attention_bias / mlp_bias False) drops them
            warnings.warn("merging BitFit offsets into a linear without a bias gives it one; a transformers model "
                          "whose config declares none there (e.g. Llama's attention_bias / mlp_bias = False) loses "
                          "them when saved and reloaded with from_pretrained: set those config flags before "
                          "save_pretrained, or keep the BitFit adapter unmerged and save it with save_adapter",
                          UserWarning, stacklevel=2)
        else:
            base.bias.copy_(new)

    def _wide_offset(self, name: str, bias: torch.Tensor) -> torch.Tensor:
        """Offset ``name`` shaped as ``bias``, in fp32 or wider (fp64 for an fp64 bias or offset: an fp64 model
        merged through fp32 was ~1e-8 off), so the sum with ``bias`` is rounded once, to the bias dtype."""
        offset = self.bitfit_bias[name].view(bias.shape)
        return offset.to(torch.promote_types(torch.promote_types(bias.dtype, offset.dtype), torch.float32))

    def _unmerge_one(self, name: str) -> None:
        base = self.base_layer
        base.bias.copy_((base.bias - self._wide_offset(name, base.bias)).to(base.bias.dtype))
        if self._added_bias and len(self.merged_adapters) <= 1:  # the last merged one (unmerge pops it after this)
            base.bias = None
            self._added_bias = False


@dataclass
class BitFitConfig:
    """Settings for ``inject(model, BitFitConfig(...))``.

    Args:
        target_modules: ``"all-biases"`` (every module that already has a bias), ``"all-linear"``
            (every linear but the output head, adding biases where missing), a regex string or a
            list of names/suffixes (e.g. the paper's subset ``["q_proj", "up_proj"]``).
        exclude_modules: names/suffixes or regex to skip.
    Raises:
        TypeError: malformed targets.
        ValueError: (at inject) ``"all-biases"`` on a model without biases; an entry of a ``target_modules`` list
            that names a module with no bias that is not a linear either (a norm without bias, a whole block).
    """

    peft_type = "ALIGNLAB_BITFIT"

    target_modules: str | list[str] = "all-biases"
    exclude_modules: str | list[str] | None = None

    def __post_init__(self) -> None:
        check_target_spec("all-linear" if self.target_modules == "all-biases" else self.target_modules, self.exclude_modules)

    def find_targets(self, model: nn.Module) -> list[str]:
        heads = _output_head_names(model)
        if self.target_modules not in ("all-biases", "all-linear"):
            # a named module held by another family was skipped, and the error said no module matched it
            for name, layer in model.named_modules():
                if isinstance(layer, AdapterLayer) and not isinstance(layer, BitFitLayer) and layer.linear_base \
                        and name_matches(self.target_modules, name) \
                        and not (self.exclude_modules is not None and name_matches(self.exclude_modules, name)):
                    raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add BitFit "
                                     "biases to it")
        names = []
        for name, module in modules_outside_adapters(model, BitFitLayer):
            if isinstance(module, BitFitLayer):
                module = module.base_layer
            excluded = self.exclude_modules is not None and name_matches(self.exclude_modules, name)
            if _bias_size(module) is None:
                entry = matching_entry(self.target_modules, name) if isinstance(self.target_modules, list) else None
                if entry is not None and not excluded:
                    # named on purpose and silently dropped while another entry matched (e.g. Llama's RMSNorm)
                    raise ValueError(f"target_modules entry {entry!r} selects {name!r}, a {type(module).__name__} "
                                     "without a bias parameter, which BitFit cannot train (it offsets a module's bias, "
                                     "or adds one to a bias-free linear); name modules with a bias or linears instead")
                continue
            if self.target_modules == "all-biases":
                ok = isinstance(getattr(module, "bias", None), nn.Parameter)
            elif self.target_modules == "all-linear":
                ok = _bias_size(module) is not None and is_linear_like(module) \
                    and name not in heads and name.split(".")[-1] not in heads
            else:
                ok = name_matches(self.target_modules, name)
            if ok and not excluded:
                names.append(name)
        if not names and self.target_modules == "all-biases":
            raise ValueError("target_modules='all-biases': this model has no bias parameters; "
                             "use 'all-linear' or a list of modules to add trainable biases to bias-free linears")
        return names

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> BitFitLayer:
        return BitFitLayer(module, adapter_name)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, BitFitLayer):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add BitFit biases to it")
        layer.add_adapter(adapter_name)

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers = layers_holding(model, adapter_name, BitFitLayer)
        return own_format_dict(self.peft_type, BitFitConfig(target_modules=sorted(layers)))

    @classmethod
    def from_peft(cls, raw: dict) -> "BitFitConfig":
        return own_format_config(cls, raw)
