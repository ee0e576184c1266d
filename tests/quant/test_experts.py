"""NF4 experts of transformers 5.x MoE blocks: per-expert bytes against bitsandbytes (oracle, CPU), the block's
output against the block run on the dequantized weights, routing-only dequantization, memory, state dicts;
tiny random Mixtral, Qwen3-MoE and gpt-oss (no downloads)."""

import copy

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Experts, NF4Linear, nf4_dequantize, nf4_quantize, quantize_model
from alignlab.quant.nf4 import dynamic_map

transformers = pytest.importorskip("transformers")

try:
    import bitsandbytes.functional as bnbF
except Exception:  # pragma: no cover - bnb is a dev dependency
    bnbF = None

COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def tiny_moe(kind: str, seed: int = 0, experts: int = 4):
    """A tiny random MoE causal LM; gpt-oss gets non-zero expert biases."""
    torch.manual_seed(seed)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=experts, num_experts_per_tok=2, **COMMON)
        model = transformers.MixtralForCausalLM(config)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=96, intermediate_size=96, num_experts=experts,
                                             num_experts_per_tok=2, head_dim=16, **COMMON)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.GptOssConfig(intermediate_size=96, num_local_experts=experts, num_experts_per_tok=2,
                                           head_dim=16, **COMMON)
        model = transformers.GptOssForCausalLM(config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("_bias"):
                    p.normal_(0, 0.02)
    return model.eval()


KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]


def _experts(model):
    return model.model.layers[0].mlp.experts


def _matrices(experts, name):
    """Every expert's (out, in) matrix of a transformers experts module."""
    w = getattr(experts, name).detach()
    return [m.T.contiguous() if getattr(experts, "is_transposed", False) else m for m in w]


def _dense_reference(original, q: NF4Experts, dtype):
    """The transformers block with its weights replaced by the dequantized NF4 weights (in ``dtype``)."""
    ref = copy.deepcopy(original).to(dtype)
    with torch.no_grad():
        for name in q.expert_parameters:
            w = q.dequantize_experts(name, dtype=dtype)
            getattr(ref, name).copy_(w.transpose(1, 2) if getattr(ref, "is_transposed", False) else w)
    return ref


