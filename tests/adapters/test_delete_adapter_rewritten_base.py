"""``delete_adapter`` of a PiSSA / OLoRA adapter: its init wrote the residual ``W − s·B₀A₀`` into the base, and deleting
the adapter leaves that residual (PEFT's ``delete_adapter`` does the same), so the model after deletion is not the model
before ``inject``. It did so without a word; it now warns (``UserWarning``), and the model it leaves is PEFT's."""

import warnings

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, delete_adapter, inject

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_deleting_a_pissa_or_olora_adapter_warns_that_the_base_stays_the_residual(init):
    with torch.no_grad():
        ref = make_tiny_llama()(IDS).logits
    model = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init=init))
    with pytest.warns(UserWarning, match=f"'default'.*init='{init}'.*residual.*not the model before inject"):
        delete_adapter(model, "default")
    with torch.no_grad():
        left = model(IDS).logits
    assert not torch.allclose(left, ref, atol=1e-3)  # the residual model, as the warning says


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_model_left_is_the_residual_model_peft_leaves(init):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
        theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"]))  # B = 0: adds nothing
        theirs.delete_adapter("default")
        ours = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init=init))
        delete_adapter(ours, "default")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs.base_model.model(IDS).logits)


def test_deleting_a_kaiming_adapter_or_one_beside_a_pissa_adapter_does_not_warn():
    model = inject(make_tiny_llama(), LoRAConfig(r=4, target_modules=TARGETS, init="pissa"))
    inject(model, LoRAConfig(r=2, target_modules=["k_proj"]), "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(model, "plain")
    with pytest.warns(UserWarning, match="residual"):
        delete_adapter(model, "default")


def test_a_failed_load_of_a_pissa_file_puts_the_base_back_without_the_residual_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    from alignlab.adapters import load_adapter, save_adapter

    save_adapter(inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=TARGETS, init="pissa")), tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    del weights[sorted(weights)[-1]]
    save_file(weights, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = make_tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match="adapter file lacks 1 key"):
            load_adapter(model, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
