"""``NF4Linear.weight``: a read-only dense view of the NF4 codes, for model code that reads a linear's weight.

Before it existed, NLLB-MoE / SeamlessM4T (``self.fc2.weight.dtype`` in every feed-forward) and Mamba
(``self.dt_proj.weight @ time_step``) raised ``AttributeError: 'NF4Linear' object has no attribute 'weight'``
on their first forward after ``quantize_model``.
"""

import copy
import io

import pytest
import torch
import transformers
from torch import nn

from alignlab.quant import DequantizedWeight, NF4Linear, quantize_model
from alignlab.quant.nf4 import nf4_dequantize


def _saved(t: torch.Tensor) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_view_reports_the_dense_weight_and_dequantizes_on_use(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40).to(dtype)
    q = NF4Linear.from_linear(lin)
    w = q.weight
    assert isinstance(w, torch.Tensor) and isinstance(w, DequantizedWeight)
    assert (w.shape, w.dtype, w.device, w.requires_grad) == (torch.Size([40, 96]), dtype, torch.device("cpu"), False)
    want = nf4_dequantize(q.quant_weight, dtype)  # the pure-PyTorch reference
    torch.testing.assert_close(w + 0, want, rtol=0, atol=0)
    x = torch.randn(5, 96, dtype=dtype)
    torch.testing.assert_close(x @ w.t(), x @ want.t(), rtol=0, atol=0)
    assert type(w.clone()) is torch.Tensor and w.float().dtype == torch.float32  # results are plain tensors
    assert isinstance(w.data, DequantizedWeight) and isinstance(w.detach(), DequantizedWeight)
    assert "NF4" in repr(w)
    with pytest.raises(RuntimeError, match=r"layer\.dequantize\(\)"):
        w.data_ptr()  # what a Triton launch asks for: named, not "tensor that doesn't have storage"
    # copies, pickles and host conversions get the dense weight (they failed asking for the view's memory)
    for copied in (copy.deepcopy(w), torch.load(_saved(w), weights_only=True), w.dense()):
        assert type(copied) is torch.Tensor and copied.dtype == dtype
        torch.testing.assert_close(copied, want, rtol=0, atol=0)
    assert w.tolist() == want.tolist()
    if dtype != torch.bfloat16:  # NumPy has no bfloat16
        assert (w.numpy() == want.numpy()).all()


def test_writes_into_the_view_are_refused():
    q = NF4Linear.from_linear(nn.Linear(64, 32))
    before = q.qdata.clone()
    w = q.weight
    writes = [lambda: w.add_(1.0), lambda: w.data.zero_(), lambda: w.detach().copy_(torch.zeros(32, 64)),
              lambda: nn.init.normal_(w), lambda: torch.mul(torch.ones(32, 64), 2.0, out=w)]
    for write in writes:
        with pytest.raises(RuntimeError, match="read-only view"):
            write()
    assert torch.equal(q.qdata, before)


def test_from_linear_refuses_an_already_quantized_layer():
    q = NF4Linear.from_linear(nn.Linear(64, 32))
    with pytest.raises(TypeError, match="already an NF4Linear"):
        NF4Linear.from_linear(q)  # its .weight is a tensor now: quantizing it again would only lose precision


def _dense_oracle(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """``model`` with each linear that ``quantized`` holds in NF4 given the dequantized weight instead."""
    dense = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            dense.get_submodule(name).weight.data.copy_(nf4_dequantize(module.quant_weight, torch.float32))
    return dense


def _mamba():
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2,
                                   intermediate_size=64, use_mambapy=False)
    return transformers.MambaForCausalLM(cfg), {}


def _nllb_moe():
    cfg = transformers.NllbMoeConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                                     decoder_attention_heads=2, num_experts=4, expert_capacity=8)
    return transformers.NllbMoeForConditionalGeneration(cfg), {"decoder_input_ids": torch.randint(3, 60, (2, 5))}


@pytest.mark.parametrize("build", [_mamba, _nllb_moe], ids=["mamba", "nllb-moe"])
def test_models_that_read_a_linear_weight_run_quantized(build):
    torch.manual_seed(0)
    model, extra = build()
    model.eval()
    quantized = quantize_model(copy.deepcopy(model), compute_dtype=torch.float32)
    assert any(isinstance(m, NF4Linear) for m in quantized.modules())
    dense = _dense_oracle(model, quantized)
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        got = quantized(input_ids=ids, **extra).logits  # raised AttributeError: no attribute 'weight'
        want = dense(input_ids=ids, **extra).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_view_follows_a_floating_cast_of_the_module():
    """Quantize an fp32 model, then ``.to(torch.bfloat16)``: a dense weight would be bf16 now, so the view says
    bf16 (NLLB-MoE cast its hidden states back to fp32 for fc2 and failed in the next layer norm: "mixed
    dtype"); the packed codes and the dequantization map keep their dtypes."""
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(64, 32))
    codes = q.qdata.clone()
    assert q.weight.dtype == torch.float32
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.quant_weight.dtype == torch.float32
    torch.testing.assert_close(q.weight + 0, nf4_dequantize(q.quant_weight, torch.bfloat16), rtol=0, atol=0)
    q.half()
    assert q.weight.dtype == torch.float16 and q.weight.data.dtype == torch.float16
    q.to("cpu").double()  # a move, and a cast to a dtype NF4 does not dequantize to: the last supported one stays
    assert q.weight.dtype == torch.float16 and torch.equal(q.qdata, codes)

    model, extra = _nllb_moe()
    quantize_model(model.eval()).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, 60, (2, 7)), **extra).logits  # raised RuntimeError: mixed dtype
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


class _ReadsDtype(nn.Module):  # T5 / NLLB-MoE / SeamlessM4T: x.to(fc.weight.dtype) every forward
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.out(x.to(self.fc.weight.dtype))


class _ReadsValues(nn.Module):  # Mamba: dt_proj.weight @ x
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48)

    def forward(self, x):
        return x @ self.fc.weight.T


@pytest.mark.parametrize("module", [_ReadsDtype, _ReadsValues])
def test_model_code_reading_weight_compiles_in_one_graph_and_exports(module):
    """Under torch.compile / torch.export ``.weight`` is the dequantized weight as a plain tensor: the wrapper could
    not be built inside a graph (fullgraph=True refused, export failed; a helper's find, 2026-12-07)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = quantize_model(module(), compute_dtype=torch.float32, skip=["out"] if module is _ReadsDtype else ()).eval()
    x = torch.randn(3, 64)
    want = model(x)
    try:
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()
    # a read of the dtype alone leaves the dequantization unused: Inductor drops it (the one GEMM of `out` remains)
    assert ("cpp_fused" in "\n".join(code)) == (module is _ReadsValues)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), want, rtol=0, atol=0)
