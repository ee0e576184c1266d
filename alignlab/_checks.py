"""Argument checks for numbers, flags and paths, shared by every subpackage (no alignlab imports, so no cycles).

A sweep hands over NumPy scalars (``np.linspace(...)[i]`` is an ``np.float64``, ``np.float32(16)``
is not a ``float``, ``np.int64(8)`` is not an ``int``), so "is it a number" means
:class:`numbers.Real` / :class:`numbers.Integral`, which NumPy registers its scalars with. A bool
is an ``int`` to Python but never a meaningful count or weight here, so it is refused. A 0-d array
or tensor is not a scalar to these checks.

The ``check_*`` helpers return the value as a Python ``float`` / ``int``, so whatever is stored
from them serialises into JSON and a saved config. Flags likewise: :func:`as_bool` takes a NumPy bool
and returns a Python bool. Paths: :func:`user_path` expands a leading ``~`` as a shell would.

Errors: the wrong kind of argument (a str, None, a list or a bool where a number is wanted; any float, 2.0 included,
where an int is wanted) raises :class:`ArgumentTypeError`, a value of the right kind out of range (0 or -1 as a
count, NaN, a negative weight) a plain ``ValueError``; both name the argument and say what was expected.
"""

from __future__ import annotations

import math
import numbers
import os
import string
from fractions import Fraction
from pathlib import Path

import numpy


class ArgumentTypeError(TypeError, ValueError):
    """The wrong kind of argument: a str, None, a list or a bool where a number is wanted, a float where an int is.

    A ``TypeError``, and a ``ValueError`` too, since these checks raised ``ValueError`` before the two cases were
    split: ``except ValueError`` written against them still catches it (as NumPy's ``AxisError`` is both a
    ``ValueError`` and an ``IndexError``). A value of the right kind that is out of range raises a plain
    ``ValueError``, never this."""


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

    :class:`ArgumentTypeError` naming ``arg`` unless ``value`` is a real number (NumPy scalars are, a bool is not);
    ``ValueError`` if it is NaN, infinite or below ``minimum``. A NaN here would reach every output."""
    if not is_real(value):
        raise ArgumentTypeError(f"{arg} must be a real number, got {value!r}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{arg} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_number_in_range(value, arg: str, low: float | None = None, high: float | None = None, *,
                          low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a Python float in the interval from ``low`` to ``high`` (``[low, high]``; ``low_open`` /
    ``high_open`` leave that end out, so ``low=0, high=1, high_open=True`` is ``[0, 1)``).

    A bound left None leaves that side open but finite: ``low=1, low_open=True`` is a finite number > 1, no bounds
    at all any finite number. A closed infinite bound admits that infinity (``low=-math.inf, high=math.inf`` refuses
    NaN only); NaN is refused always, since it fails every comparison. :class:`ArgumentTypeError` naming ``arg``
    unless ``value`` is a real number (NumPy scalars are, a bool, a str, None, a 0-d array is not), ``ValueError``
    for a NaN or a number outside the interval; both messages name the interval."""
    if is_real(value):
        above = value > -math.inf if low is None else (value > low if low_open else value >= low)
        below = value < math.inf if high is None else (value < high if high_open else value <= high)
        if above and below:
            return float(value)
    kind = ValueError if is_real(value) else ArgumentTypeError
    raise kind(f"{arg} must be {_interval_text(low, high, low_open, high_open)}, got {value!r}")


def _interval_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def as_python_number(value) -> int | float:
    """A real scalar as a Python ``int`` (if integral, e.g. ``np.int64``) or ``float`` (e.g. ``np.float32``)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_positive_number(value, arg: str) -> int | float:
    """``value`` as a Python number (:func:`as_python_number`). :class:`ArgumentTypeError` naming ``arg`` unless it
    is a real number (a bool, a str, None is not), ``ValueError`` unless it is finite and > 0 (NaN and inf would
    reach every output through a scaling)."""
    if not is_real(value):
        raise ArgumentTypeError(f"{arg} must be a positive finite number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{arg} must be a positive finite number, got {value!r}")
    return as_python_number(value)


def check_positive_int(value, arg: str, allow_none: bool = False) -> int | None:
    """``value`` as a Python int, or None where ``allow_none``. :class:`ArgumentTypeError` naming ``arg`` unless it
    is a Python or NumPy int (a bool, a float such as 2.0, a str is not), ``ValueError`` if it is <= 0."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value <= 0:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        kind = ArgumentTypeError if not is_int(value) else ValueError
        raise kind(f"{arg} must be {expected}, got {value!r}")
    return int(value)


def check_count(value, arg: str) -> int:
    """``value`` as a Python int >= 1 (NumPy ints accepted). :class:`ArgumentTypeError` naming ``arg`` unless it is
    an int (a str, None, a bool, a float such as 2.5 or 2.0 is not: the wrong kind of thing), ``ValueError`` if it
    is < 1."""
    if not is_int(value):
        raise ArgumentTypeError(f"{arg}: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{arg}: expected an int >= 1, got {value!r}")
    return int(value)


