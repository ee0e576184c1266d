"""More than one GPU: QLoRA / LoRA / DoRA models under PyTorch's FSDP2 and DDP.

alignlab adds no communication of its own: the training step runs through PyTorch's
``fully_shard`` (FSDP2) or ``DistributedDataParallel``; saving and loading adapters
gathers / scatters through ``DTensor`` (``full_tensor``, ``distribute_tensor``).

What is sharded. FSDP2 shards *parameters*: under :func:`shard_model` every rank holds
``1 / world`` of each parameter (embeddings, norms, ``lm_head``, adapter factors, DoRA
magnitudes) and all-gathers a block's parameters just before its forward / backward.
:func:`shard_model` first makes the packed uint8 bytes of every
:class:`~alignlab.quant.NF4Linear` (codes and 8-bit scales) frozen parameters too
(:mod:`alignlab.quant.fsdp`), so they are sharded the same way; FSDP2 all-gathers them as
bytes (uint8 stays uint8; no cast, no float reinterpretation). The small float scales stay
replicated. Per GPU the model takes about

    (0.52 bytes per quantized weight + float parameters) / world  +  4 / (64 * 256) bytes per quantized weight,

e.g. ~35 GB / world for a 70B base in NF4. (Calling ``fully_shard`` yourself on a model
that was not converted keeps the NF4 buffers replicated: correct, but the whole NF4 base
sits on every GPU.)

Mixed precision (FSDP2's ``MixedPrecisionPolicy``): keep fp32 master adapter weights
(the sharded parameters and the optimizer state stay fp32), all-gather and compute in
bf16 (``param_dtype=torch.bfloat16``) and reduce-scatter gradients in fp32
(``reduce_dtype=torch.float32``) -- :func:`bf16_policy`. The NF4 base computes in its own
``compute_dtype`` whatever the policy says.

Only adapter parameters carry gradients and optimizer state: :func:`~alignlab.adapters.inject`
freezes everything else, so build the optimizer from
``[p for p in model.parameters() if p.requires_grad]``. ``with disabled(model):`` (the DPO
reference pass) works unchanged under FSDP2 and DDP.

Order of operations: ``quantize_model`` -> ``inject`` (or ``load_adapter``) -> :func:`shard_model`
(or :func:`ddp_model`) -> optimizer. ``save_adapter`` and ``load_adapter``
accept the sharded (or DDP-wrapped) model on every rank; see :mod:`alignlab.adapters.io`.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["shard_model", "bf16_policy", "ddp_model", "unwrap", "is_writer", "barrier", "writer_done", "full_tensor",
           "like_target", "is_sharded", "full_state_dict"]


def bf16_policy():
    """``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: bf16 all-gather and
    compute, fp32 gradient reduction, fp32 sharded master weights and optimizer state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


_NO_GROUP = ("mesh: None shards over the default process group, and there is no torch.distributed process group: "
             "call torch.distributed.init_process_group ('gloo' on CPU, 'nccl' on GPUs) before shard_model, and "
             "start the script with torchrun (for one process: init_process_group(backend, "
             "store=torch.distributed.HashStore(), rank=0, world_size=1)), or pass a DeviceMesh as mesh")


def _launched_by_torchrun() -> bool:
    """Whether the environment holds what ``init_process_group``'s default ``env://`` start reads (torchrun sets it):
    then ``fully_shard`` without a mesh can start the default group itself."""
    return all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))


