"""NF4 on the real all-MiniLM-L6-v2 weights: the same bytes as bitsandbytes, and what ICQ calibration buys.

bitsandbytes' CPU ``quantize_4bit`` is the oracle. Without double quantization the packed codes and
the block scales must be identical and so must the dequantized weights; with it, bitsandbytes' CPU
path rounds about 1-2% of the 8-bit scale codes one step off the nearest level (docs/quantization.md),
so there the error of ours must be no larger than theirs.
"""

from __future__ import annotations

import pytest
import torch

from alignlab.quant import nf4_dequantize, nf4_quantize


def _bnb():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for NF4 bytes")
    try:
        bnb.quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    except (RuntimeError, NotImplementedError) as exc:  # a build without a CPU 4-bit path
        pytest.skip(f"this bitsandbytes build cannot quantize NF4 on CPU: {exc}")
    return bnb


def _ends(linear: dict) -> dict:
    """Every kind of linear weight in the first and the last layer: 12 of the 36, to keep CI fast."""
    return {k: w for k, w in linear.items() if k.startswith(("encoder.layer.0.", "encoder.layer.5."))}


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def _code_entropy(t) -> float:
    """Entropy (bits) of the histogram of the 16 NF4 codes of ``t`` (numel even: no padding nibble)."""
    codes = torch.stack([t.data >> 4, t.data & 15], -1).reshape(-1).long()
    p = torch.bincount(codes, minlength=16).double() / codes.numel()
    return float(-(p * torch.log2(p.clamp(min=1e-300))).sum())


def test_the_weights_are_trained_not_gaussian(minilm_linear):
    """What makes these tests worth having: heavy tails (kurtosis of a Gaussian is 3)."""
    kurt = {k: float((((w - w.mean()) / w.std()) ** 4).mean()) for k, w in minilm_linear.items()}
    assert len(kurt) == 36
    assert max(kurt.values()) > 50, max(kurt.values())
    assert sum(v > 4 for v in kurt.values()) >= 18


def test_same_codes_scales_and_values_as_bitsandbytes(minilm_linear):
    bnb = _bnb()
    for name, w in _ends(minilm_linear).items():
        ours = nf4_quantize(w, blocksize=64, double_quant=False)
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        assert torch.equal(ours.data, packed.reshape(-1)), name
        assert torch.equal(ours.absmax, state.absmax.float()), name
        theirs = bnb.dequantize_4bit(packed, state, quant_type="nf4")
        assert torch.equal(nf4_dequantize(ours, torch.float32), theirs.float().reshape(w.shape)), name


def test_double_quant_error_is_no_worse_than_bitsandbytes(minilm_linear):
    bnb = _bnb()
    rel = []
    for name, w in _ends(minilm_linear).items():
        ours = nf4_quantize(w, blocksize=64, double_quant=True)
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(ours.data, packed.reshape(-1)), name  # the 4-bit codes themselves agree
        mismatched = float((ours.absmax != state.absmax).float().mean())
        assert mismatched < 0.05, f"{name}: {mismatched:.1%} of the 8-bit scale codes differ"
        theirs = bnb.dequantize_4bit(packed, state, quant_type="nf4").float().reshape(w.shape)
        ours_w = nf4_dequantize(ours, torch.float32)
        assert _mse(ours_w, w) <= _mse(theirs, w) * (1 + 1e-4), name
        rel.append(float((ours_w - w).norm() / w.norm()))
    # NF4 keeps about 9-10% relative error on these weights; a broken scale would show far more
    assert max(rel) < 0.12 and min(rel) > 0.05, (min(rel), max(rel))


def test_icq_raises_code_entropy_on_real_weights_at_no_real_cost_in_error(minilm_linear):
    """IR-QLoRA's ICQ (arXiv 2402.05445) maximises the entropy of the codes, i.e. the information kept;
    on these weights its mean-squared error stays within a few percent of plain NF4, either way."""
    names = [name for i, name in enumerate(minilm_linear) if i % 7 == 0]  # six matrices, every kind, every layer
    ratios = []
    for name in names:
        w = minilm_linear[name][:64]  # 64 real rows keep the ICQ search fast
        plain = nf4_quantize(w, blocksize=64, double_quant=False)
        icq = nf4_quantize(w, blocksize=64, double_quant=False, calibrate="icq", icq_steps=10)
        assert _code_entropy(icq) > _code_entropy(plain) + 1e-3, name
        ratios.append(_mse(nf4_dequantize(icq, torch.float32), w) / _mse(nf4_dequantize(plain, torch.float32), w))
    assert max(ratios) < 1.05 and sum(ratios) / len(ratios) < 1.02, ratios
