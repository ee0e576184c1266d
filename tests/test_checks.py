"""alignlab._checks: flags (as_bool) and token ids from Python and NumPy; paths (user_path)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlab._checks import as_bool, check_token_id, user_path


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
