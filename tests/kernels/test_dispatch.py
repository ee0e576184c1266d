"""The Triton-vs-torch dispatch decision (alignlab.kernels.dispatch)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from alignlab.kernels import dispatch
from alignlab.kernels.dispatch import kernel_mode, triton_available, use_triton


def test_modes(monkeypatch):
    x = torch.ones(2)
    monkeypatch.setenv("ALIGNLAB_KERNELS", "torch")
    assert kernel_mode() == "torch" and not use_triton(x)
    monkeypatch.setenv("ALIGNLAB_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "_INTERPRET", False)
    assert not use_triton(x)  # CPU tensors take the reference in auto mode
    monkeypatch.setenv("ALIGNLAB_KERNELS", "triton")
    assert not use_triton(x)  # and under "triton" without the interpreter
    monkeypatch.setattr(dispatch, "_INTERPRET", True)
    assert use_triton(x) == triton_available()  # the interpreter runs kernels on CPU tensors
    monkeypatch.setenv("ALIGNLAB_KERNELS", "fast")
    with pytest.raises(ValueError, match="ALIGNLAB_KERNELS"):
        kernel_mode()


def test_use_triton_traces_without_warnings(monkeypatch):
    """torch.compile traces the dispatch decision without a warning (an lru_cache'd helper gave one)."""
    monkeypatch.setenv("ALIGNLAB_KERNELS", "auto")

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return x * 2 if use_triton(x) else x + 1

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(torch.ones(3))
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_triton_interpret_set_after_import_leaves_cpu_tensors_on_the_reference():
    # Triton reads TRITON_INTERPRET once, when the kernels are defined; a later setting used to send CPU
    # tensors to compiled kernels ("RuntimeError: 0 active drivers")
    pytest.importorskip("triton")
    code = """if True:
        import os, torch
        from alignlab.kernels.dispatch import interpreting, use_triton
        from alignlab.losses import linear_cross_entropy
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["ALIGNLAB_KERNELS"] = "triton"
        torch.manual_seed(0)
        h, w, y = torch.randn(6, 8), torch.randn(16, 8), torch.randint(0, 16, (6,))
        assert not interpreting() and not use_triton(h)
        torch.testing.assert_close(linear_cross_entropy(h, w, y).loss, torch.nn.functional.cross_entropy(h @ w.T, y))
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALIGNLAB_KERNELS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def test_kernels_setting_follows_the_environment(monkeypatch):
    """The cheap read of ALIGNLAB_KERNELS that keys NF4Linear's decode launchers sees every change made through
    os.environ (monkeypatch.setenv, os.environ[...] =, del), as os.environ.get does."""
    from alignlab.kernels.dispatch import kernels_setting

    monkeypatch.delenv("ALIGNLAB_KERNELS", raising=False)
    unset = kernels_setting()
    assert unset is None
    monkeypatch.setenv("ALIGNLAB_KERNELS", "torch")
    torch_value = kernels_setting()
    monkeypatch.setenv("ALIGNLAB_KERNELS", "triton")
    triton_value = kernels_setting()
    assert len({unset, torch_value, triton_value}) == 3
    monkeypatch.setenv("ALIGNLAB_KERNELS", "torch")
    assert kernels_setting() == torch_value
    monkeypatch.delenv("ALIGNLAB_KERNELS")
    assert kernels_setting() is None


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes", "0", "false"])
def test_interpreting_agrees_with_triton(value):
    """alignlab took only TRITON_INTERPRET="1": with "true" Triton interpreted every kernel while alignlab dispatched
    as if compiled (the reference ran under ALIGNLAB_KERNELS=triton on CPU; the bf16 tl.dot guard was off)."""
    pytest.importorskip("triton")
    code = ("import triton; from alignlab.kernels import dispatch; "
            "print(triton.knobs.runtime.interpret, dispatch.interpreting())")
    env = dict(os.environ, TRITON_INTERPRET=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    got = out.split()
    assert got[0] == got[1], f"TRITON_INTERPRET={value!r}: Triton interprets={got[0]}, alignlab={got[1]}"
