"""The KV-cache keyword of a Hugging Face model call, across transformers releases.

transformers renamed the cache argument of every model ``forward`` (and of the
model outputs) from ``past_key_values`` to ``cache`` (5.24; the old name is
accepted with a deprecation warning until 5.40), and ``generate()`` now hands the
cache over under the new name. Code that rewrites a model call in a forward
pre-hook (soft prompts) or drives incremental decoding itself (decoding
companions) must read the cache under either name and write it under the one the
model takes. This module is that one decision:

* :func:`cache_keyword` -- the name ``model.forward`` declares (``"cache"`` or ``"past_key_values"``);
* :func:`find_cache` -- ``(keyword, cache)`` of a call's keyword arguments, whichever name was used;
* :func:`output_cache` -- the cache a model output returned, without touching deprecated properties.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

__all__ = ["CACHE_KEYWORDS", "cache_keyword", "find_cache", "output_cache"]

# newest name first: a call or an output that carries both is read under the new one
CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _declared_cache_keyword(cls: type) -> str | None:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return None
    return next((k for k in CACHE_KEYWORDS if k in params), None)


def _wrapped_model(model: nn.Module) -> nn.Module | None:
    """The model a pass-through wrapper hands its keyword arguments to: ``torch.compile``'s ``_orig_mod``,
    (Distributed)DataParallel's ``module``, a PEFT model's ``get_base_model()``; None for anything else."""
    inner = getattr(model, "_orig_mod", None)
    if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        inner = model.module
    if inner is None and callable(getattr(model, "get_base_model", None)):
        inner = model.get_base_model()
    return inner if isinstance(inner, nn.Module) and inner is not model else None


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache.

    ``"cache"`` where the forward declares it (transformers ≥ 5.24), otherwise
    ``"past_key_values"`` (older releases, and models outside transformers).
    A wrapper whose forward declares neither (``torch.compile``, a PEFT model,
    DataParallel) passes the keyword on: the model inside it decides, else
    the deprecated name went to a model that takes ``cache``.
    Read once per model class.
    """
    while True:
        keyword = _declared_cache_keyword(type(model))
        inner = _wrapped_model(model) if keyword is None else None
        if inner is None:
            return keyword or "past_key_values"
        model = inner


def find_cache(kwargs: dict) -> tuple[str | None, object]:
    """``(keyword, cache)`` of a model call's keyword arguments; ``(None, None)`` when neither name is given.

    A name given with the value ``None`` counts as given (its keyword is returned),
    so a rewritten call can keep the caller's spelling.
    """
    for key in CACHE_KEYWORDS:
        if key in kwargs and kwargs[key] is not None:
            return key, kwargs[key]
    for key in CACHE_KEYWORDS:
        if key in kwargs:
            return key, None
    return None, None


def output_cache(out) -> object:
    """The KV cache an HF model output carries (``out.cache`` or ``out.past_key_values``), or ``None``."""
    getter = out.get if hasattr(out, "get") else lambda key: getattr(out, key, None)
    for key in CACHE_KEYWORDS:
        value = getter(key)
        if value is not None:
            return value
    return None
