"""``eval_mode(model)``: a model in eval mode (no dropout) for a block, every submodule's own mode put back after.

``model.train(was_training)`` is not the way back: it sets *every* submodule to the root's mode, so a block the
caller kept in eval (a frozen part, dropout switched off by hand) would come back training. Used by
:func:`alignlab.eval.perplexity`, :func:`alignlab.eval.reward_scores` and the decoding companions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; the submodules that were training train again after it."""
    training = [m for m in model.modules() if m.training]
    if not training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for m in training:
            m.training = True
