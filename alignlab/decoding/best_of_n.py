"""Best-of-N (rejection) sampling: draw N candidates, keep the highest-scoring one.

Used as an inference-time alignment baseline in e.g. "Scaling Laws for Reward
Model Overoptimization" (Gao et al., 2022, arXiv:2210.10760): for a prompt
:math:`x`, sample :math:`y_1..y_N \\sim \\pi(\\cdot \\mid x)` and return
:math:`\\arg\\max_i r(x, y_i)`. Its KL from :math:`\\pi` is at most
:math:`\\log N - (N-1)/N` nats.

:func:`rerank` works on any candidates (texts, token lists) and any scorer;
:func:`best_of_n` drives ``model.generate`` for HF-style models.

A NaN score (a reward model that overflowed, an unparsable judge reply such
as :func:`alignlab.data.parse_judge_score`'s NaN) never wins: with
``nan="lose"`` (default) it ranks below every number, ``-inf`` included; with
``nan="raise"`` it is a ``ValueError``. Only when every candidate of a prompt
is NaN is the first one returned, with a ``RuntimeWarning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

from alignlab._checks import check_count

__all__ = ["BestOfNOutput", "best_of_n", "rerank"]

T = TypeVar("T")
NanPolicy = Literal["lose", "raise"]


def _check_nan_policy(nan: str) -> None:
    if nan not in ("lose", "raise"):
        raise ValueError(f"nan: expected 'lose' or 'raise', got {nan!r}")


def _best_index(scores: torch.Tensor, nan: NanPolicy) -> torch.Tensor:
    """``(batch, n)`` scores -> ``(batch,)`` index of the first maximum, NaN ranked below everything."""
    is_nan = scores.isnan()
    if is_nan.any():
        if nan == "raise":
            rows, cols = is_nan.nonzero(as_tuple=True)
            where = [(int(r), int(c)) for r, c in zip(rows[:5], cols[:5])]
            raise ValueError(f"score_fn: NaN scores at (prompt, candidate) {where}{' ...' if rows.numel() > 5 else ''}")
        if is_nan.all(1).any():
            rows = is_nan.all(1).nonzero().flatten().tolist()
            warnings.warn(
                f"score_fn: every candidate of prompt(s) {rows} scored NaN; returning the first candidate there",
                RuntimeWarning,
                stacklevel=3,
            )
    top = scores.masked_fill(is_nan, float("-inf")).amax(1, keepdim=True)
    is_best = ~is_nan & (scores == top)
    return is_best.to(torch.uint8).argmax(1)  # argmax returns the first maximum; all-NaN rows give 0


def rerank(
    candidates: Sequence[T],
    score_fn: Callable[[Sequence[T]], Sequence[float] | torch.Tensor],
    *,
    nan: NanPolicy = "lose",
) -> tuple[T, int, list[float]]:
    """Score all candidates with one call and pick the best (first one on ties).

    Args:
        candidates: anything ``score_fn`` accepts (texts, token lists).
        score_fn: maps the candidates to one score each: a sequence of numbers or a tensor,
            of shape ``(n,)`` or ``(n, 1)`` (a reward head's column) for ``n`` candidates.
        nan: ``"lose"`` ranks NaN scores below every number; ``"raise"``
            refuses them.

    Returns:
        ``(best_candidate, best_index, scores)``.

    Raises:
        ValueError: no candidates, ``score_fn`` returns anything but ``n`` numbers
            shaped ``(n,)`` or ``(n, 1)``, a NaN score with ``nan="raise"``, or an
            unknown ``nan``.
    """
    _check_nan_policy(nan)
    if len(candidates) == 0:
        raise ValueError("candidates: expected at least one candidate")
    scores = _score_list(score_fn(candidates), len(candidates))
    best = int(_best_index(torch.tensor([scores], dtype=torch.float64), nan)[0])
    return candidates[best], best, scores


def _score_list(raw, n: int) -> list[float]:
    """``score_fn``'s answer as ``n`` Python floats; it may be shaped ``(n,)`` or ``(n, 1)``."""
    expected = f"score_fn: expected {n} scores, shape ({n},) or ({n}, 1)"
    try:
        t = raw.detach().cpu() if isinstance(raw, torch.Tensor) else torch.tensor(raw, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{expected}, got {raw!r}") from None
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{expected}, got shape {tuple(t.shape)}")
    return [float(s) for s in t.tolist()]


@dataclass
class BestOfNOutput:
    """Result of :func:`best_of_n`.

    Attributes:
        sequences: ``(batch, seq)`` the best candidate per prompt (prompt included).
        candidates: ``(batch, n, seq)`` every candidate.
        scores: ``(batch, n)`` their scores: float64 when ``score_fn`` returns a float64
            tensor or Python numbers (as in :func:`rerank`), else float32.
        best_index: ``(batch,)`` index of the chosen candidate.
    """

    sequences: torch.Tensor
    candidates: torch.Tensor
    scores: torch.Tensor
    best_index: torch.Tensor


@torch.no_grad()
def best_of_n(
    model: nn.Module,
    input_ids: torch.LongTensor,
    score_fn: Callable[[torch.LongTensor], torch.Tensor],
    *,
    n: int,
    attention_mask: torch.Tensor | None = None,
    nan: NanPolicy = "lose",
    **generate_kwargs,
) -> BestOfNOutput:
    """Sample ``n`` continuations per prompt with ``model.generate`` and keep the best.

    Args:
        model: anything with HF's ``generate(input_ids, attention_mask=...,
            num_return_sequences=..., **kwargs)``.
        input_ids: ``(batch, prompt_len)`` prompts (left-padded when batched).
        score_fn: maps ``(batch * n, seq)`` generated sequences (prompt
            included, grouped by prompt, with the prompts' left padding and,
            after a candidate that stopped early, ``generate``'s pad tokens) to
            ``(batch * n,)`` or ``(batch * n, 1)`` scores, e.g. a reward model via
            :func:`alignlab.decoding.reward_model_fn`, which strips both.
        n: candidates per prompt (>= 1).
        attention_mask: ``(batch, prompt_len)``.
        nan: ``"lose"`` ranks NaN scores below every number; ``"raise"``
            refuses them (checked before anything is chosen).
        generate_kwargs: passed on (``max_new_tokens``, ``temperature``,
            ``logits_processor``, ...); ``do_sample`` defaults to True.

    Returns:
        :class:`BestOfNOutput`; ties go to the earliest candidate, NaN
        scores never win (a prompt whose scores are all NaN gets its first
        candidate, with a ``RuntimeWarning``).

    Raises:
        ValueError: ``n < 1`` (an :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, for an ``n`` that is no
            int), bad ``input_ids`` (a list, a float tensor), ``num_return_sequences`` among the generate
            arguments (``n`` sets it), a wrong number of scores, a
            NaN score with ``nan="raise"``, or an unknown ``nan``.
    """
    _check_nan_policy(nan)
    n = check_count(n, "n")  # NumPy ints from a sweep are counts; True is not
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected an integer tensor of shape (batch, prompt_len), got {got}")
    if "num_return_sequences" in generate_kwargs:  # generate() would get it twice ("multiple values")
        raise ValueError("num_return_sequences: best_of_n sets it to n; pass n instead")
    generate_kwargs.setdefault("do_sample", True)
    out = model.generate(input_ids, attention_mask=attention_mask, num_return_sequences=n, **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    batch = input_ids.shape[0]
    raw = score_fn(sequences)
    # float32 for every score would merge float64 rewards closer than 1e-7 into a tie (the first would win)
    scores = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(raw, dtype=torch.float64)
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    scores = scores.to(sequences.device)
    if scores.dim() == 2 and scores.shape[1] == 1:  # a reward head's column, as rerank takes it
        scores = scores[:, 0]
    if scores.shape != (batch * n,):
        raise ValueError(f"score_fn: expected {batch * n} scores, shape ({batch * n},) or ({batch * n}, 1), "
                         f"got shape {tuple(scores.shape)}")
    candidates = sequences.view(batch, n, -1)
    scores = scores.view(batch, n)
    best = _best_index(scores, nan)
    return BestOfNOutput(
        sequences=candidates[torch.arange(batch, device=best.device), best],
        candidates=candidates,
        scores=scores,
        best_index=best,
    )
