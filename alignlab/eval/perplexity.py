"""Token-weighted perplexity of a causal language model.

.. math::

    \\mathrm{PPL} = \\exp\\Big(-\\frac{1}{N}\\sum_{i=1}^{N} \\log p_\\theta(x_{t_i} \\mid x_{<t_i})\\Big)

where the sum runs over every scored token of every sequence of every batch
(token-weighted: a long sequence counts more than a short one, unlike the mean
of per-sequence perplexities). A token is scored when its label is not
``ignore_index`` and its attention-mask entry is 1; the first token of a
sequence has no context and is never scored. Packed rows (``position_ids`` restarting at 0 at each sample)
are split into their samples, so a packed batch scores as its samples alone.

Long sequences are scored with a sliding window of ``max_length`` tokens
that advances by ``stride < max_length`` tokens: every token after the first
is scored exactly once, by the window that first reaches it, with at least
``max_length - stride`` tokens of context (fewer only in the first window).
The default ``stride = max_length - 1`` makes windows share a single token
(fast, least context); a small stride approaches the full-context perplexity
(slow). This is the procedure of the HF "Perplexity of fixed-length models"
guide, except that no token is left unscored at a window border (the guide's
``stride == max_length`` drops the first token of every window), written so
padded batches and label masks work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, is_int
from alignlab.data.packing import cu_seq_lens_from_position_ids, packed_attention_mask
from alignlab.eval.eval_mode import eval_mode

__all__ = ["negative_log_likelihood", "perplexity"]


def _as_batch(batch: Mapping[str, torch.Tensor] | torch.Tensor, ignore_index: int):
    """Normalise one batch to ``(input_ids, attention_mask, labels)``, all ``(batch, seq)``.

    Real tokens come first in every row; packed rows (``position_ids``) are split into one row per sample.
    """
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "batches: expected an iterable of (batch, seq) LongTensors or of mappings with an 'input_ids' key, "
            f"got an item of type {type(batch).__name__}"
        )
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"batches: 'input_ids' must be an integer tensor of shape (batch, seq), got "
            f"{getattr(input_ids, 'shape', type(input_ids))}"
        )
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        if (not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point()
                or position_ids.dtype == torch.bool or position_ids.shape != input_ids.shape):
            raise ValueError(
                f"batches: 'position_ids' must be an integer tensor of the shape of 'input_ids' "
                f"{tuple(input_ids.shape)}, got {getattr(position_ids, 'shape', type(position_ids))}"
            )
        position_ids = position_ids.to(input_ids.device)
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        _check_packed_mask(mask, position_ids, input_ids.shape)
        mask = None  # it says what the position resets say: each sample sees only itself
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    labels = batch.get("labels")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
                               or labels.is_complex() or labels.dtype == torch.bool):  # True/False are no token ids
        raise ValueError(
            "batches: 'labels' must be an integer tensor of shape (batch, seq), got "
            f"{getattr(labels, 'dtype', labels)!r}"
        )
    # cross_entropy takes only int64 targets; int32 ids (Arrow / NumPy datasets) are as good
    labels = (input_ids if labels is None else labels).to(torch.long, copy=True)
    if mask.shape != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(
            f"batches: 'attention_mask' {tuple(mask.shape)} and 'labels' {tuple(labels.shape)} must match "
            f"'input_ids' {tuple(input_ids.shape)}"
        )
    labels[~mask] = ignore_index
    # Move the real tokens of every row to the front (a stable sort keeps their
    # order). Left-padded rows then read like right-padded ones, so the default
    # position ids 0..len-1 are right for every model, not only for the ones
    # that derive them from the mask.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    input_ids, mask, labels = input_ids.gather(1, order), mask.gather(1, order), labels.gather(1, order)
    if position_ids is None:
        return input_ids, mask, labels
    return _split_packed(input_ids, mask, labels, position_ids.gather(1, order), ignore_index)


def _check_packed_mask(mask: torch.Tensor, position_ids: torch.Tensor | None, shape: torch.Size) -> None:
    """A 4-D mask is taken only as the block-diagonal causal mask of packed rows' ``position_ids``."""
    if position_ids is None:
        raise ValueError(
            "batches: a 4-D 'attention_mask' needs the rows' 'position_ids' (packed rows, as collate_packed "
            "returns them): the samples are read from the position resets"
        )
    if mask.shape != (shape[0], 1, shape[1], shape[1]):
        raise ValueError(f"batches: a 4-D 'attention_mask' must be (batch, 1, seq, seq) = "
                         f"{(shape[0], 1, shape[1], shape[1])}, got {tuple(mask.shape)}")
    allowed = mask[:, 0].to(position_ids.device)
    allowed = allowed == 0 if allowed.is_floating_point() else allowed.to(torch.bool)  # additive or bool
    if not torch.equal(allowed, packed_attention_mask(position_ids, device=position_ids.device)[:, 0]):
        raise ValueError(
            "batches: the 4-D 'attention_mask' is not the block-diagonal causal mask of the 'position_ids' "
            "(each sample attending to itself, samples starting where the positions restart at 0)"
        )


