"""Put adapters into any model and manage them: inject, disable, merge, switch, combine.

Adapters wrap the model's leaves in place; the model class is never changed, so
``transformers`` models and any ``nn.Module`` tree with ``nn.Linear`` leaves work (also GPT-2's
``Conv1D`` leaves, whose weight is stored transposed).
The config of every injected adapter is kept on the model (attribute
``alignlab_adapter_configs``) for :func:`save_adapter`. A ``transformers`` model's tied-weight maps follow the
wrappers (:mod:`alignlab.adapters.tied_keys`), so its ``tie_weights()`` and ``save_pretrained`` keep working.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from alignlab._checks import check_finite_number, check_positive_int
from alignlab._ties import module_names, parameter_owners, put_module, shared_modules, untie_changes_outputs
from alignlab.adapters.base import (AdapterLayer, SavedModule, check_adapter_name, is_linear_like, is_quantized,
                                   weight_holder)
from alignlab.adapters.config import (LoRAConfig, layer_selected, matching_entry, name_matches, pattern_matches,
                                      saved_module_matches, warn_embedding_read_elsewhere, with_task_heads)
from alignlab.adapters.experts import ExpertLoRA, fused_expert_parameters
from alignlab.adapters.embedding import TrainableTokensLayer
from alignlab.adapters.lora import LoRALinear
from alignlab.adapters.resize_guard import guard_resize_token_embeddings, unguard_resize_token_embeddings
from alignlab.adapters.tied_keys import follow_adapters_in_tied_keys, forget_ties

CONFIGS_ATTR = "alignlab_adapter_configs"


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s wrapper (``OptimizedModule._orig_mod``): its names carry an
    ``_orig_mod.`` prefix, which went into the file's keys and ``target_modules`` (PEFT then matched no module,
    ``NoMatchingPeftModuleError``), and ``load_adapter`` wanted such keys from PEFT's files."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    return model


def _user_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile`` and ``DistributedDataParallel`` wrappers, in either order: the
    adapter functions read and set the adapter list on it (on the wrapper, ``set_adapter(ddp, "b")`` found no
    adapter ``'b'`` and ``adapter_configs(ddp)`` was ``{}``)."""
    from alignlab.distributed import unwrap

    return _uncompiled(unwrap(_uncompiled(model)))


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(name, layer)`` for every adapter layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def layers_holding(model: nn.Module, adapter_name: str, cls: type) -> dict[str, AdapterLayer]:
    """``{dotted name: layer}`` of the ``cls`` layers of ``model`` that hold ``adapter_name``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, cls) and adapter_name in m.adapter_names()}


def modules_outside_adapters(model: nn.Module, family: type) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for the modules of ``model`` a ``family`` config may target: not the root,
    nothing inside an adapter wrapper, and no wrapper but those of ``family`` itself (which take a
    further adapter)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or _is_inside(name, inside):
            continue
        if _is_block_wrapper(module) and not isinstance(module, family):
            inside += _adapter_children(name, module)
            continue
        if isinstance(module, (AdapterLayer, SavedModule)):
            inside.append(name)
            if not isinstance(module, family):
                continue
        yield name, module


def _is_inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_block_wrapper(module: nn.Module) -> bool:
    """An adapter layer around something other than one linear map (a bottleneck-wrapped block, an
    embedding holding soft prompts): the modules of the wrapped block stay targetable."""
    return isinstance(module, AdapterLayer) and not is_linear_like(module.base_layer)


def _adapter_children(name: str, wrapper: nn.Module) -> list[str]:
    """The wrapper's own adapter modules (a bottleneck's down/up projections, fusion layers, a prefix MLP):
    never targets, or a second family would wrap the first one's parameters."""
    return [f"{name}.{child}" if name else child for child, _ in wrapper.named_children() if child != "base_layer"]


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def _candidates(model: nn.Module, embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    """Linear leaves (and ``nn.Embedding`` leaves if ``embeddings``) and existing adapter layers,
    not looking inside adapter wrappers."""
    found, inside = [], []
    for name, module in model.named_modules():
        if _is_inside(name, inside):
            continue
        if _is_block_wrapper(module) and not (embeddings and isinstance(module.base_layer, nn.Embedding)):
            inside += _adapter_children(name, module)
            continue
        if isinstance(module, (AdapterLayer, SavedModule)):
            inside.append(name)
            if isinstance(module, AdapterLayer):
                found.append((name, module))
        elif (is_linear_like(module) or (embeddings and isinstance(module, nn.Embedding))) and name:
            found.append((name, module))
    return found


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {"lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        heads |= {n for n, m in model.named_modules() if m is head or (isinstance(m, SavedModule) and m.original_module is head)}
    return heads


def find_targets(model: nn.Module, config) -> list[str]:
    """Dotted names of the modules ``config`` selects in ``model``: what :func:`inject` would adapt (the layers its
    ``target_modules`` name, or the blocks / embedding of configs that choose their own, such as bottleneck adapters
    and prompt tuning)."""
    own_finder = getattr(config, "find_targets", None)
    return own_finder(model) if callable(own_finder) else layer_targets(model, config)


def layer_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Dotted names of the layers ``config.target_modules`` selects in ``model`` (the rule of the configs that wrap
    layers: LoRA and the other layer families)."""
    # a config that can adapt embeddings (LoRA) finds them by name; "all-linear" never picks them
    candidates = _candidates(model, embeddings=getattr(config, "adapts_embeddings", False))
    shared = shared_modules(model)
    if config.target_modules == "all-linear":
        heads = _output_head_names(model)
        names = [n for n, m in candidates if n not in heads and n.split(".")[-1] not in heads
                 and is_linear_like(getattr(m, "base_layer", m))]
    else:
        names = [n for n, m in candidates if _any_name_matches(config.target_modules, n, m, shared)]
        if getattr(config, "layers_to_transform", None) is not None:  # PEFT: suffix matches only, not exact names
            names = [n for n in names if n in config.target_modules or layer_selected(config, n)]
    experts = getattr(config, "expert_parameters", None)  # MoE blocks whose fused expert weights it adapts
    names += [n for n in (experts(model) if callable(experts) else {}) if n not in names]
    if config.exclude_modules is not None:
        names = [n for n in names
                 if not _any_name_matches(config.exclude_modules, n, model.get_submodule(n), shared)]
    saved = _saved_or_inside(model, config)
    names = [n for n in names if n not in saved]
    if config.target_modules != "all-linear":
        _refuse_unadaptable_targets(model, config, {n for n, _ in candidates} | set(names) | saved)
    return _without_attention_out_proj(model, names, all_linear=config.target_modules == "all-linear")


def _any_name_matches(spec, name: str, module: nn.Module, shared: dict[int, list[str]]) -> bool:
    """Whether ``spec`` (target / exclude modules) matches ``name`` or another name of the same module (one module
    registered under two names, ``self.b = self.a``: selecting either selects it; PEFT looks at the first name only,
    so ``target_modules=["b"]`` matched nothing)."""
    return any(name_matches(spec, n) for n in shared.get(id(module), [name]))


def _saved_or_inside(model: nn.Module, config) -> set[str]:
    """Names of the modules ``config.modules_to_save`` selects and of every module inside them. As in PEFT, they are
    never adapter targets: a head trained in full needs no LoRA, and PEFT leaves them out of ``target_modules`` matches
    (``"all-linear"`` on a ``SEQ_CLS`` model, whose ``classifier`` PEFT saves): alignlab wrapped LoRA around such a head
    and the saved copy around that (``save_adapter``: safetensors' shared-memory error), and PEFT's files for them
    (RoBERTa's ``classifier.dense`` / ``.out_proj`` in ``target_modules``) failed to load on keys they do not have.
    A config's task head counts too (``task_type="SEQ_CLS"``: ``"all-linear"`` leaves the head to its copy, as in PEFT)."""
    wanted = _wanted_modules_to_save(model, config)
    if not wanted:
        return set()
    saved = [n for n, _ in model.named_modules() if n and saved_module_matches(list(wanted), n)]
    return {n for n, _ in model.named_modules() if any(n == p or n.startswith(p + ".") for p in saved)}


def _without_attention_out_proj(model: nn.Module, names: list[str], all_linear: bool) -> list[str]:
    """Leave out (``"all-linear"``) or refuse (named targets) the ``out_proj`` of a ``torch.nn.MultiheadAttention``:
    its forward hands ``out_proj.weight`` and ``out_proj.bias`` to ``F.multi_head_attention_forward`` instead of
    calling the module, so an adapter there never runs (the forward failed with "no attribute 'bias'")."""
    inside = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    bad = [n for n in names if n in inside]
    if bad and not all_linear:
        raise ValueError(f"{bad[0]!r} is the out_proj of a torch nn.MultiheadAttention, whose forward uses its weight "
                         "and bias directly (F.multi_head_attention_forward), so an adapter there would never run; "
                         "leave it out of target_modules (or exclude_modules)")
    return [n for n in names if n not in inside]


def _refuse_unadaptable_targets(model: nn.Module, config, adaptable: set[str]) -> None:
    """Raise when a ``target_modules`` regex string, or an entry of a list, selects a module that no layer of
    ``config`` can wrap (a norm, a whole attention or MLP block), as PEFT 0.21 does for both forms: otherwise the
    adaptable matches are adapted and this one silently dropped. Modules inside adapter wrappers and
    ``modules_to_save`` copies are not looked at."""
    spec = config.target_modules
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or _is_inside(name, skip):
            continue
        if isinstance(module, (AdapterLayer, SavedModule)) or name in adaptable:
            skip.append(name)
            continue
        if not name_matches(spec, name) or (config.exclude_modules is not None
                                            and name_matches(config.exclude_modules, name)):
            continue
        kinds = "nn.Linear, NF4Linear, transformers' Conv1D" + (
            ", nn.Embedding" if getattr(config, "adapts_embeddings", False) else "")
        selector = f"regex {spec!r}" if isinstance(spec, str) else f"entry {matching_entry(spec, name)!r}"
        raise ValueError(f"target_modules {selector} selects {name!r}, a {type(module).__name__}, which "
                         f"{type(config).__name__} cannot adapt (it wraps {kinds}); name the linear layers inside it "
                         "instead, or leave it out (exclude_modules)")


def _set_submodule(model: nn.Module, name: str, new: nn.Module, shared: dict[int, list[str]] | None = None) -> None:
    """Put ``new`` where ``name`` is, and under every other name of the module there (one module registered under
    two names, ``self.b = self.a``: both names see the adapter, as a call through either would; ``quantize_model``
    does the same). ``shared``: :func:`~alignlab._ties.shared_modules` of ``model``, taken before a loop of
    replacements (else one walk of the model per call)."""
    old = model.get_submodule(name)
    paths = (shared_modules(model) if shared is None else shared).get(id(old), [name])
    put_module(model, paths, new)


def _check_not_wrapped(model: nn.Module, action: str = "inject") -> None:
    """DDP all-reduces the parameters a model had when it was wrapped, FSDP2 shards the ones it had when sharded:
    adapter parameters added afterwards (by ``action``) would train apart on each rank, so refuse them."""
    from alignlab.distributed import is_sharded, unwrap

    if unwrap(model) is not model:
        raise ValueError(f"model is wrapped in DistributedDataParallel: {action} before ddp_model (DDP all-reduces "
                         "only the parameters the model had when it was wrapped)")
    if is_sharded(model):
        raise ValueError(f"model is sharded (FSDP2): {action} before shard_model / fully_shard (FSDP2 shards and "
                         "reduces only the parameters the model had when it was sharded)")


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Replace the modules ``config`` selects with adapter layers, in place; returns ``model``.

    The first adapter injected into a model becomes active; later ones are added inactive
    (switch with :func:`set_adapter`). Every non-adapter parameter is frozen
    (:func:`mark_only_adapters_trainable`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``config`` has the wrong type.
        ValueError: nothing matched ``target_modules`` (the message lists the linear modules
            that exist, and when a string would match a name suffix, says strings are full-name regexes
            and gives the list form), the adapter name is already used, or ``model`` is already wrapped
            in ``DistributedDataParallel`` or sharded by FSDP2 (inject before wrapping); a PiSSA / OLoRA init
            on a target whose weight another module shares (a tied ``lm_head``), which would change that module too;
            an adapter name that is empty, holds a ``.`` or is an attribute of the per-adapter ``ModuleDict`` /
            ``ParameterDict`` (``"half"``, ``"train"``); ``modules_to_save`` naming no module, or a module that is
            or holds a quantized one; a target that refuses the adapter (LoRA on an ``IA3Linear``); a ``target_modules``
            regex string, or list entry, that selects a module the config cannot adapt (a norm, a whole block), as
            PEFT refuses it. Each of these leaves the model as it was.
    """
    return _inject(model, config, adapter_name)


def _inject(model: nn.Module, config: LoRAConfig, adapter_name: str, from_file: bool = False,
            kept: dict | None = None) -> nn.Module:
    """:func:`inject`; ``from_file`` (``load_adapter``) rebuilds a PEFT file's PiSSA / OLoRA residual in a weight shared
    with another module as PEFT did (with a warning) instead of refusing it. ``kept``: the caller's copies of the
    targets' base weights (:func:`_kept_rewritten_weights`), used instead of taking a second set."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(config, "new_layer"):
        raise TypeError(f"config must be an adapter config such as LoRAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    _check_not_wrapped(model)
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in this model; pick another name or delete_adapter first")
    # A config may choose its own targets (e.g. whole blocks, the input embedding) and prepare
    # state shared by its layers (e.g. VeRA's frozen random projections) before they are built.
    targets = find_targets(model, config)
    if not targets:
        existing = sorted({n for n, _ in _candidates(model)})
        suffixes = sorted({n.split(".")[-1] for n in existing})
        exclude = getattr(config, "exclude_modules", None)
        raise ValueError(
            f"no module matched target_modules={getattr(config, 'target_modules', None)!r}"
            + (f" (exclude_modules={exclude!r})" if exclude else "")
            + f"; linear modules in this model end with {suffixes} (e.g. {existing[:3]})"
            + _string_target_hint(getattr(config, "target_modules", None), suffixes)
        )
    _warn_unused_selectors(model, config, targets)
    if getattr(config, "rewrites_base_weight", False):
        _refuse_rewriting_shared_weights(model, config, targets, warn_only=from_file)
    saved = _match_modules_to_save(model, config)   # before any change: a bad name leaves the model as it was
    warn_embedding_read_elsewhere(model, saved, saved=True)
    prepare = getattr(config, "prepare", None)
    if callable(prepare):
        prepare(model, targets, adapter_name)
    before = {id(m) for m in model.modules()}
    first = not configs
    _add_to_targets(model, config, targets, adapter_name, first, kept)
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            _set_submodule(model, name, module)
        module.add(adapter_name)
        if first:
            module.active_adapters = [adapter_name]
    configs = dict(configs)
    configs[adapter_name] = config
    object.__setattr__(model, CONFIGS_ATTR, configs)
    if first:
        object.__setattr__(model, "alignlab_active_adapters", [adapter_name])
    attach = getattr(config, "attach", None)
    if callable(attach):  # model-level wiring, e.g. the forward hook that prepends soft prompts
        attach(model, adapter_name)
    _match_modes(model, before)
    follow_adapters_in_tied_keys(model)  # transformers' tie_weights / save_pretrained name the tied tables by path
    guard_resize_token_embeddings(model)  # resizing under adapters over the vocabulary tables: see resize_guard
    heads = _output_head_names(model)
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and (name in heads or name.split(".")[-1] in heads):
            module.output_head = True  # its .weight would be the frozen table: see AdapterLayer.weight
    mark_only_adapters_trainable(model)
    return model


def _add_to_targets(model: nn.Module, config, targets: list[str], adapter_name: str, first: bool,
                    kept: dict | None = None) -> None:
    """Add the adapter to the targets that are adapter layers already, then wrap the others. The layers already
    there go first because they are where a config refuses (a LoRA on an ``IA3Linear``); if any target fails, the
    ones done are put back (the adapter deleted, the original module and its ``requires_grad`` flags returned,
    a base weight that the adapter's initialisation rewrote -- PiSSA, OLoRA -- restored bit for bit), so the
    model is as it was. A LoRA on a tied head's trainable token rows (the embedding's, passing the head's weight
    through) wraps that layer instead, as when the rows come second (PEFT's nesting); rows of the head's own stay
    refused, as in that order."""
    modules = {name: model.get_submodule(name) for name in targets}
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    held = {name for name, m in modules.items() if isinstance(m, AdapterLayer) and not (
        isinstance(config, LoRAConfig) and m.passes_base_weight and getattr(m, "tied_to", None) is not None)}
    order = sorted(targets, key=lambda name: name not in held)
    rewrites = bool(getattr(config, "rewrites_base_weight", False))
    done, restores = [], []
    shared = shared_modules(model)
    try:
        for name in order:
            module = modules[name]
            if rewrites:  # kept before the call: the call itself may rewrite the weight and then fail
                restores.append(kept[name] if kept is not None and name in kept else _kept_base_weight(module))
            if name in held:
                config.add_to(module, name, adapter_name)
            else:
                layer = config.new_layer(module, name, adapter_name)
                layer.active_adapters = [adapter_name] if first else []
                _set_submodule(model, name, layer, shared)
            done.append(name)
    except Exception:
        for name in reversed(done):
            if name in held:
                modules[name].delete_adapter(adapter_name)
            else:
                _set_submodule(model, name, modules[name])
        for p, flag in trainable:  # a new layer freezes the module it wraps
            p.requires_grad_(flag)
        for restore in reversed(restores):
            restore()
        raise


def _refuse_rewriting_shared_weights(model: nn.Module, config, targets: list[str], warn_only: bool = False) -> None:
    """``ValueError`` for a PiSSA / OLoRA init on a target whose weight another module holds too (a tied ``lm_head``
    and input embedding): writing the residual ``W − s·BA`` into the shared tensor changes the other module as well, so
    the model's output moves at initialisation (logits 0.42 off on a tiny tied Llama; PEFT does the same). With
    ``warn_only`` (a PEFT file trained so) a ``RuntimeWarning`` instead: the file needs that same residual."""
    owners, shared = parameter_owners(model), shared_modules(model)
    for name in targets:
        module = model.get_submodule(name)
        base = weight_holder(module.base_layer if isinstance(module, AdapterLayer) else module)
        weight = getattr(base, "weight", None)
        others = _held_outside(owners, weight, model, name, shared) if isinstance(weight, nn.Parameter) else []
        if others and warn_only:
            warnings.warn(f"init={config.init!r} in the file: the residual W - s·BA of {name!r} is written into the "
                          f"weight it shares with {others}, which changes too, as PEFT did when it made the file",
                          RuntimeWarning, stacklevel=4)
        elif others:
            raise ValueError(f"init={config.init!r} rewrites the base weight of {name!r} (W - s·BA), and that weight is "
                             f"shared with {others}, which would change too; untie them first (give {name!r} its own "
                             "copy of the weight and set config.tie_word_embeddings=False), use init='kaiming' or "
                             f"'gaussian', or leave {name!r} out of target_modules")


def _kept_rewritten_weights(model: nn.Module, config) -> dict:
    """For a config whose init rewrites base weights (PiSSA, OLoRA): a restore function per target (see
    :func:`_kept_base_weight`), taken before ``inject``, so that a caller that deletes the adapter again (a failed
    ``load_adapter``) can put the weights back, ``{target name: restore}`` (pass it to :func:`_inject` as ``kept``:
    one copy per target); empty for other configs."""
    if not getattr(config, "rewrites_base_weight", False):
        return {}
    return {name: _kept_base_weight(model.get_submodule(name)) for name in find_targets(model, config)}


def _kept_base_weight(module: nn.Module):
    """A copy of the weight of ``module``'s base (``module`` itself unless it is an adapter layer), and a function
    that writes it back bit for bit. A dense weight is copied to host memory, so that keeping every target's weight
    of an accelerator-filling model does not double its device memory; a quantized base keeps its packed tensor,
    whose buffers re-quantizing replaces (never writes into); a weight on the meta device has nothing to put back."""
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    if is_quantized(base):
        packed = base.quant_weight
        return lambda: base.load_quant_weight_(packed)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta:  # fused MoE experts: no init of theirs rewrites them
        return lambda: None
    kept = weight.detach().to("cpu", copy=True)

    def restore() -> None:
        with torch.no_grad():
            base.weight.copy_(kept)

    return restore


def _match_modes(model: nn.Module, before: set[int]) -> None:
    """Give the modules ``inject`` created the train/eval mode of what they wrap. ``nn.Module`` starts in training
    mode, so adapter dropout ran in a model injected (or loaded into with ``load_adapter``) in eval mode, as
    ``from_pretrained`` returns it: a PEFT file with ``lora_dropout`` gave random logits until ``model.eval()``.
    A new wrapper takes its base's mode, new adapter modules their wrapper's; nothing that existed before (the
    wrapped modules, a ``modules_to_save`` copy, made as a copy of its original) is touched."""
    for layer in model.modules():
        if isinstance(layer, SavedModule) and id(layer) not in before:
            layer.training = layer.original_module.training
        if not isinstance(layer, AdapterLayer):
            continue
        mode = layer.training if id(layer) in before else layer.base_layer.training
        for name, m in layer.named_modules():
            if id(m) not in before and not (name == "base_layer" or name.startswith("base_layer.")):
                m.training = mode


def _warn_unused_selectors(model: nn.Module, config, targets: list[str]) -> None:
    """Warn (``RuntimeWarning``, as PEFT 0.21 does) about an ``exclude_modules`` that excludes no module and, for
    LoRA and LoKr, ``rank_pattern`` / ``alpha_pattern`` keys that match no adapted module (AdaLoRA: ``rank_pattern``
    keys naming none): most often a typo, after which the
    adapter would train at the default rank / alpha, or on the modules meant to be left out. Not an error: a PEFT
    file written for several architectures may name modules that this model lacks."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and not any(name_matches(exclude, n) for names in module_names(model).values() for n in names if n):
        warnings.warn(f"exclude_modules={exclude!r} matches no module of this model, so nothing was excluded; "
                      "check the names", RuntimeWarning, stacklevel=3)
    if isinstance(getattr(config, "rank_pattern", None), dict) and hasattr(config, "init_r"):
        # AdaLoRA: exact "<module>.lora_E" keys, a key naming no adapted module was ignored without a word
        adapted = set(targets)
        unused = [k for k in config.rank_pattern if k.removesuffix(".lora_E") not in adapted]
        if unused:
            warnings.warn(f"rank_pattern keys {unused} name none of the {len(targets)} adapted modules and were "
                          f"ignored (e.g. {targets[:2]}); check the names", RuntimeWarning, stacklevel=3)
        return
    regex_patterns = isinstance(config, LoRAConfig) or getattr(config, "regex_patterns", False)  # LoRA, LoKr
    if not regex_patterns or not (config.rank_pattern or config.alpha_pattern):
        return
    # a fused MoE experts module is adapted per parameter, and its patterns match "<module>.<parameter>"
    names = list(targets) + [f"{t}.{p}" for t in targets for p in fused_expert_parameters(model.get_submodule(t))]
    for field, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        unused = [k for k in patterns if not any(pattern_matches(k, n) for n in names)]
        if unused:
            warnings.warn(f"{field} keys {unused} match none of the {len(targets)} adapted modules and were ignored "
                          f"(e.g. {targets[:2]}); check the names", RuntimeWarning, stacklevel=3)


def _wanted_modules_to_save(model: nn.Module, config) -> list[str] | None:
    # a config may add modules of its own for this model, as PEFT's task wrappers add the task's head: the soft-prompt
    # configs say which (modules_to_save_for), and a LoRA-family config's task_type adds its head (with_task_heads)
    resolve = getattr(config, "modules_to_save_for", None)
    if callable(resolve):
        return resolve(model)
    if hasattr(config, "task_type"):
        return with_task_heads(model, config)
    return getattr(config, "modules_to_save", None)


def _match_modules_to_save(model: nn.Module, config) -> list[str]:
    wanted = _wanted_modules_to_save(model, config)
    if not wanted:
        return []
    names = []
    for name, module in model.named_modules():
        if name and saved_module_matches(list(wanted), name) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    missing = [w for w in wanted if not any(saved_module_matches([w], n) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save: no module named {missing} in this model")
    from alignlab.quant import NF4Experts, NF4Linear

    for name in names:
        # A quantized weight is frozen uint8 buffers, so the trainable copy would train nothing.
        inner = [f"{name}.{n}".rstrip(".") for n, m in model.get_submodule(name).named_modules()
                 if isinstance(m, (NF4Linear, NF4Experts))]
        if inner:
            raise ValueError(f"modules_to_save: {name!r} holds a quantized module ({inner[0]!r}), whose copy would "
                             "have nothing to train; keep it dense with quantize_model(..., skip=[...]), or adapt it "
                             "with target_modules instead")
    return names


def adapter_configs(model: nn.Module) -> dict:
    """``{adapter_name: config}`` of the adapters injected into ``model`` (or the model inside its
    ``DistributedDataParallel`` / ``torch.compile`` wrapper, as for the other adapter functions)."""
    model = _user_model(model)
    return dict(getattr(model, CONFIGS_ATTR, None) or {})


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters that run in ``model``'s forward (summed when several), in order.

    The first adapter injected is active; :func:`set_adapter` changes the list and
    :func:`delete_adapter` drops a deleted name. A copy: changing it does not change the model.
    Empty for a model with no adapters. ``with disabled(model)`` does not change it.
    """
    model = _user_model(model)
    return list(getattr(model, "alignlab_active_adapters", []))


def _require_adapters(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_configs(model)
    for n in names:
        if n not in known:
            raise ValueError(f"adapter {n!r} not found; this model has {sorted(known)}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` (one name or several, summed) the active adapters.

    At least one: ``names=[]`` left the adapters in place with none of them running and none trainable, silently.
    PEFT differs by entry point (``PeftModel.set_adapter`` takes one name only; ``LoraModel.set_adapter([])`` and
    ``PeftMixedModel.set_adapter([])`` do what ours did); refusing keeps a model with adapters running at least one.
    For the base model use ``with disabled(model):``; to drop adapters, :func:`delete_adapter` or
    :func:`merge_and_unload`.

    Raises:
        TypeError: ``names`` is neither a string nor a sequence of strings (None included).
        ValueError: ``names`` is empty or names an adapter twice; an unknown adapter name; adapters whose
            trainable token rows overlap on a layer, or that each train a copy of one module (``modules_to_save``);
            a merged adapter left out of ``names`` (it would keep running in the base weight: unmerge first);
            every layer keeps the adapters it had active.
    """
    model = _user_model(model)
    if names is None:  # None means "the active adapters" to merge(), which means nothing here
        raise TypeError("names must be an adapter name or an iterable of names, got None")
    names = _adapter_name_list(names, "names", if_empty="to run the base model use `with disabled(model):`, to "
                               "remove adapters delete_adapter(model, name) or merge_and_unload(model)")
    _require_adapters(model, names)
    for name, module in _saved_modules(model):  # a trained copy replaces the module: copies cannot be summed
        copies = [n for n in names if n in module.modules_to_save]
        if len(copies) > 1:
            raise ValueError(f"adapters {copies} each train their own copy of {name!r} (modules_to_save), which cannot "
                             "be summed: activate one of them at a time (as in PEFT)")
    named = list(adapter_layers(model))
    for name, layer in named:  # merged adapters keep running in the base weight, active or not
        still = [n for n in layer.merged_adapters if n not in names]
        if still:
            raise ValueError(f"{name}: adapter(s) {still} are merged into its base weight, so they would keep running "
                             f"beside {names} (PEFT unmerges first, with a warning): unmerge(model) before set_adapter")
    layers = [layer for _, layer in named]
    before = [list(layer.active_adapters) for layer in layers]
    try:
        for layer in layers:
            layer.set_active(names)
    except ValueError:  # the layers switched before the refusing one ran adapters the model did not list as active
        for layer, active in zip(layers, before):
            layer.active_adapters = active
        raise
    for _, module in _saved_modules(model):
        module.active_adapters = [n for n in names if n in module.modules_to_save]
    object.__setattr__(model, "alignlab_active_adapters", names)
    mark_only_adapters_trainable(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (it must not be merged); layers left empty are unwrapped.

    Deleting the only active adapter activates the first remaining one (the earliest added), with a
    ``UserWarning`` naming it, as PEFT does; the model ran as its bare base before, silently.

    An adapter initialised by PiSSA / OLoRA (``init="pissa"`` / ``"pissa_niter_K"`` / ``"olora"``) wrote the residual
    ``W - s·B₀A₀`` into the base, and the base keeps it after deletion (as in PEFT, whose ``delete_adapter`` does
    the same): the model left is not the model before :func:`inject`, and a ``UserWarning`` says so. The original
    ``W`` is not kept (a host copy of every target weight); reload the base weights to get it back.

    Raises:
        TypeError: ``name`` is not a str (a list included: one adapter per call).
        ValueError: ``name`` is not an adapter of ``model``.
    """
    model = _user_model(model)
    if not isinstance(name, str):  # a list failed in a dict lookup ("unhashable type: 'list'"), naming nothing
        raise TypeError(f"name must be one adapter name (a str), got {name!r}; delete adapters one at a time")
    _require_adapters(model, [name])
    rewritten = _rewritten_bases(model, name)
    _delete_adapter(model, name)
    if rewritten:
        n, _, i = rewritten[0]
        warnings.warn(f"adapter {name!r} on {n!r} (and {len(rewritten) - 1} more) was initialised with init={i!r}, "
                      "which wrote the residual W - s·B0A0 into the base: the base keeps it after delete_adapter (as "
                      "in PEFT), so the model left is not the model before inject; reload the base weights for the "
                      "original", UserWarning, stacklevel=2)


def _rewritten_bases(model: nn.Module, adapter: str | None = None) -> list[tuple[str, str, str]]:
    """``(layer name, adapter, init)`` for each layer whose base a PiSSA / OLoRA init of ``adapter`` (default: of any
    adapter) rewrote to the residual ``W - s·BA``."""
    return [(n, a, i) for n, m in adapter_layers(model) if isinstance(getattr(m, "init", None), dict)
            for a, i in m.init.items() if (adapter is None or a == adapter)
            and (i in ("pissa", "olora") or i.startswith("pissa_niter_"))]


def _delete_adapter(model: nn.Module, name: str) -> None:
    """:func:`delete_adapter` without its checks and the residual warning (a failed ``load_adapter`` deletes the
    adapter it injected, then puts the base weights back itself)."""
    was_active = name in active_adapters(model)
    shared = shared_modules(model)
    for lname, layer in _nested_first(list(adapter_layers(model))):
        if name in layer.adapter_names():
            layer.delete_adapter(name)
        if not layer.adapter_names():  # the last adapter went: put the plain base back
            _set_submodule(model, lname, layer.base_layer, shared)
    for mname, module in list(_saved_modules(model)):
        if name in module.modules_to_save:
            del module.modules_to_save[name]
            module.active_adapters = [n for n in module.active_adapters if n != name]
        if not module.modules_to_save:
            _set_submodule(model, mname, module.original_module, shared)
    follow_adapters_in_tied_keys(model)
    configs = adapter_configs(model)
    del configs[name]
    object.__setattr__(model, CONFIGS_ATTR, configs)
    active = [n for n in active_adapters(model) if n != name]
    object.__setattr__(model, "alignlab_active_adapters", active)
    if was_active and not active and configs:
        # the earliest remaining adapter, or the merged ones (set_adapter refuses to leave one out: it keeps running)
        merged = {n for _, layer in adapter_layers(model) for n in layer.merged_adapters}
        fallback = [n for n in configs if n in merged] or next(iter(configs))
        warnings.warn(f"adapter {name!r} was active and is deleted: {fallback!r} is now the active adapter (as in "
                      "PEFT); set_adapter(model, ...) to choose another", UserWarning, stacklevel=3)
        set_adapter(model, fallback)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the frozen base model inside the block (e.g. the DPO reference policy, no second copy).

    With adapters initialised by PiSSA / OLoRA (``init="pissa"`` / ``"olora"``), which rewrite the base to the
    residual ``W - s·BA``, that is the residual model, not the original: a ``UserWarning`` says so.

    Raises:
        ValueError: the model has no adapter layers (nothing to disable: the block would run the
            same model, e.g. a DPO reference equal to the policy, loss stuck at log 2), or adapters
            are merged into the base weights (unmerge first).
    """
    wrapper, model = model, _user_model(model)
    layers = [m for _, m in adapter_layers(model)] + [m for _, m in _saved_modules(model)]
    if not layers:
        raise ValueError("model has no adapter layers, so disabled(model) would run the same model; "
                         "inject adapters first (inject(model, LoRAConfig(...)))")
    merged = [n for n, m in adapter_layers(model) if m.merged]
    if merged:
        raise ValueError(f"cannot disable adapters merged into the base (e.g. {merged[0]!r}); call unmerge(model) first")
    rewritten = _rewritten_bases(model)
    if rewritten:
        n, a, i = rewritten[0]
        warnings.warn(f"adapter {a!r} on {n!r} (and {len(rewritten) - 1} more) was initialised with init={i!r}, which "
                      "left the residual W - s·BA in the base: disabled(model) runs that residual model, not the "
                      "original one (as in PEFT); for the original as a reference keep a frozen copy of it",
                      UserWarning, stacklevel=3)
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield wrapper
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


# an empty list read as "the active adapters" merged them all
_MERGE_EMPTY = "give None for the active adapters, or the names to use"


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones; one name or a list) into the base weights; forward
    output is unchanged.

    Raises:
        TypeError: ``adapter_names`` is not None, a string or a sequence of strings.
        ValueError: an adapter is unknown or already merged, the model holds no adapters, or ``adapter_names`` is an
            empty list (it used to merge the active adapters); a float16
            base weight whose merged values would leave float16's range (they would round to inf), naming
            the layer (that layer is left unchanged; the layers merged before it stay merged:
            :func:`unmerge` undoes them); a LoRA on a tied head merged while trainable token rows of another
            adapter stay active and unmerged under it (raised before any change); a merge that would untie a
            table on a model whose forward reads ``config.tie_word_embeddings`` (transformers'
            SwitchTransformers, UDOP; raised before any change).
    """
    wrapper, model = model, _user_model(model)
    adapter_names = _adapter_name_list(adapter_names, if_empty=_MERGE_EMPTY)
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model holds no adapter layers; nothing to merge")
    if adapter_names is not None:
        _require_adapters(model, adapter_names)
    _refuse_merge_over_live_rows(layers, adapter_names)
    _refuse_stale_rows(layers, adapter_names)
    _untie_before_merge(model, [(n, l) for n, l in layers
                                 if any(a in l.adapter_names() for a in (adapter_names or l.active_adapters))])
    for name, layer in _nested_first(layers):
        names = [n for n in (adapter_names or layer.active_adapters) if n in layer.adapter_names()]
        try:
            layer.merge(names)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return wrapper


def _refuse_merge_over_live_rows(layers: list[tuple[str, AdapterLayer]], adapter_names: list[str] | None) -> None:
    """The check of a LoRA head's merge over trainable token rows (``LoRALinear._check_mergeable``) for the whole
    call, before :func:`merge` changes anything (it unties the head first): the rows it merges below count."""
    for name, layer in layers:
        inner = getattr(layer, "base_layer", None)
        if not isinstance(layer, LoRALinear) or not isinstance(inner, AdapterLayer):
            continue
        names = [n for n in (adapter_names or layer.active_adapters) if n in layer.adapter_names()]
        below = frozenset(n for n in (adapter_names or inner.active_adapters) if n in inner.adapter_names())
        if names:
            try:
                layer._check_mergeable(names, below)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None


def _refuse_stale_rows(layers: list[tuple[str, AdapterLayer]], adapter_names: list[str] | None) -> None:
    """Trainable token rows whose originals went stale (built on meta, no state dict loaded since) refuse a merge
    before any layer changes (``TrainableTokensLayer._refuse_stale``)."""
    for name, layer in layers:
        if isinstance(layer, TrainableTokensLayer):
            try:
                layer._refuse_stale(adapter_names or layer.active_adapters)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None


def _nested_first(layers: list[tuple[str, AdapterLayer]]) -> list[tuple[str, AdapterLayer]]:
    """``layers`` (in model order) with a layer that is another's ``base_layer`` (trainable token rows under a LoRA
    on a tied head) moved before that one: merging writes the rows into the head's weight before the LoRA adds
    ``ΔW`` to all of it (the other order overwrote the rows' ``ΔW``), and unwrapping replaces the inner layer while
    the outer one's name still leads to it."""
    index = {name: i for i, (name, _) in enumerate(layers)}
    suffix = ".base_layer"

    def key(item: tuple[str, AdapterLayer]) -> tuple[int, int]:
        root, depth = item[0], 0
        while root.endswith(suffix) and root[: -len(suffix)] in index:
            root, depth = root[: -len(suffix)], depth + 1
        return index[root], -depth

    return sorted(layers, key=key)


def _adapter_name_list(adapter_names, arg: str = "adapter_names", if_empty: str | None = None) -> list[str] | None:
    """``adapter_names`` as a list (a single string is one name, not its letters; any iterable of names,
    e.g. ``dict.keys()``, is read once), or None; an empty one is a ``ValueError`` ending in the hint ``if_empty``,
    where one is given (an empty list is allowed only where no hint is)."""
    if adapter_names is None:
        return None
    if isinstance(adapter_names, str):
        return [adapter_names]
    names = list(adapter_names) if isinstance(adapter_names, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{arg} must be an adapter name or an iterable of names, got {adapter_names!r}")
    if not names and if_empty is not None:
        raise ValueError(f"{arg} is empty; {if_empty}")
    if if_empty is not None and len(set(names)) != len(names):  # (the callers that run or fold each name once)
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{arg} names {twice} more than once; each adapter runs (or is merged) once")
    return names


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every layer that has merged adapters."""
    layers = [(n, m) for n, m in adapter_layers(_user_model(model)) if m.merged]
    if not layers:
        raise ValueError("no adapter is merged in this model; nothing to unmerge")
    for _, layer in layers:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Merge adapters (default: the active ones; one name or a list) and replace every adapter layer by
    its (updated) base; returns a plain model.

    Raises:
        ValueError: as :func:`merge` (an empty ``adapter_names`` list too), naming the layer (a float16 merge that
            would overflow included); the
            layers before it are already merged and unloaded.
    """
    wrapper, model = model, _user_model(model)
    adapter_names = _adapter_name_list(adapter_names, if_empty=_MERGE_EMPTY)
    for name, module in _saved_modules(model):  # before any change: the copies replace their originals last
        if any(n in module.modules_to_save for n in module.active_adapters):
            _refuse_untie_where_forward_reads_the_flag(model, name, _tied_elsewhere(model, name, module.original_module))
    _refuse_stale_rows(list(adapter_layers(model)), adapter_names)
    _untie_before_merge(model, [(n, l) for n, l in adapter_layers(model)
                                if any(a in l.adapter_names() and a not in l.merged_adapters
                                       for a in (adapter_names or l.active_adapters))])
    shared = shared_modules(model)
    for name, layer in _nested_first(list(adapter_layers(model))):
        names = [n for n in (adapter_names or layer.active_adapters) if n in layer.adapter_names()]
        names = [n for n in names if n not in layer.merged_adapters]
        if names:
            try:
                layer.merge(names)
            except ValueError as exc:  # name the layer, as merge() does
                raise ValueError(f"{name}: {exc}") from None
        _set_submodule(model, name, layer.base_layer, shared)
    for name, module in list(_saved_modules(model)):
        active = [n for n in module.active_adapters if n in module.modules_to_save]
        if active:
            _untie_saved_copy(model, name, module)
        _set_submodule(model, name, module.modules_to_save[active[0]] if active else module.original_module, shared)
    follow_adapters_in_tied_keys(model)
    for attr in (CONFIGS_ATTR, "alignlab_active_adapters"):
        if attr in model.__dict__:
            object.__delattr__(model, attr)
    unguard_resize_token_embeddings(model)
    return wrapper


def _untie_saved_copy(model: nn.Module, name: str, module: SavedModule) -> None:
    """Before ``merge_and_unload`` puts the trained copy of a ``modules_to_save`` module in place of the original: where
    the original's weight is tied to another module (GPT-2's or Gemma's ``lm_head`` and input embedding, either one
    saved), the copy is not, so set ``config.tie_word_embeddings = False`` with a warning, as a merge into a tied weight
    does. Left True, the next ``tie_weights()`` (``resize_token_embeddings``, loaders that honour the flag) put the
    other module's table back in place of the trained one without a word (logits 2.9 off on a tiny GPT-2)."""
    others = _tied_elsewhere(model, name, module.original_module)
    if not others:
        return
    warnings.warn(f"{name}: its trained copy (modules_to_save) replaces a module tied to {others}; the tie is gone (the "
                  "other module keeps the original weight), and config.tie_word_embeddings is set to False",
                  stacklevel=3)
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    for c in (config, get_text() if callable(get_text) else None):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    forget_ties(model, [f"{name}.original_module.{n}" for n, _ in module.original_module.named_parameters()])


def _untie_before_merge(model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
    """Give a base weight that is tied to another module (an ``lm_head`` tied to the input embedding)
    its own copy before a merge writes into it, with a warning, as PEFT warns: merging into a
    shared tensor would silently change the other module too."""
    owners, shared = parameter_owners(model), shared_modules(model)
    untie = []
    for name, layer in layers:
        holder = weight_holder(layer.base_layer)  # the head's linear, under trainable token rows
        weight = getattr(holder, "weight", None)
        if not isinstance(weight, nn.Parameter) or getattr(layer, "keeps_ties", False):
            continue  # (trainable token rows are meant for both tied modules: merging writes them into both)
        others = _held_outside(owners, weight, model, name, shared)
        if others:
            _refuse_untie_where_forward_reads_the_flag(model, name, others)
            untie.append((name, holder, weight, others))
    for name, holder, weight, others in untie:
        warnings.warn(f"{name}.weight is tied to {others}; merging into it unties it (the other module keeps "
                      "the original weight, and config.tie_word_embeddings is set to False)", stacklevel=3)
        holder.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        forget_ties(model, parameter_owners(model).get(id(holder.weight), []))


def _held_outside(owners: dict[int, list[str]], weight: nn.Parameter, model: nn.Module, name: str,
                  shared: dict[int, list[str]]) -> list[str]:
    """The names ``weight`` has outside module ``name`` and the other names of that module (one module under two
    names is not a tie: :func:`_set_submodule` changes it under both) (:func:`~alignlab._ties.parameter_owners`' map
    ``owners``, :func:`~alignlab._ties.shared_modules`' map ``shared``)."""
    held = owners.get(id(weight), [])
    if len(held) < 2:
        return []
    paths = tuple(n + "." for n in shared.get(id(model.get_submodule(name)), [name]))
    return [o for o in held if not o.startswith(paths)]


def _tied_elsewhere(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """Names of the parameters outside ``name`` that are parameters of ``module`` (tied to it)."""
    owners, shared = parameter_owners(model), shared_modules(model)
    return sorted({o for p in module.parameters() for o in _held_outside(owners, p, model, name, shared)})


def _refuse_untie_where_forward_reads_the_flag(model: nn.Module, name: str, others: list[str]) -> None:
    """``ValueError`` when untying ``name`` from ``others`` (which sets ``config.tie_word_embeddings = False``) would
    change the model's outputs: transformers' SwitchTransformers and UDOP scale the decoder output by
    ``d_model ** -0.5`` in forward only while that flag is True (the merged logits were 17 off on a tiny model)."""
    if not others or not untie_changes_outputs(model):
        return
    raise ValueError(f"{name} is tied to {others}: merging into it (or putting its modules_to_save copy in its place) "
                     f"unties it and sets config.tie_word_embeddings = False, and {type(model).__name__}.forward reads "
                     "that flag (it rescales the decoder output only while tied), so the merged model would compute "
                     "other logits; keep this adapter unmerged, or leave the tied tables out of it")


def mark_only_adapters_trainable(model: nn.Module) -> nn.Module:
    """Freeze everything except the parameters of the active adapters (and their ``modules_to_save`` copies)."""
    wrapper, model = model, _user_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    active = set(active_adapters(model))
    for _, layer in adapter_layers(model):
        # an adapter's tensors sit under its name in the layer's per-adapter dicts; matching the name anywhere in
        # a parameter's path also caught other components: with adapters "0" and "1", the inactive prefix encoder
        # "1" trained its transform.0 layer
        for mname, store in layer.named_modules():
            if mname == "base_layer" or mname.startswith("base_layer.") or not isinstance(store, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for name in active & set(store.keys()):
                entry = store[name]
                for p in ([entry] if isinstance(entry, nn.Parameter) else entry.parameters()):
                    p.requires_grad_(True)
    for _, module in _saved_modules(model):
        for n in module.active_adapters:
            for p in module.modules_to_save[n].parameters():
                p.requires_grad_(True)
    return wrapper


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _string_target_hint(target: object, suffixes: list[str]) -> str:
    """The fix when a ``target_modules`` string was meant as a name suffix: it is a full-name regex."""
    if not isinstance(target, str) or not any(re.fullmatch(target, s) for s in suffixes):
        return ""
    regex = r".*\." + (target if target in suffixes else f"({target})")
    as_list = f"pass name suffixes as a list, target_modules=[{target!r}], or " if target in suffixes else "use "
    return (f"; a target_modules string is a regular expression matched against the whole module name (PEFT's "
            f'rule): {as_list}a regex such as r"{regex}"')


def count_parameters(model: nn.Module) -> ParameterCount:
    """``(trainable, total)`` parameter counts; a shared parameter counts once.

    An NF4 weight (:class:`~alignlab.quant.NF4Linear`, :class:`~alignlab.quant.NF4Experts`) counts its
    logical elements, ``out * in`` per matrix (its packed bytes and scales are buffers, or frozen uint8
    parameters after :func:`~alignlab.distributed.shard_model`, and are not counted themselves), so a
    QLoRA model has the total of its dense base -- PEFT's ``get_nb_trainable_parameters`` on a bitsandbytes
    4-bit model gives the same numbers.
    """
    from alignlab.quant import NF4Experts, NF4Linear

    seen, trainable, total = set(), 0, 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            total += module.out_features * module.in_features
        elif isinstance(module, NF4Experts):
            total += sum(module.num_experts * module.shape_of(n).numel() for n in module.expert_parameters)
        else:
            continue
        # the packed uint8 pieces FSDP conversion turns into parameters stand for the logical weight
        seen.update(id(p) for p in module.parameters(recurse=False) if p.dtype == torch.uint8)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "cat",
    rank: int | None = None,
) -> None:
    """Combine LoRA adapters into a new one.

    * ``"cat"`` (exact): stacks the factors, new rank ``Σ r_i``: ``ΔW = Σ w_i s_i B_i A_i``.
    * ``"svd"``: the best rank-``rank`` approximation (truncated SVD) of that same ``ΔW``.
    * ``"linear"``: PEFT's factor averaging, ``A = Σ sign(w_i s_i) √|w_i s_i| A_i``,
      ``B = Σ √|w_i s_i| B_i`` (all ranks equal); cheap but *not* equal to ``Σ w_i ΔW_i`` unless the
      adapters share factors.

    The new adapter has scaling 1 (``alpha = rank``) and is added inactive.

    ``adapters`` is one name or a list of them; ``rank`` (a positive int) is read by ``"svd"`` only.

    Raises:
        TypeError: ``adapters`` is not a name or names, ``weights`` not a sequence, a weight not a number, ``rank``
            not an int (``"svd"``); each names the argument.
        ValueError: unknown adapters/combination, DoRA adapters, mismatched lengths or ranks; adapters with trained
            copies of modules (``modules_to_save``: the combination would leave them out); ``model`` wrapped in
            ``DistributedDataParallel`` or sharded by FSDP2 (as :func:`inject`: the new adapter's parameters would
            not be reduced; combine before wrapping, or on ``ddp.module`` for evaluation).
    """
    model = _uncompiled(model)
    _check_not_wrapped(model, "add_weighted_adapter")
    if combination not in ("cat", "svd", "linear"):
        raise ValueError(f"combination must be 'cat', 'svd' or 'linear', got {combination!r}")
    check_adapter_name(adapter_name)
    if not isinstance(weights, Iterable) or isinstance(weights, str):
        raise TypeError(f"weights must be a sequence of numbers, one per adapter, got {weights!r}")
    adapters = _adapter_name_list(adapters, "adapters")
    weights = [check_finite_number(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if combination == "svd":
        if rank is None:
            raise ValueError("combination='svd' needs a positive rank, got None")
        check_positive_int(rank, "rank")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"adapters and weights must be non-empty and of equal length, got {len(adapters)} and {len(weights)}")
    _require_adapters(model, adapters)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if not all(isinstance(configs[a], LoRAConfig) for a in adapters):
        kinds = sorted({type(configs[a]).__name__ for a in adapters})
        raise ValueError(f"add_weighted_adapter combines LoRA adapters; got {kinds}")
    if any(getattr(configs[a], "use_dora", False) for a in adapters):
        raise ValueError("weighted combination is defined for plain LoRA adapters, not DoRA")
    if any(isinstance(layer, ExpertLoRA) and set(adapters) & set(layer.adapter_names()) for _, layer in adapter_layers(model)):
        raise ValueError("weighted combination of adapters on fused expert weights is not supported")
    if any(not isinstance(layer, (LoRALinear, ExpertLoRA)) and set(adapters) & set(layer.adapter_names())
           for _, layer in adapter_layers(model)):  # embedding LoRA, trainable token rows
        raise ValueError("weighted combination covers LoRA on linear layers; these adapters also adapt an embedding "
                         "(LoRA or trainable token rows)")
    copies = sorted({f"{name} ({a})" for name, module in _saved_modules(model) for a in adapters
                     if a in module.modules_to_save})
    if copies:  # a trained copy cannot be weighted into the new adapter, and leaving it out dropped it silently
        raise ValueError(f"adapters train their own copies of modules (modules_to_save: {copies}), which a weighted "
                         "combination cannot carry (PEFT refuses copies of one module by several adapters)")
    if combination == "linear":
        ranks = {configs[a].r for a in adapters} | {r for a in adapters for r in configs[a].rank_pattern.values()}
        if len(ranks) != 1:
            raise ValueError(f"combination='linear' needs adapters of equal rank, got ranks {sorted(ranks)}")
    ranks: dict[str, int] = {}
    for lname, layer in adapter_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names()]
        if not present:
            continue
        a_new, b_new = _combine(layer, present, combination, rank)
        r = ranks[lname] = a_new.shape[0]
        layer.add_adapter(adapter_name, r=r, alpha=float(r), adapter_dtype=layer.lora_A[present[0][0]].weight.dtype)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(a_new)
            layer.lora_B[adapter_name].weight.copy_(b_new)
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    configs[adapter_name] = LoRAConfig(
        r=default_r,
        alpha=float(default_r),
        target_modules=sorted(ranks),
        rank_pattern={_exact(n): r for n, r in ranks.items() if r != default_r},
        alpha_pattern={_exact(n): float(r) for n, r in ranks.items() if r != default_r},
    )
    object.__setattr__(model, CONFIGS_ATTR, configs)


def _exact(name: str) -> str:
    """A rank/alpha pattern that matches exactly this dotted module name."""
    return "^" + name.replace(".", r"\.")


def _combine(layer: LoRALinear, present, combination: str, rank: int | None):
    f32 = lambda t: t.detach().float()  # noqa: E731
    if combination == "linear":
        # PEFT's convention: both factors carry sqrt(|w·s|), A also the sign.
        roots = [(n, math.sqrt(abs(w * layer.scaling[n])), math.copysign(1.0, w)) for n, w in present]
        a = sum(root * sign * f32(layer.lora_A[n].weight) for n, root, sign in roots)
        b = sum(root * f32(layer.lora_B[n].weight) for n, root, _ in roots)
        return a, b
    a = torch.cat([w * layer.scaling[n] * f32(layer.lora_A[n].weight) for n, w in present], dim=0)
    b = torch.cat([f32(layer.lora_B[n].weight) for n, _ in present], dim=1)
    if combination == "cat":
        return a, b
    delta = b @ a
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    a_new = delta.new_zeros(rank, delta.shape[1])
    b_new = delta.new_zeros(delta.shape[0], rank)
    a_new[:k] = s.sqrt()[:, None] * vh
    b_new[:, :k] = u * s.sqrt()
    return a_new, b_new
