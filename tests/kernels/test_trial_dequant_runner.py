"""dequant_runner off the bound-launch path (user trial 2026-12-04): its "plain call" is nf4_dequant's, so it
follows ALIGNLAB_KERNELS and works on a CPU without Triton's interpreter; dtype as nf4_dequant takes it."""

import os
import subprocess
import sys

import pytest
import torch

from alignlab.kernels import nf4_dequant as mod
from alignlab.quant import nf4_dequantize, nf4_quantize


def test_runner_on_cpu_without_the_interpreter():
    # before: make() launched the Triton kernel on a CPU tensor and failed ("Torch not compiled with CUDA enabled")
    code = ("import torch\n"
            "from alignlab.kernels.nf4_dequant import dequant_runner\n"
            "from alignlab.quant import nf4_quantize, nf4_dequantize\n"
            "t = nf4_quantize(torch.randn(5, 70), blocksize=32)\n"
            "assert torch.equal(dequant_runner(t, torch.float16)(), nf4_dequantize(t, torch.float16))\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALIGNLAB_KERNELS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_runner_follows_the_torch_mode(torch_mode, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel ran under ALIGNLAB_KERNELS=torch")

    monkeypatch.setattr(mod, "_launch_dequant", no_kernel)
    t = nf4_quantize(torch.randn(3, 64))
    assert torch.equal(mod.dequant_runner(t, torch.float32)(), nf4_dequantize(t, torch.float32))


def test_runner_dtype_as_nf4_dequant(kernel_mode):
    t = nf4_quantize(torch.randn(3, 64, dtype=torch.float16))
    got = mod.dequant_runner(t, None)()  # before: float32 (torch.empty's default), not t's dtype
    assert got.dtype == torch.float16 and torch.equal(got, nf4_dequantize(t))
    with pytest.raises(TypeError, match="dtype"):  # before: an int8 tensor of truncated values
        mod.dequant_runner(t, torch.int8)
