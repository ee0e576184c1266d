"""``resize_token_embeddings`` on a transformers model that holds adapters over its vocabulary tables.

transformers resizes by building a new ``nn.Embedding`` / ``nn.Linear`` from the old module's ``.weight`` and putting it
in place with ``set_input_embeddings`` / ``set_output_embeddings``, input table first. Under an adapter that wraps the
input embedding or the output head (trainable token rows, LoRA on ``embed_tokens`` / ``lm_head``, either in
``modules_to_save``) that fails (the wrapper has no ``.weight``, or is not an ``nn.Embedding``), after the input table
was resized where only the head is wrapped; and where a wrapped module shares the table of a plain one (T5's
``encoder`` / ``decoder.embed_tokens`` under ``shared``) the setter replaces the wrapper, adapter and all. PEFT fails
the same ways; the order that works is: resize, then inject.

So :func:`guard_resize_token_embeddings` gives an injected model its own ``resize_token_embeddings`` (an instance
attribute over the class's method) that refuses, before any change, while adapters wrap those tables, and runs the
class's method otherwise; :func:`unguard_resize_token_embeddings` removes it (``merge_and_unload``).
"""

from __future__ import annotations

from torch import nn

from alignlab.adapters.base import AdapterLayer, SavedModule, hf_embedding

_ATTR = "resize_token_embeddings"


def adapters_over_vocab_tables(model: nn.Module) -> list[str]:
    """Names of the adapter wrappers (outermost) that hold a parameter of the model's input embedding or output head:
    the modules ``get_input_embeddings()`` / ``get_output_embeddings()`` return when wrapped, and wrappers of other
    modules over the same table (T5's ``encoder.embed_tokens``)."""
    tables = {id(p) for getter in ("get_input_embeddings", "get_output_embeddings")
              if (m := hf_embedding(model, getter)) is not None for p in m.parameters()}
    names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n in names):
            continue
        if isinstance(module, (AdapterLayer, SavedModule)) and any(id(p) in tables for p in module.parameters()):
            names.append(name)
    return names


class _RefusingResize:
    """The model's ``resize_token_embeddings`` while it holds adapters: ``ValueError`` (nothing changed) if a call
    would resize tables that adapters wrap, else the class's method. A plain object holding the model, so that
    ``copy.deepcopy`` (it then holds the copy) and pickling of the model keep working."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        sizes = list(args[:2]) + [kwargs.get("new_num_tokens"), kwargs.get("pad_to_multiple_of")]
        wrapped = adapters_over_vocab_tables(self.model) if any(s is not None for s in sizes) else []
        if wrapped:
            raise ValueError(
                f"resize_token_embeddings: adapters wrap the vocabulary tables ({', '.join(map(repr, wrapped))}); "
                "transformers would replace those modules (dropping the adapters) or fail half way (the input table "
                "resized, the head not). resize the vocabulary first, then inject: model.resize_token_embeddings(n); "
                "inject(model, config) (or load_adapter), as with PEFT; or merge_and_unload / delete_adapter those "
                "adapters before resizing")
        return type(self.model).resize_token_embeddings(self.model, *args, **kwargs)


def guard_resize_token_embeddings(model: nn.Module) -> None:
    """Give ``model`` (a transformers model: one with ``resize_token_embeddings``) the refusing method; no-op for
    others and for a model that has it already."""
    if callable(getattr(type(model), _ATTR, None)) and not isinstance(model.__dict__.get(_ATTR), _RefusingResize):
        object.__setattr__(model, _ATTR, _RefusingResize(model))


def unguard_resize_token_embeddings(model: nn.Module) -> None:
    """Put the class's ``resize_token_embeddings`` back (the model holds no adapters any more)."""
    if isinstance(model.__dict__.get(_ATTR), _RefusingResize):
        object.__delattr__(model, _ATTR)
