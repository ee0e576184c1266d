"""Sequence packing and collation: padded, packed and padding-free batches.

Packing concatenates several tokenised samples into one row of at most
``max_length`` tokens. For the samples to stay independent:

* ``position_ids`` restart at 0 at every sample boundary, so RoPE sees each
  sample at its own positions;
* attention is block-diagonal-causal: token ``i`` of the row may attend
  ``j`` iff ``j <= i`` and both belong to the same sample
  (:func:`packed_attention_mask`), or equivalently the attention kernel gets
  ``cu_seq_lens`` (FlashAttention's varlen API, which ``transformers`` also
  derives from reset ``position_ids`` when no mask is passed);
* the label of each sample's first token is ``-100``: with the usual shifted
  loss it would be predicted from the previous sample's last token.

With these three, the loss and gradients of a packed row equal those of the
samples run one by one without padding (checked in the tests against a tiny
Llama). See "Efficient Sequence Packing without Cross-contamination"
(Krell et al., arXiv:2107.02027).

:func:`pack_examples` streams (greedy, in order, ``O(1)`` memory per row);
:func:`collate_padding_free` flattens a list of samples into one ``(1,
total)`` row with ``cu_seq_lens``; :func:`collate_padded` right-pads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, TypedDict

import torch

from alignlab._checks import ArgumentTypeError, check_positive_int, check_token_id, is_int, token_id_list
from alignlab.data.sft import IGNORE_INDEX, SequenceTooLongError, TokenizedExample

__all__ = [
    "PackedExample",
    "collate_packed",
    "collate_padded",
    "collate_padding_free",
    "cu_seq_lens_from_position_ids",
    "pack_examples",
    "packed_attention_mask",
]


class PackedExample(TypedDict):
    """A packed row: ``input_ids``, ``labels``, ``position_ids`` (equal lengths) and ``seq_lens``."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]


