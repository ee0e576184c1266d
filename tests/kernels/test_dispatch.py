"""The Triton-vs-torch dispatch decision (alignlab.kernels.dispatch)."""

import warnings

import pytest
import torch

from alignlab.kernels.dispatch import kernel_mode, triton_available, use_triton


def test_modes(monkeypatch):
    x = torch.ones(2)
    monkeypatch.setenv("ALIGNLAB_KERNELS", "torch")
    assert kernel_mode() == "torch" and not use_triton(x)
    monkeypatch.setenv("ALIGNLAB_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)  # CPU tensors take the reference in auto mode
    monkeypatch.setenv("ALIGNLAB_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
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
