"""Supervised fine-tuning data: chat-template rendering and completion-only labels.

A conversation is a list of ``{"role": ..., "content": ...}`` messages. It
is rendered with the user's tokenizer (``tokenizer.apply_chat_template``), so
the model sees exactly the format it will see at inference, and tokenised
once. Labels copy the input ids on assistant tokens and are ``-100``
(``IGNORE_INDEX``) elsewhere, so the usual next-token cross-entropy is the
completion-only SFT loss

    L = - Σ_t m_t log p(x_t | x_<t) / Σ_t m_t,   m_t = 1 iff token t belongs to an assistant turn.

The assistant spans are found without template-specific markers: the
rendering of ``messages[:k]`` with the generation prompt must be a prefix of
the rendering of ``messages[:k+1]``, and the characters in between are the
k-th assistant turn (its content plus the template's end-of-turn text).
Tokens are mapped to characters through the fast tokenizer's offsets, or
(slow tokenizers) the text is tokenised span by span.

Prompt/completion rows (``{"prompt": ..., "completion": ...}``) are supervised
on the completion only, as TRL's ``completion_only_loss``: the labelled span runs
from the end of the prompt rendered with the generation prompt to the end of the
conversation, so assistant turns inside a multi-turn prompt are context, not
targets (``completion_only_loss=False`` labels them too, as for ``messages``).

Everything works one example at a time, so :func:`tokenize_chats` streams
over any iterable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

from alignlab._checks import as_bool, check_positive_int

__all__ = [
    "IGNORE_INDEX",
    "SequenceTooLongError",
    "TokenizedExample",
    "render_chat",
    "tokenize_chat",
    "tokenize_chats",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

Message = Mapping[str, Any]


class SequenceTooLongError(ValueError):
    """A tokenised sample is longer than the allowed ``max_length``."""


class TokenizedExample(TypedDict):
    """One tokenised sample: ``input_ids`` and ``labels`` (``-100`` = no loss), equal lengths."""

    input_ids: list[int]
    labels: list[int]


def _check_tokenizer(tokenizer: Any) -> None:
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tokenizer has no chat_template: set tokenizer.chat_template to a Jinja template "
            "(or use a chat/instruct tokenizer)"
        )


def _check_messages(messages: Sequence[Message], name: str = "messages") -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{name} must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{name}[{i}] must be a mapping with 'role' and 'content', got {m!r}")
        content = m["content"]
        # A list is a multimodal/content-parts message; None is allowed beside tool calls only.
        if not isinstance(content, (str, list)) and not (content is None and m.get("tool_calls")):
            raise TypeError(
                f"{name}[{i}]['content'] must be a str (or a list of content parts), got "
                f"{type(content).__name__}: {content!r}"
            )


def render_chat(messages: Sequence[Message], tokenizer: Any, add_generation_prompt: bool = False,
                **template_kwargs: Any) -> str:
    """The chat-template text of ``messages`` (no tokenisation).

    Raises ``ValueError`` if the tokenizer has no chat template or a message
    lacks ``role``/``content``.
    """
    _check_tokenizer(tokenizer)
    _check_messages(messages)
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def _assistant_spans(messages: Sequence[Message], tokenizer: Any, train_on: str,
                     template_kwargs: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    full = render_chat(messages, tokenizer, **template_kwargs)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("conversation has no assistant turn: nothing to train on")
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for k in turns:
        if k == 0:
            raise ValueError("an assistant turn must follow at least one prompt message (messages[0] is assistant)")
        prefix = render_chat(messages[:k], tokenizer, add_generation_prompt=True, **template_kwargs)
        through = render_chat(messages[: k + 1], tokenizer, **template_kwargs)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise ValueError(
                "the chat template is not prefix-consistent (rendering messages[:k] with the generation prompt "
                f"is not a prefix of rendering messages[:k+1], k={k}); completion masks cannot be derived"
            )
        if len(through) > len(prefix):
            spans.append((len(prefix), len(through)))
    return full, spans


def _tokenize_with_spans(text: str, spans: list[tuple[int, int]], tokenizer: Any) -> TokenizedExample:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tok, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = any(start < e and end > s for s, e in spans) if end > start else any(
                s <= start < e for s, e in spans
            )
            labels.append(tok if inside else IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels}
    # slow tokenizer: tokenise the text piece by piece (pieces are cut at turn boundaries)
    ids, labels, cursor = [], [], 0
    for s, e in spans + [(len(text), len(text))]:
        for piece, train in ((text[cursor:s], False), (text[s:e], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                labels.extend(piece_ids if train else [IGNORE_INDEX] * len(piece_ids))
        cursor = e
    return {"input_ids": ids, "labels": labels}


def tokenize_chat(
    messages: Sequence[Message],
    tokenizer: Any,
    max_length: int | None = None,
    train_on: Literal["all", "last"] = "all",
    overflow: Literal["error", "truncate"] = "error",
    **template_kwargs: Any,
) -> TokenizedExample:
    """Render + tokenise one conversation with completion-only labels.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        tokenizer: a ``transformers`` tokenizer with a ``chat_template``.
        max_length: longest allowed sequence; ``None`` for no limit.
        train_on: ``"all"`` assistant turns or only the ``"last"`` one.
        overflow: ``"error"`` raises when longer than ``max_length``;
            ``"truncate"`` keeps the first ``max_length`` tokens (raises if
            no supervised token survives).
        **template_kwargs: passed to ``apply_chat_template``.

    Returns ``{"input_ids": list[int], "labels": list[int]}``.

    Raises ``ValueError`` for: a tokenizer without chat template, malformed
    messages, no assistant turn, a template that is not prefix-consistent,
    an over-long sequence (``overflow="error"``; :class:`SequenceTooLongError`,
    a ``ValueError`` subclass), a ``max_length`` < 1; for a ``max_length`` that is
    neither an int nor None, :class:`~alignlab.ArgumentTypeError` (a ``ValueError`` too).
    """
    _check_options(train_on, overflow, max_length)
    text, spans = _assistant_spans(messages, tokenizer, train_on, template_kwargs)
    return _finish(text, spans, tokenizer, max_length, overflow)


def _check_options(train_on: str, overflow: str, max_length: int | None) -> None:
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    if overflow not in ("error", "truncate"):
        raise ValueError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
    check_positive_int(max_length, "max_length", allow_none=True)


def _completion_span(prompt: Sequence[Message], completion: Sequence[Message], tokenizer: Any,
                     template_kwargs: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendering of ``prompt + completion`` and the completion's character span in it."""
    prefix = render_chat(prompt, tokenizer, add_generation_prompt=True, **template_kwargs)
    full = render_chat(list(prompt) + list(completion), tokenizer, **template_kwargs)
    if not full.startswith(prefix):
        raise ValueError(
            "the chat template is not prefix-consistent (the prompt rendered with the generation prompt is not "
            "a prefix of prompt + completion); the completion span cannot be derived"
        )
    return full, [(len(prefix), len(full))] if len(full) > len(prefix) else []


