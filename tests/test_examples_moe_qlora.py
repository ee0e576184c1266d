"""Smoke test: examples/moe_qlora.py (NF4 experts + expert LoRA + trainable rows of new tokens) on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_moe_qlora_example_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "adapter"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "moe_qlora.py"), "--steps", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NF4 linears=8  NF4 experts modules=2" in proc.stdout
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0]
    diff = [float(line.split()[-1]) for line in proc.stdout.splitlines() if "reproduces the logits" in line]
    assert diff and diff[0] < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed_tokens": [128, 129], "lm_head": [128, 129]}
    assert cfg["target_parameters"]
