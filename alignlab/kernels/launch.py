"""A cheaper eager launch of an already compiled Triton kernel.

``kernel[grid](*args, **meta)`` spends ~40 µs of host time per call with Triton 3.6 on an H200
(``benchmarks/host_overhead.py``): binding the arguments, computing the specialization key, looking the
compiled kernel up and building the launch metadata. The GPU work of a decode-sized NF4 product is
~10 µs, so in eager decoding and small training steps that host time *is* the step.

:func:`launch` keeps Triton's own compile and cache (the first call per key goes through
``kernel[grid]``, which compiles if needed and returns the compiled kernel) and afterwards calls that
compiled kernel's launcher directly, exactly as Triton's ``run`` does at its end (same arguments,
same launch hooks). The key reproduces what Triton specializes on: each tensor's dtype and whether its
address is 16-byte aligned; each int's width class, whether it is 1 and whether it divides by 16; the
value of every other argument and of every meta-parameter; the current device. A kernel that
specializes on anything else must not be launched through here.

Two more cuts after the first call. Tensors go to the launcher as their data pointers (ints): given a
tensor, Triton's C launcher calls its ``data_ptr()`` and asks the driver to check the address
(``cuPointerGetAttribute``), once per pointer argument per launch -- about a dozen for an NF4 kernel -- while
an int is taken as it is (the checks the driver made are ours to make before: every caller launches only on
CUDA tensors of the current device). And on Triton 3.6 (the release measured on the GPU) the compiled
launcher's C entry point is called directly where Triton's Python wrapper around it would do nothing for
the kernel (no scratch memory, no launch hooks registered): that wrapper builds the launch metadata for the
hooks and calls two empty hook chains per launch.

Falls back to ``kernel[grid](*args, **meta)`` under the Triton interpreter, inside ``torch.compile``
tracing (dynamo captures the plain launch as a user-defined Triton kernel), and for Triton versions
this was not checked on (the launcher's argument list is Triton-internal). ``ALIGNLAB_FAST_LAUNCH=0``
turns it off.
"""

from __future__ import annotations

import functools

import torch

from alignlab._checks import env_switch
from alignlab.kernels.dispatch import interpreting

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["launch", "bind", "pointers", "cdiv", "next_power_of_2", "options", "sm_count", "dependent_launch"]

# Triton releases whose compiled-kernel launcher takes (grid x, y, z, stream, function, packed metadata,
# launch metadata, enter hook, exit hook, *every argument incl. constexprs), with launch hooks in
# ``triton.knobs``: checked on 3.6 (H200 run) and in the 3.9 sources.
_CHECKED = ("3.4", "3.5", "3.6", "3.7", "3.8", "3.9")
_ENABLED = (
    triton is not None
    and hasattr(triton, "knobs")
    and triton.__version__.rsplit(".", 1)[0] in _CHECKED
    and env_switch("ALIGNLAB_FAST_LAUNCH", True)
)
# the release whose compiled launcher's C entry point takes (grid x, y, z, stream, function, cooperative, pdl,
# global scratch, profile scratch, packed metadata, launch metadata, enter hook, exit hook, *arguments): read in its
# sources (backends/nvidia/driver.py, CudaLauncher) and run on an H100 / H200
_DIRECT_VERSION = "3.6"
_CACHE: dict = {}
# Launch options every alignlab kernel asks for explicitly. FMA contraction (``a * b + c`` as one fused
# multiply-add): on by default in every Triton so far, but Triton 3.9 warns at each compile that leaves it unset
# and 3.10 turns it off by default (ptxas ``--fmad=false``), which would make each kernel issue a multiply and
# an add where it now issues one FMA -- slower, and rounded differently from what the tests measured.
_OPTIONS = {"enable_fp_fusion": True}
_INTERPRET = interpreting()  # read once at import (alignlab.kernels.dispatch), as Triton reads it
_Tensor = torch.Tensor


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code: Triton's own ``triton.cdiv`` / ``next_power_of_2`` are constexpr functions
    whose Python call costs ~2-5 µs (measured on the CI VM and the H200's host), several per layer call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), for host code (see :func:`cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def dependent_launch(index: int) -> bool:
    """Whether kernels on CUDA device ``index`` can be launched as programmatic dependents (PDL: a kernel starts while
    the one before it on the stream still runs, and waits for it only where it executes ``griddepcontrol.wait``):
    an NVIDIA GPU of compute capability 9.0 or later, a Triton that takes the ``launch_pdl`` option, the compiled path
    (not the interpreter)."""
    if triton is None or _INTERPRET or torch.version.hip is not None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(index)[0] >= 9


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``, asked once per device (grid sizing of split kernels)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def options() -> dict:
    """Keyword options for a direct ``kernel[grid](...)`` launch (see ``_OPTIONS``); none while ``torch.compile``
    traces the launch (Dynamo takes only the launch options it knows, and Inductor compiles the kernel with its
    own)."""
    return {} if torch.compiler.is_compiling() else _OPTIONS


def _key(args: tuple) -> tuple:
    """What selects a compiled kernel, per argument: a tensor's dtype and 16-byte alignment; an int's
    width class, ``== 1`` and divisibility by 16; any other value itself (bools, floats, None).
    Written inline (no call per argument): this runs on every launch."""
    return tuple([
        (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _Tensor)
        else (-2147483648 <= a < 2147483648, a == 1, a & 15 == 0) if a.__class__ is int
        else a
        for a in args
    ])


def pointers(args: tuple) -> tuple:
    """``args`` with each tensor replaced by its data pointer (see the module docstring)."""
    return tuple([a.data_ptr() if isinstance(a, _Tensor) else a for a in args])


def _silent(hook) -> bool:
    """Whether a Triton launch hook does nothing: None, or a hook chain (Triton 3.6) with nothing in it."""
    return hook is None or (hook.__class__.__name__ == "HookChain" and not hook.calls)


def _direct(compiled):
    """``(c_launch, cooperative, pdl)``: the compiled launcher's C entry point and the two flags its Python wrapper
    passes, where calling it directly is what the wrapper would do (Triton 3.6, no scratch memory); else None."""
    run = compiled.run
    if (triton.__version__.rsplit(".", 1)[0] != _DIRECT_VERSION or run.__class__.__name__ != "CudaLauncher"
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or not hasattr(run, "launch")):
        return None
    return run.launch, run.launch_cooperative_grid, run.launch_pdl


def _grid3(grid: tuple) -> tuple[int, int, int]:
    """A grid of 1-3 ints as the three the launcher takes."""
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def _fire(entry: tuple, grid: tuple[int, int, int], stream: int, args: tuple) -> None:
    """Launch the cached ``entry`` (``(compiled, constexpr tail, _direct(compiled))``) on ``grid`` (:func:`_grid3`)
    with ``args``, its runtime arguments with tensors as pointers: directly where :func:`_direct` allows it and no
    launch hook is registered at the time of the call, else through Triton's launcher as Triton's own ``run`` calls
    it."""
    compiled, tail, direct = entry
    hooks = triton.knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    if direct is not None and _silent(enter) and _silent(leave):
        c_launch, coop, pdl = direct
        c_launch(*grid, stream, compiled.function, coop, pdl, None, None, compiled.packed_metadata, None, None, None,
                 *args, *tail)
        return
    full = (*args, *tail)
    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full), enter, leave, *full)


