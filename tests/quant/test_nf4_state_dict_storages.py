"""NF4Linear state dicts: with the packed storage the codes and the scales were views of one storage, which savers
read as tied copies (accelerate's save_model dropped every weight.absmax with only a log line; the file then failed
to load). A helper's find."""

import pytest
import torch

from alignlab.quant import NF4Linear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("calibrate", [None, "icq"])
def test_state_dict_entries_do_not_alias_each_other(double_quant, calibrate):
    """Savers (accelerate's save_model, safetensors) treat entries of one storage as tied copies and drop all but
    one: every state-dict entry must have a storage no other entry uses."""
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 16), double_quant=double_quant, calibrate=calibrate,
                                  compute_dtype=torch.float32)
    sd = layer.state_dict()
    ptrs = [v.untyped_storage().data_ptr() for v in sd.values()]
    assert len(ptrs) == len(set(ptrs)), {k: v.untyped_storage().data_ptr() for k, v in sd.items()}
    again = NF4Linear.from_linear(torch.nn.Linear(64, 16), double_quant=double_quant, calibrate=calibrate,
                                  compute_dtype=torch.float32)
    again.load_state_dict({k: v.clone() for k, v in sd.items()})
    x = torch.randn(3, 64)
    assert torch.equal(again(x), layer(x))


def test_accelerate_save_model_keeps_every_key(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from alignlab.quant import quantize_model

    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 16)), compute_dtype=torch.float32)
    accelerate.Accelerator(cpu=True).save_model(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(model.state_dict())
