"""Smoke test: examples/moe_qlora.py (NF4 experts + expert LoRA + trainable rows of new tokens) on CPU."""

import json

import pytest

from conftest import run_cpu_example, step_losses

pytest.importorskip("transformers")


def test_moe_qlora_example_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "adapter"
    stdout = run_cpu_example("moe_qlora.py", "--steps", "4", "--out", str(out))
    assert "NF4 linears=8  NF4 experts modules=2" in stdout
    losses = step_losses(stdout)
    assert losses[-1] < losses[0]
    diff = [float(line.split()[-1]) for line in stdout.splitlines() if "reproduces the logits" in line]
    assert diff and diff[0] < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed_tokens": [128, 129], "lm_head": [128, 129]}
    assert cfg["target_parameters"]
