"""transformers' names of tied weights, kept in step with the adapter layers that wrap them.

A ``transformers`` model names the tensors it ties by their paths (``LlamaForCausalLM._tied_weights_keys`` is
``{"lm_head.weight": "model.embed_tokens.weight"}``, and ``post_init`` expands every sub-model's map into the
instance's ``all_tied_weights_keys``). ``tie_weights()`` -- which ``resize_token_embeddings``, ``init_weights``, the
``Trainer`` and checkpoint loaders call -- reads each source with ``get_parameter`` and assigns it to the target with
``setattr`` on the target's parent module; ``save_pretrained`` drops the targets from a state dict that holds shared
tensors by the same names.

An adapter layer moves its base's tensors one level down (``model.embed_tokens.base_layer.weight``), and one over an
embedding or an output head hides ``.weight`` (it would be the frozen table; see
:attr:`~alignlab.adapters.base.AdapterLayer.weight`). With trainable token rows on a tied input embedding,
``tie_weights()`` then raised ``AttributeError`` ("`model.embed_tokens.weight` is neither a parameter, buffer, nor
extra state"), and with a LoRA on a tied ``lm_head`` it registered the table as a stray ``lm_head.weight`` parameter
of the wrapper. :func:`follow_adapters_in_tied_keys` rewrites those maps to the paths the tied tensors have now
(through ``base_layer``, and ``original_module`` of a ``modules_to_save`` wrapper, which keeps the tie while its copy
trains) and puts the model's own maps back once the wrappers are gone, so that ``tie_weights()`` ties the bases the
adapters compute with and leaves the adapters' tensors (the trained rows included) as they are.
"""

from __future__ import annotations

import re

from torch import nn

from alignlab.adapters.base import AdapterLayer, SavedModule

__all__ = ["follow_adapters_in_tied_keys", "forget_ties"]

_MAPS = ("_tied_weights_keys", "all_tied_weights_keys")
_KEPT = "_alignlab_tied_keys"  # {map attribute: (set on the instance?, the model's own map)}
_UNTIED = "_alignlab_untied_keys"  # targets of the own all_tied_weights_keys whose tie a merge broke


def follow_adapters_in_tied_keys(model: nn.Module) -> None:
    """Point the tied-weight maps of every module of ``model`` that has them (``transformers``' ``PreTrainedModel``
    and its sub-models) at where the tied tensors live under the current adapter layers; a map that needs no change
    is the model's own again. Call after the module tree changed (``inject``, unwrapping).

    A model whose config ties nothing (``tie_word_embeddings=False``) keeps its ``_tied_weights_keys`` as they are,
    as transformers ignores them there. The names of ``_tied_weights_keys`` are regular expressions to transformers
    (``all_tied_weights_keys`` holds literal parameter names), so a trained rows' name holding an adapter name with
    regex characters (``"a+b"``) goes into it escaped."""
    for module in model.modules():
        kept = module.__dict__.get(_KEPT, {})
        for attr in _MAPS:
            if attr in kept:
                own, original = kept[attr]
            else:
                own, original = attr in module.__dict__, module.__dict__.get(attr, getattr(type(module), attr, None))
            if not isinstance(original, dict) or not original:
                continue
            patterns = attr == "_tied_weights_keys"
            untied = () if patterns else module.__dict__.get(_UNTIED, ())
            if patterns and not getattr(getattr(module, "config", None), "tie_word_embeddings", False):
                moved = original  # transformers' get_expanded_tied_weights_keys returns {} for such a model
            else:
                moved = {}
                for target, source in original.items():
                    if target in untied:
                        continue
                    target, target_layers = _through_adapters(module, target)
                    source, source_layers = _through_adapters(module, source)
                    moved[target] = source
                    rows = _shared_rows(target_layers, source_layers)
                    moved.update({_as_pattern(t): _as_pattern(s) for t, s in rows.items()} if patterns else rows)
            if moved != original:
                kept[attr] = (own, original)
                object.__setattr__(module, attr, moved)
            elif attr in kept:
                del kept[attr]
                if own:
                    object.__setattr__(module, attr, original)
                else:
                    object.__delattr__(module, attr)
        if kept:
            module.__dict__[_KEPT] = kept
        else:
            module.__dict__.pop(_KEPT, None)


def forget_ties(model: nn.Module, paths) -> None:
    """Drop from ``all_tied_weights_keys`` (the one ``tie_weights(recompute_mapping=False)`` reads: ``init_weights()``,
    a distributed checkpoint load) every tie of the parameters ``paths`` (their names in ``model`` now), once a merge
    gave such a parameter its own copy and set ``config.tie_word_embeddings`` to False, as transformers drops an entry
    whose tensors a checkpoint holds apart. Left in, that call put the input table back over a merged head (logits 100
    off on the tiny Llama); the model's own map, put back when the wrappers go, stays without them too."""
    paths = set(paths)
    for prefix, module in model.named_modules():
        kept = module.__dict__.get(_KEPT, {})
        own = kept["all_tied_weights_keys"][1] if "all_tied_weights_keys" in kept else module.__dict__.get(
            "all_tied_weights_keys")
        if not isinstance(own, dict) or not own:
            continue
        rel = {p[len(prefix) + 1:] if prefix else p for p in paths if not prefix or p.startswith(prefix + ".")}
        untied = {t for t, s in own.items() if {_through_adapters(module, t)[0], _through_adapters(module, s)[0]} & rel}
        if untied:
            module.__dict__[_UNTIED] = module.__dict__.get(_UNTIED, set()) | untied
    follow_adapters_in_tied_keys(model)


def _as_pattern(name: str) -> str:
    """A parameter name as a regex that matches it alone (kept as it is when it holds no regex character)."""
    return name if re.fullmatch(r"[\w.]+", name) else re.escape(name) + "$"


def _through_adapters(root: nn.Module, name: str) -> tuple[str, list[tuple[str, nn.Module]]]:
    """``name`` (a dotted path below ``root``) with a ``base_layer`` / ``original_module`` step under every wrapper
    on the way, and the ``(path, wrapper)`` pairs passed; unchanged when the path is no module of ``root`` (a regex of
    the map, a module this model lacks)."""
    *path, leaf = name.split(".")
    module, steps, wrappers = root, [], []
    for step in path + [None]:
        while isinstance(module, (AdapterLayer, SavedModule)) and (
                step not in module._modules if step is not None else
                leaf not in module._parameters and leaf not in module._buffers):
            inner = "base_layer" if isinstance(module, AdapterLayer) else "original_module"
            wrappers.append((".".join(steps), module))
            module, steps = module._modules[inner], steps + [inner]
        if step is None:
            break
        module = module._modules.get(step)
        if module is None:
            return name, []
        steps.append(step)
    return ".".join(steps + [leaf]), wrappers


def _shared_rows(target_layers: list[tuple[str, nn.Module]],
                 source_layers: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """The trained rows a tied :class:`~alignlab.adapters.embedding.TrainableTokensLayer` on the target shares with
    the layer on the source (the same parameters, which ``save_pretrained`` must see as tied too)."""
    from alignlab.adapters.embedding import TrainableTokensLayer

    rows = {}
    for path, layer in target_layers:
        if not isinstance(layer, TrainableTokensLayer) or layer.tied_to is None:
            continue
        for source_path, source in source_layers:
            if source is layer.tied_to:
                for n in layer.adapter_names():
                    rows[f"{path}.trainable_tokens_delta.{n}"] = f"{source_path}.trainable_tokens_delta.{n}"
    return rows