def _validate(example: TokenizedExample, index: int) -> tuple[list[int], list[int]]:
    try:
        ids, labels = example["input_ids"], example["labels"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"example {index} must have 'input_ids' and 'labels'") from err
    ids, labels = token_id_list(ids, f"example {index}: input_ids"), token_id_list(labels, f"example {index}: labels")
    if len(ids) != len(labels):
        raise ValueError(f"example {index}: input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
    if not ids:
        raise ValueError(f"example {index} is empty")
    if min(ids) < 0:  # an embedding lookup would fail later, far from the sample (or wrap, in a hand-written gather)
        raise ValueError(f"example {index}: input_ids must be token ids >= 0, got {min(ids)}")
    return ids, labels


def pack_examples(
    examples: Iterable[TokenizedExample],
    max_length: int,
    overflow: Literal["error", "skip"] = "error",
) -> Iterator[PackedExample]:
    """Greedily concatenate samples, in order, into rows of at most ``max_length`` tokens.

    A row is emitted when the next sample does not fit. Each sample's first
    label is set to ``-100`` (see module docstring). Samples are never split.
    ``overflow``: a sample longer than ``max_length`` raises
    :class:`~alignlab.data.sft.SequenceTooLongError` (a ``ValueError``;
    ``"error"``) or is dropped (``"skip"``). A ``max_length`` that is no int raises
    :class:`~alignlab.ArgumentTypeError` (a ``TypeError`` and a ``ValueError``), one < 1 ``ValueError``; so do
    token ids that are no ints (1.5, True, a str) and negative ``input_ids``, naming the example.
    """
    check_positive_int(max_length, "max_length")
    if overflow not in ("error", "skip"):
        raise ValueError(f"overflow must be 'error' or 'skip', got {overflow!r}")
    row: PackedExample = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for i, example in enumerate(examples):
        ids, labels = _validate(example, i)
        if len(ids) > max_length:
            if overflow == "skip":
                continue
            raise SequenceTooLongError(f"example {i} has {len(ids)} tokens, longer than max_length={max_length}")
        if len(row["input_ids"]) + len(ids) > max_length:
            yield row
            row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        row["input_ids"].extend(ids)
        row["labels"].extend([IGNORE_INDEX] + labels[1:])
        row["position_ids"].extend(range(len(ids)))
        row["seq_lens"].append(len(ids))
    if row["input_ids"]:
        yield row


def _check_pad_token_id(pad_token_id) -> None:
    # None failed inside torch.full; 1.5 or True were silently read as 1
    if pad_token_id is None:
        raise ArgumentTypeError("pad_token_id: expected a non-negative int, got None (a tokenizer without a pad token: "
                                "set tokenizer.pad_token)")
    check_token_id(pad_token_id, "pad_token_id")


def _check_mask_dtype(dtype, name: str) -> None:
    if dtype is not None and dtype != torch.bool and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{name} must be None, torch.bool or a floating-point dtype, got {dtype!r}")


def packed_attention_mask(
    seq_lens: Sequence[Sequence[int]] | torch.Tensor,
    length: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows, shape ``(batch, 1, length, length)``.

    ``seq_lens``: per row, the sample lengths in order (a list of lists), or
    ``position_ids`` ``(batch, length)`` with resets at sample starts.
    Positions past ``sum(seq_lens[b])`` (padding) attend only to themselves so
    that no softmax row is empty. Returns a bool mask (True = may attend) when
    ``dtype`` is ``None`` or ``torch.bool``, else an additive float mask (0 / dtype min) as
    ``transformers`` accepts for ``attention_mask``. ``length`` (an int) pads
    the mask of a ``seq_lens`` list; with ``position_ids`` the length is theirs.
    Raises ``ValueError`` for an integer ``dtype`` (neither kind of mask), lengths
    that are not positive ints, a ``length`` that is not an int or is shorter than
    a row, or a ``length`` that differs from the ``position_ids``' own; for a length that is no int
    it is an :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too.
    """
    _check_mask_dtype(dtype, "dtype")
    if length is not None and not is_int(length):
        kind = ValueError if is_int(length) else ArgumentTypeError
        raise kind(f"length must be None or an int, got {length!r}")
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dim() != 2:
            raise ValueError(f"position_ids must be (batch, length), got shape {tuple(seq_lens.shape)}")
        if seq_lens.dtype == torch.bool or seq_lens.is_floating_point() or seq_lens.is_complex():
            raise ValueError(f"position_ids must be an integer tensor, got dtype {seq_lens.dtype}")
        if length is not None and length != seq_lens.shape[1]:  # it was ignored without a word
            raise ValueError(f"length={length} differs from the position_ids' length {seq_lens.shape[1]}")
        pos = seq_lens.to(device)
        segment = (pos == 0).long().cumsum(dim=1)
        length = pos.shape[1]
    else:
        rows = [list(r) for r in seq_lens]
        if not rows or any(not r or any(not is_int(n) or n < 1 for n in r) for r in rows):
            kind = ArgumentTypeError if any(not is_int(n) for r in rows for n in r) else ValueError
            raise kind("seq_lens must be a non-empty list of non-empty lists of positive int lengths, got "
                       f"{seq_lens!r}"[:200])
        need = max(sum(r) for r in rows)
        length = need if length is None else length
        if length < need:
            raise ValueError(f"length={length} is shorter than the longest packed row ({need})")
        segment = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            ids = torch.repeat_interleave(torch.arange(1, len(r) + 1, device=device), torch.tensor(r, device=device))
            segment[b, : ids.numel()] = ids
            # each padding position gets its own segment
            segment[b, ids.numel():] = torch.arange(length - ids.numel(), device=device) + len(r) + 1
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """FlashAttention varlen boundaries ``[0, n_1, n_1+n_2, …, total]`` (int32) of a flattened ``(1, total)`` row.

    ``position_ids``: ``(1, total)`` or ``(total,)`` integers that count ``0, 1, 2, …`` within each sample
    and restart at 0 at the next (as :func:`collate_padding_free` makes them). Raises ``TypeError`` if it is
    not a tensor; ``ValueError`` for a float or bool dtype, another shape (a batch of several rows has no
    single row of boundaries), an empty row, or positions that do not start at 0 or do not count up by one
    (a gap, a repeat or a negative value: such a row has no sample boundaries to read).
    """
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype == torch.bool or position_ids.is_floating_point() or position_ids.is_complex():
        raise ValueError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if not (position_ids.dim() == 1 or position_ids.dim() == 2 and position_ids.shape[0] == 1):
        raise ValueError(f"position_ids must be (1, total) or (total,), got shape {tuple(position_ids.shape)}")
    flat = position_ids.flatten()
    if flat.numel() == 0:
        raise ValueError("position_ids is empty")
    if flat[0] != 0:
        raise ValueError(f"position_ids must start at 0 (a sample boundary), got {int(flat[0])}")
    bad = torch.nonzero((flat[1:] != 0) & (flat[1:] != flat[:-1] + 1)).flatten()
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(f"position_ids must count 0, 1, 2, ... within each sample and restart at 0 at the next, "
                         f"got {int(flat[i])} at index {i} after {int(flat[i - 1])}")
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, total]).to(torch.int32)


def collate_padding_free(examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor | int]:
    """Flatten samples into one ``(1, total)`` row without padding.

    Returns ``input_ids``, ``labels`` (first label of each sample ``-100``),
    ``position_ids`` (restarting at 0) — all ``(1, total)`` long — plus
    ``cu_seq_lens`` ``(n + 1,)`` int32 and ``max_length`` for varlen
    attention kernels, and ``use_cache=False``. With ``transformers`` >= 5
    pass ``input_ids``, ``labels``, ``position_ids``, ``use_cache=False`` and
    no ``attention_mask`` (``model(**batch)`` does): it derives the sample
    boundaries from the position resets, but only when no KV cache is built.
    With the cache on (the default of most configs outside training) the
    samples attend to each other silently. Or add
    ``attention_mask=packed_attention_mask(batch["position_ids"], dtype=...)``.
    Raises ``ValueError`` on an empty list or an empty/malformed sample.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty")
    total = sum(len(_validate(e, i)[0]) for i, e in enumerate(examples))  # names an empty sample first
    packed = list(pack_examples(examples, max_length=total))
    row = packed[0]
    lens = torch.tensor(row["seq_lens"])
    return {
        "input_ids": torch.tensor([row["input_ids"]], dtype=torch.long),
        "labels": torch.tensor([row["labels"]], dtype=torch.long),
        "position_ids": torch.tensor([row["position_ids"]], dtype=torch.long),
        "cu_seq_lens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32),
        "max_length": int(lens.max()),
        "use_cache": False,
    }


def collate_padded(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad samples to one ``(batch, seq)`` batch: ``input_ids``, ``labels`` (pads ``-100``), ``attention_mask``.

    With ``padding_side="left"`` each sample's first label is ``-100`` too: the shifted loss would predict it
    from the pad before it (right padding never scores it), so both sides score the same tokens.

    Raises ``ValueError`` for an empty or malformed sample list, a ``pad_token_id`` that is not a
    non-negative int (``None``: the tokenizer has no pad token), a ``pad_to_multiple_of`` that is
    not ``None`` or a positive int, or an unknown ``padding_side``; for a ``pad_token_id``
    or ``pad_to_multiple_of`` that is no int (None included for ``pad_token_id``) it is an
    :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    _check_pad_token_id(pad_token_id)
    if pad_to_multiple_of is not None and (not is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
        kind = ValueError if is_int(pad_to_multiple_of) else ArgumentTypeError
        raise kind(f"pad_to_multiple_of must be None or a positive int, got {pad_to_multiple_of!r}")
    rows = [_validate(e, i) for i, e in enumerate(examples)]
    length = max(len(ids) for ids, _ in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[b, sl] = torch.tensor(ids)
        labels[b, sl] = torch.tensor(lab)
        if padding_side == "left":
            labels[b, sl.start] = IGNORE_INDEX
        attention_mask[b, sl] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


_BOOL_MASK_ATTENTION = ("sdpa", "flex_attention")


def _check_packed_row(row: PackedExample, b: int) -> None:
    """``ValueError`` unless ``row`` is a packed row whose ``position_ids`` count ``0 … n-1`` over each of its
    ``seq_lens``: the mask is built from ``seq_lens``, so a row whose lengths disagree with its tokens (cut by
    hand) was masked wrongly without a word, and an unpacked sample failed with a bare ``KeyError``."""
    try:
        ids, labels, pos, lens = (list(row[k]) for k in ("input_ids", "labels", "position_ids", "seq_lens"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"rows[{b}] must be a packed row with input_ids, labels, position_ids and seq_lens "
                         "(from pack_examples; collate_padded takes unpacked samples)") from err
    if not lens or any(not is_int(n) or n < 1 for n in lens) \
            or not len(ids) == len(labels) == len(pos) == sum(lens) or pos != [i for n in lens for i in range(n)]:
        raise ValueError(f"rows[{b}]: input_ids ({len(ids)}), labels ({len(labels)}) and position_ids ({len(pos)}) "
                         f"must have the length of the samples seq_lens={lens}, with positions restarting at 0 at "
                         "each sample")


def collate_packed(rows: Sequence[PackedExample], pad_token_id: int, length: int | None = None,
                   mask_dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None) -> dict[str, torch.Tensor]:
    """Stack packed rows into ``(batch, length)`` tensors, right-padded.

    Returns ``input_ids``, ``labels`` (pads ``-100``), ``position_ids``
    (0 on padding: each pad is its own one-token segment) and
    ``attention_mask`` ``(batch, 1, length, length)`` from
    :func:`packed_attention_mask`, of the kind the attention in use needs:

    * ``mask_dtype`` given: additive (0 / dtype min) in that dtype, right for every
      ``transformers`` attention that takes a 4-D mask (``torch.bool``: the bool mask);
    * else ``attn_implementation="eager"`` (pass ``model.config._attn_implementation``):
      additive float32 — eager attention *adds* the mask to the scores, so a bool
      mask would be added as 0/1 and change the logits;
    * else ``"sdpa"``/``"flex_attention"``: bool (True = may attend), 4x smaller;
    * else (neither given): bool, with a ``UserWarning`` that it is wrong under eager
      attention.

    Raises ``ValueError`` for an empty ``rows``, a row that is not a packed row (keys, or lengths and
    positions that disagree with its ``seq_lens``), a bad ``pad_token_id`` (as in
    :func:`collate_padded`), a short ``length``, an integer
    ``mask_dtype``, or another
    ``attn_implementation`` (flash-attention kernels take no 4-D mask: use
    :func:`collate_padding_free`'s ``position_ids``/``cu_seq_lens``, or pass ``mask_dtype``).
    """
    if len(rows) == 0:
        raise ValueError("rows is empty")
    _check_pad_token_id(pad_token_id)
    _check_mask_dtype(mask_dtype, "mask_dtype")
    if mask_dtype is None:
        if attn_implementation == "eager":
            mask_dtype = torch.float32
        elif attn_implementation is None:
            warnings.warn(
                "collate_packed returns a bool attention_mask, right for SDPA and flex attention but added as 0/1 "
                "(wrong logits) by eager attention; pass attn_implementation=model.config._attn_implementation "
                "or mask_dtype=<compute dtype> to get the right kind",
                UserWarning,
                stacklevel=2,
            )
        elif attn_implementation not in _BOOL_MASK_ATTENTION:
            raise ValueError(
                f"attn_implementation must be 'eager', 'sdpa', 'flex_attention' or None, got {attn_implementation!r} "
                "(flash-attention kernels take no 4-D mask: use collate_padding_free, or pass mask_dtype)"
            )
    if length is not None and not is_int(length):
        kind = ValueError if is_int(length) else ArgumentTypeError
        raise kind(f"length must be None or an int, got {length!r}")
    for b, r in enumerate(rows):
        _check_packed_row(r, b)
    need = max(len(r["input_ids"]) for r in rows)
    length = need if length is None else length
    if length < need:
        raise ValueError(f"length={length} is shorter than the longest row ({need})")
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        position_ids[b, :n] = torch.tensor(r["position_ids"])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": packed_attention_mask([r["seq_lens"] for r in rows], length, dtype=mask_dtype),
    }
