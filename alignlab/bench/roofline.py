"""The two ceilings a unit benchmark is judged against, measured on this machine.

A memory-bound operation cannot beat a plain device-to-device copy of the
bytes it must move; a compute-bound one cannot beat a large dense matmul.
Datasheet numbers are optimistic, so both are *measured* once per process and
device (``functools.lru_cache``), with the same timing loop as
:func:`alignlab.bench.measure`:

* :func:`copy_bandwidth` -- ``dst.copy_(src)`` of a large buffer; a copy of
  ``N`` bytes moves ``2N`` (read + write), so bandwidth = ``2N / t``.
* :func:`matmul_tflops` -- ``a @ b`` with square ``(n, n)`` operands,
  ``2 n^3`` floating-point operations, on random data.

See "Roofline: an insightful visual performance model for multicore
architectures" (Williams, Waterman, Patterson, CACM 2009).
"""

from __future__ import annotations

import functools

import torch

from alignlab._checks import ArgumentTypeError, check_positive_int, is_int
from alignlab.bench.timing import _resolve_device, measure

_COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
_MATMUL_N = {"cuda": 8192, "cpu": 512}


def copy_bandwidth(device: str | torch.device | None = None, *, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written.

    Args:
        device: ``None`` means the current CUDA device when there is one, else CPU.
        nbytes: size of the copied buffer (default 1 GiB on CUDA, 64 MiB on CPU).

    Raises:
        ValueError: ``nbytes`` is not a positive multiple of 4, or the device is unusable.
        TypeError: ``nbytes`` is not an int (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    dev = _resolve_device(device, (), {})
    nbytes = _COPY_BYTES.get(dev.type, 64 << 20) if nbytes is None else nbytes
    if not is_int(nbytes) or nbytes <= 0 or nbytes % 4:
        kind = ValueError if is_int(nbytes) else ArgumentTypeError
        raise kind(f"nbytes must be a positive multiple of 4, got {nbytes!r}")
    return _copy_bandwidth(str(dev), int(nbytes))


@functools.lru_cache(maxsize=None)
def _copy_bandwidth(device: str, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    # No cache flush: the buffers dwarf every cache, and the flush would only add noise.
    m = measure(dst.copy_, src, warmup=5, rep=100 if src.is_cuda else 5, flush_cache=False, memory=False, name="copy")
    return 2 * nbytes / (m.median_ms * 1e-3)


def matmul_tflops(
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    n: int | None = None,
) -> float:
    """Measured dense ``(n, n) @ (n, n)`` matmul throughput in TFLOP/s (``2 n^3`` flops per product).

    Args:
        device: ``None`` means the current CUDA device when there is one, else CPU.
        dtype: operand dtype (bf16 by default: the tensor-core peak most kernels chase).
        n: matrix size (default 8192 on CUDA, 512 on CPU).

    Raises:
        TypeError: ``dtype`` is not a floating-point ``torch.dtype``.
        ValueError: ``n`` is not a positive int (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too, if it is no int).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    dev = _resolve_device(device, (), {})
    n = _MATMUL_N.get(dev.type, 512) if n is None else n
    check_positive_int(n, "n")
    return _matmul_tflops(str(dev), dtype, int(n))


@functools.lru_cache(maxsize=None)
def _matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    m = measure(torch.matmul, a, b, out=out, warmup=5, rep=30 if a.is_cuda else 5, flush_cache=False, memory=False, name="matmul")
    return 2 * n**3 / (m.median_ms * 1e-3) / 1e12
