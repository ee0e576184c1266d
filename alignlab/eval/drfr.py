"""DRFR: the Decomposed Requirements Following Ratio.

From "InFoBench: Evaluating Instruction Following Ability in Large Language
Models" (Qin et al., 2024, arXiv:2401.03601). Each instruction :math:`i` is
broken into requirements :math:`j = 1..m_i`; a judge (human or model) answers
yes/no for each, :math:`r_{ij} \\in \\{0, 1\\}`. Then

.. math::

    \\mathrm{DRFR} = \\frac{\\sum_i \\sum_j r_{ij}}{\\sum_i m_i}

i.e. requirements are pooled, so an instruction with many requirements
weighs more than one with few. The judgements come from the caller (for an
LLM judge see :mod:`alignlab.eval.judge`); this module only aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy

from alignlab._checks import ArgumentTypeError, as_bool, is_int

__all__ = ["drfr", "parse_yes_no"]

_YES = {"yes", "y", "true", "1"}
_NO = {"no", "n", "false", "0"}


def parse_yes_no(answer: bool | int | str) -> bool:
    """One judgement as a bool: ``True``/``1``/``"YES"`` or ``False``/``0``/``"NO"`` (NumPy bools and integers too).

    Strings are matched on their first word, case-insensitively, ignoring
    punctuation and markdown emphasis around it (``"Yes, because ..."`` and ``"**No**"`` are read).

    Raises:
        ValueError: anything else (an unparsable judge answer should be seen,
            not counted as a failure).
    """
    return _judgement(answer, "answer")


def _judgement(answer, where: str) -> bool:
    if isinstance(answer, (bool, numpy.bool_)):  # NumPy bools: a judge's ``scores > 0.5`` array
        return bool(answer)
    if is_int(answer) and answer in (0, 1):  # NumPy integers too
        return bool(answer)
    if isinstance(answer, str):
        words = answer.strip().split()
        # punctuation and the markdown emphasis LLM judges put around a verdict ("**Yes**,")
        first = words[0].strip(".,:;!?\"'()[]*_`").lower() if words else ""
        if first in _YES:
            return True
        if first in _NO:
            return False
    raise ValueError(f"{where}: expected a yes/no answer (bool, 0/1, 'yes'/'no'), got {answer!r}")


def drfr(judgements: Sequence[Sequence[bool | int | str]], *, per_instruction: bool = False):
    """Decomposed Requirements Following Ratio.

    Args:
        judgements: per instruction, the judgement of each of its requirements
            (anything :func:`parse_yes_no` accepts); a 2-D NumPy array of 0/1 or
            bools works when every instruction has as many requirements.
        per_instruction: also return each instruction's own ratio (a bool).

    Returns:
        The DRFR in ``[0, 1]``, or ``(drfr, [ratio_i, ...])`` when
        ``per_instruction``.

    Raises:
        ValueError: no requirements at all, an instruction with no
            requirements, or an unparsable judgement (named as ``judgements[i][j]``).
        TypeError: ``per_instruction`` is not a bool (a string such as ``"no"`` would switch it on); ``judgements``
        or one of its rows a string (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    per_instruction = as_bool(per_instruction, "per_instruction")
    if isinstance(judgements, (str, bytes)) or len(judgements) == 0:  # len: a NumPy array has no truth value
        kind = ArgumentTypeError if isinstance(judgements, (str, bytes)) else ValueError
        raise kind("judgements: expected a non-empty sequence of per-instruction judgement lists")
    satisfied, total, ratios = 0, 0, []
    for i, row in enumerate(judgements):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) == 0:
            # a flat list of judgements (no per-instruction lists) failed inside len() of a bool
            kind = ValueError if hasattr(row, "__len__") and not isinstance(row, (str, bytes)) else ArgumentTypeError
            raise kind(f"judgements[{i}]: expected a non-empty sequence of requirement judgements, got {row!r} (a "
                       "list per instruction: [[True, False], [True]])")
        hits = sum(_judgement(a, f"judgements[{i}][{j}]") for j, a in enumerate(row))
        satisfied += hits
        total += len(row)
        ratios.append(hits / len(row))
    score = satisfied / total
    return (score, ratios) if per_instruction else score