def _routing(tokens=13, hidden=64, experts=4, k=2, seed=0, skip=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    if skip is not None:
        logits[:, skip] = -1e9  # nobody routes to these
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return x, idx, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", KINDS)
def test_every_expert_is_quantized_as_its_own_2d_weight(kind):
    experts = _experts(tiny_moe(kind))
    q = NF4Experts.from_experts(experts, blocksize=64)
    assert q.expert_parameters == ("gate_up_proj", "down_proj")
    assert q.num_experts == 4 and q.has_gate and q.is_transposed == (kind == "gpt_oss") and q.has_bias == (kind == "gpt_oss")
    for name in q.expert_parameters:
        for e, w in enumerate(_matrices(experts, name)):
            t, ref = q.quant_weight(name, e), nf4_quantize(w, blocksize=64)
            assert tuple(t.shape) == tuple(w.shape)
            for part in ("data", "absmax", "nested_absmax", "nested_offset"):
                assert torch.equal(getattr(t, part), getattr(ref, part)), (name, e, part)
            torch.testing.assert_close(q.dequantize_experts(name, [e])[0], nf4_dequantize(ref, torch.bfloat16), rtol=0, atol=0)
    # a subset, in any order, is the same slices
    sub = q.dequantize_experts("down_proj", torch.tensor([3, 1]), dtype=torch.float32)
    full = q.dequantize_experts("down_proj", dtype=torch.float32)
    assert torch.equal(sub, full[[3, 1]])


@pytest.mark.skipif(bnbF is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_per_expert_bytes_equal_bitsandbytes(kind, double_quant):
    experts = _experts(tiny_moe(kind))
    q = NF4Experts.from_experts(experts, blocksize=64, double_quant=double_quant)
    for name in q.expert_parameters:
        for e, w in enumerate(_matrices(experts, name)):
            data, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            t = q.quant_weight(name, e)
            assert torch.equal(t.data, data.reshape(-1)), (name, e)
            if not double_quant:
                assert torch.equal(t.absmax, st.absmax)
                continue
            assert t.nested_offset.item() == st.offset.item()
            assert torch.equal(t.nested_absmax, st.state2.absmax)
            # bitsandbytes' CPU search puts a few 8-bit scale codes near the midpoint of two levels one step
            # the other way (tests/quant/test_nf4.py); every other code is equal
            diff = (t.absmax.long() - st.absmax.long()).abs()
            assert diff.max() <= 1 and (diff != 0).float().mean() < 0.05
            code = dynamic_map()
            # and the scales they decode to agree to that one step
            torch.testing.assert_close(code[t.absmax.long()], code[st.absmax.long()], rtol=0, atol=0.02)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_output_and_input_gradient_equal_the_dequantized_block(kind, dtype):
    experts = _experts(tiny_moe(kind))
    q = NF4Experts.from_experts(experts, compute_dtype=dtype)
    ref = _dense_reference(experts, q, dtype)
    x, idx, w = _routing()
    x = x.to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = q(xa, idx, w.to(dtype)), ref(xb, idx, w.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


def test_the_triton_path_gives_the_same_block(triton_mode):
    """The NF4 matmul / dequantization kernels (interpreter on CPU, the GPU when there is one) in the block."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = NF4Experts.from_experts(_experts(tiny_moe("gpt_oss")), compute_dtype=torch.float32).to(device)
    x, idx, w = (t.to(device) for t in _routing(tokens=5))
    x.requires_grad_()
    y = q(x, idx, w)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    full = q.dequantize_experts("down_proj", [2, 0])
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ALIGNLAB_KERNELS", "torch")
        x2 = x.detach().clone().requires_grad_()
        y2 = q(x2, idx, w)
        (gx2,) = torch.autograd.grad(y2, x2, torch.ones_like(y2))
        torch.testing.assert_close(full, q.dequantize_experts("down_proj", [2, 0]), rtol=0, atol=0)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-5)


def test_only_the_routed_experts_are_dequantized(monkeypatch):
    q = NF4Experts.from_experts(_experts(tiny_moe("mixtral", experts=6)), compute_dtype=torch.float32)
    seen = []
    real = NF4Experts.quant_weight
    monkeypatch.setattr(NF4Experts, "quant_weight", lambda self, name, e: seen.append((name, e)) or real(self, name, e))
    x, idx, w = _routing(experts=6, skip=[1, 4])
    q(x.requires_grad_(), idx, w).sum().backward()
    routed = set(idx.unique().tolist())
    assert routed == {0, 2, 3, 5}
    assert {e for _, e in seen} == routed
    assert len(seen) == 2 * 2 * len(routed)  # gate_up and down, forward and backward


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_model_converts_experts_and_linears(kind):
    model = tiny_moe(kind)
    original = copy.deepcopy(model)
    quantize_model(model, compute_dtype=torch.float32)
    q = _experts(model)
    assert isinstance(q, NF4Experts)
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    assert not any(p.dim() == 3 for p in model.parameters())  # no dense expert stack left
    # the whole model equals the original with every quantized weight replaced by its dequantized value
    ref = copy.deepcopy(original)
    ref.model.layers[0].mlp.experts = _dense_reference(_experts(original), q, torch.float32)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, NF4Linear):
                ref.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model(ids).logits, original(ids).logits, atol=1e-6)  # it is quantized


def test_quantize_model_skip_and_errors():
    model = tiny_moe("mixtral")
    quantize_model(model, skip=["experts"])
    assert not isinstance(_experts(model), NF4Experts)
    with pytest.raises(ValueError, match="calibrate"):
        quantize_model(tiny_moe("mixtral"), calibrate="icq")
    with pytest.raises(TypeError, match="experts module"):
        NF4Experts.from_experts(nn.Linear(3, 4))
    q = NF4Experts.from_experts(_experts(tiny_moe("mixtral")))
    with pytest.raises(ValueError, match="name must be one of"):
        q.dequantize_experts("up_proj")
    with pytest.raises(ValueError, match="shape"):
        q.load_dense_experts_("down_proj", torch.zeros(4, 3, 3))


def test_memory_is_about_a_quarter_of_bf16():
    """A CPU byte count of one block's stored tensors (codes, 8-bit scales, second-level scales, offsets)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=512, intermediate_size=1024, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=8, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)
    experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config).to(torch.bfloat16)
    nn.init.normal_(experts.gate_up_proj, std=0.02)
    nn.init.normal_(experts.down_proj, std=0.02)
    dense = sum(p.numel() * p.element_size() for p in experts.parameters())
    q = NF4Experts.from_experts(experts)
    n = sum(p.numel() for p in experts.parameters())
    expected = n * (0.5 + 1 / 64 + 4 / (64 * 256)) + 4 * 2 * 4  # + one fp32 offset per expert matrix
    assert q.nbytes() == pytest.approx(expected, rel=1e-3)
    assert 0.255 < q.nbytes() / dense < 0.27


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_state_dict_round_trip_and_dtype_moves(kind):
    a = quantize_model(tiny_moe(kind, seed=0), compute_dtype=torch.float32)
    b = quantize_model(tiny_moe(kind, seed=1), compute_dtype=torch.float32)
    keys = set(_experts(a).state_dict())
    assert {"gate_up_proj_qdata", "gate_up_proj_qabsmax", "gate_up_proj_nested_absmax", "gate_up_proj_nested_offset"} <= keys
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)
    a.to(torch.bfloat16)  # the packed codes and fp32 scales keep their dtypes
    q = _experts(a)
    assert q.gate_up_proj_qdata.dtype == torch.uint8 and q.gate_up_proj_nested_absmax.dtype == torch.float32
    assert q.gate_up_proj_nested_offset.dtype == torch.float32


def test_load_dense_and_quantized_state_round_trip():
    q = NF4Experts.from_experts(_experts(tiny_moe("qwen3_moe")), compute_dtype=torch.float32)
    before = q.quantized_state("down_proj")
    w = q.dequantize_experts("down_proj")
    q.load_dense_experts_("down_proj", w + 0.01)
    assert not torch.equal(q.down_proj_qdata, before["qdata"])
    for e in range(q.num_experts):  # re-quantized as bitsandbytes would quantize the new matrix
        ref = nf4_quantize(w[e] + 0.01)
        assert torch.equal(q.quant_weight("down_proj", e).data, ref.data)
    q.load_quantized_state_("down_proj", before)
    torch.testing.assert_close(q.dequantize_experts("down_proj"), w, rtol=0, atol=0)


# -- QLoRA on experts: the expert LoRA of alignlab.adapters.experts over the NF4 base -----------------------
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _qlora(kind, seed=0):
    from alignlab.adapters import LoRAConfig, inject

    model = quantize_model(tiny_moe(kind, seed=seed), compute_dtype=torch.float32)
    return inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS))


