"""Preference pairs: builders (counterfactual DPO, SPIN, self-rewarding / AI feedback) and collation.

A pair is ``{"prompt": messages, "chosen": str, "rejected": str}`` where
``messages`` is a chat prompt (list of ``{"role", "content"}``) ending before
the assistant's answer. Builders are generators over iterables and call a
user-supplied ``generate(batch_of_message_lists) -> list[str]`` (any
sampler: ``transformers`` ``generate`` + decode, vLLM, an API) in batches,
so nothing here depends on a model class.

* **Counterfactual DPO** — "Aligning Large Language Models with
  Counterfactual DPO", Butcher, arXiv:2401.09566: the same model answers
  under a system prompt asking for the desired style (chosen) and one asking
  for the undesired style (rejected); the pair is trained on the prompt
  *without* those instructions, so the behaviour is internalised.
  ``desired_system=None`` gives the paper's "discourage" variant (plain
  answer preferred over the undesired one), ``undesired_system=None`` the
  "encourage" variant.
* **SPIN** — "Self-Play Fine-Tuning Converts Weak Language Models to Strong
  Language Models", Chen et al., arXiv:2401.01335: chosen = the SFT ground
  truth, rejected = the current model's own generation.
* **Self-rewarding / online AI feedback** — "Self-Rewarding Language
  Models", Yuan et al., arXiv:2401.10020, and "Direct Language Model
  Alignment from Online AI Feedback", Guo et al., arXiv:2402.04792: sample
  several candidates, score them with a judge (the model itself via
  LLM-as-a-judge, or any scorer) and pair the best against the worst.

:func:`tokenize_preference` and :func:`collate_preference` turn pairs into one
padded ``(2·batch, seq)`` batch, chosen rows first, as the DPO-family losses
expect.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

import torch

from alignlab._checks import (ArgumentTypeError, as_bool, check_finite_number, check_number_in_range,
                              check_positive_int, check_template_fields, is_int)
from alignlab.data.packing import collate_padded
from alignlab.data.sft import Message, _check_options, _check_tokenizer, tokenize_prompt_completion

__all__ = [
    "PreferencePair",
    "collate_preference",
    "counterfactual_pairs",
    "llm_judge",
    "online_feedback_pairs",
    "pairs_from_scores",
    "parse_judge_score",
    "self_rewarding_pairs",
    "spin_pairs",
    "tokenize_preference",
]

Generate = Callable[[list[list[dict[str, Any]]]], Sequence[str]]
Judge = Callable[[list[dict[str, Any]], Sequence[str]], Sequence[float]]


class PreferencePair(TypedDict):
    """``prompt``: chat messages before the answer; ``chosen`` / ``rejected``: answer texts."""

    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str


def _as_messages(prompt: str | Sequence[Message], name: str = "prompt") -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(f"{name} must be a string or a non-empty list of chat messages, got {prompt!r}")


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    check_positive_int(size, "batch_size")
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _call_generate(generate: Generate, prompts: list[list[dict[str, Any]]]) -> list[str]:
    out = list(generate(prompts))
    if len(out) != len(prompts):
        raise ValueError(f"generate returned {len(out)} completions for {len(prompts)} prompts")
    if not all(isinstance(o, str) for o in out):
        raise TypeError("generate must return a list of strings")
    return out


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    body = [m for m in messages if m["role"] != "system"]
    return body if system is None else [{"role": "system", "content": system}] + body


def counterfactual_pairs(
    prompts: Iterable[str | Sequence[Message]],
    generate: Generate,
    desired_system: str | None,
    undesired_system: str | None,
    train_system: str | None = None,
    batch_size: int = 8,
    skip_identical: bool = True,
) -> Iterator[PreferencePair]:
    """Counterfactual DPO pairs (arXiv:2401.09566): answers under two steering system prompts.

    For each prompt, ``chosen = generate(desired_system + prompt)`` and
    ``rejected = generate(undesired_system + prompt)`` (``None`` = no system
    message; any system message already in the prompt is replaced). The pair's
    prompt carries ``train_system`` (``None``: no system message). Pairs
    whose two answers are identical are dropped when ``skip_identical``.
    Raises ``ValueError`` if both system prompts are ``None`` or equal,
    ``TypeError`` if ``skip_identical`` is not a bool.
    """
    if desired_system == undesired_system:
        raise ValueError("desired_system and undesired_system must differ")
    skip_identical = as_bool(skip_identical, "skip_identical")
    for batch in _batched((_as_messages(p) for p in prompts), batch_size):
        good = _call_generate(generate, [_with_system(m, desired_system) for m in batch])
        bad = _call_generate(generate, [_with_system(m, undesired_system) for m in batch])
        for messages, c, r in zip(batch, good, bad):
            if skip_identical and c.strip() == r.strip():
                continue
            yield {"prompt": _with_system(messages, train_system), "chosen": c, "rejected": r}


def spin_pairs(
    examples: Iterable[Mapping[str, Any]],
    generate: Generate,
    batch_size: int = 8,
    skip_identical: bool = True,
) -> Iterator[PreferencePair]:
    """SPIN pairs (arXiv:2401.01335): ground truth chosen, the model's own generation rejected.

    Each example is ``{"messages": [..., {"role": "assistant", ...}]}`` (the
    last assistant turn is the ground truth) or ``{"prompt": str | messages,
    "response": str}``. Run once per SPIN iteration with the current model
    behind ``generate``. Raises ``ValueError`` on an example of neither form,
    ``TypeError`` if ``skip_identical`` is not a bool.
    """
    skip_identical = as_bool(skip_identical, "skip_identical")

    def split(ex: Mapping[str, Any], i: int) -> tuple[list[dict[str, Any]], str]:
        if "messages" in ex:
            msgs = _as_messages(ex["messages"], f"examples[{i}]['messages']")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise ValueError(f"examples[{i}]['messages'] must end with an assistant turn after a prompt")
            return msgs[:-1], str(msgs[-1]["content"])
        if "prompt" in ex and "response" in ex:
            return _as_messages(ex["prompt"], f"examples[{i}]['prompt']"), str(ex["response"])
        raise ValueError(f"examples[{i}] needs 'messages' or 'prompt' + 'response', got keys {sorted(ex)}")

    for batch in _batched((split(ex, i) for i, ex in enumerate(examples)), batch_size):
        generated = _call_generate(generate, [p for p, _ in batch])
        for (prompt, truth), own in zip(batch, generated):
            if skip_identical and own.strip() == truth.strip():
                continue
            yield {"prompt": prompt, "chosen": truth, "rejected": own}


def _same_text(a, b) -> bool:
    """Whether two candidates are the same answer: texts compared after stripping, anything else by ``==``."""
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def _score_values(scores: Sequence) -> list[float]:
    """Each score as a float, None as NaN; :class:`ArgumentTypeError` naming ``scores[i]`` for anything else."""
    out = []
    for i, v in enumerate(scores):
        if v is None:
            out.append(math.nan)
            continue
        try:
            if isinstance(v, (str, bytes, bool)):  # float("3") would read a judge's raw text as a score
                raise TypeError
            out.append(float(v))
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(f"scores[{i}]: expected a real number or None, got {v!r}") from None
    return out


def pairs_from_scores(
    prompt: str | Sequence[Message],
    candidates: Sequence[str],
    scores: Sequence[float],
    strategy: Literal["best_worst", "all"] = "best_worst",
    min_margin: float = 0.0,
    skip_identical: bool = True,
) -> list[PreferencePair]:
    """Turn judge scores of candidate answers into pairs.

    ``best_worst`` (Self-Rewarding LMs, arXiv:2401.10020): one pair, the
    highest- against the lowest-scored candidate (first occurrence wins ties),
    kept only if ``max - min > min_margin``. ``all``: every ``(i, j)`` with
    ``s_i - s_j > min_margin``. NaN and None scores (an unparsable judgement) are
    ignored; two infinite scores of the same sign are tied (no pair). A pair whose two texts are equal after
    stripping (a sampled judge can score one text twice, differently) is dropped when ``skip_identical``:
    ``best_worst`` then gives no pair. Raises ``ValueError`` if lengths differ or ``min_margin`` is
    negative, NaN or infinite (a negative margin would pair a candidate with
    itself and tied candidates both ways round); ``TypeError`` if it is not
    a real number, or if a score is neither a number (Python, NumPy, a one-element
    tensor) nor None (a str, a bool: :class:`~alignlab.ArgumentTypeError` naming ``scores[i]``), or if
    ``skip_identical`` is not a bool.
    """
    if len(candidates) != len(scores):
        raise ValueError(f"candidates ({len(candidates)}) and scores ({len(scores)}) differ in length")
    min_margin = check_finite_number(min_margin, "min_margin", minimum=0)
    if strategy not in ("best_worst", "all"):
        raise ValueError(f"strategy must be 'best_worst' or 'all', got {strategy!r}")
    skip_identical = as_bool(skip_identical, "skip_identical")
    messages = _as_messages(prompt)
    valid = [(v, i) for i, v in enumerate(_score_values(scores)) if not math.isnan(v)]
    if strategy == "best_worst" and len(valid) >= 2:
        best = max(valid, key=lambda t: (t[0], -t[1]))
        worst = min(valid, key=lambda t: (t[0], t[1]))
        valid = [best, worst]  # the one pair below, if its margin holds

    def keep(si: float, i: int, sj: float, j: int) -> bool:  # inf - inf is NaN: no margin, no pair
        return si - sj > min_margin and not (skip_identical and _same_text(candidates[i], candidates[j]))

    return [
        {"prompt": messages, "chosen": candidates[i], "rejected": candidates[j]}
        for si, i in valid for sj, j in valid if keep(si, i, sj, j)
    ]


def self_rewarding_pairs(
    records: Iterable[Mapping[str, Any]],
    strategy: Literal["best_worst", "all"] = "best_worst",
    min_margin: float = 0.0,
    skip_identical: bool = True,
) -> Iterator[PreferencePair]:
    """:func:`pairs_from_scores` over ``{"prompt", "candidates", "scores"}`` records, lazily."""
    for i, rec in enumerate(records):
        missing = {"prompt", "candidates", "scores"} - set(rec)
        if missing:
            raise ValueError(f"records[{i}] is missing {sorted(missing)}")
        yield from pairs_from_scores(rec["prompt"], rec["candidates"], rec["scores"], strategy, min_margin,
                                     skip_identical)


def online_feedback_pairs(
    prompts: Iterable[str | Sequence[Message]],
    generate: Generate,
    judge: Judge,
    num_candidates: int = 2,
    strategy: Literal["best_worst", "all"] = "best_worst",
    min_margin: float = 0.0,
    batch_size: int = 8,
    skip_identical: bool = True,
) -> Iterator[PreferencePair]:
    """Online AI feedback (arXiv:2402.04792) / self-rewarding loop step.

    Samples ``num_candidates`` answers per prompt (``generate`` is called
    ``num_candidates`` times per batch; it should sample, not decode
    greedily), scores them with ``judge(prompt_messages, candidates) ->
    scores`` and yields :func:`pairs_from_scores` (two samples of one text never make a pair while
    ``skip_identical``). Raises ``ValueError`` for a
    ``num_candidates`` that is not an int >= 2, a bad ``min_margin`` or ``batch_size``
    (:class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, for a count that is no int).
    """
    if not is_int(num_candidates) or num_candidates < 2:  # 2.5 failed in range(), "3" in the comparison
        kind = ValueError if is_int(num_candidates) else ArgumentTypeError
        raise kind(f"num_candidates must be an int >= 2, got {num_candidates!r}")
    min_margin = check_finite_number(min_margin, "min_margin", minimum=0)  # before any sampling
    skip_identical = as_bool(skip_identical, "skip_identical")
    for batch in _batched((_as_messages(p) for p in prompts), batch_size):
        samples = [_call_generate(generate, batch) for _ in range(num_candidates)]
        for b, messages in enumerate(batch):
            candidates = [s[b] for s in samples]
            scores = list(judge(messages, candidates))
            yield from pairs_from_scores(messages, candidates, scores, strategy, min_margin, skip_identical)


_SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)

JUDGE_TEMPLATE = (
    "Rate the response to the user's request on an additive 0-{max_score} scale: one point each if it is "
    "relevant, if it addresses most of the request, if it answers the core question usefully, if it is "
    "clear, complete and well organised, and if it is expert-level with no superfluous content.\n\n"
    "Request:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Explain briefly, then finish with a line \"Score: <points>\"."
)


def _check_max_score(max_score: float) -> None:
    check_number_in_range(max_score, "max_score", 0, low_open=True)


def parse_judge_score(text: str, max_score: float = 5.0) -> float:
    """The last ``Score: x`` in a judge's answer; NaN when absent or outside ``[0, max_score]``.

    A NaN never wins where scores are maximised: :func:`pairs_from_scores`
    drops it, :func:`alignlab.decoding.rerank` and
    :func:`alignlab.decoding.best_of_n` rank it last (or raise with
    ``nan="raise"``). Raises ``ValueError`` unless ``max_score`` is a finite
    number > 0 (a NaN one made every score NaN); :class:`~alignlab.ArgumentTypeError`, a ``TypeError``
    too, for one that is no number.
    """
    _check_max_score(max_score)
    found = _SCORE.findall(text or "")
    if not found:
        return math.nan
    value = float(found[-1])
    return value if 0.0 <= value <= max_score else math.nan


def llm_judge(generate: Generate, template: str = JUDGE_TEMPLATE, max_score: float = 5.0) -> Judge:
    """A :data:`Judge` from a generator: LLM-as-a-judge with an additive rubric (arXiv:2401.10020 §2).

    ``template`` is formatted with ``prompt`` (the last user message),
    ``response`` and ``max_score``; scores are read with
    :func:`parse_judge_score`. Raises ``ValueError`` for a ``max_score`` that is not a finite number > 0
    (:class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, for no number) or a ``template`` without a ``{prompt}`` or ``{response}`` placeholder (the judge would not see that text).
    """
    _check_max_score(max_score)  # now, not at the first reply
    check_template_fields(template, ("prompt", "response"))  # format() would drop the text silently

    def judge(messages: list[dict[str, Any]], candidates: Sequence[str]) -> list[float]:
        request = next((str(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")
        asks = [[{"role": "user", "content": template.format(prompt=request, response=c, max_score=max_score)}]
                for c in candidates]
        return [parse_judge_score(t, max_score) for t in _call_generate(generate, asks)]

    return judge


def tokenize_preference(pair: Mapping[str, Any], tokenizer: Any, max_length: int | None = None,
                        **template_kwargs: Any) -> dict[str, list[int]]:
    """Chat-format a pair; labels cover only the chosen / rejected answer.

    ``chosen`` / ``rejected``: an answer string (one assistant turn) or, as in TRL's conversational
    preference rows, a list of messages (``[{"role": "assistant", "content": ...}]``). Each side is
    ``prompt + answer`` through :func:`~alignlab.data.sft.tokenize_prompt_completion`, as
    :func:`~alignlab.data.sft.tokenize_chats`' prompt/completion rows: the labelled span runs from the end of
    the prompt rendered with the generation prompt to the end of the conversation.

    Returns ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels``. Raises ``ValueError`` as :func:`~alignlab.data.sft.tokenize_chat` does
    (e.g. longer than ``max_length``), if a key is missing or if an answer is neither a string nor a
    list of messages (naming the side); ``TypeError`` naming the message for a content that is no string.
    """
    missing = {"prompt", "chosen", "rejected"} - set(pair)
    if missing:
        raise ValueError(f"pair is missing {sorted(missing)}")
    _check_options("last", "error", max_length)  # argument errors come before the prompt's
    _check_tokenizer(tokenizer)
    prompt = _as_messages(pair["prompt"])
    out: dict[str, list[int]] = {}
    for side in ("chosen", "rejected"):
        ex = tokenize_prompt_completion(prompt, pair[side], tokenizer, max_length, template_kwargs=template_kwargs,
                                        completion_name=side)
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ex["input_ids"], ex["labels"]
    return out


def collate_preference(examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int,
                       pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One right-padded batch of ``2·B`` rows: ``B`` chosen then ``B`` rejected.

    Input rows carry ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels``. Returns ``input_ids``,
    ``labels`` (``-100`` off-answer and on padding), ``attention_mask``, all
    ``(2B, seq)``; split log-probs with ``x[:B]`` / ``x[B:]``. Raises
    ``ValueError`` on an empty list or a missing key.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty")
    rows = []
    for side in ("chosen", "rejected"):
        for i, ex in enumerate(examples):
            if f"{side}_input_ids" not in ex or f"{side}_labels" not in ex:
                raise ValueError(f"examples[{i}] needs {side}_input_ids and {side}_labels")
            rows.append({"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]})
    return collate_padded(rows, pad_token_id, pad_to_multiple_of)
