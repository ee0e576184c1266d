"""Smoke test: examples/qlora.py trains a QLoRA adapter on CPU and saves it in PEFT layout."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cpu_example, step_losses

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_qlora_example_runs_and_adapter_reloads(tmp_path):
    out = tmp_path / "adapter"
    stdout = run_cpu_example("qlora.py", "--steps", "3", "--out", str(out))
    assert "NF4 layers=14" in stdout
    losses = step_losses(stdout)
    assert losses[-1] < losses[0]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").exists()

    # the saved adapter loads onto a freshly quantized copy of the same base (QLoRA reload)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from qlora import tiny_llama
    finally:
        sys.path.pop(0)
    from alignlab.adapters import load_adapter
    from alignlab.quant import quantize_model

    model = quantize_model(tiny_llama(0), compute_dtype=torch.float32)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        before = model(ids).logits
    load_adapter(model, out)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)  # the trained B != 0 changed the output
