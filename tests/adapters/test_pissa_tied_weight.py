"""PiSSA / OLoRA on a tied ``lm_head``: the residual ``W − s·BA`` went into the table the input embedding shares, so the
embedding changed too and the model's logits moved at initialisation (0.42 off on a tiny tied Llama), where the init
promises an unchanged output. PEFT does the same. ``inject`` now refuses it before any change; ``load_adapter`` still
rebuilds a PEFT file made so (its weights need that residual), with a warning."""

import warnings

import pytest
import torch
from torch import nn

from conftest import make_tied_llama

from alignlab.adapters import LoRAConfig, adapter_configs, inject, load_adapter

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_rewriting_init_on_a_tied_head_is_refused_before_any_change(init):
    model = make_tied_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=f"init={init!r} rewrites the base weight of 'lm_head'.*shared with "
                                         r"\['model.embed_tokens.weight'\]"):
        inject(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"], init=init))
    assert adapter_configs(model) == {} and type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, table)


def test_a_peft_file_made_so_loads_as_peft_built_it(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tied_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                       init_lora_weights="pissa")).eval()
    theirs.save_pretrained(tmp_path)
    with pytest.warns(RuntimeWarning, match="'lm_head' is written into the weight it shares"):
        ours = load_adapter(make_tied_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