def _split_packed(input_ids, mask, labels, position_ids, ignore_index: int):
    """One right-padded row per sample of packed rows: a sample starts at each real token whose position is
    0, so every sample is scored alone, as it is trained (its first token without context, none from the
    sample before it). Samples with nothing to score are left out."""
    lengths = mask.sum(1).tolist()
    segments = []
    for b, n in enumerate(lengths):
        if not n:
            continue
        try:  # the sample boundaries of the real tokens, which must count 0, 1, 2, ... and restart at 0
            bounds = cu_seq_lens_from_position_ids(position_ids[b, :n]).tolist()
        except ValueError as err:
            raise ValueError(f"batches: 'position_ids' row {b} (over its real tokens): {err}") from None
        for s, e in zip(bounds[:-1], bounds[1:]):
            if bool((labels[b, s + 1:e] != ignore_index).any()):
                segments.append((b, s, e))
    width = max((e - s for _, s, e in segments), default=0)
    out_ids = input_ids.new_zeros((len(segments), width))
    out_mask = torch.zeros((len(segments), width), dtype=torch.bool, device=mask.device)
    out_labels = labels.new_full((len(segments), width), ignore_index)
    for row, (b, s, e) in enumerate(segments):
        out_ids[row, : e - s] = input_ids[b, s:e]
        out_mask[row, : e - s] = True
        out_labels[row, : e - s] = labels[b, s:e]
    return out_ids, out_mask, out_labels


def _window_starts(length: int, max_length: int, stride: int) -> list[int]:
    starts, begin = [0], 0
    while begin + max_length < length:
        begin += stride
        starts.append(begin)
    return starts


@torch.no_grad()
def negative_log_likelihood(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    ignore_index: int = -100,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of scored tokens.

    Args:
        model: a causal LM; ``model(input_ids=..., attention_mask=...)`` returns
            logits ``(batch, seq, vocab)`` or an object with a ``.logits``
            attribute (any HF ``*ForCausalLM``). It is put in eval mode for the
            call and restored afterwards.
        batches: iterable of ``(batch, seq)`` ``input_ids`` tensors or of
            mappings with ``input_ids`` and optional ``attention_mask`` (1 =
            real token; left or right padding) and ``labels`` (``ignore_index``
            = not scored, e.g. a masked prompt). ``labels`` are the tokens
            themselves, not shifted: HF convention. Packed rows carry
            ``position_ids`` (``collate_packed``, ``collate_padding_free``):
            each row is split where the positions restart at 0 and every sample
            is scored alone, as the packed model sees it; their 4-D
            ``attention_mask`` must be the block-diagonal causal mask of those
            positions (checked; ``ValueError`` otherwise).
        max_length: window length; ``None`` scores each sequence in one pass.
        stride: window step, ``1 <= stride < max_length`` so the token at a
            window start still has context; defaults to ``max_length - 1``.
            Needs ``max_length``.
        ignore_index: label value that is not scored (an int; :class:`~alignlab.ArgumentTypeError` otherwise).

    Returns:
        ``(total_nll, num_tokens)``; log-softmax in at least float32 (a float64 model in float64), summed in float64.

    Raises:
        ValueError / TypeError: malformed batches or window arguments; a single
            tensor or mapping instead of an iterable of them (``TypeError``).
    """
    if not is_int(ignore_index):  # 1.5 was stored as 1 in the labels but compared as 1.5: pads were scored
        raise ArgumentTypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if max_length is None and stride is not None:
        raise ValueError("stride: needs max_length to be set too")
    if max_length is not None and (not is_int(max_length) or max_length < 2):
        kind = ValueError if is_int(max_length) else ArgumentTypeError
        raise kind(f"max_length: expected an int >= 2, got {max_length!r}")
    if stride is None and max_length is not None:
        stride = max_length - 1
    if max_length is not None and (not is_int(stride) or not 1 <= stride < max_length):
        kind = ValueError if is_int(stride) else ArgumentTypeError
        raise kind(f"stride: expected an int with 1 <= stride < max_length={max_length}, got {stride!r}")

    if isinstance(batches, (torch.Tensor, Mapping)):
        # iterating one (batch, seq) tensor gives its rows, one mapping its keys: errors about the wrong thing
        raise TypeError(
            f"batches: expected an iterable of batches, got one {type(batches).__name__}; wrap it in a list"
        )
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            input_ids, mask, labels = _as_batch(batch, ignore_index)
            device = next(model.parameters(), input_ids).device
            input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
            length = int(mask.sum(1).max()) if mask.numel() else 0
            window = length if max_length is None else max_length
            scored_until = 1  # the first token has no context
            for begin in _window_starts(length, window, stride or window):
                end = min(begin + window, length)
                targets = labels[:, begin:end].clone()
                # Tokens before `scored_until` were scored by an earlier window;
                # here they only serve as context.
                targets[:, : max(scored_until - begin, 0)] = ignore_index
                scored_until = end
                rows = (targets[:, 1:] != ignore_index).any(1).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                out = model(input_ids=input_ids[rows, begin:end], attention_mask=mask[rows, begin:end].long())
                logits = out.logits if hasattr(out, "logits") else out
                shift_labels = targets[rows, 1:]
                keep = shift_labels != ignore_index
                # at least float32 (a float64 model keeps float64), summed in float64 as documented
                scored = logits[:, :-1][keep]
                nll = nn.functional.cross_entropy(
                    scored.to(torch.promote_types(scored.dtype, torch.float32)), shift_labels[keep], reduction="none"
                )
                total += float(nll.double().sum())
                count += int(keep.sum())
    return total, count


def perplexity(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    ignore_index: int = -100,
) -> float:
    """Token-weighted perplexity ``exp(total_nll / num_tokens)`` over all batches.

    Arguments as in :func:`negative_log_likelihood`.

    Raises:
        ValueError: no token was scored (empty batches or everything masked),
            plus everything :func:`negative_log_likelihood` raises.
    """
    total, count = negative_log_likelihood(
        model, batches, max_length=max_length, stride=stride, ignore_index=ignore_index
    )
    if count == 0:
        raise ValueError("batches: no token was scored (empty input, or every label is ignore_index)")
    return math.exp(total / count)
