"""NF4Linear and quantize_model: forward/backward, frozen weight, checkpoint interop, errors."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from alignlab.quant.linear import NF4Linear, quantize_model
from alignlab.quant.nf4 import nf4_code, nf4_dequantize, nf4_quantize

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover
        bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed")


def _dequant_formula(layer: NF4Linear) -> torch.Tensor:
    """Independent dequantization from the bitsandbytes-format state dict (fp32)."""
    sd = layer.state_dict()
    data = sd["weight"].reshape(-1).long()
    codes = torch.stack([data >> 4, data & 15], 1).reshape(-1)
    n = layer.out_features * layer.in_features
    if "weight.nested_absmax" in sd:
        import json

        meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
        q8 = sd["weight.absmax"].long()
        nested = sd["weight.nested_absmax"].repeat_interleave(256)[: q8.numel()]
        absmax = sd["weight.nested_quant_map"][q8] * nested + torch.tensor(meta["nested_offset"], dtype=torch.float32)
    else:
        absmax = sd["weight.absmax"]
    idx = torch.arange(n) // layer.blocksize
    return (nf4_code()[codes[:n]] * absmax[idx]).reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_backward_match_dense_formula(dtype, double_quant, torch_mode):
    torch.manual_seed(0)
    lin = nn.Linear(80, 24, bias=True)
    q = NF4Linear.from_linear(lin, blocksize=32, double_quant=double_quant, compute_dtype=dtype)
    w = _dequant_formula(q).to(dtype)
    x = torch.randn(2, 3, 80, dtype=dtype, requires_grad=True)
    y = q(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w, lin.bias.detach().to(dtype))
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in q.parameters())
    torch.testing.assert_close(q.dequantize(torch.float32), _dequant_formula(q))


def test_backward_saves_no_dense_weight():
    q = NF4Linear.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = q(x)
    assert all(n < 64 * 128 for n in saved), saved
    y.sum().backward()
    assert x.grad.shape == x.shape


@needs_bnb
def test_matches_bitsandbytes_linear4bit():
    torch.manual_seed(1)
    w = torch.randn(48, 64) * 0.05
    b = torch.randn(48)
    layer = bnb.nn.Linear4bit(64, 48, bias=True, compress_statistics=True, quant_type="nf4",
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    layer.bias = nn.Parameter(b)
    layer = layer.to("cpu")
    sd = layer.state_dict()
    q = NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
    assert not q.load_state_dict(sd).unexpected_keys
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), layer(x), rtol=1e-5, atol=1e-5)
    # and write the same bytes back
    back = q.state_dict()
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_quantize_model_tiny_llama_and_checkpoint_roundtrip():
    model = make_tiny_llama(seed=0)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_model(model, compute_dtype=torch.float32)
    names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert "lm_head" not in names and isinstance(model.lm_head, nn.Linear)
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    with torch.no_grad():
        out = model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    fresh = quantize_model(make_tiny_llama(seed=1), compute_dtype=torch.float32)
    res = fresh.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, out)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


@needs_bnb
def test_loads_bitsandbytes_checkpoint_of_a_whole_model():
    """A checkpoint whose 4-bit entries come from bitsandbytes (what transformers saves) loads, and saves back."""
    model = make_tiny_llama(seed=2)
    sd = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compress_statistics=True,
                                      quant_type="nf4", compute_dtype=torch.float32)
            layer.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            layer = layer.to("cpu")
            sd.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    for k, v in model.state_dict().items():
        if not any(k.startswith(p.rsplit(".weight", 1)[0] + ".weight") for p in sd if p.endswith(".weight")):
            sd.setdefault(k, v)
    target = quantize_model(make_tiny_llama(seed=3), compute_dtype=torch.float32)
    res = target.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys
    out = target.state_dict()
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k


def test_errors():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 3))

    with pytest.raises(ValueError, match="2-D"):
        NF4Linear.from_linear(Conv())
    lin = nn.Linear(64, 8)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear.from_linear(lin, blocksize=48)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        NF4Linear.from_linear(lin.to(torch.float64))
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model("model")
    q = NF4Linear.from_linear(nn.Linear(64, 8))
    other = NF4Linear.from_linear(nn.Linear(64, 16))
    with pytest.raises(RuntimeError, match=r"checkpoint has shape \(16, 64\)"):
        q.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(2, 32))
    with pytest.raises(ValueError, match="shape"):
        q.load_dense_weight_(torch.randn(8, 32))


def test_load_dense_weight_and_dtype_moves():
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(64, 8), blocksize=32, compute_dtype=torch.float32)
    w = torch.randn(8, 64)
    q.load_dense_weight_(w)
    expected = nf4_quantize(w, blocksize=32, double_quant=True)
    assert torch.equal(q.qdata, expected.data) and torch.equal(q.qabsmax, expected.absmax)
    q16 = q.to(torch.float16)
    assert q16.qnested_absmax.dtype == torch.float32 and q16.qabsmax.dtype == torch.uint8
    assert q16.bias.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_path_matches_torch_path(dtype, monkeypatch):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(48, 20), blocksize=32, compute_dtype=dtype)
    x = torch.randn(3, 48, dtype=dtype)
    outs = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
        xi = x.clone().requires_grad_(True)
        y = q(xi)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad))
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    torch.testing.assert_close(outs[0][1], outs[1][1], **tol)


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_qdora_inject_and_merge(use_dora):
    """LoRA / DoRA wrap NF4Linear (QLoRA / QDoRA); merging re-quantizes the merged dense weight."""
    from alignlab.adapters import LoRAConfig, disabled, inject, merge_and_unload

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    quantize_model(base, skip=(), compute_dtype=torch.float32)
    model = inject(base, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # give B a non-zero value so the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(5, 64)
    y = model(x)
    y.sum().backward()
    assert all(p.grad is not None for p in trainable)
    with torch.no_grad(), disabled(model):
        y_base = model(x)
    merged = merge_and_unload(model)
    assert isinstance(merged[0], NF4Linear) and isinstance(merged[2], NF4Linear)
    with torch.no_grad():
        y2 = merged(x)
    # the merge moved the quantized base to the adapted model (up to re-quantization error)
    rel = ((y2 - y.detach()).norm() / y.detach().norm()).item()
    rel_base = ((y_base - y.detach()).norm() / y.detach().norm()).item()
    assert rel < 0.4 * rel_base


def test_transformers_4bit_checkpoint_roundtrip(tmp_path):
    """A checkpoint written by transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant) loads
    into quantize_model(...) with the same logits as transformers' own 4-bit model, and saves back byte-exact."""
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    if bnb is None:
        pytest.skip("bitsandbytes not installed")
    def llama(seed):
        # bitsandbytes' CPU 4-bit matmul needs out_features % 32 == 0 (intermediate 128, not conftest's 136)
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config).eval()

    dense = llama(4)
    dense.save_pretrained(tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg,
                                                                device_map="cpu")
        hf4.save_pretrained(tmp_path / "q4")
    sd = safetensors_torch.load_file(tmp_path / "q4" / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in sd

    ours = quantize_model(llama(5), compute_dtype=torch.float32)
    res = ours.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    assert all("rotary" in k or "lm_head" in k for k in res.missing_keys), res.missing_keys
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf4(ids).logits
        out = ours(ids).logits
    # bitsandbytes' CPU 4-bit matmul repacks the weight and runs at reduced precision, so compare
    # the logits by relative norm (seen: 4e-3)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    back = ours.state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_count_parameters_equals_peft_on_a_bitsandbytes_4bit_model(tmp_path):
    """QLoRA counts: ours on quantize_model + inject equal PEFT's get_nb_trainable_parameters on the same
    model loaded in 4-bit by transformers / bitsandbytes (PEFT counts a Params4bit as 2 weights per byte)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if bnb is None:
        pytest.skip("bitsandbytes not installed")
    from alignlab.adapters import LoRAConfig, count_parameters, inject

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map="cpu")
        want = peft.get_peft_model(hf4, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours = quantize_model(transformers.LlamaForCausalLM(config), compute_dtype=torch.float32)
    inject(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert tuple(count_parameters(ours)) == want.get_nb_trainable_parameters()


def test_quantize_model_keeps_the_head_whatever_skip_says_and_rejects_unknown_names():
    """`skip` adds to the kept head instead of replacing it; a name that matches nothing is an error."""
    model = quantize_model(make_tiny_llama(), skip=["o_proj"], compute_dtype=torch.float32)
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    with pytest.raises(ValueError, match=r"skip: \['nope'\] match no nn.Linear"):
        quantize_model(make_tiny_llama(), skip=["nope"])
    model = quantize_model(make_tiny_llama(), quantize_head=True, compute_dtype=torch.float32)
    assert isinstance(model.lm_head, NF4Linear)
    model = quantize_model(make_tiny_llama(), skip=(n for n in ["o_proj"]), compute_dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear  # a generator of names is read once


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_output_comes_back_in_the_input_dtype(compute_dtype):
    """float64 in, float64 out (the product in compute_dtype, cast back); an integer input is refused."""
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(64, 16), compute_dtype=compute_dtype)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, q(x.detach().to(compute_dtype)).double(), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.dtype == torch.float64
    with torch.no_grad():
        assert q(x.detach()).dtype == torch.float64
        for dtype in (torch.float16, torch.float32, torch.bfloat16):
            assert q(x.detach().to(dtype)).dtype == dtype
    for dtype in (torch.int64, torch.uint8, torch.bool):
        with pytest.raises(TypeError, match=f"x must be a floating-point tensor, got dtype {dtype}"):
            q(torch.ones(3, 64, dtype=dtype))
    for x in ([[1.0] * 64] * 3, np.ones((3, 64), dtype=np.float32)):  # was AttributeError ('requires_grad')
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got (list|ndarray)"):
            q(x)


def test_from_linear_refuses_a_truthy_non_bool_double_quant():
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        NF4Linear.from_linear(nn.Linear(64, 8), double_quant="no")
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        NF4Linear.from_linear(nn.Linear(64, 8), double_quant=0)
    assert NF4Linear.from_linear(nn.Linear(64, 8), double_quant=np.True_).double_quant is True


def test_quantize_model_names_the_module_with_a_non_finite_weight():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj: .*non-finite values"):
        quantize_model(model)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_built_on_meta_takes_a_checkpoint(bias):
    """Quantizing a meta linear gives meta buffers of the right shapes; to_empty + load_state_dict (or
    assign=True) fill them; .to() out of meta raises torch's error and leaves the layer as it was."""
    torch.manual_seed(0)
    ref = NF4Linear.from_linear(nn.Linear(64, 32, bias=bias))
    x = torch.randn(2, 64)
    q = NF4Linear.from_linear(nn.Linear(64, 32, bias=bias, device="meta"))
    assert q.qdata.is_meta and q.qdata.shape == ref.qdata.shape and q(x.to("meta")).shape == (2, 32)
    with pytest.raises(NotImplementedError, match="to_empty"):
        q.to("cpu")
    assert all(getattr(q, name) is not None for name in ("qdata", "qabsmax", "qnested_absmax"))
    q.to_empty(device="cpu").load_state_dict(ref.state_dict())
    assert torch.equal(q(x), ref(x))
    q = NF4Linear.from_linear(nn.Linear(64, 32, bias=bias, device="meta"))
    q.load_state_dict(ref.state_dict(), assign=True)
    assert not q.qdata.is_meta and torch.equal(q(x), ref(x))


def test_quantize_model_refuses_flags_and_names_of_the_wrong_type():
    """A truthy string would switch a flag on silently; a bare int has no names to skip."""
    for kw, match in ((dict(double_quant="no"), "double_quant must be a bool"),
                      (dict(quantize_head="yes"), "quantize_head must be a bool"),
                      (dict(skip=5), "skip must be a module name"),
                      (dict(skip=["o_proj", 3]), "skip must hold module names")):
        with pytest.raises(TypeError, match=match):
            quantize_model(make_tiny_llama(), **kw)


def test_quantize_model_takes_numpy_bool_flags_as_python_bools():
    """A sweep hands over np.bool_; it means what the Python bool means, and ints and strings stay refused."""
    torch.manual_seed(0)
    ref = quantize_model(make_tiny_llama(), double_quant=False, quantize_head=True, compute_dtype=torch.float32)
    torch.manual_seed(0)
    model = quantize_model(make_tiny_llama(), double_quant=np.False_, quantize_head=np.True_, compute_dtype=torch.float32)
    assert isinstance(model.lm_head, NF4Linear)
    q = model.model.layers[0].mlp.up_proj
    assert q.double_quant is False and q.qnested_absmax is None
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for kw, name in ((dict(double_quant=0), "double_quant"), (dict(double_quant=1), "double_quant"),
                     (dict(quantize_head=1), "quantize_head"), (dict(quantize_head="no"), "quantize_head")):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            quantize_model(make_tiny_llama(), **kw)


def test_quantize_model_after_inject_is_refused_with_the_order_to_use():
    from alignlab.adapters import LoRAConfig, inject

    model = inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="call quantize_model before inject"):
        quantize_model(model)
    assert type(model.model.layers[0].self_attn.q_proj.lora_A["default"]) is nn.Linear  # untouched


