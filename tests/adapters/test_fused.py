"""The fused LoRA / DoRA paths over dense and NF4 bases: formulas, precision, checkpointing, compile."""

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import enable_checkpointing, make_tiny_llama

from alignlab.adapters import LoRAConfig, LoRALinear, adapter_layers, inject
from alignlab.adapters.fused import dora_linear, lora_linear
from alignlab.quant.linear import NF4Linear, quantize_model
from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize


def _formula(x, w, bias, a, b, s, m=None):
    """The LoRA / DoRA output in float64 from the dense weight (DoRA's norm detached, as in the paper)."""
    x, w, a, b = x.double(), w.double(), a.double(), b.double()
    v = w + s * b @ a
    if m is not None:
        v = m.double()[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    y = x @ v.T
    return y if bias is None else y + bias.double()


def _inputs(tokens, in_f, out_f, r, dora, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    a = (torch.randn(r, in_f, generator=g) / 3).requires_grad_()
    b = (torch.randn(out_f, r, generator=g) / 3).requires_grad_()
    m = (w.norm(dim=1) * (1 + 0.1 * torch.randn(out_f, generator=g))).requires_grad_() if dora else None
    x = torch.randn(*tokens, in_f, generator=g)
    return x, w, bias, a, b, m


def _check(fn_out, x, refs_from, tol):
    y, leaves = fn_out
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, gy.to(y.device))
    ref_y, ref_leaves = refs_from()
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, gy.double())
    torch.testing.assert_close(y.cpu().double(), ref_y, **tol)
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.float32  # fp32 leaves get fp32 gradients whatever the compute dtype
        torch.testing.assert_close(got.cpu().double(), ref, **tol)


# (tokens, in, out, r): M = 0, M = 1 (small-M kernels), > 16 rows (dequantize + matmul), odd sizes;
# in = 70 is not a multiple of the NF4 blocksize (the generic path)
CASES = [((0,), 64, 37, 3), ((1,), 64, 37, 3), ((2, 11), 64, 37, 5), ((23,), 70, 19, 2)]


@pytest.mark.parametrize("tokens,in_f,out_f,r", CASES)
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("mode,dtype", [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)])
def test_nf4_fused_matches_formula(tokens, in_f, out_f, r, dora, mode, dtype, monkeypatch, kernel_device):
    """QLoRA / QDoRA fused function vs the float64 formula on the dequantized weight: output and the
    gradients of x, A, B (and m); fp32 masters, compute dtype fp32 or fp16 (Triton interpreter on CPU)."""
    if mode == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ALIGNLAB_KERNELS", mode)
    x, w, bias, a, b, m = _inputs(tokens, in_f, out_f, r, dora)
    t = nf4_quantize(w, blocksize=32).to(kernel_device)
    dense = nf4_dequantize(t, torch.float32).cpu()
    dev = lambda v: None if v is None else v.detach().to(kernel_device).requires_grad_(v.requires_grad)  # noqa: E731
    xd, ad, bd, md = dev(x.requires_grad_()), dev(a), dev(b), dev(m)
    s = 1.7
    if dora:
        y = dora_linear(xd.to(dtype), t, bias.to(kernel_device), ad, bd, s, md, dtype)
    else:
        y = lora_linear(xd.to(dtype), t, bias.to(kernel_device), ad, bd, s, dtype)
    leaves = [v for v in (xd, ad, bd, md) if v is not None]

    def ref():
        ref_leaves = [v.detach().double().requires_grad_() for v in (x, a, b) + ((m,) if dora else ())]
        return _formula(ref_leaves[0], dense, bias, *ref_leaves[1:3], s, *ref_leaves[3:]), ref_leaves

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    _check((y, leaves), x, ref, tol)


