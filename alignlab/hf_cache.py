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
def _declared_cache_keyword(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: assume the long-lived name
        return "past_key_values"
    return next((k for k in CACHE_KEYWORDS if k in params), "past_key_values")


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache.

    ``"cache"`` where the forward declares it (transformers ≥ 5.24), otherwise
    ``"past_key_values"`` (older releases, and models outside transformers).
    Read once per model class.
    """
    return _declared_cache_keyword(type(model))


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
