"""alignlab._checks: flags (as_bool), token ids and numbers in a range (check_number_in_range) from Python and NumPy;
paths (user_path)."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_number_in_range, check_token_id, user_path


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_, np.bool_(1), np.array([1, 2]) > 1])
def test_as_bool_takes_python_and_numpy_bools(value):
    """np.bool_ (a sweep's value, an array comparison's element) was refused; it comes back a Python bool."""
    if isinstance(value, np.ndarray):
        value = value[1]  # np.bool_ element of a comparison
    got = as_bool(value, "flag")
    assert type(got) is bool and got == bool(value)


@pytest.mark.parametrize("value", ["no", "True", 1, 0, np.int64(1), 1.0, None, np.array(True), torch.tensor(True)],
                         ids=["str-no", "str-True", "int-1", "int-0", "np-int", "float", "none", "0d-array", "tensor"])
def test_as_bool_refuses_non_flags(value):
    with pytest.raises(TypeError, match="flag must be a bool"):
        as_bool(value, "flag")


def test_check_token_id():
    """Token ids are non-negative ints (NumPy ints accepted, returned as Python ints); None only where allowed."""
    assert check_token_id(np.int64(3), "pad_token_id") == 3 and type(check_token_id(np.int64(3), "x")) is int
    assert check_token_id(None, "eos_token_id", allow_none=True) is None
    for bad in (None, 1.5, True, "2", -1):
        with pytest.raises(ValueError, match="pad_token_id: expected a non-negative int"):
            check_token_id(bad, "pad_token_id")
    with pytest.raises(ValueError, match="eos_token_id: expected None or a non-negative int"):
        check_token_id(-2, "eos_token_id", allow_none=True)


def test_user_path_expands_the_home_folder_and_names_the_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path("~/out/x.json", "path") == tmp_path / "out" / "x.json"
    assert user_path(Path("~"), "out_dir") == tmp_path
    assert user_path("a~/b", "path") == Path("a~/b")  # only a leading ~ is the home folder
    assert user_path("~" + os.sep, "path") == tmp_path
    with pytest.raises(TypeError, match="out_dir must be a str or os.PathLike, got NoneType"):
        user_path(None, "out_dir")


def test_check_count_types_then_values():
    """The count check ``reward_model_fn`` / ``RewardGuidedLogitsProcessor`` / ``reward_scores`` share: no number at
    all is a TypeError naming the argument, a number that is no int >= 1 a ValueError; NumPy ints pass as ints."""
    from alignlab._checks import check_count

    assert check_count(np.int64(3), "top_k") == 3 and type(check_count(np.int64(3), "top_k")) is int
    for bad in ("3", None, True, np.bool_(True), torch.tensor(3)):
        with pytest.raises(TypeError, match="batch_size: expected an int >= 1"):
            check_count(bad, "batch_size")
    for bad in (0, -2, 2.5, 2.0, float("nan"), np.float64(2.0)):
        with pytest.raises(ValueError, match="top_k: expected an int >= 1"):
            check_count(bad, "top_k")


@pytest.mark.parametrize("value", [0.5, 1, np.float64(0.5), np.float32(0.25), np.int64(1), 0.0],
                         ids=["float", "int", "np-float64", "np-float32", "np-int64", "low-end"])
def test_check_number_in_range_returns_a_python_float(value):
    got = check_number_in_range(value, "p", 0, 1)
    assert type(got) is float and got == float(value)


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.5", None, [0.5], np.array(0.5), torch.tensor(0.5)],
                         ids=["bool", "np-bool", "str", "none", "list", "0d-array", "tensor"])
def test_check_number_in_range_refuses_non_numbers_as_argument_type_errors(value):
    """A bool is an int to Python (True would be 1, in range), never a meaningful weight or ratio here."""
    with pytest.raises(ArgumentTypeError, match=r"p must be a number in \[0, 1\), got "):
        check_number_in_range(value, "p", 0, 1, high_open=True)


@pytest.mark.parametrize("low_open, high_open, text, inside, outside", [
    (False, False, "[0, 1]", [0, 1, 0.5], [-0.1, 1.5]),
    (True, False, "(0, 1]", [1, 1e-9], [0, -1]),
    (False, True, "[0, 1)", [0, 0.999], [1, 2]),
    (True, True, "(0, 1)", [0.5], [0, 1]),
])
def test_check_number_in_range_open_and_closed_ends(low_open, high_open, text, inside, outside):
    for v in inside:
        assert check_number_in_range(v, "p", 0, 1, low_open=low_open, high_open=high_open) == v
    for v in [*outside, float("nan"), np.float64("nan"), float("inf"), -math.inf]:
        with pytest.raises(ValueError, match=f"p must be a number in {re.escape(text)}, got ") as info:
            check_number_in_range(v, "p", 0, 1, low_open=low_open, high_open=high_open)
        assert not isinstance(info.value, TypeError)


def test_check_number_in_range_one_sided_and_unbounded_are_finite():
    """A bound left None is no bound but finiteness: inf would pass ``> 1`` and zero every RoPE frequency."""
    assert check_number_in_range(1e4, "base", 1, low_open=True) == 1e4
    assert check_number_in_range(0, "tol", 0) == 0.0 and check_number_in_range(-5, "x", high=0) == -5.0
    for v, low, low_open, match in [(1, 1, True, "base must be a finite number > 1, got 1"),
                                    (math.inf, 1, True, "base must be a finite number > 1, got inf"),
                                    (-0.1, 0, False, "base must be a finite number >= 0, got -0.1")]:
        with pytest.raises(ValueError, match=match):
            check_number_in_range(v, "base", low, low_open=low_open)
    with pytest.raises(ValueError, match="x must be a finite number < 0, got 0"):
        check_number_in_range(0, "x", high=0, high_open=True)
    for v in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="w must be a finite number, got "):
            check_number_in_range(v, "w")


def test_check_number_in_range_infinite_closed_bounds_admit_infinity_but_not_nan():
    assert check_number_in_range(math.inf, "threshold", -math.inf, math.inf) == math.inf
    assert check_number_in_range(-math.inf, "threshold", -math.inf, math.inf) == -math.inf
    with pytest.raises(ValueError, match=r"threshold must be a number in \[-inf, inf\], got nan"):
        check_number_in_range(math.nan, "threshold", -math.inf, math.inf)


@pytest.mark.parametrize("value,want", [(None, True), ("", True), ("1", True), ("0", False), ("TRUE", True),
                                        ("false", False), (" on ", True), ("Off", False), ("yes", True), ("no", False)])
def test_env_switch_reads_the_usual_spellings(value, want, monkeypatch):
    """An environment switch: unset or empty keeps the default; 1/true/yes/on and 0/false/no/off in any case.
    ALIGNLAB_NF4_SMALL=false once read as "not 0", so on."""
    from alignlab._checks import env_switch

    if value is None:
        monkeypatch.delenv("ALIGNLAB_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("ALIGNLAB_TEST_SWITCH", value)
    assert env_switch("ALIGNLAB_TEST_SWITCH", True) is (want if value else True)
    assert env_switch("ALIGNLAB_TEST_SWITCH", False) is (want if value else False)


def test_env_switch_warns_and_keeps_the_default_for_anything_else(monkeypatch):
    from alignlab._checks import env_switch

    monkeypatch.setenv("ALIGNLAB_TEST_SWITCH", "enabled")
    with pytest.warns(RuntimeWarning, match="ALIGNLAB_TEST_SWITCH='enabled' is not a switch.*default, False"):
        assert env_switch("ALIGNLAB_TEST_SWITCH", False) is False
    monkeypatch.setenv("ALIGNLAB_TEST_SWITCH", "Auto")  # a tri-state switch's extra word comes back as given
    assert env_switch("ALIGNLAB_TEST_SWITCH", "auto", choices=("auto",)) == "auto"
    monkeypatch.setenv("ALIGNLAB_TEST_SWITCH", "1")
    assert env_switch("ALIGNLAB_TEST_SWITCH", "auto", choices=("auto",)) is True


def test_every_switch_read_at_import_is_documented():
    """Each ``env_switch("ALIGNLAB_...")`` and ``env_count(...)`` in the package is listed in docs/installation.md
    (a new switch once shipped without it)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = set()
    for path in (root / "alignlab").rglob("*.py"):
        names.update(re.findall(r'env_(?:switch|count)\(\s*"(ALIGNLAB_[A-Z0-9_]+)"', path.read_text()))
    assert len(names) >= 10
    doc = (root / "docs" / "installation.md").read_text()
    assert sorted(n for n in names if f"`{n}`" not in doc) == []


