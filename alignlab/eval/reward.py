"""Score generations with a reward model, in padded batches.

A reward model maps a token sequence (prompt + response) to a scalar
:math:`r_\\phi(x, y)`, e.g. a Bradley-Terry model trained as in "Training
language models to follow instructions with human feedback" (Ouyang et al.,
2022, arXiv:2203.02155). With HF that is an ``*ForSequenceClassification``
model with ``num_labels=1``, which reads the score at the last non-padding
token of each row.

Sequences are sorted by length before batching (less padding), right-padded,
and the scores are returned in the caller's order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, check_count, check_token_id, is_int, token_id_list
from alignlab.eval.eval_mode import eval_mode

__all__ = ["reward_scores"]


def _token_lists(sequences, tokenizer) -> list[list[int]]:
    if isinstance(sequences, str):
        raise TypeError("sequences: expected a sequence of texts or token-id sequences, got a single string")
    out = []
    for i, seq in enumerate(sequences):
        if isinstance(seq, str):
            if tokenizer is None:
                raise ValueError(f"sequences[{i}]: texts need a tokenizer (pass tokenizer=...)")
            seq = tokenizer(seq)["input_ids"]
        seq = token_id_list(seq, f"sequences[{i}]")
        if seq and min(seq) < 0:  # an embedding lookup would fail with an IndexError naming nothing
            raise ValueError(f"sequences[{i}]: token ids must be >= 0, got {min(seq)}")
        if not seq:
            raise ValueError(f"sequences[{i}]: empty sequence")
        out.append(seq)
    return out


def _text_config(model):
    """The config whose ``pad_token_id`` an HF classifier reads (a multimodal model's text config), or None."""
    config = getattr(model, "config", None) if isinstance(model, nn.Module) else None
    text_config = getattr(config, "get_text_config", None)
    return text_config() if callable(text_config) else config


def _lent_pad(tokens: list[list[int]], pad: int | None) -> int:
    """A right-padding id for a classifier that has no pad id of its own: ``pad`` (or 0) unless a row of the
    batch ends in it, else the smallest id none of them ends in. The classifier, lent it as its pad id, scores
    each row at its last token that is not this id: the row's own last token, as when it is scored alone."""
    ends = {t[-1] for t in tokens}
    fill = 0 if pad is None else pad
    return fill if fill not in ends else min(set(range(len(tokens) + 1)) - ends)


@contextlib.contextmanager
def _pad_lent_to(config, pad_id: int | None):
    """``config.pad_token_id = pad_id`` inside the block (if ``pad_id`` is not None), None again afterwards."""
    if pad_id is None:
        yield
        return
    config.pad_token_id = pad_id
    try:
        yield
    finally:
        config.pad_token_id = None


@torch.no_grad()
def reward_scores(
    model: nn.Module | Callable[..., torch.Tensor],
    sequences: Sequence[Sequence[int] | torch.Tensor | str],
    *,
    tokenizer=None,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    label_index: int | None = None,
) -> torch.Tensor:
    """Reward of each sequence, computed ``batch_size`` at a time.

    Args:
        model: reward model; ``model(input_ids=(b, t), attention_mask=(b, t))``
            returns ``(b,)``, ``(b, 1)`` or ``(b, num_labels)`` scores, or an
            object with ``.logits`` of that shape. ``nn.Module`` models are put
            in eval mode for the call and restored afterwards.
        sequences: full texts (with ``tokenizer``) or token ids, one per
            generation, of any lengths.
        tokenizer: HF-style tokenizer, ``tokenizer(text)["input_ids"]``; only
            needed for texts.
        batch_size: sequences per forward pass.
        pad_token_id: id used for right padding; defaults to
            ``model.config.pad_token_id`` then ``tokenizer.pad_token_id``.
            HF sequence-classification models locate the last real token
            through this id, so it must be the model's own: one that differs
            from a set ``model.config.pad_token_id`` is a ``ValueError``. A
            model whose (text) config has ``pad_token_id = None`` (HF then scores
            only one row per call) is lent a pad id for each batched call and
            set back to None afterwards: this id, or one that no row of the batch
            ends in, so that every row is scored at its own last token.
        label_index: which column of ``(b, num_labels)`` scores to return
            (an int, negative counting from the end); required when ``num_labels > 1``.

    Returns:
        ``(len(sequences),)`` float32 tensor on the CPU.

    Raises:
        ValueError: empty sequence, a negative token id, a ``batch_size`` that is no int >= 1, missing pad id for
            unequal lengths, a ``pad_token_id`` that is not a non-negative int
            or differs from ``model.config.pad_token_id``,
            multi-column scores without ``label_index``, or a ``label_index`` out of range.
        TypeError: a single string instead of a sequence of them; a token id that is no int (1.7, True); a
            ``batch_size`` or ``label_index`` that is no
            int (a str, a bool, a float such as 1.0; None too for ``batch_size``, while it is ``label_index``'s
            default): an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too.
    """
    # the wrong kind of thing (a str, None, a bool, a float where an int goes) is an ArgumentTypeError
    batch_size = check_count(batch_size, "batch_size")
    check_token_id(pad_token_id, "pad_token_id", allow_none=True)  # 1.5 was padded as 1
    if label_index is not None and not is_int(label_index):  # True would pick column 1, 1.0 is no index
        raise ArgumentTypeError(f"label_index: expected None or an int, got {label_index!r}")
    tokens = _token_lists(sequences, tokenizer)
    if not tokens:
        return torch.empty(0)
    text_config = _text_config(model)
    config_pad = getattr(text_config, "pad_token_id", None)
    # HF classifiers without a pad id refuse batches of more than one row: each batched call lends them one
    lend = text_config is not None and hasattr(text_config, "pad_token_id") and config_pad is None
    if pad_token_id is not None and config_pad is not None and int(pad_token_id) != config_pad:
        # an HF classifier reads the score at the last token that is not its own pad id: rows padded with
        # another id were scored at their last pad, silently
        raise ValueError(
            f"pad_token_id: {pad_token_id} differs from the reward model's own model.config.pad_token_id="
            f"{config_pad}, through which it finds each row's last real token (rows padded with another id "
            "are scored at a pad); leave pad_token_id=None or pass the model's"
        )
    pad = next((p for p in (pad_token_id, config_pad, getattr(tokenizer, "pad_token_id", None)) if p is not None),
               None)
    if pad is None and not lend and len({len(t) for t in tokens}) > 1 and batch_size > 1:
        raise ValueError("pad_token_id: needed to batch sequences of different lengths (set it or model.config.pad_token_id)")
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
    scores = torch.empty(len(tokens), dtype=torch.float32)
    with mode:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = len(tokens[idx[0]])
            lent = _lent_pad([tokens[i] for i in idx], pad) if lend and len(idx) > 1 else None
            fill = lent if lent is not None else (pad if pad is not None else 0)
            ids = torch.full((len(idx), width), fill, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(tokens[i])] = torch.tensor(tokens[i])
                mask[row, : len(tokens[i])] = 1
            with _pad_lent_to(text_config, lent):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
            out = out.logits if hasattr(out, "logits") else out
            if out.dim() == 2 and out.shape[1] == 1:
                out = out[:, 0]
            elif out.dim() == 2:
                if label_index is None:
                    raise ValueError(
                        f"label_index: the model returns {out.shape[1]} scores per sequence; choose one column"
                    )
                if not -out.shape[1] <= label_index < out.shape[1]:
                    raise ValueError(
                        f"label_index: {label_index} is out of range for the model's {out.shape[1]} scores per sequence"
                    )
                out = out[:, label_index]
            if out.shape != (len(idx),):
                raise ValueError(f"model: expected (batch,) or (batch, num_labels) scores, got {tuple(out.shape)}")
            scores[torch.tensor(idx)] = out.float().cpu()
    return scores