def as_bool(value, arg: str) -> bool:
    """``value`` as a Python bool: a bool or a NumPy bool (``np.bool_``, from a sweep or an array comparison).

    :class:`ArgumentTypeError` naming ``arg`` for anything else: a truthy string (``"no"``) would switch a flag on, and an
    int, None, a 0-d array or a tensor is not a flag. Store the result, not ``value``: a NumPy bool would not
    serialise into a saved config."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numpy.bool_):
        return bool(value)
    raise ArgumentTypeError(f"{arg} must be a bool, got {value!r}")


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str, default: bool, choices: tuple[str, ...] = ()) -> bool | str:
    """The on/off switch in environment variable ``name``: ``1 / true / yes / on`` or ``0 / false / no / off`` (any
    case), ``default`` when unset or empty; with ``choices`` also one of those words, returned as given (lower case).
    Anything else keeps ``default`` with a ``RuntimeWarning`` naming the variable: ``ALIGNLAB_NF4_SMALL=false``
    once read as "not 0", so on, and ``...=true`` on a switch tested for "1" as off."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in choices:
        return value
    if value in _ON or value in _OFF:
        return value in _ON
    allowed = ", ".join((*choices, "0 / 1", "true / false", "on / off", "yes / no"))
    return _env_default(name, f"a switch ({allowed})", default)


def env_count(name: str, default: int, minimum: int = 0) -> int:
    """The whole number ``>= minimum`` in environment variable ``name`` (a row or slice count), ``default`` when unset
    or empty; anything else keeps ``default`` with a ``RuntimeWarning`` naming the variable (``int()`` of ``on``
    used to stop the import with a message naming neither the variable nor what it takes)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        count = int(value)
    except ValueError:
        count = None
    if count is not None and count >= minimum:
        return count
    return _env_default(name, f"a whole number >= {minimum}", default)


def _env_default(name: str, expected: str, default):
    """``default``, after a ``RuntimeWarning`` that environment variable ``name`` holds something other than
    ``expected`` (the module that read it named as where it happened)."""
    import warnings

    warnings.warn(f"{name}={os.environ[name]!r} is not {expected}; using the default, {default}", RuntimeWarning,
                  stacklevel=3)
    return default


def user_path(value, arg: str) -> Path:
    """``value`` as a :class:`~pathlib.Path`, with a leading ``~`` or ``~user`` expanded to that home folder (for a
    file written, ``Path("~/out")`` was a folder named ``~`` in the current one). :class:`ArgumentTypeError` naming ``arg``
    unless ``value`` is a str or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{arg} must be a str or os.PathLike, got {type(value).__name__}")
    return Path(os.path.expanduser(os.fspath(value)))


def check_token_id(value, arg: str, allow_none: bool = False) -> int | None:
    """``value`` as a Python ``int`` token id (>= 0; NumPy integers accepted), or None where ``allow_none``.

    :class:`ArgumentTypeError` naming ``arg`` for anything but an int (or None where allowed): a float such as 1.5
    would match no token (or be truncated to 1 by ``torch.full``), ``True`` would match id 1, and a string such as
    ``"2"`` never matches. ``ValueError`` for a negative int.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 0:
        expected = "None or a non-negative int" if allow_none else "a non-negative int"
        kind = ArgumentTypeError if not is_int(value) else ValueError
        raise kind(f"{arg}: expected {expected}, got {value!r}")
    return int(value)


def ratio_fraction(ratio: float) -> Fraction:
    """A ratio such as a keep ratio ``ρ`` as the nearest fraction with a denominator up to 10⁶, so that ``⌈n ρ⌉``
    counts as the decimal reads: in floats ``0.07 * 100`` is ``7.000000000000001`` (8 kept of 100, not 7), and a
    NumPy float32 0.6 is 0.6000000238418579 (13 of 20, not 12)."""
    return Fraction(float(ratio)).limit_denominator(10**6)


def token_id_list(seq, arg: str) -> list[int]:
    """The entries of the sequence ``seq`` as Python ints: ints, NumPy integers or 0-d integer tensors (a 1-d int
    tensor reads as one). :class:`ArgumentTypeError` naming ``arg`` for a float (``int(1.7)`` would read token 1),
    a bool (True would be token 1) or anything else; no range check (labels hold -100, the caller checks ids)."""
    import torch  # here only: the rest of this module needs no torch

    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1 or seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool:
            raise ArgumentTypeError(f"{arg}: expected a 1-d integer tensor, got shape {tuple(seq.shape)} "
                                    f"dtype {seq.dtype}")
        return seq.tolist()
    if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
        raise ArgumentTypeError(f"{arg}: expected a sequence of integer token ids, got {type(seq).__name__}")
    out = []
    for t in seq:
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not (t.is_floating_point() or t.is_complex()
                                                                 or t.dtype == torch.bool):
            t = t.item()
        if not is_int(t):
            raise ArgumentTypeError(f"{arg}: expected integer token ids, got {t!r} (no floats or bools)")
        out.append(int(t))
    return out


def check_template_fields(template, needed, arg: str = "template") -> None:
    """``ValueError`` naming the ``{placeholders}`` of ``needed`` that the ``str.format`` template lacks (the
    text meant for them would be left out of the prompt without a word: ``format`` ignores unused keywords);
    :class:`ArgumentTypeError` if ``template`` is not a str."""
    if not isinstance(template, str):
        raise ArgumentTypeError(f"{arg}: expected a str, got {type(template).__name__}")
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    missing = [name for name in needed if name not in fields]
    if missing:
        raise ValueError(
            f"{arg}: has no {', '.join('{' + m + '}' for m in missing)} placeholder, so that text would not reach "
            f"the judge (a custom template needs {', '.join('{' + n + '}' for n in needed)})"
        )
