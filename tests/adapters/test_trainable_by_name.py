"""mark_only_adapters_trainable finds an adapter's tensors under its name in the layers' per-adapter dicts; the name
matched anywhere in a parameter's path also made other adapters' tensors trainable."""

from conftest import make_tiny_llama

from alignlab.adapters import BottleneckConfig, PrefixTuningConfig, count_parameters, inject, set_adapter


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_numbered_adapters_train_only_the_active_one():
    # the inactive prefix encoder "1" trained its transform.0 layer: "...prefix_encoder.1.transform.0.weight"
    # holds ".0." like the active adapter's name
    model = make_tiny_llama()
    for name in ("0", "1"):
        inject(model, PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8), name)
    set_adapter(model, "0")
    names = _trainable(model)
    assert names and all(".prefix_encoder.0." in n for n in names)
    set_adapter(model, "1")
    assert all(".prefix_encoder.1." in n for n in _trainable(model))


def test_an_adapter_named_like_a_parameter_trains_only_itself():
    model = inject(make_tiny_llama(), BottleneckConfig(), "default")
    inject(model, BottleneckConfig(), "weight")  # every adapter parameter path ends in ".weight" or ".bias"
    set_adapter(model, "weight")
    assert all(".weight." in n for n in _trainable(model))
    assert count_parameters(model).trainable == sum(p.numel() for n, p in model.named_parameters() if ".weight." in n)
