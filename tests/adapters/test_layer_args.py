"""Adapter layers built by hand (not through a config) are held to their config's argument checks. Before, each
case below was accepted silently (a NaN scaling, a dropout of 1, a rank of 0, a prefix of 0 tokens), or failed
with an error of its own words: ZeroDivisionError for a rank-0 VeRA projection, RuntimeError for an integer
adapter dtype on the embedding layers."""

import pytest
import torch
from torch import nn

from alignlab.adapters import (
    AdaLoRALinear,
    BottleneckLayer,
    FusionLayer,
    LoKrLinear,
    LoRAEmbedding,
    PrefixEncoder,
    TrainableTokensLayer,
    VeRALinear,
    VeRAProjections,
)

NAN = float("nan")


def _lin():
    return nn.Linear(16, 12)


def _emb():
    return nn.Embedding(20, 16)


def _proj():
    return VeRAProjections(4, 16, 12, 0)


BAD = {  # (build, error, message)
    "vera_projections_rank_0": (lambda: VeRAProjections(0, 16, 12, 0), ValueError, "r must be a positive integer"),
    "vera_projections_width_0": (lambda: VeRAProjections(4, 0, 12, 0), ValueError, "in_max must be a positive integer"),
    "vera_rank_0": (lambda: VeRALinear(_lin(), _proj(), r=0), ValueError, "r must be a positive integer"),
    "vera_dropout_1": (lambda: VeRALinear(_lin(), _proj(), r=4, dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
    "vera_dropout_negative": (lambda: VeRALinear(_lin(), _proj(), r=4, dropout=-0.5), ValueError, "dropout must be"),
    "vera_d_initial_nan": (lambda: VeRALinear(_lin(), _proj(), r=4, d_initial=NAN), ValueError, "d_initial must be a finite"),
    "bottleneck_hidden_0": (lambda: BottleneckLayer(_lin(), hidden=0, bottleneck=4), ValueError, "hidden must be a positive"),
    "bottleneck_scaling_nan": (lambda: BottleneckLayer(_lin(), hidden=12, bottleneck=4, scaling=NAN), ValueError,
                               "scaling must be a finite number"),
    "bottleneck_scaling_str": (lambda: BottleneckLayer(_lin(), hidden=12, bottleneck=4, scaling="1"), TypeError,
                               "scaling must be a real number"),
    "fusion_hidden_0": (lambda: FusionLayer(0, ["a", "b"]), ValueError, "hidden must be a positive integer"),
    "fusion_one_adapter": (lambda: FusionLayer(12, ["a"]), ValueError, "adapters must list at least two"),
    "fusion_temperature_0": (lambda: FusionLayer(12, ["a", "b"], temperature=0.0), ValueError,
                             "temperature must be a positive finite number"),
    "fusion_temperature_nan": (lambda: FusionLayer(12, ["a", "b"], temperature=NAN), ValueError, "temperature must be"),
    "adalora_scaling_nan": (lambda: AdaLoRALinear(_lin(), r=2, scaling=NAN), ValueError, "scaling must be a finite"),
    "adalora_dropout_1": (lambda: AdaLoRALinear(_lin(), r=2, scaling=1.0, dropout=1.0), ValueError, "dropout must be"),
    "adalora_dropout_negative": (lambda: AdaLoRALinear(_lin(), r=2, scaling=1.0, dropout=-0.1), ValueError, "dropout must be"),
    "lokr_factor_0": (lambda: LoKrLinear(_lin(), r=2, decompose_factor=0), ValueError,
                      "decompose_factor must be -1 or a positive integer"),
    "lokr_factor_float": (lambda: LoKrLinear(_lin(), r=2, decompose_factor=3.5), ValueError, "decompose_factor must be"),
    "lora_embedding_int_dtype": (lambda: LoRAEmbedding(_emb(), r=2, adapter_dtype=torch.int64), TypeError,
                                 "adapter_dtype must be None or a floating-point"),
    "trainable_tokens_int_dtype": (lambda: TrainableTokensLayer(_emb(), [1], adapter_dtype=torch.int64), TypeError,
                                   "adapter_dtype must be None or a floating-point"),
    "prefix_tokens_0": (lambda: PrefixEncoder(0, 2, 8, None), ValueError, "n must be a positive integer"),
    "prefix_layers_0": (lambda: PrefixEncoder(3, 0, 8, None), ValueError, "num_layers must be a positive integer"),
    "prefix_width_0": (lambda: PrefixEncoder(3, 2, 0, None), ValueError, "token_dim must be a positive integer"),
    "prefix_projection_0": (lambda: PrefixEncoder(3, 2, 8, 0), ValueError, "projection_hidden must be a positive"),
    "prefix_std_negative": (lambda: PrefixEncoder(3, 2, 8, None, init_std=-1.0), ValueError, "init_std must be a finite"),
    "prefix_std_nan": (lambda: PrefixEncoder(3, 2, 8, None, init_std=NAN), ValueError, "init_std must be a finite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_of_a_hand_built_layer_are_refused_naming_them(case):
    build, error, message = BAD[case]
    with pytest.raises(error, match=message):
        build()


def test_good_arguments_still_build():
    """The edges the configs accept: AdaLoRA rank 0 (a pruned layer), LoKr factor -1, init_std 0, dropout 0, a negative d_initial."""
    assert AdaLoRALinear(_lin(), r=0, scaling=1.0).lora_A["default"].shape == (0, 16)
    assert LoKrLinear(_lin(), r=2, decompose_factor=-1) is not None
    assert VeRALinear(_lin(), _proj(), r=4, dropout=0.0, d_initial=-0.1).r["default"] == 4
    assert not PrefixEncoder(3, 2, 8, None, init_std=0.0)().any()
    assert FusionLayer(12, ("a", "b"), temperature=2).temperature == 2.0


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused", "plain"])
def test_adapter_on_the_meta_device_says_so(dropout):
    """A LoRA layer made over a meta base (an offloaded or not yet loaded model) has meta factors; a call names that,
    not a device move of the input."""
    from alignlab.adapters import LoRALinear

    with torch.device("meta"):
        layer = LoRALinear(torch.nn.Linear(4, 3), r=2, dropout=dropout)
    layer.base_layer.to_empty(device="cpu")
    with pytest.raises(ValueError, match="adapter 'default' has its weights on the meta device"):
        layer(torch.randn(2, 4))
