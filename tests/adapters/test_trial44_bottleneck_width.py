"""A bottleneck adapter of the wrong width is refused when built (it loaded and failed at the first forward)."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import BottleneckConfig, BottleneckLayer, inject, load_adapter, save_adapter

IDS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def test_file_from_a_model_of_another_width_is_refused_and_the_model_kept(tmp_path):
    save_adapter(inject(make_tiny_llama(hidden_size=32), BottleneckConfig(reduction_factor=4)), tmp_path)
    wider = make_tiny_llama(hidden_size=64)
    with torch.no_grad():
        before = wider(input_ids=IDS).logits
    with pytest.raises(ValueError, match="hidden size 32 does not fit block 'model.layers.0.mlp'"):
        load_adapter(wider, tmp_path)
    assert not any(isinstance(m, BottleneckLayer) for m in wider.modules())
    with torch.no_grad():
        torch.testing.assert_close(wider(input_ids=IDS).logits, before, rtol=0, atol=0)
    # the same width loads, with the same outputs
    same = load_adapter(make_tiny_llama(hidden_size=32), tmp_path)
    assert isinstance(same.get_submodule("model.layers.1.mlp"), BottleneckLayer)


def test_explicit_hidden_size_must_fit_the_blocks():
    with pytest.raises(ValueError, match="hidden_size="):
        inject(make_tiny_llama(hidden_size=32), BottleneckConfig(reduction_factor=4, hidden_size=48))
    model = inject(make_tiny_llama(hidden_size=32), BottleneckConfig(reduction_factor=4, hidden_size=32))
    assert model(input_ids=IDS).logits.shape == (2, 5, 128)


def test_default_houlsby_placement_on_gpt2_names_the_missing_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    # GPT-2 calls its attention "attn": before, only the two MLPs got adapters (a Pfeiffer placement), silently
    with pytest.raises(ValueError, match=r"has no \['self_attn'\]: pass target_modules="):
        inject(gpt2, BottleneckConfig(reduction_factor=4))
    assert not any(isinstance(m, BottleneckLayer) for m in gpt2.modules())
    inject(gpt2, BottleneckConfig(reduction_factor=4, target_modules=["attn", "mlp"]))
    wrapped = sorted(n for n, m in gpt2.named_modules() if isinstance(m, BottleneckLayer))
    assert wrapped == [f"transformer.h.{i}.{b}" for i in range(2) for b in ("attn", "mlp")]
    assert gpt2(input_ids=IDS).logits.shape == (2, 5, 128)


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
@pytest.mark.parametrize("target, side", [("k_proj", "output is 16"), ("up_proj", "output is 72")])
def test_a_linear_target_of_another_output_width_is_refused_at_inject(placement, target, side):
    # a linear is a block of its own: the adapter adds to its output, which for k_proj (GQA) or up_proj is not
    # hidden wide; they were wrapped and failed at the first forward ("mat1 and mat2 shapes cannot be multiplied")
    model = make_tiny_llama(hidden_size=32)
    match = f"hidden size 32 does not fit 'model.layers.0.[a-z_]+.{target}', a linear whose {side}"
    with pytest.raises(ValueError, match=match):
        inject(model, BottleneckConfig(reduction_factor=4, placement=placement, target_modules=[target]))
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())
    for fits in (["o_proj"], ["down_proj"] if placement == "houlsby" else ["q_proj"]):  # out (and in) = hidden
        adapted = inject(make_tiny_llama(hidden_size=32), BottleneckConfig(reduction_factor=4, placement=placement,
                                                                           target_modules=fits))
        assert adapted(input_ids=IDS).logits.shape == (2, 5, 128)


def test_down_proj_is_refused_for_a_parallel_adapter_which_reads_its_input():
    match = "a linear whose input is 72 wide: a parallel adapter adds to its output and reads its input"
    with pytest.raises(ValueError, match=match):
        inject(make_tiny_llama(hidden_size=32), BottleneckConfig(placement="parallel", target_modules=["down_proj"]))


@pytest.mark.parametrize("field, value", [("target_modules", 5), ("target_modules", []), ("exclude_modules", 5),
                                          ("target_modules", "(")])
def test_malformed_targets_are_refused_when_the_config_is_built(field, value):
    # 5 passed the config and failed at inject with "'int' object is not iterable", naming nothing
    kind = ValueError if value == "(" else TypeError
    with pytest.raises(kind, match=field):
        BottleneckConfig(**{field: value})
    with pytest.raises(TypeError, match="target_modules must be a regex string or a non-empty list"):
        BottleneckConfig(target_modules=5)


def test_a_hand_built_layer_over_a_linear_of_another_width_is_refused():
    """BottleneckLayer(base, hidden, ...) checks a linear base's widths as inject does (a parallel layer over
    nn.Linear(32, 48) with hidden=48 was built and failed at forward with a raw matmul error; a helper's find)."""
    with pytest.raises(ValueError, match="hidden=48 does not fit the base layer, a linear whose input is 32 wide"):
        BottleneckLayer(torch.nn.Linear(32, 48), hidden=48, bottleneck=8, parallel=True)
    with pytest.raises(ValueError, match="output is 48 wide"):
        BottleneckLayer(torch.nn.Linear(32, 48), hidden=32, bottleneck=8)
    serial = BottleneckLayer(torch.nn.Linear(32, 48), hidden=48, bottleneck=8)  # reads the output only: fits
    assert serial(torch.randn(5, 32)).shape == (5, 48)
    square = BottleneckLayer(torch.nn.Linear(48, 48), hidden=48, bottleneck=8, parallel=True)
    with pytest.raises(ValueError, match="input is 32 wide"):  # add_adapter checks the new adapter's placement
        BottleneckLayer(torch.nn.Linear(32, 48), hidden=48, bottleneck=8).add_adapter("p", 4, parallel=True)
    assert square(torch.randn(5, 48)).shape == (5, 48)
