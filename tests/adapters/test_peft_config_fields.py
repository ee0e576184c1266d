"""Every field of PEFT's ``LoraConfig`` is either honoured by ``load_adapter``, refused by name when set (it changes
what the file's tensors compute and alignlab does not implement it), or changes no number (metadata, options of an
init the file's weights replace). A field this alignlab does not know (a file from a newer PEFT) was ignored
without a word; it now warns, naming the field and its value, as PEFT 0.21 itself does for such files."""

import dataclasses
import warnings

import pytest

from alignlab.adapters.io import PEFT_LORA_FIELDS, config_from_peft

BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}

# fields that change the numbers, alignlab has no implementation of, and a non-default value each
REFUSED = {"bias": "all", "lora_bias": True, "layer_replication": [[0, 2]], "alora_invocation_tokens": [5],
           "use_qalora": True, "megatron_config": {"tensor_model_parallel_size": 2}, "use_bdlora": {"nblocks": 2},
           "arrow_config": {"top_k": 2}, "kasa_config": {"r": 2}, "velora_config": {"rank": 2},
           "monteclora_config": {"n": 2}, "init_lora_weights": "loftq"}
# fields that change no number of a loaded adapter
METADATA = {"task_type": "CAUSAL_LM", "auto_mapping": {"base_model_class": "X"}, "peft_version": "0.21.2",
            "base_model_name_or_path": "org/model", "revision": "main", "inference_mode": True,
            "runtime_config": {"ephemeral_gpu_offload": True}, "megatron_core": "megatron.core",
            "qalora_group_size": 32, "loftq_config": {"loftq_bits": 4}, "eva_config": {"rho": 2.0},
            "corda_config": {"cache_file": "x"}, "lora_ga_config": {"direction": "ArB2r"},
            "astra_config": {"cache_file": "x"}}


def test_every_peft_lora_field_is_known():
    peft = pytest.importorskip("peft")
    missing = sorted(f.name for f in dataclasses.fields(peft.LoraConfig) if f.name not in PEFT_LORA_FIELDS)
    assert not missing, f"PEFT's LoraConfig has fields load_adapter does not classify: {missing}"


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_number_changing_field_refused_by_name(key):
    with pytest.raises(ValueError, match=rf"{key}={REFUSED[key]!r}".replace("[", r"\[").replace("{", r"\{")):
        config_from_peft({**BASE, key: REFUSED[key]})


def test_metadata_fields_accepted_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = config_from_peft({**BASE, **METADATA})
    assert config.r == 4 and config.target_modules == ["q_proj"]


def test_unknown_field_warns_with_its_value():
    with pytest.warns(RuntimeWarning, match=r"use_new_variant=True.*not a field of PEFT 0\.21"):
        config_from_peft({**BASE, "use_new_variant": True})
    with warnings.catch_warnings():  # an unknown field that is off (null, false, empty) says nothing
        warnings.simplefilter("error")
        config_from_peft({**BASE, "use_new_variant": False, "new_config": None, "new_list": []})
