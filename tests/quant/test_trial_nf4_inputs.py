"""Inputs found wrong in a user trial (2026-12-04): ICQ search arguments, 0-d inputs and weights, and the
calibration an NF4Linear keeps after loading a checkpoint."""

import pytest
import torch
from torch import nn

from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.quant import NF4Linear, nf4_dequantize, nf4_quantize


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf")])
def test_icq_lambda_not_finite_is_refused(lam):
    # before: every shift, so every dequantized value, came out NaN without a word
    with pytest.raises(ValueError, match="icq_lambda"):
        nf4_quantize(torch.randn(4, 64), calibrate="icq", icq_lambda=lam)


def test_icq_lambda_not_a_number_is_a_type_error():
    with pytest.raises(TypeError, match="icq_lambda"):
        nf4_quantize(torch.randn(4, 64), calibrate="icq", icq_lambda="0.1")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_icq_steps_must_be_a_positive_int(steps):
    # before: -3 raised torch's "number of steps must be non-negative", 2.5 linspace's TypeError, and 0 searched
    # only lambda = -icq_lambda (never the median itself)
    with pytest.raises(ValueError, match="icq_steps"):
        nf4_quantize(torch.randn(4, 64), calibrate="icq", icq_steps=steps)


def test_icq_arguments_still_work_and_are_ignored_without_calibration():
    w = torch.randn(4, 64)
    t = nf4_quantize(w, calibrate="icq", icq_lambda=0.05, icq_steps=3)
    assert t.shift is not None and torch.isfinite(nf4_dequantize(t)).all()
    nf4_quantize(w, icq_lambda=float("nan"), icq_steps=0)  # calibrate=None: the search arguments are unused


def test_nf4linear_0d_input_is_a_value_error():
    q = NF4Linear.from_linear(nn.Linear(64, 4), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="in_features"):  # before: IndexError from x.shape[-1]
        q(torch.tensor(1.0))


def test_nf4linear_refuses_an_unknown_calibrate():
    with pytest.raises(ValueError, match="calibrate"):  # before: accepted, refused only when a merge re-quantized
        NF4Linear(nf4_quantize(torch.randn(4, 64)), calibrate="gptq")


def test_triton_dequant_of_a_0d_weight(triton_mode):
    # nf4_quantize takes any shape; the kernel path raised IndexError on shape[-1] of a 0-d weight
    t = nf4_quantize(torch.tensor(-1.5))
    got = nf4_dequant(t)
    assert got.shape == () and torch.equal(got, nf4_dequantize(t))


def test_loaded_checkpoint_sets_the_calibration_that_merges_keep():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    icq = NF4Linear.from_linear(lin, calibrate="icq", compute_dtype=torch.float32)
    plain = NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float32)
    w = lin.weight.detach() + 0.01

    plain.load_state_dict(icq.state_dict())  # an ICQ checkpoint into a layer quantized without calibration
    assert plain.qshift is not None
    plain.load_dense_weight_(w)  # what merge does: before, the re-quantized weight lost its ICQ shift
    assert plain.qshift is not None
    icq.load_dense_weight_(w)
    assert torch.equal(plain.dequantize(torch.float32), icq.dequantize(torch.float32))

    back = NF4Linear.from_linear(nn.Linear(64, 8), calibrate="icq", compute_dtype=torch.float32)
    back.load_state_dict(NF4Linear.from_linear(lin, compute_dtype=torch.float32).state_dict())  # plain into ICQ
    back.load_dense_weight_(w)
    assert back.qshift is None


def _meta(d: dict) -> torch.Tensor:
    import json

    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def test_corrupt_nf4_state_dicts_raise_value_error():
    from alignlab.quant.nf4 import NF4Tensor

    sd = nf4_quantize(torch.randn(5, 37), blocksize=32).state_dict()
    no_offset = {k: v for k, v in sd.items() if k != "nested_offset"}
    with pytest.raises(ValueError, match="nested_offset"):  # before: KeyError
        NF4Tensor.from_state_dict(no_offset)
    with pytest.raises(ValueError, match="dtype"):  # before: AttributeError from getattr(torch, ...)
        NF4Tensor.from_state_dict({**sd, "meta": _meta({"shape": [5, 37], "dtype": "nonsense", "blocksize": 32})})
    with pytest.raises(ValueError, match="nested_blocksize"):  # before: ZeroDivisionError
        NF4Tensor.from_state_dict({**sd, "meta": _meta({"shape": [5, 37], "dtype": "float32", "blocksize": 32,
                                                        "nested_blocksize": 0})})


def test_bnb_state_dict_without_nested_offset_raises_value_error_and_load_state_dict_names_it():
    from alignlab.quant import nf4_from_bnb_state_dict, nf4_to_bnb_state_dict

    q = NF4Linear.from_linear(nn.Linear(37, 5), blocksize=32, compute_dtype=torch.float32)
    sd = nf4_to_bnb_state_dict(q.quant_weight)
    sd["weight.quant_state.bitsandbytes__nf4"] = _meta({"quant_type": "nf4", "blocksize": 32, "dtype": "float32",
                                                        "shape": [5, 37]})
    with pytest.raises(ValueError, match="nested_offset"):  # before: KeyError
        nf4_from_bnb_state_dict(sd)
    with pytest.raises(RuntimeError, match="nested_offset"):  # before: the KeyError escaped load_state_dict
        q.load_state_dict({**sd, "bias": q.bias})


def test_wrong_argument_types_are_type_errors_naming_the_argument():
    import numpy as np

    from alignlab.kernels.nf4_matmul import nf4_matmul
    from alignlab.quant import nf4_to_bnb_state_dict

    t = nf4_quantize(torch.randn(4, 64))
    w = torch.randn(4, 64)
    # before: AttributeError / NotImplementedError ("rshift_cpu" not implemented for 'Float'), and for a NumPy
    # row_scale the self-contradicting "row_scale must be float32, got float32"
    for call, arg in [(lambda: nf4_dequant(w), "t"), (lambda: nf4_dequantize(w), "t"),
                      (lambda: nf4_to_bnb_state_dict(w), "t"),
                      (lambda: nf4_dequant(t, row_scale=[1.0] * 4), "row_scale"),
                      (lambda: nf4_dequant(t, row_scale=np.ones(4, dtype=np.float32)), "row_scale"),
                      (lambda: nf4_matmul([[1.0] * 64], t), "x"),
                      (lambda: NF4Linear(t, bias=[0.0] * 4), "bias")]:
        with pytest.raises(TypeError, match=arg):
            call()