@pytest.mark.parametrize("kind", KINDS)
def test_count_parameters_counts_quantized_experts_as_dense(kind):
    from alignlab.adapters import count_parameters

    dense = sum(p.numel() for p in tiny_moe(kind).parameters())
    assert count_parameters(quantize_model(tiny_moe(kind), compute_dtype=torch.float32)).total == dense


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_qlora_on_experts_equals_lora_on_the_dequantized_experts(kind):
    from alignlab.adapters.experts import ExpertLoRA

    original = tiny_moe(kind)
    model = _qlora(kind)
    layer = _experts(model)
    assert isinstance(layer, ExpertLoRA) and isinstance(layer.base_layer, NF4Experts)
    # the twin: the original transformers experts holding the dequantized weights, under the same factors
    twin = copy.deepcopy(model)
    twin.model.layers[0].mlp.experts.base_layer = _dense_reference(_experts(original), layer.base_layer, torch.float32)
    twin.model.layers[0].mlp.experts.base_layer.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    twin_params = dict(twin.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                twin_params[n].copy_(p)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    y, y_ref = model(ids).logits, twin(ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_qlora_on_a_quantized_mixtral_trains_saves_and_loads(tmp_path):
    from alignlab.adapters import load_adapter, merge, save_adapter, unmerge

    model = _qlora("mixtral")
    base = _experts(model).base_layer
    packed = {n: base.quantized_state(n)["qdata"].clone() for n in base.expert_parameters}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(base.quantized_state(n)["qdata"], packed[n]) for n in packed)  # the base never moves
    expected = model(ids).logits
    save_adapter(model, tmp_path)
    fresh = quantize_model(tiny_moe("mixtral"), compute_dtype=torch.float32)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)
    # merging re-quantizes W + ΔW; unmerging gives the packed base back byte for byte
    merge(fresh)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=0.05, atol=0.05)
    unmerge(fresh)
    fresh_base = _experts(fresh).base_layer
    assert all(torch.equal(fresh_base.quantized_state(n)["qdata"], packed[n]) for n in packed)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)