@pytest.mark.parametrize("use_dora", [False, True])
def test_unmerge_on_an_nf4_base_restores_the_outputs_exactly(use_dora):
    """Merging re-quantizes W + ΔW; unmerge puts the packed weight from before the merge back (bit-exact)."""
    from alignlab.adapters import LoRAConfig, adapter_layers, inject, merge, unmerge

    model = quantize_model(make_tiny_llama(), compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=use_dora))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = [layer.base_layer.qdata.clone() for _, layer in adapter_layers(model)]
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="re-quantizes"):  # PEFT warns too: outputs move by the rounding
            merge(model)
        y_merged = model(input_ids=ids).logits
        unmerge(model)
        y1 = model(input_ids=ids).logits
    assert not torch.equal(y_merged, y0)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for q, (_, layer) in zip(before, adapter_layers(model)):
        assert torch.equal(layer.base_layer.qdata, q) and not layer.merged_adapters
    with pytest.raises(TypeError, match="NF4Tensor"):
        next(adapter_layers(model))[1].base_layer.load_quant_weight_(torch.zeros(3))


# -- the eager decode path (kept launchers; issue 24) ---------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [0, 1, 5, 40])
def test_decode_path_in_fp16_and_without_rows(rows, monkeypatch):
    """The decode launchers with fp16 activations (the test below runs bf16), and a batch of no rows (no launcher
    is made for it): each no-grad call gives what nf4_matmul gives."""
    from alignlab.kernels.nf4_matmul import nf4_matmul
    from alignlab.quant import linear

    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", True)
    torch.manual_seed(rows)
    layer = NF4Linear.from_linear(nn.Linear(256, 320, device="cuda", dtype=torch.float16), compute_dtype=torch.float16)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
            y = layer(x)
            assert y.shape == (rows, 320) and y.dtype == torch.float16
            torch.testing.assert_close(y, nf4_matmul(x, layer.quant_weight, layer.bias), rtol=0, atol=0)
    runners = layer.quant_weight.__dict__.get("_runners") or {}
    assert any(r is not None for r in runners.values()) == (rows > 0)


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 64, 100])
def test_decode_path_equals_nf4_matmul_on_every_call(rows, bias, monkeypatch):
    """With the decode launchers on (the default), no-grad CUDA calls go through a launcher kept per input
    layout and stream: each call, new inputs of the same layout, a sliced (non-contiguous) input, a second
    stream and a CUDA graph give what nf4_matmul gives; replacing the weight drops the launchers."""
    from alignlab.kernels.nf4_matmul import nf4_matmul
    from alignlab.quant import linear

    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", True)
    torch.manual_seed(rows)
    lin = nn.Linear(256, 320, bias=bias, device="cuda", dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(lin)
    b = None if layer.bias is None else layer.bias
    with torch.no_grad():
        for step in range(3):  # first call builds the launcher, the next ones use it
            x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(layer(x), nf4_matmul(x, layer.quant_weight, b), rtol=0, atol=0)
        runners = layer.quant_weight.__dict__.get("_runners") or {}
        # a launcher is kept for every decode-sized layout: the small-M kernels' up to the device's bound, the
        # dequantize + cuBLAS one above it (up to 64 rows); more than 64 rows are never looked up
        assert any(r is not None for r in runners.values()) == (rows <= 64), "launcher kept for decode sizes"
        assert bool(runners) == (rows <= 64)
        big = torch.randn(2, rows, 300, device="cuda", dtype=torch.bfloat16)
        xs = big[:, :, 7:263]  # rows at a stride of 300, unaligned start
        for _ in range(2):  # the same strided input both ways: the same kernel path, the same bits
            torch.testing.assert_close(layer(xs), nf4_matmul(xs, layer.quant_weight, b), rtol=0, atol=0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # x was made on the default stream
        with torch.cuda.stream(side):
            for _ in range(2):
                y_side = layer(x)
        side.synchronize()
        torch.testing.assert_close(y_side, nf4_matmul(x, layer.quant_weight, b), rtol=0, atol=0)
        xg = x.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = layer(xg)
        for _ in range(2):
            xg.copy_(torch.randn_like(xg))
            g.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(yg, nf4_matmul(xg, layer.quant_weight, b), rtol=0, atol=0)
        layer.load_dense_weight_(torch.randn(320, 256, device="cuda"))
        assert "_runners" not in layer.quant_weight.__dict__
        torch.testing.assert_close(layer(x), nf4_matmul(x, layer.quant_weight, b), rtol=0, atol=0)


@pytest.mark.cuda
def test_decode_path_keeps_errors_and_grad_rules(monkeypatch):
    from alignlab.quant import linear

    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", True)
    lin = nn.Linear(128, 64, device="cuda", dtype=torch.bfloat16)
    layer = NF4Linear.from_linear(lin)
    with torch.no_grad():
        x1 = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
        layer(x1)
        layer(x1)  # a launcher now serves this layout
        with pytest.raises(ValueError, match="in_features=128"):
            layer(torch.randn(1, 64, device="cuda", dtype=torch.bfloat16))
        monkeypatch.setenv("ALIGNLAB_KERNELS", "torch")  # a flip of the dispatch is obeyed, launcher or not
        want = nn.functional.linear(x1, nf4_dequantize(layer.quant_weight, torch.bfloat16), layer.bias)
        torch.testing.assert_close(layer(x1), want, rtol=0, atol=0)
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # grad-requiring calls get their gradient (test_decode_path_with_grad below)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [None, "frozen", "trained"])
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_decode_path_with_grad(rows, bias, monkeypatch):
    """An input that needs a gradient takes the kept launcher too (kernels.nf4_matmul.kept_matmul), unless the bias
    trains: the output bits of the launchers-off path, the same input gradient (dy W), second derivatives too."""
    from alignlab.quant import linear

    torch.manual_seed(rows)
    layer = NF4Linear.from_linear(nn.Linear(256, 320, bias=bias is not None, device="cuda", dtype=torch.bfloat16))
    if bias == "trained":
        layer.bias.requires_grad_(True)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, 320, device="cuda", dtype=torch.bfloat16)

    def calls():
        out = []
        for _ in range(3):  # the first call keeps a launcher, the next ones use it
            xg, dyg = x.clone().requires_grad_(True), dy.clone().requires_grad_(True)
            y = layer(xg)
            (gx,) = torch.autograd.grad(y, xg, dyg, create_graph=True)  # dy W, differentiable in dy
            (gdy,) = torch.autograd.grad(gx.float().square().sum(), dyg)  # 2 (dy W) Wᵀ
            (gsq,) = torch.autograd.grad(y.float().square().sum(), xg)
            out.append((y.detach(), gx.detach(), gdy, gsq))
        return out

    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", False)
    ref = calls()
    assert "_runners" not in layer.quant_weight.__dict__
    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", True)
    got = calls()
    runners = layer.quant_weight.__dict__.get("_runners") or {}
    assert any(r is not None for r in runners.values()) == (bias != "trained")
    for g, r in zip(got, ref):
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 8])
def test_compiled_decode_matches_eager(rows):
    """torch.compile of a model with NF4Linear at decode sizes (the GEMV and the small tl.dot kernel, whose inline
    PTX string Inductor copies into its generated source) runs and gives the eager result."""
    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16)), nn.ReLU(),
                          NF4Linear.from_linear(nn.Linear(192, 64, bias=False, device="cuda", dtype=torch.bfloat16)))
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_reduce_overhead_decode_keeps_nothing_in_the_graph_pool():
    """The first decode-sized product of a process may run inside the warm-up of CUDA graph trees (a
    ``torch.compile(mode="reduce-overhead")`` generate step): the split-K counters it keeps for later calls must
    not come from the graph's private pool (the trees stop with "tensor(s) in the cudagraph pool not tracked as
    outputs", seen on an H200 before alignlab._keep)."""
    from alignlab.kernels import nf4_small

    torch._dynamo.reset()
    for kept in (nf4_small._POOLS, nf4_small._VIEWS, nf4_small._SLOT_OF, nf4_small._WS):
        kept.clear()  # as in a fresh process: nothing made yet
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    step = torch.compile(layer, mode="reduce-overhead")
    with torch.no_grad():
        outs = [step(x).clone() for _ in range(4)]  # warm-up, recording, replays
    assert nf4_small._POOLS, "this shape was expected to take a split-K kernel (arrival counters)"
    want = x @ nf4_dequantize(layer.quant_weight, torch.bfloat16).T
    for got in outs:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_quantize_model_replaces_nothing_when_it_refuses_a_module():
    """A NaN in a late layer (or an experts module NF4Experts cannot take) used to be found after the earlier
    linears were already NF4: the model was left half converted. Now everything is checked first."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.down_proj: weight has non-finite values"):
        quantize_model(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_quantize_model_checks_experts_before_replacing_linears():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3)
    model = transformers.MixtralForCausalLM(config)
    experts = model.model.layers[1].mlp.experts
    with torch.no_grad():
        experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"experts: experts\.down_proj has non-finite values"):
        quantize_model(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert model.model.layers[1].mlp.experts is experts


def test_quantize_model_refuses_a_bad_calibrate_before_naming_any_layer():
    """A whole-call argument: the error named the first layer (``model.layers.0.self_attn.q_proj: calibrate must
    ...``) as if that layer were at fault, and nothing is replaced."""
    model = make_tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"^calibrate must be None or 'icq', got 'icqq'$"):
        quantize_model(model, calibrate="icqq")
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_dequantize_to_float64_gives_the_fp32_values():
    """NF4Linear takes float64 inputs, so dequantize(torch.float64) gives the fp32 dequantization exactly (a TypeError
    before); other dtypes keep their checks."""
    layer = NF4Linear.from_linear(nn.Linear(128, 16))
    w64 = layer.dequantize(torch.float64)
    assert w64.dtype == torch.float64 and torch.equal(w64, layer.dequantize(torch.float32).double())
    with pytest.raises(TypeError):
        layer.dequantize(torch.int8)