@pytest.mark.parametrize("dora", [False, True])
def test_dense_fused_with_fp32_masters_on_16bit_base(dora, torch_mode):
    """bf16 base, fp32 factors: the factors are cast per call, gradients come back fp32, and the values
    are within bf16 rounding of the float64 formula."""
    x, w, bias, a, b, m = _inputs((3, 5), 48, 24, 4, dora, seed=2)
    wb, xb = w.bfloat16(), x.bfloat16().requires_grad_()
    s = 2.0
    y = dora_linear(xb, wb, bias.bfloat16(), a, b, s, m) if dora else lora_linear(xb, wb, bias.bfloat16(), a, b, s)
    assert not y.is_cuda
    assert y.dtype == torch.bfloat16
    leaves = [v for v in (xb, a, b, m) if v is not None]
    y_ref_in = [v.detach().double().requires_grad_() for v in (xb, a, b) + ((m,) if dora else ())]
    y_ref = _formula(y_ref_in[0], wb, bias.bfloat16(), *y_ref_in[1:3], s, *y_ref_in[3:])
    gy = torch.randn(y.shape).bfloat16()
    grads = torch.autograd.grad(y, leaves, gy)
    refs = torch.autograd.grad(y_ref, y_ref_in, gy.double())
    rel = lambda p, q: ((p.double() - q).norm() / q.norm()).item()  # noqa: E731
    assert rel(y, y_ref) < 1e-2
    assert [g.dtype for g in grads[1:]] == [torch.float32] * (len(grads) - 1)
    for got, ref in zip(grads, refs):
        assert rel(got, ref) < 2e-2


def _qlora_layer(dora: bool, **kw) -> LoRALinear:
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 40, bias=True), blocksize=32, compute_dtype=torch.float32)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=dora, **kw)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    return layer


