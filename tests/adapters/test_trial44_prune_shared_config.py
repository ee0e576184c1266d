"""prune_ranks on one of two adapters built from the same config object: the other adapter's file kept the
pruned ranks in its rank_pattern and could not be loaded (a shape error against its full-rank tensors)."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import (
    AdaLoRAConfig,
    SoRAConfig,
    adapter_configs,
    inject,
    load_adapter,
    prune_ranks,
    save_adapter,
    set_adapter,
)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", [SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    AdaLoRAConfig(init_r=4, target_r=2, total_step=5, target_modules=["q_proj", "v_proj"])],
                         ids=["sora", "adalora"])
def test_pruning_one_adapter_leaves_the_other_and_the_users_config(config, tmp_path):
    model = make_tiny_llama()
    inject(model, config, "a")
    inject(model, config, "b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
                if "lora_E" in name and name.endswith(".a"):
                    p[:2] = 0  # two ranks of adapter a to prune
    assert set(prune_ranks(model, "a").values()) == {2}
    assert config.rank_pattern in ({}, None)
    assert adapter_configs(model)["b"] is config and adapter_configs(model)["a"] is not config
    outputs = {}
    for name in ("a", "b"):
        set_adapter(model, name)
        with torch.no_grad():
            outputs[name] = model(input_ids=IDS).logits
        save_adapter(model, tmp_path / name, name)
    for name, rank in (("a", 2), ("b", 4)):
        fresh = load_adapter(make_tiny_llama(), tmp_path / name)
        assert fresh.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].shape[0] == rank
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=IDS).logits, outputs[name])