def _finish(text: str, spans: list[tuple[int, int]], tokenizer: Any, max_length: int | None,
            overflow: str) -> TokenizedExample:
    example = _tokenize_with_spans(text, spans, tokenizer)
    n = len(example["input_ids"])
    if max_length is not None and n > max_length:
        if overflow == "error":
            raise SequenceTooLongError(f"sequence has {n} tokens, longer than max_length={max_length}")
        example = {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}
    if all(label == IGNORE_INDEX for label in example["labels"]):
        raise ValueError("no supervised token left (assistant turns empty or truncated away)")
    return example


def tokenize_prompt_completion(
    prompt: str | Sequence[Message],
    completion: str | Sequence[Message],
    tokenizer: Any,
    max_length: int | None = None,
    overflow: Literal["error", "truncate"] = "error",
    *,
    template_kwargs: Mapping[str, Any] | None = None,
    completion_name: str = "completion",
) -> TokenizedExample:
    """Render + tokenise ``prompt + completion`` with labels on the completion only.

    A string ``prompt`` is one user turn and a string ``completion`` one assistant turn; either may instead be
    a list of messages (TRL's conversational rows; the completion may hold several turns). The labelled span runs
    from the end of the prompt rendered with the generation prompt to the end of the whole rendering: the
    completion's turns and the template's end-of-turn text, as TRL's ``completion_only_loss``. The prompt, its
    generation prompt included, is ``-100``. ``max_length`` and ``overflow`` act as in :func:`tokenize_chat`;
    ``template_kwargs`` go to ``apply_chat_template``; errors about the completion's messages call it
    ``completion_name``. Used by :func:`tokenize_chats` (prompt/completion rows) and
    :func:`~alignlab.data.pairs.tokenize_preference` (each answer).

    Returns ``{"input_ids": list[int], "labels": list[int]}``, equal lengths.

    Raises ``ValueError`` for a tokenizer without chat template, malformed messages, a template that is not
    prefix-consistent, an over-long sequence (``overflow="error"``; :class:`SequenceTooLongError`), no supervised
    token left, a bad ``overflow`` or ``max_length``; ``TypeError`` for a message content that is no string or a
    tokenizer that is no ``transformers`` tokenizer.
    """
    _check_options("last", overflow, max_length)  # train_on has no say: the completion is the one span
    _check_tokenizer(tokenizer)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    _check_messages(completion, completion_name)  # the prompt is checked where it is rendered
    text, spans = _completion_span(prompt, completion, tokenizer, template_kwargs or {})
    return _finish(text, spans, tokenizer, max_length, overflow)