@pytest.mark.parametrize("dora", [False, True])
def test_layer_over_nf4_takes_the_fused_path_unless_asked_not_to(dora, monkeypatch, torch_mode):
    import alignlab.adapters.lora as lora_mod

    calls = []
    for fn in ("lora_linear", "dora_linear"):
        orig = getattr(lora_mod, fn)
        monkeypatch.setattr(lora_mod, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    layer = _qlora_layer(dora)
    x = torch.randn(6, 64)
    y = layer(x)
    assert calls == ["dora_linear" if dora else "lora_linear"]
    layer.exact_fp32 = True  # fp32 compute dtype: exact already, so still fused
    layer(x)
    assert len(calls) == 2
    layer.base_layer.compute_dtype = torch.bfloat16  # 16-bit compute + exact_fp32: the unfused fp32 path
    y_exact = layer(x)
    assert len(calls) == 2
    layer.exact_fp32 = False
    y_fast = layer(x)
    assert len(calls) == 3 and y_fast.dtype == y_exact.dtype == torch.float32
    torch.testing.assert_close(y_fast, y, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y_exact, y, rtol=3e-2, atol=3e-2)
    with pytest.raises(TypeError, match="exact_fp32"):
        LoRAConfig(exact_fp32="yes")


def _qlora_llama(dora: bool, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    model = quantize_model(make_tiny_llama(num_layers=2).to(device, compute_dtype), compute_dtype=compute_dtype)
    inject(model, LoRAConfig(r=4, alpha=8, use_dora=dora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B["default"].weight.copy_(0.1 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_checkpointing(model, ids, reentrant: bool, rtol: float, atol: float, **options):
    model.train()
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    enable_checkpointing(model, reentrant, **options)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if reentrant:  # the frozen embedding's output must carry grad into re-entrant checkpointed blocks
        model.enable_input_require_grads()
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_gives_the_same_gradients(dora, reentrant, torch_mode):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    _check_checkpointing(_qlora_llama(dora), ids, reentrant, 1e-5, 1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_hf_checkpointing_of_every_second_layer_gives_the_same_gradients(dora, torch_mode):
    """Newer transformers checkpoint every n-th decoder layer only (``every_n_layers``): the fused layers run both
    checkpointed and not in one model."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    _check_checkpointing(_qlora_llama(dora), ids, False, 1e-5, 1e-6, every_n_layers=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dora", [False, True])
def test_hf_checkpointing_with_offloaded_activations_gives_the_same_gradients(dora):
    """``offload=True`` (newer transformers) keeps what the checkpointed layers save in pinned host memory and
    copies it back for backward: the fused QLoRA / QDoRA functions see copies of their saved input, not the
    caller's tensor. bf16 compute with fp32 adapters, the default on a GPU. (On a CPU-only torch transformers
    itself fails there: pinned memory needs an accelerator.)"""
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()
    _check_checkpointing(_qlora_llama(dora, torch.bfloat16, "cuda"), ids, False, 1e-2, 1e-3, offload=True)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("min_rows", [1, 4096])  # LoRA as the custom ops, and as plain ops
def test_torch_compile_whole_model_has_no_graph_break(dora, min_rows, torch_mode, monkeypatch):
    """fullgraph=True fails on any graph break; aot_eager also traces the backward."""
    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "OP_MIN_ROWS", min_rows)
    model = _qlora_llama(dora)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, grads = _loss_and_grads(compiled, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for k, ref in grads_ref.items():
        got = grads[k] if k in grads else grads["_orig_mod." + k]
        scale = ref.abs().max().clamp_min(1e-12)  # fp32, other op order: compare relative to the tensor's size
        torch.testing.assert_close(got / scale, ref / scale, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("min_rows, takes_op", [(1, True), (25, False)])
def test_compiled_lora_layers_run_as_the_custom_ops(dora, min_rows, takes_op, torch_mode, monkeypatch):
    """Under torch.compile, from ``OP_MIN_ROWS`` rows, every LoRA / DoRA layer is one ``alignlab::lora_forward`` /
    ``dora_forward`` call in the graph (the eager fused code, opaque to Inductor: traced as plain ops the adapter term
    cost an extra copy of each layer's output), and its registered backward gives the eager gradients; below, plain
    ops (24 rows here)."""
    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "OP_MIN_ROWS", min_rows)
    model = _qlora_llama(dora)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    calls, op = [], torch.ops.alignlab.dora_forward if dora else torch.ops.alignlab.lora_forward

    def backend(gm, example_inputs):
        calls.extend(n for n in gm.graph.nodes if n.op == "call_function" and n.target is op)
        return gm.forward

    try:
        loss, grads = _loss_and_grads(torch.compile(model, fullgraph=True, backend=backend), ids)
    finally:
        torch._dynamo.reset()
    assert len(calls) == (len(list(adapter_layers(model))) if takes_op else 0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for k, ref in grads_ref.items():
        torch.testing.assert_close(grads.get(k, grads.get("_orig_mod." + k)), ref, rtol=1e-5, atol=1e-7, msg=k)


def test_a_first_call_traced_by_torch_compile_does_not_recompile(torch_mode, monkeypatch):
    """The first compiled call of a process used to fill fused._AUTOCAST_AVAILABLE while Dynamo traced it: Dynamo
    guarded on the key being absent, so the second, identical call compiled the whole model again."""
    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "_AUTOCAST_AVAILABLE", {})  # as in a process whose first layer call is traced
    model = _qlora_llama(False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    try:
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        for _ in range(3):
            _loss_and_grads(compiled, ids)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_compiled_ops_under_autocast_equal_eager(dora, nf4, torch_mode, monkeypatch):
    """Under torch.autocast(bf16) on a bf16 base (fp32 masters), the custom ops give the eager layer's output and
    gradients bit for bit; the DoRA norm stays fp32 on both (autocast used to run the eager reference's products
    in bf16)."""
    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "OP_MIN_ROWS", 1)
    torch.manual_seed(0)
    base = nn.Linear(64, 24, bias=True).to(torch.bfloat16)
    if nf4:
        base = NF4Linear.from_linear(base, blocksize=32, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(3, 40, 64, dtype=torch.bfloat16, requires_grad=True)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        results.append((y, torch.autograd.grad(y.float().square().sum(), params)))
    torch._dynamo.reset()
    (y, grads), (y_ref, grads_ref) = results[1], results[0]
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_plain_path_keeps_an_nf4_base_output_dtype_under_autocast(torch_mode):
    """Two active adapters take the plain path: under autocast its rank-r addmm ran in bf16 and returned bf16 for an
    fp32 input, where the base alone and the fused path (one adapter) return the input's dtype."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 24), blocksize=32, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    layer.add_adapter("other", r=4, alpha=8)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = base(x)
        one = layer(x)
        layer.set_active(["default", "other"])
        both = layer(x)
    assert alone.dtype == one.dtype == both.dtype == torch.float32


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("dy_pass", [False, True])  # backward's rank-r products by rank_grads (interpreter)
def test_adapter_ops_pass_opcheck(nf4, rows, dy_pass, monkeypatch):
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the four custom ops (LoRA and
    DoRA, forward and backward), dense and NF4 weights, empty and odd row counts; r = 4 (rank_grads pads r to 16:
    its results must still be dense, as the fake ones are)."""
    from alignlab.adapters import fused
    from alignlab.adapters.fused import _nf4_fields

    monkeypatch.setenv("ALIGNLAB_KERNELS", "triton" if dy_pass else "torch")
    monkeypatch.setattr(fused, "DY_PASS", dy_pass)
    monkeypatch.setattr(fused, "DY_PASS_MIN_ROWS", 0)
    monkeypatch.setattr(fused, "DY_PASS_MIN_COLS", 0)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    weight = nf4_quantize(w, blocksize=32) if nf4 else w
    dense_w, fields = (None, _nf4_fields(weight)) if nf4 else (w, _nf4_fields(None))
    x2 = torch.randn(rows, 64, generator=g, requires_grad=True)
    a = torch.randn(4, 64, generator=g, requires_grad=True)
    b = torch.randn(24, 4, generator=g, requires_grad=True)
    bias = torch.randn(24, generator=g)
    m = (w.norm(dim=1) * 1.1).requires_grad_()
    torch.library.opcheck(torch.ops.alignlab.lora_forward.default, (x2, dense_w, *fields, bias, a, b, 0.5))
    torch.library.opcheck(torch.ops.alignlab.dora_forward.default, (x2, dense_w, *fields, bias, a, b, m, 0.5))
    gy = torch.randn(rows, 24, generator=g)
    xa = torch.randn(rows, 4, generator=g)
    for need in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.alignlab.lora_backward.default,
                              (gy, x2.detach(), dense_w, *fields, a.detach(), b.detach(), xa, 0.5, *need))
    with torch.no_grad():
        y, xa, *factors = torch.ops.alignlab.dora_forward(x2, dense_w, *fields, bias, a, b, m, 0.5)
    for need in ((True, True, True, True), (False, False, True, True)):
        torch.library.opcheck(torch.ops.alignlab.dora_backward.default,
                              (gy, x2.detach(), dense_w, *fields, bias, a.detach(), b.detach(), m.detach(), xa, y,
                               *factors, *need))


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_lora_forward_op_at_decode_rows_passes_opcheck(nf4, rows, triton_mode):
    """``alignlab::lora_forward`` whose forward takes the decode kernels (fp16 at decode rows, the interpreter):
    schema, fake implementation (its ``xa`` output included: the down kernel's, ``(rows, r)`` in x's dtype),
    autograd registration and AOT dispatch."""
    from alignlab.adapters import fused
    from alignlab.adapters.fused import _nf4_fields

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(24, 64, generator=g).half()
    weight = nf4_quantize(w.float(), blocksize=32) if nf4 else w
    dense_w, fields = (None, _nf4_fields(weight)) if nf4 else (w, _nf4_fields(None))
    x2 = torch.randn(rows, 64, generator=g).half().requires_grad_()
    a = torch.randn(4, 64, generator=g, requires_grad=True)
    b = torch.randn(24, 4, generator=g, requires_grad=True)
    bias = torch.randn(24, generator=g).half()
    assert fused.takes_decode_kernels(x2, a, torch.float16)
    torch.library.opcheck(torch.ops.alignlab.lora_forward.default, (x2, dense_w, *fields, bias, a, b, 0.5))


@pytest.mark.parametrize("dora", [False, True])
def test_linear_ops_match_the_fused_functions(dora, torch_mode):
    """The op pairs give lora_linear's / dora_linear's output and gradients bit for bit (fp32 masters, bf16 compute,
    a 3-D input, a bias)."""
    from alignlab.adapters.fused import dora_linear_op, lora_linear_op

    x, w, bias, a, b, m = _inputs((2, 5), 64, 24, 4, dora, seed=3)
    t = nf4_quantize(w, blocksize=32)
    x = x.to(torch.bfloat16).requires_grad_()
    results = []
    for fn in ((dora_linear, dora_linear_op) if dora else (lora_linear, lora_linear_op)):
        y = fn(x, t, bias, a, b, 0.5, m, torch.bfloat16) if dora else fn(x, t, bias, a, b, 0.5, torch.bfloat16)
        leaves = [x, a, b, m] if dora else [x, a, b]
        results.append((y, torch.autograd.grad(y.float().square().sum(), leaves)))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 24)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_qlora_layer_matches_peft_style_unfused_sum(torch_mode):
    """The fused QLoRA layer equals base(x) + s·B A x computed module by module (fp32 compute)."""
    layer = _qlora_layer(False)
    x = torch.randn(3, 7, 64)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + s * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    copy.deepcopy(layer)  # layers stay copyable (with the fused path's cached casts)


@pytest.mark.parametrize("dora", [False, True])
def test_saves_only_what_backward_needs(dora, torch_mode):
    """QLoRA / QDoRA save x (the caller's own tensor), x·Aᵀ, the cast factors and, for DoRA, z in the compute
    dtype: never a dequantized or merged (out, in) weight, and no fp32 (tokens, out) temporary."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(96, 80, bias=False), blocksize=32, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=dora)  # fp32 masters
    x = torch.randn(3, 50, 96, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert not any(t.numel() >= 80 * 96 and t.dim() == 2 and t.shape[-1] == 96 and t.shape[0] == 80 for t in saved)
    assert not any(t.dtype == torch.float32 and t.numel() >= 150 * 80 for t in saved)
    big = [t for t in saved if t.numel() >= 150 * 80]
    assert any(t.data_ptr() == x.data_ptr() for t in big)  # x itself, not a copy
    assert len(big) == (2 if dora else 1), [(tuple(t.shape), t.dtype) for t in big]  # x (and z)


def test_dora_zero_magnitude_row_gets_zero_magnitude_gradient(torch_mode):
    """A row with m = 0 outputs its bias alone; the documented magnitude gradient there is 0, elsewhere the formula."""
    x, w, bias, a, b, m = _inputs((6,), 20, 9, 3, True, seed=4)
    m = m.detach().clone()
    m[3] = 0.0
    m.requires_grad_()
    y = dora_linear(x, w, bias, a, b, 0.5, m)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (dm,) = torch.autograd.grad(y, [m], gy)
    m_ref = m.detach().double().requires_grad_()
    (dm_ref,) = torch.autograd.grad(_formula(x, w, bias, a, b, 0.5, m_ref), [m_ref], gy.double())
    assert dm[3] == 0 and torch.isfinite(dm).all()
    keep = torch.arange(9) != 3
    torch.testing.assert_close(dm[keep].double(), dm_ref[keep], rtol=1e-4, atol=1e-5)


def _bf16_layer(dora: bool) -> LoRALinear:
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(48, 24, bias=True).bfloat16().requires_grad_(False), r=4, alpha=8, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    return layer


def _uncached(layer: LoRALinear, x):
    """The fused function with fresh casts and norm: what the layer must give whatever it cached."""
    base, a, b = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    if layer.is_dora("default"):
        return dora_linear(x, base.weight, base.bias, a, b, s, layer.lora_magnitude_vector["default"])
    return lora_linear(x, base.weight, base.bias, a, b, s)


@pytest.mark.parametrize("dora", [False, True])
def test_cached_factor_casts_and_norm_follow_every_change(dora, torch_mode):
    """The fused path keeps A, B in bf16 (and DoRA's row norm) between calls: an optimizer step, an in-place
    edit, a replaced tensor, a changed base weight or scale must each show in the very next output."""
    layer = _bf16_layer(dora)
    layer.cache_casts = True
    x = torch.randn(5, 48).bfloat16()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)

    def same():
        torch.testing.assert_close(layer(x), _uncached(layer, x), rtol=0, atol=0)

    same()
    assert layer._casts["default"][1][0].dtype == torch.bfloat16
    first = layer(x)
    layer(x).float().square().sum().backward()
    opt.step()  # in-place update: version counters move
    same()
    assert not torch.equal(layer(x), first)
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(-1)
    same()
    layer.lora_B["default"].weight.data = torch.randn(24, 4)  # a new tensor (version counter not bumped)
    same()
    with torch.no_grad():
        layer.base_layer.weight.add_(0.25)  # the base weight changes DoRA's norm
    same()
    layer.scaling["default"] = 3.0
    same()


@pytest.mark.parametrize("dora", [False, True])
def test_by_default_nothing_is_cached_so_data_edits_are_seen(dora, torch_mode):
    """``p.data.add_`` changes values without a version bump: with the default (no cast cache) the next call
    sees it; with ``cache_casts`` it cannot, which is why the cache is opt-in."""
    layer = _bf16_layer(dora)
    assert layer.cache_casts is False
    x = torch.randn(5, 48).bfloat16()
    before = layer(x)
    layer.lora_B["default"].weight.data.add_(0.5)  # no version bump, same address
    torch.testing.assert_close(layer(x), _uncached(layer, x), rtol=0, atol=0)
    assert not torch.equal(layer(x), before)
    layer.cache_casts = True
    layer(x)
    layer.lora_B["default"].weight.data.add_(0.5)
    assert not torch.equal(layer(x), _uncached(layer, x))  # the documented blind spot of the opt-in cache


def test_cached_casts_made_in_inference_mode_do_not_reach_autograd(torch_mode):
    layer = _bf16_layer(False)
    layer.cache_casts = True
    x = torch.randn(3, 48).bfloat16().requires_grad_()
    with torch.inference_mode():
        layer(x.detach())
    layer(x).float().sum().backward()  # would fail if an inference tensor were saved for backward
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None


def test_quant_weight_object_is_reused_until_a_buffer_changes():
    base = NF4Linear.from_linear(nn.Linear(64, 8), blocksize=32, compute_dtype=torch.float32)
    t = base.quant_weight
    assert base.quant_weight is t
    sd = base.state_dict()  # saving must not change the cached object (it once set shift to None on it)
    assert base.quant_weight is t and "weight" in sd
    base.load_dense_weight_(torch.randn(8, 64))
    assert base.quant_weight is not t and base.quant_weight.data is base.qdata
    base.to(torch.float64)  # a module move re-registers the buffers: a new object over the new buffers
    t3 = base.quant_weight
    assert t3.data is base.qdata and t3.absmax is base.qabsmax
    x = torch.randn(2, 64)
    torch.testing.assert_close(base(x), x @ nf4_dequantize(t3, torch.float32).T + base.bias.float())


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quant", [False, True])
def test_no_grad_calls_skip_autograd_and_give_the_same_output(dora, quant, monkeypatch, torch_mode):
    """Inference calls run the fused math without an autograd function: same values, no graph."""
    import alignlab.adapters.fused as fused_mod
    import alignlab.kernels.nf4_matmul as nf4_matmul_mod

    layer = _qlora_layer(dora) if quant else _bf16_layer(dora)
    x = torch.randn(4, 64 if quant else 48).to(torch.float32 if quant else torch.bfloat16)
    with_grad = layer(x.clone().requires_grad_())
    applied = []
    for cls in (fused_mod._LoRAFn, fused_mod._DoRAFn, nf4_matmul_mod._NF4Matmul):
        monkeypatch.setattr(cls, "apply", lambda *a, _o=cls.apply, **k: applied.append(1) or _o(*a, **k))
    with torch.no_grad():
        plain = layer(x)
    assert applied == [] and plain.grad_fn is None
    torch.testing.assert_close(plain, with_grad.detach(), rtol=0, atol=0)
    with torch.no_grad():
        base_out = layer.base_layer(x)
    assert applied == []
    torch.testing.assert_close(base_out, layer.base_layer(x.clone().requires_grad_()).detach(), rtol=0, atol=0)


class _Ops(TorchDispatchMode):
    """Records the name of every aten op run inside it (views included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_lora_scale_rides_in_the_gemms():
    """The LoRA scale s costs no pass of its own: forward takes it in the GEMM forming s·x Aᵀ, backward in the
    one forming s·dy B (alpha), and ∂L/∂B reuses the saved s·x Aᵀ -- no elementwise multiply in either direction
    (each was an extra kernel launch per layer call)."""
    x, w, bias, a, b, _ = _inputs((3, 5), 48, 24, 4, False, seed=4)
    xb = x.bfloat16().requires_grad_()
    with _Ops() as fwd:
        y = lora_linear(xb, w.bfloat16(), None, a, b, 1.7)
    gy = torch.randn(y.shape).bfloat16()
    with _Ops() as bwd:
        grads = torch.autograd.grad(y, (xb, a, b), gy)
    for ops in (fwd.names, bwd.names):
        assert not {"mul", "mul_"} & set(ops), ops
    ref_in = [v.detach().double().requires_grad_() for v in (xb, a, b)]
    refs = torch.autograd.grad(_formula(ref_in[0], w.bfloat16(), None, ref_in[1], ref_in[2], 1.7), ref_in, gy.double())
    for got, ref in zip(grads, refs):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_fp32_factors_are_cast_by_one_op():
    """With fp32 masters on a 16-bit base, A and B come to the compute dtype by one multi-tensor copy (one
    launch on CUDA instead of two), with the values a plain cast gives."""
    layer = LoRALinear(nn.Linear(48, 24).bfloat16().requires_grad_(False), r=4, alpha=8)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == torch.float32
    with _Ops() as ops:
        ac, bc = layer._cast_factors("default", a, b, torch.bfloat16, layer.scaling["default"], scaled=True)
    assert [n for n in ops.names if "copy" in n] == ["_foreach_copy_"], ops.names
    assert torch.equal(ac, a.detach().bfloat16()) and torch.equal(bc, b.detach().bfloat16())


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_saved_tensors_replaced_by_copies_give_the_same_gradients(dora, compute_dtype, kernel_mode):
    """Activation offloading (transformers' ``offload=True``, ``torch.autograd.graph.save_on_cpu``) hands backward
    copies of what forward saved, not the tensors themselves: the fused QLoRA / QDoRA functions must not depend on
    a saved tensor's identity or memory (simulated on CPU by hooks that pack a clone)."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 48, bias=True), blocksize=32, compute_dtype=compute_dtype)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
    x = torch.randn(3, 9, 64, dtype=compute_dtype)
    gy = torch.randn(3, 9, 48, dtype=compute_dtype)

    def grads(hooks):
        xi = x.clone().requires_grad_()
        with hooks:
            y = layer(xi)
        y.backward(gy)
        out = [xi.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad(set_to_none=True)
        return out

    ref = grads(contextlib.nullcontext())
    copied = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t))
    assert len(copied) == len(ref) == (4 if dora else 3)
    for got, want in zip(copied, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16, 64, 65])
def test_qlora_decode_rows_take_the_launcher_kept_on_the_packed_weight(dora, rows, monkeypatch):
    """Up to ``nf4_matmul.DECODE_ROWS`` rows the fused QLoRA / QDoRA layer's base product goes through the launcher
    kept on the packed weight (``decode_matmul``, as NF4Linear's decode path): outputs and gradients are the bits of
    the launchers-off run, with and without grad, and one is kept only for those row counts (QDoRA: up to
    ``SMALL_M`` rows; above, its row scale goes into a dequantization instead)."""
    from alignlab.adapters import fused
    from alignlab.kernels.nf4_matmul import DECODE_ROWS, SMALL_M
    from alignlab.quant import linear

    # the base product through the packed weight's launcher: the rank-term epilogue (on by default) makes LoRA's
    # product by the small-M kernel itself up to 16 rows (tests/kernels/test_lora_decode.py covers it)
    monkeypatch.setattr(fused, "RANK_EPILOGUE", False)
    torch.manual_seed(rows)
    base = NF4Linear.from_linear(nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16))
    layer = LoRALinear(base, r=16, alpha=32, use_dora=dora)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)

    def run(on: bool):
        monkeypatch.setattr(linear, "DECODE_LAUNCHERS", on)
        with torch.no_grad():
            y_nograd = [layer(x) for _ in range(3)]  # the first call keeps a launcher, the next ones use it
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.float().square().sum().backward()
        grads = [xg.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad(set_to_none=True)
        return y_nograd, y.detach(), grads

    off = run(False)
    assert "_runners" not in base.quant_weight.__dict__
    on = run(True)
    assert bool(base.quant_weight.__dict__.get("_runners")) == (rows <= (SMALL_M if dora else DECODE_ROWS))
    for y in on[0]:
        torch.testing.assert_close(y, off[0][0], rtol=0, atol=0)
    torch.testing.assert_close(on[1], off[1], rtol=0, atol=0)
    # with grad and without: the same forward (LoRA up to the decode kernels' MAX_ROWS rows takes them both ways)
    torch.testing.assert_close(on[1], on[0][0], rtol=0, atol=0)
    for got, want in zip(on[2], off[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("nf4, shape, takes_op", [(False, (1, 64), True), (False, (2, 3, 64), True),
                                                  (False, (70, 64), False), (True, (1, 64), True),
                                                  (True, (2, 3, 64), True)])
def test_compiled_lora_at_decode_rows_runs_the_decode_kernels_in_the_op(nf4, shape, takes_op, triton_mode,
                                                                       monkeypatch):
    """Under torch.compile a LoRA layer at decode rows (up to ``lora_decode.MAX_ROWS``) is one ``alignlab::lora_forward``
    call whose forward is the eager decode product (traced as plain ops it cast both factors and made the rank-r term
    by GEMMs and an out-of-place add): the eager layer's output and gradients bit for bit, with grad and without; more
    rows below ``OP_MIN_ROWS`` stay plain ops; ``DECODE_OP = False`` traces decode rows as plain ops too. fp16 (the
    interpreter's bf16 ``tl.dot`` is wrong), fp32 master factors. (Over an NF4 base the plain ops are not traced
    here: under the interpreter the base product with a gradient launches its kernel while traced, outside the graph
    (a graph break, which ``fullgraph=True`` refuses); on a GPU it is the ``nf4_small_matmul`` op,
    tests/adapters/test_cuda.py.)"""
    from alignlab.adapters import fused
    from alignlab.kernels import lora_decode

    torch.manual_seed(len(shape))
    base = nn.Linear(64, 48, bias=True).to(torch.float16)
    if nf4:
        base = NF4Linear.from_linear(base, blocksize=32, compute_dtype=torch.float16)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(*shape, dtype=torch.float16)
    assert lora_decode.applies(x, layer.lora_A["default"].weight, torch.float16) == takes_op
    calls = []

    def backend(gm, example_inputs):
        calls.extend(n for n in gm.graph.nodes
                      if n.op == "call_function" and n.target is torch.ops.alignlab.lora_forward)
        return gm.forward

    def outputs(fn):
        with torch.no_grad():
            y0 = fn(x)
        xg = x.clone().requires_grad_(True)
        y = fn(xg)
        params = [xg, *(p for p in layer.parameters() if p.requires_grad)]
        return y0, y.detach(), torch.autograd.grad(y.float().square().sum(), params)

    want = outputs(layer)
    for decode_op in (True,) if nf4 else (True, False):
        monkeypatch.setattr(fused, "DECODE_OP", decode_op)
        calls.clear()
        try:
            got = outputs(torch.compile(layer, fullgraph=True, backend=backend))
        finally:
            torch._dynamo.reset()
        assert len(calls) == (2 if takes_op and decode_op else 0)  # one graph without grad, one with
        if takes_op and decode_op:
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
            for g, w in zip(got[2], want[2]):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        else:  # plain ops: other kernels, the same function to fp16 rounding
            torch.testing.assert_close(got[1], want[1], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dora, compute_dtype", [(True, torch.float16), (False, torch.float32)])
def test_compiled_plain_paths_that_launch_kernels_run_under_the_interpreter(dora, compute_dtype, triton_mode):
    """Under ``TRITON_INTERPRET=1`` a traced plain path that launches a Triton kernel (DoRA's row norm; the NF4
    dequantization of an fp32-compute base) runs that launch outside the graph (``launch._interpreted``, a graph
    break): Dynamo's fake tensors used to reach the interpreter and fail there. Output and gradients bit for bit as
    eager's: LoRA over an fp32-compute base with fp16 inputs traces its plain ops in fp32, rounding once at the end as
    the fused path does (they ran in fp16: 1 unit in the last place off eager's, 2026-12-07)."""
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=compute_dtype), r=4, alpha=8,
                       use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(2, 64, dtype=torch.float16)
    factors = [p for p in layer.parameters() if p.requires_grad]
    results = []
    try:
        for fn in (layer, torch.compile(layer, backend="aot_eager")):
            with torch.no_grad():
                y0 = fn(x)
            xg = x.clone().requires_grad_(True)
            results.append((y0, *torch.autograd.grad(fn(xg).float().square().sum(), [xg, *factors])))
    finally:
        torch._dynamo.reset()
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