def shard_model(
    model: nn.Module,
    block_types: Iterable[str | type] | None = None,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` every transformer block of ``model``, then the model itself; returns ``model``.

    Blocks are the modules whose class is in ``block_types`` (classes or class names; a single name or
    class is one block type); by default
    a ``transformers`` model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``). Each block is
    one FSDP2 unit (one all-gather before its forward and backward); the rest (embeddings, final
    norm, ``lm_head``) forms the root unit. The NF4 layers are made shardable first
    (:func:`alignlab.quant.fsdp.shardable_nf4_`). Call it after ``inject`` / ``load_adapter``:
    adapters added later would not be sharded.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a block type is neither a class nor a name, or ``mp_policy``
            is not a ``MixedPrecisionPolicy`` (e.g. ``torch.bfloat16``: :func:`bf16_policy` is the policy for it).
        ValueError: no ``block_types`` given and the model declares none, or none of them occurs; no
            ``mesh`` and no process group (``init_process_group`` not called, not started by ``torchrun``).
        RuntimeError: this torch's FSDP2 cannot shard the NF4 bytes (torch 2.11 makes every shard require
            grad, which a uint8 tensor cannot: pytorch/pytorch#177844; torch 2.13 shards them).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from alignlab.quant.fsdp import shardable_nf4_

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        # fully_shard took it, and the first forward failed with "'torch.dtype' object has no attribute 'param_dtype'"
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got {mp_policy!r}"
                        " (bf16_policy() is bf16 compute with fp32 gradient reduction)")
    if block_types is None:
        block_types = getattr(model, "_no_split_modules", None)
        if not block_types:
            raise ValueError("block_types must be given: the model declares no _no_split_modules")
    if isinstance(block_types, (str, type)):  # one name, not its characters
        block_types = (block_types,)
    try:
        block_types = tuple(block_types)
    except TypeError:  # was int's "'int' object is not iterable"
        raise TypeError(f"block_types must be a class, a class name or an iterable of them, got {block_types!r}") \
            from None
    if not all(isinstance(t, (str, type)) for t in block_types):
        raise TypeError(f"block_types must be classes or class names, got {block_types!r}")
    wanted = {t if isinstance(t, str) else t.__name__ for t in block_types}
    blocks = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    if not blocks:
        raise ValueError(f"block_types={sorted(wanted)} match no module of {type(model).__name__}")
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
              "reshard_after_forward": reshard_after_forward}
    if mesh is None and not (dist.is_available() and dist.is_initialized()) and not _launched_by_torchrun():
        # before anything is changed: fully_shard of the first block went through, so a retry after
        # init_process_group failed with "fully_shard has already been applied"
        raise ValueError(_NO_GROUP)
    shardable_nf4_(model)
    for module in model.modules():  # FSDP2 refills gathered factors without a version bump: no stale casts
        if hasattr(module, "cache_casts"):
            module.cache_casts = False
    try:
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    except ValueError as e:
        # with no mesh, fully_shard builds one over the default group, starting it from torchrun's environment
        if mesh is not None or (dist.is_available() and dist.is_initialized()):
            raise
        raise ValueError(_NO_GROUP) from e
    except RuntimeError as e:
        if "can require gradients" not in str(e):
            raise
        raise RuntimeError(
            f"torch {torch.__version__}'s FSDP2 makes every shard require grad, which the NF4 layers' uint8 bytes "
            "cannot (pytorch/pytorch#177844; torch 2.13 shards them): upgrade torch, or build the model again and "
            "call fully_shard on it yourself, without shard_model (the NF4 bytes then stay whole on every rank)") from e
    return model


def ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model, **kwargs)`` that does not re-broadcast buffers before each forward.

    DDP's default copies every buffer from rank 0 at each forward; here the buffers include the
    frozen NF4 bytes of the whole base (identical on every rank after the initial sync), so that
    would move the entire quantized model per step. Only the adapters' gradients are all-reduced.

    DDP all-reduces the parameters that require grad when it is made: choose the active adapters
    (``set_adapter``) before wrapping. A forward of the wrapper after another parameter was made
    trainable (``set_adapter(ddp.module, ...)``, ``requires_grad_``) raises ``ValueError`` (with grad enabled):
    that parameter would train apart on each rank, without a word.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (DDP said "'str' object has no attribute 'named_parameters'").
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        kwargs.setdefault("forward_sync_buffers", False)
    else:  # torch < 2.13 spells it broadcast_buffers
        kwargs.setdefault("broadcast_buffers", False)
    ddp = DistributedDataParallel(model, **kwargs)
    reduced = {id(p) for p in model.parameters() if p.requires_grad}

    def refuse_late_trainables(_wrapper: nn.Module, _args) -> None:
        if not torch.is_grad_enabled() or all(id(p) in reduced for p in model.parameters() if p.requires_grad):
            return  # without grad (an evaluation of another adapter) nothing is reduced, nothing drifts apart
        late = next(n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reduced)
        raise ValueError(f"parameter {late!r} requires grad but did not when ddp_model wrapped the model (set_adapter "
                         "or requires_grad_ after wrapping): DDP all-reduces only the parameters trainable when it was "
                         "made, so each rank would train its own copy; choose the active adapters before ddp_model, "
                         "or wrap the model again")

    ddp.register_forward_pre_hook(refuse_late_trainables)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a ``DistributedDataParallel`` wrapper (FSDP2 needs none: it shards in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def writer_done(error: BaseException | None, what: str) -> None:
    """The end of a rank-0 write that every rank waits for: ``barrier()`` that also carries the outcome.

    Rank 0 passes the exception its write raised (or None); every rank learns whether it succeeded, so
    a failed write raises on all ranks instead of leaving the others waiting in a barrier that rank 0
    never reaches. Rank 0 re-raises its own exception; the others raise ``RuntimeError`` naming ``what``.
    Outside ``torch.distributed`` it re-raises ``error`` if there is one.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    flag = [error is None]
    dist.broadcast_object_list(flag, src=0)  # the others wait here until rank 0 has written (or failed)
    if error is not None:
        raise error
    if not flag[0]:
        raise RuntimeError(f"rank 0 failed to write {what}; its own error says why")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` is all-gathered (every rank must call), a plain tensor is returned as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_target(src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``src`` (the whole tensor, the same on every rank) laid out as ``target``: this rank's shard
    when ``target`` is a ``DTensor`` (no communication: each rank slices its own part), else ``src``.

    Raises ``ValueError`` if ``src`` does not have ``target``'s (global) shape: ``target.copy_`` of the
    result would broadcast a ``(1, n)`` source over an ``(m, n)`` target without a word."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(src.shape) != tuple(target.shape):
        raise ValueError(f"src: expected the shape of target {tuple(target.shape)}, got {tuple(src.shape)}")
    src = src.to(device=target.device, dtype=target.dtype)
    if not isinstance(target, DTensor):
        return src
    return distribute_tensor(src, target.device_mesh, target.placements, src_data_rank=None)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict()`` of a sharded model on rank 0, on CPU (``{}`` on other ranks).

    Every rank must call it: each sharded tensor is all-gathered in turn (one at a time, so
    the peak extra memory per GPU is the largest parameter). ``NF4Linear`` layers write
    bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_state...``), so the base of
    an FSDP2 QLoRA model loads into ``transformers`` with ``BitsAndBytesConfig`` as a
    single-process one does.
    """
    out = {}
    for key, value in unwrap(model).state_dict().items():
        value = full_tensor(value)
        if is_writer():
            out[key] = value.detach().cpu()
    return out
