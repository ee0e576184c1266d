"""Device tensors kept for the life of the process (lookup tables, split-K counters, workspaces).

Such a tensor must not come out of a CUDA-graph memory pool. ``torch.compile(mode="reduce-overhead")``
(CUDA graph trees) runs its warm-up calls with every allocation *of the calling thread* routed to the
graph's private pool; a tensor made there and kept in a module-level cache is memory the pool hands
out again on replay, and the trees stop with "tensor(s) in the cudagraph pool not tracked as outputs"
(seen on an H200 when the first NF4 decode product of a process ran inside a compiled ``generate()``
step). :func:`keep` therefore makes such tensors on a short-lived worker thread, whose allocations the
routing leaves alone (a side stream of the same thread would not do: the routing is per thread).
"""

from __future__ import annotations

import threading

import torch

__all__ = ["keep"]


def keep(make, device: torch.device | str):
    """``make()`` (a tensor or a tuple of tensors on ``device``), allocated outside any CUDA-graph pool.

    On CUDA, ``make`` runs on a worker thread (its own current stream, synchronized before this returns,
    so the values are ready); each tensor is then marked as used by this thread's current stream, so
    that freeing it later (a workspace replaced by a larger one) waits for the kernels queued there.
    Off CUDA, or while the current stream is being captured into a graph (where no kept tensor should
    be made at all), it simply runs ``make()`` here.
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()
    index = device.index if device.index is not None else torch.cuda.current_device()
    box: dict = {}

    def work():
        try:
            with torch.cuda.device(index):
                box["out"] = make()
                torch.cuda.current_stream(index).synchronize()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="alignlab-keep", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    out = box["out"]
    current = torch.cuda.current_stream(index)
    for t in out if isinstance(out, tuple) else (out,):
        t.record_stream(current)
    return out