def test_no_tokens_and_sentinel_routes():
    """An empty batch gives an empty output; ids >= E (expert-parallel sentinels) contribute nothing."""
    experts = _experts(tiny_moe("mixtral"))
    q = NF4Experts.from_experts(experts, compute_dtype=torch.float32)
    x, idx, w = _routing(tokens=6)
    assert q(x[:0], idx[:0], w[:0]).shape == (0, 64)
    masked = idx.clone()
    masked[:, 1] = q.num_experts  # second slot routes nowhere
    only_first = q(x, idx[:, :1], w[:, :1])
    torch.testing.assert_close(q(x, masked, w), only_first, rtol=0, atol=0)


class _UngatedExperts(nn.Module):
    """Experts without a gate, as transformers' decorator describes them (``has_gate=False``: ``up_proj``
    ``(E, I, H)``, ``act_fn``, ``down_proj`` ``(E, H, I)``); the reference loop is written out here."""

    def __init__(self, experts=3, hidden=64, inter=96):
        super().__init__()
        self.num_experts, self.has_gate, self.has_bias, self.is_transposed = experts, False, False, False
        self.up_proj = nn.Parameter(torch.randn(experts, inter, hidden) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) * 0.05)
        self.act_fn = nn.GELU()

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(idx.shape[1]):
                e = int(idx[t, slot])
                out[t] += w[t, slot] * (self.down_proj[e] @ self.act_fn(self.up_proj[e] @ x[t]))
        return out


def test_experts_without_a_gate():
    torch.manual_seed(0)
    experts = _UngatedExperts()
    q = NF4Experts.from_experts(experts, compute_dtype=torch.float32)
    assert q.expert_parameters == ("up_proj", "down_proj") and not q.has_gate
    x, idx, w = _routing(tokens=7, experts=3)
    ref = copy.deepcopy(experts)
    with torch.no_grad():
        ref.up_proj.copy_(q.dequantize_experts("up_proj"))
        ref.down_proj.copy_(q.dequantize_experts("down_proj"))
    torch.testing.assert_close(q(x, idx, w), ref(x, idx, w), rtol=1e-5, atol=1e-6)


# -- torch.compile: the per-expert loop runs inside the opaque op alignlab::nf4_grouped_linear ---------------
def _randomise_trainable(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_torch_compile_fullgraph_of_a_quantized_mixtral_equals_eager():
    """Inductor compiles the frozen quantized model in one graph (the routing-dependent loop over experts
    stays inside the op) with the eager loss."""
    torch._dynamo.reset()
    model = quantize_model(tiny_moe("mixtral"), compute_dtype=torch.float32, skip=["q_proj", "k_proj", "v_proj", "o_proj"])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
        eager = model(ids, labels=ids).loss
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_of_qlora_on_experts_equals_eager():
    """Expert LoRA over NF4 experts compiled in one graph: the eager loss and adapter gradients (the op's
    backward re-dequantizes for the input gradient). ``aot_eager``: the trace and the op's autograd are what
    broke; inductor's code generation for forward + backward would add ~25 s on CPU."""
    torch._dynamo.reset()
    model = _qlora("mixtral")
    _randomise_trainable(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def run(fn):
        for p in params.values():
            p.grad = None
        loss = fn(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params.items()}

    ours, g_ours = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    eager, g_eager = run(model)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    assert any("experts" in n for n in g_ours)
    for n in g_eager:
        torch.testing.assert_close(g_ours[n], g_eager[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_torch_func_grad_and_vjp_through_quantized_experts(kind):
    """torch.func.grad / vjp raised RuntimeError ("must override the setup_context staticmethod") on the
    experts' autograd Function; now they give the input gradient that autograd gives."""
    q = NF4Experts.from_experts(_experts(tiny_moe(kind)), compute_dtype=torch.float32)
    x, idx, w = _routing()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    xa = x.clone().requires_grad_()
    q(xa, idx, w).backward(g)
    got = torch.func.grad(lambda t: (q(t, idx, w) * g).sum())(x.clone())
    torch.testing.assert_close(got, xa.grad, rtol=1e-5, atol=1e-6)
    _, pull = torch.func.vjp(lambda t: q(t, idx, w), x.clone())
    torch.testing.assert_close(pull(g)[0], xa.grad, rtol=1e-5, atol=1e-6)