def _interpreted(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """A launch reached while ``torch.compile`` traces, under ``TRITON_INTERPRET=1``: the interpreter runs the kernel
    in Python on CPU tensors, which Dynamo cannot trace (its fake tensors reached the interpreter and failed there), so
    the launch runs outside the graph (a graph break: ``fullgraph=True`` refuses it). Plain code paths that launch
    kernels while traced (DoRA's norm, an NF4 dequantization) compile so on a CPU; the custom ops need no break.
    Called through :func:`_interpreted_outside`: the ``torch.compiler.disable`` wrapper is made at the first traced
    launch, when Dynamo is loaded anyway. Made at import under the interpreter, the import of Dynamo (~1 s) also made
    spawned DDP ranks (the tests' workers, ``examples/fsdp_qlora.py --ddp``) hang in their gloo teardown (torch 2.13)."""
    kernel[grid](*args, **meta, **options())


_OUTSIDE: list = []  # a plain list, not functools.cache: Dynamo traces this call, and warns on a cache wrapper


def _interpreted_outside():
    """``torch.compiler.disable(_interpreted)``, made once, at the first call (while Dynamo traces)."""
    if not _OUTSIDE:
        _OUTSIDE.append(torch.compiler.disable(_interpreted))
    return _OUTSIDE[0]


def launch(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)`` with the per-call host work of the second and later calls cut.

    Args:
        kernel: a ``triton.jit`` function.
        grid: a tuple of 1-3 ints (no callables, no autotuners).
        args: the runtime arguments in signature order (tensors, ints, floats, bools, None).
        meta: constexpr parameters by name, plus launch options (``num_warps``, ``num_stages``).
    """
    if not _ENABLED or _INTERPRET or torch.compiler.is_compiling():
        if _INTERPRET and torch.compiler.is_compiling():
            _interpreted_outside()(kernel, grid, args, meta)
        else:
            kernel[grid](*args, **meta, **options())
        return
    device = torch.cuda.current_device()
    key = (kernel, device, tuple(meta.items()), _key(args))
    entry = _CACHE.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta, **_OPTIONS)
        names = kernel.arg_names[len(args):]
        if getattr(compiled, "function", None) is None or any(n not in meta for n in names):
            return  # defaults or something unusual: leave every call of this key to Triton
        _CACHE[key] = (compiled, tuple(meta[n] for n in names), _direct(compiled))
        return
    _fire(entry, _grid3(grid), torch._C._cuda_getCurrentRawStream(device), pointers(args))


def bind(kernel, grid: tuple, args: tuple, meta: dict):
    """The compiled kernel that ``launch(kernel, grid, args, meta)`` runs, as ``go(stream, args)``; or None.

    For callers that launch one specialization many times (a layer's decode call): ``go`` skips even the
    key computation of :func:`launch`, so the caller must only pass argument tuples that Triton would
    specialize the same way as ``args`` (same dtypes, 16-byte alignment classes, int classes; ``grid``
    and ``meta`` fixed) and a raw stream of the bound device. In the tuples given to ``go`` every tensor is
    given as its data pointer (an int: :func:`pointers`), which is the caller's to keep alive and on the
    bound device. None where :func:`launch` would not take its fast path, or before its first call with
    this key (which compiles).
    """
    if not _ENABLED or _INTERPRET or torch.compiler.is_compiling():
        return None
    entry = _CACHE.get((kernel, torch.cuda.current_device(), tuple(meta.items()), _key(args)))
    return None if entry is None else functools.partial(_fire, entry, _grid3(grid))  # the grid padded once


