"""Whether a model's forward reads ``config.tie_word_embeddings`` (no alignlab imports: quant and adapters share it).

Untying a shared embedding / head table (a merge into it, an NF4 copy of a tied head) sets that flag to False, so
that transformers' ``tie_weights()`` does not put the shared table back. Most models read the flag only when they
tie; SwitchTransformers and UDOP also rescale the decoder output by ``d_model ** -0.5`` in forward only while it is
True, so there an untie changes the logits and is refused instead.
"""

from __future__ import annotations

import inspect

from torch import nn


def forward_reads_tie_flag(model: nn.Module) -> bool:
    """Whether ``type(model).forward``'s source mentions ``tie_word_embeddings`` (False where there is no source: a
    class made at run time)."""
    try:
        return "tie_word_embeddings" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