@pytest.mark.parametrize("value,want", [("", 7), ("  ", 7), ("12", 12), (" 3 ", 3), ("0", 0)])
def test_env_count_reads_whole_numbers(value, want, monkeypatch):
    from alignlab._checks import env_count

    monkeypatch.setenv("ALIGNLAB_TEST_COUNT", value)
    assert env_count("ALIGNLAB_TEST_COUNT", 7) == want


@pytest.mark.parametrize("value", ["on", "1.5", "-2", "many"])
def test_env_count_warns_and_keeps_the_default_for_anything_else(value, monkeypatch):
    """ALIGNLAB_NF4_LARGE_M=on once stopped `import alignlab.quant` with int()'s message, naming no variable."""
    from alignlab._checks import env_count

    monkeypatch.setenv("ALIGNLAB_TEST_COUNT", value)
    with pytest.warns(RuntimeWarning, match=r"ALIGNLAB_TEST_COUNT=.*whole number >= 0.*default, 7"):
        assert env_count("ALIGNLAB_TEST_COUNT", 7) == 7
    monkeypatch.setenv("ALIGNLAB_TEST_COUNT", "0")
    with pytest.warns(RuntimeWarning, match="whole number >= 1"):
        assert env_count("ALIGNLAB_TEST_COUNT", 1, minimum=1) == 1
