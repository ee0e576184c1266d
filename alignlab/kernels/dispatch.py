"""The one place that decides Triton kernel vs. PyTorch reference.

``ALIGNLAB_KERNELS`` controls it:

* unset / ``auto`` -- Triton when every tensor is on CUDA and Triton imports;
* ``torch``        -- always the PyTorch reference (debugging, tests);
* ``triton``       -- Triton whenever it imports, also for CPU tensors when
                      ``TRITON_INTERPRET=1`` (how CI runs kernels without a GPU).

The kernels write plain tensors (no autograd graph). Entry points whose PyTorch reference is differentiable
take the reference whenever autograd wants a gradient of one of their inputs (:func:`wants_grad`), so a call
is differentiable on every path, as it is on CPU.

``TRITON_INTERPRET`` is read once, when this module is imported, as Triton itself reads it once: a
kernel is an interpreted or a compiled function from its definition on. Set it after import and CPU
tensors keep taking the reference (the kernels were defined compiled; launching them on CPU tensors
would end in Triton's "0 active drivers").
"""

from __future__ import annotations

import os

import torch

_MODES = ("auto", "torch", "triton")
# CUDA builds have the float32-output overload of mm for 16-bit operands (``torch.mm(a, b, out_dtype=...)``; the
# CPU build lists it but does not run it): callers test ``a.is_cuda and MM_OUT_DTYPE``
MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def kernel_mode() -> str:
    """The current value of ``ALIGNLAB_KERNELS`` (read on every call, so tests may flip it)."""
    raw = kernels_setting()
    if raw is None:  # unset: the common case, without decoding or parsing anything (every kernel call asks)
        return "auto"
    mode = (raw.decode() if isinstance(raw, bytes) else raw).strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"ALIGNLAB_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def kernels_setting():
    """``ALIGNLAB_KERNELS`` as set (unparsed, None if unset), for the keys of dispatch decisions a caller keeps
    (``NF4Linear``'s decode launchers): read from ``os.environ``'s own mapping, since ``os.environ.get`` encodes the
    name and decodes the value on every call (~0.5-1 µs of host time per decode call; the value is the same)."""
    env = os.environ
    data = getattr(env, "_data", None)  # os._Environ keeps its entries encoded (bytes on POSIX)
    return env.get("ALIGNLAB_KERNELS") if data is None else data.get(_SETTING_KEY)


_SETTING_KEY = os.environ.encodekey("ALIGNLAB_KERNELS") if hasattr(os.environ, "encodekey") else None


def _triton_interprets() -> bool:
    """Whether Triton defines kernels as interpreted functions: ``TRITON_INTERPRET`` as Triton reads it (``1``,
    ``true``, ``on``, ``yes`` in any case; only ``"1"`` was taken here, so ``TRITON_INTERPRET=true`` made Triton
    interpret while alignlab dispatched as if compiled)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no triton, or a release without knobs
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


_INTERPRET = _triton_interprets()  # alignlab's kernels are defined after this import


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter: ``TRITON_INTERPRET=1`` when alignlab's kernels were defined."""
    return _INTERPRET


try:  # once, at import: a plain module constant is what torch.compile traces cheaply (an lru_cache warned)
    import triton  # noqa: F401

    _TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    _TRITON = False


def interpreted_bf16_dot(*tensors: torch.Tensor) -> bool:
    """Whether a kernel that multiplies these tensors by ``tl.dot`` without casting them must take its reference:
    under the interpreter a bf16 operand reaches ``tl.dot`` as its raw 16-bit integers (results off by ~1e10)."""
    return interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)


def triton_available() -> bool:
    """Whether Triton imports in this process."""
    return _TRITON


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether grad mode is on and any given tensor requires grad (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is running. The kernels cannot read its
    wrapped tensors (not even an output allocated under it) and the fused autograd Functions have no vmap rule, so
    callers take plain torch ops then (``vmap`` over an NF4 layer on the Triton path raised ``NotImplementedError``,
    ``torch.func.grad`` of a fused LoRA layer ``RuntimeError``)."""
    return torch._C._are_functorch_transforms_active()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path should run for these tensors.

    ``auto`` takes Triton only when all tensors live on a CUDA device; ``triton``
    also accepts CPU tensors under the interpreter. Never while ``torch.export`` traces: it runs without Dynamo
    (non-strict, its default), so a kernel launched there would read fake tensors' memory ("Cannot access data
    pointer"); the exported graph takes the PyTorch ops (custom ops such as the small-M NF4 product stay opaque).
    """
    mode = kernel_mode()
    if mode == "torch" or not triton_available() or torch.compiler.is_exporting():
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "triton":
        return on_cuda or interpreting()
    return on_cuda and not interpreting()
