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
