"""NF4 format: codebook, byte-exactness with bitsandbytes, double quant, interop, ICQ."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from alignlab.quant.nf4 import (
    NF4Tensor,
    dynamic_map,
    nf4_code,
    nf4_dequantize,
    nf4_from_bnb_state_dict,
    nf4_quantize,
    nf4_to_bnb_state_dict,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # pragma: no cover - bnb is a dev dependency
        bnbF = None

needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(7, 13), (64, 96), (1, 1), (3, 50, 7), (33, 256)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def _reference_dequant(data, absmax_f32, n, blocksize, shape):
    """w_i = q[c_i] * s_{i // blocksize}, high nibble first -- written out independently."""
    code = nf4_code()
    hi = (data.reshape(-1).long() >> 4) & 15
    lo = data.reshape(-1).long() & 15
    codes = torch.stack([hi, lo], 1).reshape(-1)[:n]
    idx = torch.arange(n) // blocksize
    return (code[codes] * absmax_f32[idx]).reshape(shape)


def test_codebook_is_normal_quantiles():
    # QLoRA: 8 positive quantiles of N(0,1) on linspace(offset, 0.5, 9), 7 negative on
    # linspace(offset, 0.5, 8), plus 0, normalised by the largest.
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    v = v / v.max()
    torch.testing.assert_close(nf4_code().double(), v, atol=1e-6, rtol=0)
    assert nf4_code()[7] == 0 and nf4_code()[0] == -1 and nf4_code()[15] == 1


@needs_bnb
def test_codebooks_match_bitsandbytes():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_packed_bytes_match_bitsandbytes(dtype, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for shape in SHAPES:
        w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
        q, st = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        t = nf4_quantize(w, blocksize=blocksize, double_quant=False)
        assert torch.equal(t.data, q.reshape(-1)), (shape, "packed bytes / nibble order")
        assert torch.equal(t.absmax, st.absmax), shape
        n = w.numel()
        ref = _reference_dequant(t.data, t.absmax, n, blocksize, shape).to(dtype)
        assert torch.equal(nf4_dequantize(t), ref)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_double_quant_matches_bitsandbytes(dtype, blocksize):
    g = torch.Generator().manual_seed(7)
    for shape in [(300, 77), (128, 512), (5, 3)]:
        w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
        q, st = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        t = nf4_quantize(w, blocksize=blocksize, double_quant=True)
        assert torch.equal(t.data, q.reshape(-1))
        assert t.nested_offset.item() == st.offset.item()
        assert torch.equal(t.nested_absmax, st.state2.absmax)
        # 8-bit codes of the scales: ours are the exact nearest level.  bitsandbytes'
        # CPU search (BinSearch "Direct2" + a distance check) resolves a few values
        # near the midpoint of two levels the other way (seen: < 2% of the scales,
        # one step).  The GPU benchmark run compares with bitsandbytes' CUDA kernel.
        diff = t.absmax.long() - st.absmax.long()
        assert diff.abs().max() <= 1
        if diff.any():
            # rare, and only where the scaled value lies near the midpoint of two levels
            assert (diff != 0).float().mean() < 0.02
            plain = nf4_quantize(w, blocksize=blocksize, double_quant=False).absmax
            nested = t.nested_absmax.repeat_interleave(256)[: t.num_blocks]
            scaled = ((plain - t.nested_offset) / nested)[diff != 0]
            code = dynamic_map()
            mid = (code[t.absmax.long()] + code[st.absmax.long()])[diff != 0] / 2
            gap = (code[t.absmax.long()] - code[st.absmax.long()]).abs()[diff != 0]
            assert ((scaled - mid).abs() <= 0.2 * gap).all()


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_matches_bitsandbytes(dtype, double_quant):
    """Dequantizing bitsandbytes' own state through alignlab gives bnb's values exactly.

    bitsandbytes 0.50's native CPU NF4 dequantizer assumes blocks never straddle
    rows; use row lengths that are multiples of the blocksize for the peer here
    (our own odd-shape dequantization is checked against the written-out formula).
    """
    g = torch.Generator().manual_seed(3)
    for shape, bs in [((64, 128), 64), ((96, 256), 128), ((3, 1024), 1024), ((40, 64), 32)]:
        w = (torch.randn(*shape, generator=g) * 0.05).to(dtype)
        q, st = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=double_quant)
        sd = {"weight": q, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
        t = nf4_from_bnb_state_dict(sd)
        assert torch.equal(nf4_dequantize(t), bnbF.dequantize_4bit(q, st, quant_type="nf4"))


def test_odd_sizes_and_all_zero_block():
    w = torch.zeros(3, 37)
    w[1, 5] = 0.5
    t = nf4_quantize(w, blocksize=32, double_quant=False)
    assert t.data.numel() == math.ceil(111 / 2)
    out = nf4_dequantize(t)
    assert out.shape == (3, 37) and out[1, 5] == 0.5
    assert out.abs().sum() == 0.5
    # odd element count: the tail nibble is padding
    t2 = nf4_quantize(torch.randn(5, 3), blocksize=64)
    assert nf4_dequantize(t2).shape == (5, 3)


def test_reconstruction_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    t = nf4_quantize(w, blocksize=64, double_quant=True)
    err = (nf4_dequantize(t) - w).abs()
    # each value is within half the widest NF4 gap (0.304) of its block scale,
    # plus the error of the 8-bit scale itself
    scale = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(64, 256)
    assert (err <= 0.5 * 0.3039 * scale * 1.02 + 1e-6).all()


def test_state_dict_roundtrip_and_to():
    w = torch.randn(17, 40, dtype=torch.bfloat16)
    for dq in (False, True):
        t = nf4_quantize(w, blocksize=32, double_quant=dq)
        sd = t.state_dict()
        t2 = NF4Tensor.from_state_dict({k: v.clone() for k, v in sd.items()})
        assert torch.equal(nf4_dequantize(t2), nf4_dequantize(t))
        assert t2.dtype == torch.bfloat16 and t2.blocksize == 32 and t2.shape == (17, 40)
        t3 = t.to("cpu")
        assert torch.equal(t3.data, t.data) and t3.device.type == "cpu"


def test_inconsistent_state_dict_raises():
    t = nf4_quantize(torch.randn(8, 64), blocksize=64)
    sd = t.state_dict()
    sd["data"] = sd["data"][:-1]
    with pytest.raises(ValueError, match="packed data"):
        NF4Tensor.from_state_dict(sd)
    sd = t.state_dict()
    sd["absmax"] = sd["absmax"][:-1]
    with pytest.raises(ValueError, match="absmax"):
        NF4Tensor.from_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        NF4Tensor.from_state_dict({"data": t.data})


def test_state_dict_with_a_bad_nested_offset_or_meta_names_it():
    """A two-element nested_offset raised reshape's RuntimeError; undecodable meta bytes a bare JSON / Unicode
    error that named no key."""
    t = nf4_quantize(torch.randn(8, 64), blocksize=64)  # double-quantized
    sd = t.state_dict()
    sd["nested_offset"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"nested_offset must hold one number, got shape \(2,\)"):
        NF4Tensor.from_state_dict(sd)
    for blob in (torch.tensor([255, 254], dtype=torch.uint8), torch.tensor(list(b"{not json"), dtype=torch.uint8)):
        sd = t.state_dict()
        sd["meta"] = blob
        with pytest.raises(ValueError, match="meta must hold UTF-8 JSON metadata"):
            NF4Tensor.from_state_dict(sd)


@pytest.mark.parametrize("bs", [0, 16, 48, 8192, 100])
def test_bad_blocksize(bs):
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(torch.randn(4, 64), blocksize=bs)


def test_blocksize_numpy_int_accepted_bool_float_refused():
    np = pytest.importorskip("numpy")
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for bs in (np.int64(64), np.int32(32)):
        t = nf4_quantize(w, blocksize=bs)
        ref = nf4_quantize(w, blocksize=int(bs))
        assert type(t.blocksize) is int and t.blocksize == int(bs)
        assert torch.equal(t.data, ref.data) and torch.equal(nf4_dequantize(t), nf4_dequantize(ref))
        assert NF4Tensor.from_state_dict(t.state_dict()).blocksize == int(bs)  # the JSON meta takes it
    for bad in (True, 64.0, np.float64(64), np.int64(48), "64"):
        with pytest.raises((TypeError, ValueError), match="blocksize"):
            nf4_quantize(w, blocksize=bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype"):
        nf4_quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4_quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        nf4_quantize(torch.ones(0, 4))
    with pytest.raises(ValueError, match="calibrate"):
        nf4_quantize(torch.ones(4, 64), calibrate="gptq")
    with pytest.raises(TypeError, match="double_quant must be a bool"):  # "no" is truthy: it would switch it on
        nf4_quantize(torch.ones(4, 64), double_quant="no")


@pytest.mark.parametrize("flag", [np.False_, np.True_])
def test_double_quant_takes_a_numpy_bool(flag):
    """np.bool_ from a sweep quantizes as the Python bool does; the tensor reports a Python bool."""
    w = torch.randn(8, 64)
    t, ref = nf4_quantize(w, double_quant=flag), nf4_quantize(w, double_quant=bool(flag))
    assert t.double_quant is bool(flag)
    assert torch.equal(nf4_dequantize(t), nf4_dequantize(ref))


@pytest.mark.parametrize("bad", [0, 1, None, np.array(True)])
def test_double_quant_refuses_ints_none_and_arrays(bad):
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        nf4_quantize(torch.ones(4, 64), double_quant=bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("double_quant", [False, True])
def test_non_finite_weight_is_refused(bad, double_quant):
    """One NaN would make every double-quantized scale NaN (their mean is the offset)."""
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\)"):
        nf4_quantize(w, double_quant=double_quant)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear4bit_checkpoint_roundtrip(double_quant, dtype):
    """Load what ``bitsandbytes.nn.Linear4bit`` (used by transformers) saves, and write it back byte for byte."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(96, 40, bias=True, compress_statistics=double_quant, quant_type="nf4",
                              compute_dtype=dtype)
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 96, dtype=dtype) * 0.05, requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4")
    layer = layer.to("cpu")
    sd = {k: v for k, v in layer.state_dict().items() if k.startswith("weight")}
    expected = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected
    t = nf4_from_bnb_state_dict(sd)
    back = nf4_to_bnb_state_dict(t)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert torch.equal(back[k], sd[k]), k
    # and our own quantization produces that same checkpoint
    w = torch.randn(40, 96, dtype=dtype) * 0.05
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = nf4_to_bnb_state_dict(nf4_quantize(w, 64, double_quant))
    theirs = {"weight": q, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
    meta_o = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta_t = json.loads(bytes(theirs["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta_o == meta_t
    assert torch.equal(ours["weight"], theirs["weight"])


def test_bnb_state_dict_errors():
    t = nf4_quantize(torch.randn(8, 64))
    sd = nf4_to_bnb_state_dict(t)
    bad = dict(sd)
    del bad["weight.absmax"]
    with pytest.raises(ValueError, match="missing"):
        nf4_from_bnb_state_dict(bad)
    bad = dict(sd)
    bad["weight.quant_map"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match="quant_map"):
        nf4_from_bnb_state_dict(bad)
    fp4 = {k.replace("nf4", "fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="NF4"):
        nf4_from_bnb_state_dict(fp4)
    bad = dict(sd)
    bad["weight"] = sd["weight"][:-2]
    with pytest.raises(ValueError, match="packed data"):
        nf4_from_bnb_state_dict(bad)


def _code_entropy(t: NF4Tensor) -> float:
    codes = torch.stack([t.data >> 4, t.data & 15], 1).reshape(-1)[: t.numel].long()
    p = torch.bincount(codes, minlength=16).float() / t.numel
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def test_icq_raises_entropy_and_lowers_error_on_skewed_weights():
    g = torch.Generator().manual_seed(0)
    # non-Gaussian: a per-block offset plus a skewed (log-normal) component
    w = torch.randn(32, 128, generator=g) * 0.02 + 0.03 * torch.exp(0.6 * torch.randn(32, 128, generator=g))
    plain = nf4_quantize(w, blocksize=64, double_quant=False)
    icq = nf4_quantize(w, blocksize=64, double_quant=False, calibrate="icq", icq_steps=20)
    assert icq.shift is not None and icq.shift.shape == (plain.num_blocks,)
    assert _code_entropy(icq) > _code_entropy(plain) + 0.05
    err_plain = (nf4_dequantize(plain) - w).pow(2).mean()
    err_icq = (nf4_dequantize(icq) - w).pow(2).mean()
    assert err_icq < 0.9 * err_plain
    # the shift is applied exactly as  w = q[c] * s + tau
    n = w.numel()
    ref = _reference_dequant(icq.data, icq.absmax, n, 64, w.shape) + icq.shift.repeat_interleave(64).reshape(w.shape)
    torch.testing.assert_close(nf4_dequantize(icq), ref, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="ICQ"):
        nf4_to_bnb_state_dict(icq)
    # survives a state-dict round trip, also with double quantization
    icq2 = nf4_quantize(w, blocksize=64, double_quant=True, calibrate="icq", icq_steps=5)
    back = NF4Tensor.from_state_dict(icq2.state_dict())
    assert torch.equal(nf4_dequantize(back), nf4_dequantize(icq2))


def test_nf4_decision_thresholds_are_bitsandbytes_and_ties_go_down():
    """The 15 midpoints equal bitsandbytes' CUDA decision thresholds (its kernel's fp32 constants), and a
    value exactly on a threshold takes the lower code, as its strict `x > threshold` does."""
    from alignlab.quant.nf4 import _nearest_code, nf4_code

    bnb_thresholds = torch.tensor([
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=torch.float32)
    code = nf4_code()
    assert torch.equal((code[:-1] + code[1:]) / 2, bnb_thresholds)
    above = torch.nextafter(bnb_thresholds, torch.full_like(bnb_thresholds, 2.0))
    assert _nearest_code(bnb_thresholds, code).tolist() == list(range(15))
    assert _nearest_code(above, code).tolist() == list(range(1, 16))


def test_double_quant_offset_of_block_scales_near_the_fp32_limit():
    """The double-quantization offset is the block scales' mean: in fp32 (bitsandbytes' value) where that is finite,
    in fp64 where the fp32 sum overflows (weights near 3e38 dequantized to inf / NaN before)."""
    w = torch.tensor([3e38, -3e38, 1.0] * 30)
    t = nf4_quantize(w, blocksize=64, double_quant=True)
    assert torch.isfinite(t.nested_offset).all()
    d = nf4_dequantize(t, torch.float32)
    assert torch.isfinite(d).all() and d[0].item() == pytest.approx(3e38, rel=1e-2)
    small = torch.randn(64, 128)
    t = nf4_quantize(small, blocksize=64, double_quant=True)
    assert torch.equal(t.nested_offset, nf4_quantize(small, blocksize=64, double_quant=False).absmax.mean())
