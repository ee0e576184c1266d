"""Argument checks for numbers, flags and paths, shared by every subpackage (no alignlab imports, so no cycles).

A sweep hands over NumPy scalars (``np.linspace(...)[i]`` is an ``np.float64``, ``np.float32(16)``
is not a ``float``, ``np.int64(8)`` is not an ``int``), so "is it a number" means
:class:`numbers.Real` / :class:`numbers.Integral`, which NumPy registers its scalars with. A bool
is an ``int`` to Python but never a meaningful count or weight here, so it is refused. A 0-d array
or tensor is not a scalar to these checks.

The ``check_*`` helpers return the value as a Python ``float`` / ``int``, so whatever is stored
from them serialises into JSON and a saved config. Flags likewise: :func:`as_bool` takes a NumPy bool
and returns a Python bool. Paths: :func:`user_path` expands a leading ``~`` as a shell would.
"""

from __future__ import annotations

import math
import numbers
import os
import string
from pathlib import Path

import numpy


def is_real(value) -> bool:
    """Whether ``value`` is a Python or NumPy real scalar other than a bool (NaN and inf included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """:func:`is_real` and neither NaN nor ±inf."""
    return is_real(value) and math.isfinite(value)


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer other than a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_finite_number(value, arg: str, minimum: float | None = None) -> float:
    """``value`` as a Python float (a NumPy scalar kept as is would not serialise into a saved config).

    ``TypeError`` naming ``arg`` unless ``value`` is a real number (NumPy scalars are, a bool is not);
    ``ValueError`` if it is NaN, infinite or below ``minimum``. A NaN here would reach every output."""
    if not is_real(value):
        raise TypeError(f"{arg} must be a real number, got {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{arg} must be a finite number{bound}, got {value!r}")
    return float(value)


def as_python_number(value) -> int | float:
    """A real scalar as a Python ``int`` (if integral, e.g. ``np.int64``) or ``float`` (e.g. ``np.float32``)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_positive_number(value, arg: str) -> int | float:
    """``value`` as a Python number (:func:`as_python_number`); ``ValueError`` naming ``arg`` unless it
    is a finite real > 0 (a bool is not; NaN and inf are not, as they would reach every output through
    a scaling)."""
    if not is_finite_real(value) or not value > 0:
        raise ValueError(f"{arg} must be a positive finite number, got {value!r}")
    return as_python_number(value)


def check_positive_int(value, arg: str) -> int:
    """``value`` as a Python int; ``ValueError`` naming ``arg`` unless it is an integer > 0 (a bool is not)."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return int(value)


def check_count(value, arg: str) -> int:
    """``value`` as a Python int >= 1 (NumPy ints accepted). ``TypeError`` naming ``arg`` unless it is a real number
    (a str, None, a bool is not: the wrong kind of thing), ``ValueError`` unless it is an int >= 1 (0 or 2.5 is a
    number, but no count)."""
    if not is_real(value):
        raise TypeError(f"{arg}: expected an int >= 1, got {value!r}")
    if not is_int(value) or value < 1:
        raise ValueError(f"{arg}: expected an int >= 1, got {value!r}")
    return int(value)


def as_bool(value, arg: str) -> bool:
    """``value`` as a Python bool: a bool or a NumPy bool (``np.bool_``, from a sweep or an array comparison).

    ``TypeError`` naming ``arg`` for anything else: a truthy string (``"no"``) would switch a flag on, and an
    int, None, a 0-d array or a tensor is not a flag. Store the result, not ``value``: a NumPy bool would not
    serialise into a saved config."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numpy.bool_):
        return bool(value)
    raise TypeError(f"{arg} must be a bool, got {value!r}")


def user_path(value, arg: str) -> Path:
    """``value`` as a :class:`~pathlib.Path`, with a leading ``~`` or ``~user`` expanded to that home folder (for a
    file written, ``Path("~/out")`` was a folder named ``~`` in the current one). ``TypeError`` naming ``arg``
    unless ``value`` is a str or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a str or os.PathLike, got {type(value).__name__}")
    return Path(os.path.expanduser(os.fspath(value)))


def check_token_id(value, arg: str, allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int`` token id (>= 0; NumPy integers accepted), or None where ``allow_none``.

    ``ValueError`` naming ``arg`` otherwise: a float such as 1.5 would match no token (or be truncated to 1
    by ``torch.full``), ``True`` would match id 1, and a string such as ``"2"`` never matches.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 0:
        expected = "None or a non-negative int" if allow_none else "a non-negative int"
        raise ValueError(f"{arg}: expected {expected}, got {value!r}")
    return int(value)


def check_template_fields(template, needed, arg: str = "template") -> None:
    """``ValueError`` naming the ``{placeholders}`` of ``needed`` that the ``str.format`` template lacks (the
    text meant for them would be left out of the prompt without a word: ``format`` ignores unused keywords);
    ``TypeError`` if ``template`` is not a str."""
    if not isinstance(template, str):
        raise TypeError(f"{arg}: expected a str, got {type(template).__name__}")
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    missing = [name for name in needed if name not in fields]
    if missing:
        raise ValueError(
            f"{arg}: has no {', '.join('{' + m + '}' for m in missing)} placeholder, so that text would not reach "
            f"the judge (a custom template needs {', '.join('{' + n + '}' for n in needed)})"
        )
