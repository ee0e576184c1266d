"""Shared parameters (tied tables) and shared modules of a model, and whether untying one changes its outputs (no
alignlab imports: quant and adapters share it).

Untying a shared embedding / head table (a merge into it, an NF4 copy of a tied head) sets
``config.tie_word_embeddings`` to False, so that transformers' ``tie_weights()`` does not put the shared table back.
Most models read the flag only when they tie; SwitchTransformers and UDOP also rescale the decoder output by
``d_model ** -0.5`` in forward only while it is True, so there an untie changes the logits and is refused instead.
"""

from __future__ import annotations

import inspect

from torch import nn


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules(remove_duplicate=False)``'s (name, module) pairs, in its order, except that an ancestor
    held again below itself (``child.up = parent``) is named there but not walked into again: the torch walk recursed
    without end, and inject / unload failed on such models."""
    out: list[tuple[str, nn.Module]] = []
    on_path: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        out.append((prefix, module))
        if id(module) in on_path:
            return
        on_path.add(id(module))
        for key, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}.{key}" if prefix else key)
        on_path.discard(id(module))

    visit(model, "")
    return out


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter's names in ``model``, by the parameter's ``id``: a tensor that several modules hold (a tied
    table) has several names."""
    owners: dict[int, list[str]] = {}
    for name, module in _named_modules(model):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    return owners


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every dotted name of every module in ``model`` (``""`` for ``model`` itself), by the module's ``id``, in one
    walk: a module registered under two names (``self.b = self.a``) has two."""
    names: dict[int, list[str]] = {}
    for name, module in _named_modules(model):
        names.setdefault(id(module), []).append(name)
    return names


def shared_modules(model: nn.Module) -> dict[int, list[str]]:
    """:func:`module_names` of the modules that sit in ``model`` under more than one name. A caller replacing many
    modules asks once, not per module: a walk per module made ``inject`` quadratic in the model's module count
    (3.4 s for 80 Llama layers)."""
    return {k: v for k, v in module_names(model).items() if len(v) > 1}


def put_module(model: nn.Module, names: list[str], module: nn.Module) -> None:
    """Set ``module`` under each dotted name in ``names``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def untie_changes_outputs(model: nn.Module) -> bool:
    """Whether ``model`` ties its tables (``config.tie_word_embeddings``) and its forward reads that flag, so that
    untying them (which sets it False) would change what the model computes."""
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and forward_reads_tie_flag(model)


def forward_reads_tie_flag(model: nn.Module) -> bool:
    """Whether ``type(model).forward``'s source mentions ``tie_word_embeddings`` (False where there is no source: a
    class made at run time)."""
    try:
        return "tie_word_embeddings" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