def tokenize_chats(
    conversations: Iterable[Sequence[Message] | Mapping[str, Any]],
    tokenizer: Any,
    max_length: int | None = None,
    train_on: Literal["all", "last"] = "all",
    overflow: Literal["error", "truncate", "skip"] = "error",
    completion_only_loss: bool = True,
    **template_kwargs: Any,
) -> Iterator[TokenizedExample]:
    """Lazily :func:`tokenize_chat` every conversation of an iterable.

    Each item is a message list, a ``{"messages": [...]}`` row, or a
    ``{"prompt": str | messages, "completion": str | messages}`` row (TRL's
    formats; a string completion becomes one assistant turn, a string prompt one
    user turn). ``overflow="skip"`` drops over-long conversations (logged at INFO
    level) instead of raising.

    ``completion_only_loss`` (prompt/completion rows only): ``True`` (default, as
    TRL's ``completion_only_loss``) labels only the completion, everything
    rendered after the prompt and its generation prompt; ``False`` treats the row
    as one conversation and labels its assistant turns as ``train_on`` says,
    those inside a multi-turn prompt included.

    Raises ``ValueError``/``TypeError`` naming the conversation for malformed
    rows (e.g. a ``content`` that is not a string), besides :func:`tokenize_chat`'s.
    """
    completion_only_loss = as_bool(completion_only_loss, "completion_only_loss")  # NumPy bools too
    if overflow not in ("error", "truncate", "skip"):
        raise ValueError(f"overflow must be 'error', 'truncate' or 'skip', got {overflow!r}")
    row_overflow = "error" if overflow == "skip" else overflow
    _check_options(train_on, row_overflow, max_length)
    for i, conv in enumerate(conversations):
        try:
            prompt, completion = _row_prompt_completion(conv)
            if prompt is not None and completion_only_loss:
                example = tokenize_prompt_completion(prompt, completion, tokenizer, max_length, row_overflow,
                                                     template_kwargs=template_kwargs)
            else:
                messages = completion if prompt is None else list(prompt) + list(completion)
                example = tokenize_chat(messages, tokenizer, max_length, train_on, row_overflow, **template_kwargs)
        except SequenceTooLongError as err:
            if overflow == "skip":
                logger.info("skipping conversation %d: %s", i, err)
                continue
            raise SequenceTooLongError(f"conversation {i}: {err}") from err
        except ValueError as err:
            raise ValueError(f"conversation {i}: {err}") from err
        except TypeError as err:
            raise TypeError(f"conversation {i}: {err}") from err
        yield example


def _row_prompt_completion(
    row: Sequence[Message] | Mapping[str, Any],
) -> tuple[list[Message] | None, list[Message]]:
    """``(prompt, completion)`` messages of a prompt/completion row, ``(None, messages)`` otherwise."""
    if not isinstance(row, Mapping):
        _check_messages(row)
        return None, list(row)
    if "messages" in row:
        _check_messages(row["messages"])
        return None, list(row["messages"])
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        _check_messages(prompt, "prompt")
        _check_messages(completion, "completion")
        return list(prompt), list(completion)
    raise ValueError(f"a row must hold 'messages' or 'prompt' + 'completion', got keys {sorted(row)}")
