"""RoPE scaling: formulas written out here, and transformers' ROPE_INIT_FUNCTIONS as the peer."""

import math

import pytest
import torch

from alignlab.context.rope import (
    RopeScaling,
    ScaledRotaryEmbedding,
    apply_rope_scaling,
    dynamic_ntk_inv_freq,
    linear_inv_freq,
    longrope_attention_scaling,
    longrope_inv_freq,
    ntk_inv_freq,
    rope_inv_freq,
    scaled_inv_freq,
    yarn_attention_scaling,
    yarn_inv_freq,
    yarn_ramp,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def hf_config(head_dim=16, max_pos=64, theta=10000.0, **rope):
    params = {"rope_theta": theta, **rope}
    params.setdefault("rope_type", "default")
    return transformers.LlamaConfig(
        vocab_size=32, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        intermediate_size=8, num_hidden_layers=1, max_position_embeddings=max_pos, rope_parameters=params,
    )


def theta_formula(d, b):
    return torch.tensor([b ** (-2.0 * i / d) for i in range(d // 2)], dtype=torch.float64)


@pytest.mark.parametrize("d,b", [(2, 10000.0), (16, 10000.0), (64, 500000.0)])
def test_plain_rope_formula(d, b):
    torch.testing.assert_close(rope_inv_freq(d, b).double(), theta_formula(d, b), rtol=1e-6, atol=0)


@pytest.mark.parametrize("s", [1.0, 2.0, 7.5])
def test_linear_matches_formula_and_hf(s):
    d, b = 32, 10000.0
    ours = linear_inv_freq(d, b, s)
    torch.testing.assert_close(ours.double(), theta_formula(d, b) / s, rtol=1e-6, atol=0)
    ref, attn = ROPE_INIT_FUNCTIONS["linear"](hf_config(d, rope_type="linear", factor=s))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert attn == 1.0


@pytest.mark.parametrize("s", [2.0, 4.0, 16.0])
def test_ntk_endpoints_and_hf_dynamic_at_full_length(s):
    d, b, L = 16, 10000.0, 64
    ours = ntk_inv_freq(d, b, s)
    theta = theta_formula(d, b)
    # highest frequency untouched, lowest interpolated by exactly s
    assert ours[0].item() == pytest.approx(1.0)
    assert ours[-1].item() == pytest.approx(theta[-1].item() / s, rel=1e-5)
    b_new = b * s ** (d / (d - 2))
    torch.testing.assert_close(ours.double(), theta_formula(d, b_new), rtol=1e-5, atol=0)
    # HF's dynamic NTK with factor s-1 at length 2L uses s' = (s-1)*2 - (s-2) = s: static NTK-aware with s
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(d, L, rope_type="dynamic", factor=s - 1), seq_len=2 * L)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("seq_len", [1, 40, 64, 65, 100, 1000])
def test_dynamic_matches_hf(seq_len):
    d, b, L, s = 16, 10000.0, 64, 4.0
    ours = dynamic_ntk_inv_freq(d, b, s, seq_len, L)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(d, L, rope_type="dynamic", factor=s), seq_len=seq_len)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    if seq_len <= L:
        torch.testing.assert_close(ours, rope_inv_freq(d, b))


def yarn_written_out(d, b, s, L, beta_fast, beta_slow, truncate):
    out = []
    idx = lambda r: d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))  # noqa: E731
    lo, hi = idx(beta_fast), idx(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 1e-3
    for i in range(d // 2):
        theta = b ** (-2 * i / d)
        w = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 1 -> interpolate (theta/s), 0 -> keep
        out.append(w * theta / s + (1 - w) * theta)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(
    "d,b,s,L,bf,bs,trunc",
    [(16, 10000.0, 4.0, 64, 32.0, 1.0, True), (64, 10000.0, 8.0, 2048, 32.0, 1.0, True),
     (128, 500000.0, 2.0, 4096, 16.0, 2.0, False), (32, 10000.0, 1.0, 128, 32.0, 1.0, True)],
)
def test_yarn_matches_formula_and_hf(d, b, s, L, bf, bs, trunc):
    ours = yarn_inv_freq(d, b, s, L, bf, bs, trunc)
    torch.testing.assert_close(ours.double(), yarn_written_out(d, b, s, L, bf, bs, trunc), rtol=1e-5, atol=0)
    cfg = hf_config(d, L, b, rope_type="yarn", factor=s, original_max_position_embeddings=L,
                    beta_fast=bf, beta_slow=bs, truncate=trunc)
    ref, ref_attn = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    inv, attn = scaled_inv_freq(RopeScaling("yarn", s, L, beta_fast=bf, beta_slow=bs, truncate=trunc), d, b)
    torch.testing.assert_close(inv, ref, rtol=1e-5, atol=0)
    assert attn == pytest.approx(ref_attn)
    assert attn == pytest.approx(1.0 if s <= 1 else 0.1 * math.log(s) + 1.0)
    if s > 1:  # the ramp really mixes: some pairs kept, some interpolated
        theta = rope_inv_freq(d, b)
        assert torch.isclose(ours[0], theta[0]) and torch.isclose(ours[-1], theta[-1] / s)


def test_yarn_mscale_pair_matches_hf():
    s, m, mall = 40.0, 1.0, 0.707
    cfg = hf_config(16, 64, rope_type="yarn", factor=s, original_max_position_embeddings=64, mscale=m,
                    mscale_all_dim=mall)
    _, ref_attn = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    expected = (0.1 * m * math.log(s) + 1) / (0.1 * mall * math.log(s) + 1)
    assert yarn_attention_scaling(s, m, mall) == pytest.approx(ref_attn) == pytest.approx(expected)


@pytest.mark.parametrize("seq_len", [None, 64, 65, 500])
def test_longrope_matches_formula_and_hf(seq_len):
    d, b, L, s = 16, 10000.0, 64, 8.0
    g = torch.Generator().manual_seed(0)
    long_f = (1 + 7 * torch.rand(d // 2, generator=g)).sort().values.tolist()
    short_f = (1 + 0.2 * torch.rand(d // 2, generator=g)).tolist()
    inv, attn = scaled_inv_freq(RopeScaling("longrope", s, L, long_factor=long_f, short_factor=short_f), d, b,
                                seq_len=seq_len)
    use = long_f if (seq_len or 0) > L else short_f
    torch.testing.assert_close(inv.double(), theta_formula(d, b) / torch.tensor(use, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(longrope_inv_freq(d, b, use), inv)
    cfg = hf_config(d, L, b, rope_type="longrope", factor=s, original_max_position_embeddings=L,
                    long_factor=long_f, short_factor=short_f)
    ref, ref_attn = ROPE_INIT_FUNCTIONS["longrope"](cfg, seq_len=seq_len)
    torch.testing.assert_close(inv, ref, rtol=1e-5, atol=0)
    assert attn == pytest.approx(ref_attn) == pytest.approx(math.sqrt(1 + math.log(s) / math.log(L)))
    assert longrope_attention_scaling(1.0, L) == 1.0


def test_rotary_module_layout_matches_hf_rotary():
    cfg = hf_config(16, 64, rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    ref_mod = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    ours = ScaledRotaryEmbedding(RopeScaling("yarn", 4.0, 64), 16, 10000.0, 64)
    x = torch.zeros(2, 5, 8, dtype=torch.bfloat16)
    pos = torch.tensor([[0, 1, 2, 3, 200], [7, 8, 9, 0, 1]])
    for a, r in zip(ours(x, pos), ref_mod(x, pos)):
        assert a.dtype == torch.bfloat16 and a.shape == (2, 5, 16)
        torch.testing.assert_close(a, r)


def _kinds():
    d = 8  # head_dim of the tiny model below
    return [
        RopeScaling("linear", 2.0),
        RopeScaling("ntk", 3.0),
        RopeScaling("dynamic", 2.0),
        RopeScaling("yarn", 4.0, beta_fast=8.0, beta_slow=1.0),
        RopeScaling("longrope", 4.0, long_factor=[1.0, 1.5, 2.5, 4.0][:d // 2],
                    short_factor=[1.0, 1.0, 1.1, 1.2][:d // 2]),
    ]


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_rotary_never_reads_the_device_back(kind, monkeypatch):
    """dynamic / longrope read the largest position back to the host on every forward (``.item()``, a
    device sync per layer call under generate()). Now it stays a tensor: nothing turns a tensor into a
    Python value during forward, and cos/sin are exactly those of the host formula at that length."""
    d, b, L = 16, 10000.0, 64
    scaling = (RopeScaling("dynamic", 3.0) if kind == "dynamic" else
               RopeScaling("longrope", 4.0, long_factor=[1.0 + i / 4 for i in range(d // 2)],
                           short_factor=[1.0 + i / 64 for i in range(d // 2)]))
    module = ScaledRotaryEmbedding(scaling, d, b, L)
    x = torch.zeros(1, 3, 4)
    cases = [torch.tensor([[0, 1, n - 1]]) for n in (5, L, L + 1, 2 * L + 7, 5 * L)]
    wanted = []
    for pos in cases:
        inv, attn = scaled_inv_freq(scaling, d, b, L, int(pos.max()) + 1)
        angles = pos[..., None].float() * inv
        emb = torch.cat((angles, angles), dim=-1)
        wanted.append((emb.cos() * attn, emb.sin() * attn))
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    got = [module(x, pos) for pos in cases]
    monkeypatch.undo()
    assert reads == []
    for (cos, sin), (want_cos, want_sin) in zip(got, wanted):
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_length_dependent_rotary_compiles_without_a_graph_break():
    """The docs promise fullgraph compilation: the old ``.item()`` was a data-dependent graph break."""
    for scaling in (RopeScaling("dynamic", 3.0), RopeScaling("longrope", 4.0, long_factor=[2.0] * 8,
                                                            short_factor=[1.0] * 8)):
        module = ScaledRotaryEmbedding(scaling, 16, 10000.0, 64)
        compiled = torch.compile(module, backend="eager", fullgraph=True)
        x = torch.zeros(1, 3, 4)
        for n in (5, 200):
            pos = torch.tensor([[0, 1, n]])
            for a, b in zip(compiled(x, pos), module(x, pos)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("scaling", _kinds(), ids=lambda s: s.kind)
def test_apply_to_llama_equals_hf_built_from_config(scaling):
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=1, vocab_size=64, hidden_size=32, num_layers=1)
    model.config.max_position_embeddings = 16  # short "pre-training" window so seq 40 is an extension
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # rebuild for the new window
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_rope_scaling(model, scaling)
    assert all(type(m).__name__ != "LlamaRotaryEmbedding" for m in model.modules())
    # stock transformers, fresh from the config we wrote: the peer
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(model.config.to_dict())).eval()
    ref.load_state_dict(state)
    assert type(ref.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"
    torch.manual_seed(0)
    for n in (10, 40):  # inside and beyond the original window (dynamic / longrope switch)
        ids = torch.randint(0, 64, (2, n))
        ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)  # HF's dynamic cache is stateful
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    # scaling really changes the model beyond the window
    plain = make_tiny_llama(seed=1, vocab_size=64, hidden_size=32, num_layers=1)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="kind"):
        RopeScaling("nope", 2.0)
    with pytest.raises(ValueError, match="factor"):
        RopeScaling("linear", 0.5)
    with pytest.raises(ValueError, match="long_factor"):
        RopeScaling("longrope", 2.0)
    with pytest.raises(ValueError, match="dim"):
        rope_inv_freq(7)
    with pytest.raises(ValueError, match="factors"):
        longrope_inv_freq(8, 10000.0, [1.0, 2.0])
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        scaled_inv_freq(RopeScaling("yarn", 2.0), 8, 10000.0)
    with pytest.raises(TypeError, match="scaling"):
        scaled_inv_freq("yarn", 8, 10000.0)
    with pytest.raises(TypeError, match="config"):
        apply_rope_scaling(torch.nn.Linear(2, 2), RopeScaling("linear", 2.0))
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    with pytest.raises(ValueError, match="dynamic"):
        apply_rope_scaling(model, RopeScaling("dynamic", 2.0, original_max_position_embeddings=64))
    apply_rope_scaling(model, RopeScaling("linear", 2.0))
    with pytest.raises(ValueError, match="already"):
        apply_rope_scaling(model, RopeScaling("linear", 2.0))



@pytest.mark.parametrize("second", ["ntk", "yarn", "linear"])
def test_a_second_call_after_ntk_is_refused(second):
    """Static NTK is written as a plain RoPE with a larger theta, so the config check let a second call scale the
    scaled base again (NTK on NTK, YaRN on NTK), without a word. The rotary modules tell."""
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    apply_rope_scaling(model, RopeScaling("ntk", 4.0))
    config = dict(model.config.rope_parameters)
    with pytest.raises(ValueError, match="already has apply_rope_scaling's kind='ntk'"):
        apply_rope_scaling(model, RopeScaling(second, 2.0))
    assert dict(model.config.rope_parameters) == config


@pytest.mark.parametrize("which", ["long_factor", "short_factor"])
def test_longrope_factors_checked_at_apply_time(which):
    """A factor set of the wrong length fails when it is given (scaled_inv_freq at any length, and
    apply_rope_scaling before touching the model), not at the first forward past the window."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=1, vocab_size=64, hidden_size=32, num_layers=1)  # head_dim 8: 4 rotary pairs
    good = {"long_factor": [1.0, 1.5, 2.5, 4.0], "short_factor": [1.0, 1.0, 1.1, 1.2]}
    bad = dict(good, **{which: [1.0, 2.0, 3.0]})
    scaling = RopeScaling("longrope", 4.0, original_max_position_embeddings=16, **bad)
    with pytest.raises(ValueError, match=f"{which} must have dim/2 = 4 entries"):
        scaled_inv_freq(scaling, 8, 10000.0)  # seq_len=None: within the window
    with pytest.raises(ValueError, match=f"{which} must have dim/2 = 4 entries"):
        scaled_inv_freq(scaling, 8, 10000.0, seq_len=100)
    before = model.config.to_dict()
    rotary = model.model.rotary_emb
    with pytest.raises(ValueError, match=f"{which} must have dim/2 = 4 entries"):
        apply_rope_scaling(model, scaling)
    assert model.config.to_dict() == before and model.model.rotary_emb is rotary  # nothing changed
    nonpositive = dict(good, **{which: [1.0, 0.0, 2.0, float("nan")]})
    with pytest.raises(ValueError, match=f"{which} must hold finite factors > 0"):
        apply_rope_scaling(model, RopeScaling("longrope", 4.0, original_max_position_embeddings=16, **nonpositive))
    apply_rope_scaling(model, RopeScaling("longrope", 4.0, original_max_position_embeddings=16, **good))


def test_numpy_factor_matches_python_factor():
    np = pytest.importorskip("numpy")
    # a sweep over np.linspace(1, 16, ...) hands np.float64 / np.float32 factors
    for fn in (linear_inv_freq, ntk_inv_freq):
        torch.testing.assert_close(fn(64, 10000.0, np.float32(16)), fn(64, 10000.0, 16.0))
    torch.testing.assert_close(rope_inv_freq(np.int64(64)), rope_inv_freq(64))
    scaling = RopeScaling("linear", factor=np.float32(4))
    assert scaling.factor == 4.0 and type(scaling.factor) is float
    for bad in (True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor"):
            linear_inv_freq(64, 10000.0, bad)
    with pytest.raises(ValueError, match="dim"):
        rope_inv_freq(True)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(attention_factor=float("nan")), ValueError, "attention_factor"),
    (dict(attention_factor=0.0), ValueError, "attention_factor"),
    (dict(mscale=float("nan")), ValueError, "mscale"),
    (dict(mscale_all_dim=float("inf")), ValueError, "mscale_all_dim"),
    (dict(original_max_position_embeddings=0), ValueError, "original_max_position_embeddings"),
    (dict(original_max_position_embeddings=1.5), ValueError, "original_max_position_embeddings"),
    (dict(original_max_position_embeddings=True), ValueError, "original_max_position_embeddings"),
    (dict(beta_fast=float("nan")), ValueError, "beta_fast"),
    (dict(beta_fast=1.0, beta_slow=2.0), ValueError, "beta_fast"),
    (dict(truncate="no"), TypeError, "truncate"),
    (dict(truncate=0), TypeError, "truncate"),
])
def test_rope_scaling_fields_are_checked(kwargs, error, match):
    """Before, a NaN attention_factor / mscale gave NaN cos and sin, original_max_position_embeddings=0 fell
    back to the model's length and True was read as 1, truncate='no' truncated: each is refused when given."""
    with pytest.raises(error, match=match):
        RopeScaling("yarn", 4.0, **kwargs)


def test_rope_scaling_fields_are_stored_as_python_values():
    np = pytest.importorskip("numpy")
    s = RopeScaling("yarn", 4.0, np.int64(64), beta_fast=np.float32(16), truncate=np.bool_(False),
                    attention_factor=np.float64(1.2))
    assert (s.original_max_position_embeddings, s.beta_fast, s.truncate, s.attention_factor) == (64, 16.0, False, 1.2)
    assert [type(v) for v in (s.original_max_position_embeddings, s.beta_fast, s.truncate, s.attention_factor)] \
        == [int, float, bool, float]
    inv, attn = scaled_inv_freq(s, 8, 10000.0)
    torch.testing.assert_close(inv, yarn_inv_freq(8, 10000.0, 4.0, 64, 16.0, 1.0, False))
    assert attn == 1.2
    lr = RopeScaling("longrope", 2.0, long_factor=torch.tensor([1.0, 2.0]), short_factor=np.ones(2))
    assert lr.long_factor == (1.0, 2.0) and lr.short_factor == (1.0, 1.0)
    with pytest.raises(TypeError, match="long_factor"):
        RopeScaling("longrope", 2.0, long_factor="1234")  # was read as the factors (1, 2, 3, 4)


def test_base_and_lengths_are_checked():
    """Before: base=inf gave inv_freq (1, 0, 0, ...) without a word, a seq_len of 150.5 was truncated and NaN
    failed inside int(), original_max_position_embeddings=0 in yarn_ramp was a bare 'math domain error' and
    L=1 in longrope_attention_scaling a ZeroDivisionError."""
    for bad in (float("inf"), float("nan"), "10000", True):
        with pytest.raises(ValueError, match="base"):
            rope_inv_freq(8, bad)
    with pytest.raises(ValueError, match="seq_len"):
        dynamic_ntk_inv_freq(8, 10000.0, 2.0, 150.5, 100)
    with pytest.raises(ValueError, match="seq_len"):
        dynamic_ntk_inv_freq(8, 10000.0, 2.0, float("nan"), 100)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        dynamic_ntk_inv_freq(8, 10000.0, 2.0, 150, 100.0)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        yarn_ramp(8, 10000.0, 0)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        yarn_inv_freq(8, 10000.0, 2.0, -5)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        longrope_attention_scaling(4.0, 1)
    # a 0-d integer tensor (position_ids.max() + 1) is a length
    torch.testing.assert_close(dynamic_ntk_inv_freq(8, 10000.0, 2.0, torch.tensor(150), 100),
                               dynamic_ntk_inv_freq(8, 10000.0, 2.0, 150, 100))
    assert longrope_attention_scaling(4.0, 4096) == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(4096)))


@pytest.mark.parametrize("knobs", [dict(mscale=0.0, mscale_all_dim=1.0), dict(mscale=2.0, attention_factor=1.1),
                                   dict(mscale=1.0, mscale_all_dim=0.707), dict(mscale=2.0),
                                   dict(mscale=1.0, mscale_all_dim=0.707, attention_factor=0.9)])
def test_written_yarn_config_gives_the_same_attention_scaling_in_transformers(knobs):
    """apply_rope_scaling wrote mscale=0 with mscale_all_dim as the pair (transformers then ignores both and
    takes 0.1 ln s + 1), and with mscale != 1 overwrote a given attention_factor by the mscale value: a saved
    checkpoint reloaded with another attention scaling than the one trained with."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=1, vocab_size=64, hidden_size=32, num_layers=1)  # head_dim 8
    scaling = RopeScaling("yarn", 8.0, **knobs)
    apply_rope_scaling(model, scaling)
    _, ours = scaled_inv_freq(scaling, 8, 10000.0, model.config.max_position_embeddings)
    _, ref = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig.from_dict(model.config.to_dict()))
    assert model.model.rotary_emb.attention_scaling == pytest.approx(ours)
    assert ref == pytest.approx(ours)


def test_attention_scalings_refuse_non_finite_input():
    """yarn_attention_scaling / longrope_attention_scaling returned NaN (or inf) for a NaN (inf) factor or
    mscale, which then scaled every cos and sin."""
    for call, match in ((lambda: yarn_attention_scaling(float("nan")), "factor"),
                        (lambda: yarn_attention_scaling(float("inf")), "factor"),
                        (lambda: yarn_attention_scaling(4.0, float("nan")), "mscale"),
                        (lambda: yarn_attention_scaling(4.0, 1.0, float("nan")), "mscale_all_dim"),
                        (lambda: longrope_attention_scaling(float("nan"), 4096), "factor"),
                        (lambda: longrope_attention_scaling(float("inf"), 4096), "factor")):
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    assert yarn_attention_scaling(0.5) == 1.0 and longrope_attention_scaling(0.5, 4096) == 1.0  # s <= 1: 1


def test_scaling_helpers_check_their_ranges_by_name():
    """yarn_attention_scaling / longrope_attention_scaling returned 1.0 for a factor of 0 or -1 and a negative scale
    for mscale=-50 (RopeScaling refuses both); yarn_ramp's betas failed in the comparison (a str) or in math.log
    (inf) with messages that named nothing."""
    for call, error, match in (
            (lambda: yarn_attention_scaling(0.0), ValueError, "factor"),
            (lambda: yarn_attention_scaling(-1.0), ValueError, "factor"),
            (lambda: yarn_attention_scaling(4.0, mscale=-50.0), ValueError, "mscale"),
            (lambda: yarn_attention_scaling(4.0, 1.0, mscale_all_dim=-1.0), ValueError, "mscale_all_dim"),
            (lambda: longrope_attention_scaling(0.0, 4096), ValueError, "factor"),
            (lambda: longrope_attention_scaling("2", 4096), TypeError, "factor"),
            (lambda: yarn_ramp(64, 10000.0, 4096, beta_fast="32"), TypeError, "beta_fast"),
            (lambda: yarn_ramp(64, 10000.0, 4096, beta_fast=math.inf), ValueError, "beta_fast"),
            (lambda: yarn_ramp(64, 10000.0, 4096, beta_slow=math.nan), ValueError, "beta_slow")):
        with pytest.raises(error, match=match):
            call()
    assert yarn_attention_scaling(4.0, mscale=0.0) == 1.0  # 0 is allowed, as in RopeScaling
    assert torch.equal(yarn_ramp(64, 10000.0, 4096, beta_fast=32, beta_slow=1),
                       yarn_ramp(64, 10000.0, 4096, beta_fast=32.0, beta_slow=1.0))


def test_per_layer_type_rope_is_refused_by_name():
    """A Gemma 3 style config (one rope_parameters dict per layer type, buffers '<type>_inv_freq') was refused
    as 'no rotary module found', which sends the reader looking for a missing module."""
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=128)
    model = transformers.Gemma3ForCausalLM(cfg)
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="one RoPE per layer type"):
        apply_rope_scaling(model, RopeScaling("linear", 2.0))
    assert model.config.to_dict() == before


def test_a_longrope_window_of_one_is_refused_when_made():
    """ln L = 0 in LongRoPE's attention scaling: L = 1 was accepted by RopeScaling and refused at first use."""
    with pytest.raises(ValueError, match="original_max_position_embeddings must be an int >= 2"):
        RopeScaling("longrope", 2.0, original_max_position_embeddings=1, long_factor=[1.0] * 4)
    RopeScaling("yarn", 2.0, original_max_position_embeddings=1)  # others take it


@pytest.mark.parametrize("kind, seq_len, error", [
    ("longrope", -5, ValueError), ("longrope", 10.5, TypeError), ("longrope", "20", TypeError),
    ("dynamic", 0, ValueError), ("dynamic", -5, ValueError), ("yarn", True, TypeError),
])
def test_scaled_inv_freq_checks_seq_len_for_every_kind(kind, seq_len, error):
    """longrope compared seq_len unchecked (-5 and 10.5 picked a factor set, "20" failed in a comparison without
    naming it) and dynamic read 0 as "not given" (a helper's find): a length that is not an int >= 1 is refused
    by name, whatever the kind."""
    extra = dict(long_factor=[2.0] * 4) if kind == "longrope" else {}
    scaling = RopeScaling(kind, 2.0, **extra)
    with pytest.raises(error, match="seq_len must be an int >= 1"):
        scaled_inv_freq(scaling, 8, 1e4, 10, seq_len=seq_len)
    inv, _ = scaled_inv_freq(scaling, 8, 1e4, 10, seq_len=torch.tensor(11))  # a 0-d int tensor is read as its value
    assert torch.equal(inv, scaled_inv_freq(scaling, 8, 1e4, 10, seq_len=11)[0])


@pytest.mark.parametrize("truncate", ["no", None, 1])
def test_yarn_functions_refuse_a_truncate_that_is_not_a_bool(truncate):
    """yarn_ramp / yarn_inv_freq read truncate by truthiness ("no" switched it on, None off), where RopeScaling
    refused the same values (a helper's find)."""
    with pytest.raises(TypeError, match="truncate must be a bool"):
        yarn_ramp(64, 1e4, 4096, truncate=truncate)
    with pytest.raises(TypeError, match="truncate must be a bool"):
        yarn_inv_freq(64, 1e4, 4.0, 4096, truncate=truncate)
