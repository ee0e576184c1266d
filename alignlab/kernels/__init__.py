"""Triton kernels. Each file holds kernel(s), autotune configs and a launcher.

Callers never pick a kernel themselves: they ask :func:`use_triton` (see
``dispatch.py``), which is the single place that decides between the Triton
path and the pure-PyTorch reference.
"""

from alignlab.kernels.dispatch import triton_available, use_triton

__all__ = ["triton_available", "use_triton"]
