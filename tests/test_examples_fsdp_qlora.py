"""Smoke test: examples/fsdp_qlora.py under torchrun with 2 CPU processes (gloo), FSDP2 and DDP, and alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, run_cpu_example, step_losses

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [["--dora"], ["--ddp"]], ids=["fsdp2-dora", "ddp-lora"])
def test_fsdp_qlora_example_runs_with_torchrun(tmp_path, flags):
    out = tmp_path / "adapter"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "examples" / "fsdp_qlora.py"), "--steps", "3",
           "--out", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2 backend=gloo" in proc.stdout
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0]
    diff = next(float(line.split()[-1]) for line in proc.stdout.splitlines() if "reproduces the loss" in line)
    assert diff < 1e-5  # the fresh model, given the saved adapter, is the trained one
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == ("--dora" in flags)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_fsdp_qlora_example_runs_without_torchrun():
    """Started with plain ``python`` (no RANK in the environment) it used to die in init_process_group with
    torch's "environment variable RANK expected"; it now runs as a world of one process."""
    env_rank = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        out = run_cpu_example("fsdp_qlora.py", "--steps", "3", timeout=240)
    finally:
        os.environ.update(env_rank)
    assert "world=1 backend=gloo" in out
    losses = step_losses(out)
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert "reproduces the loss to 0.00e+00" in out


def test_fsdp_qlora_example_refuses_zero_steps():
    """``--steps 0`` built and sharded the model, then died formatting the missing loss (TypeError): now a usage
    error before anything is built."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "fsdp_qlora.py"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr, proc.stderr[-2000:]
