"""NF4 weights FSDP2 can shard: the packed uint8 bytes become frozen parameters.

FSDP2 (``fully_shard``) shards *parameters* along dim 0 and all-gathers them before a
unit's forward and backward; :class:`~alignlab.quant.NF4Linear` keeps its weight in
*buffers*, which FSDP2 replicates. :func:`shardable_nf4_` turns the uint8 buffers of every
``NF4Linear`` -- the packed codes ``qdata`` ``(ceil(out * in / 2),)`` and, with double
quantization, the 8-bit block scales ``qabsmax`` ``(num_blocks,)`` -- into frozen
``nn.Parameter``\\ s. FSDP2 then keeps ``1 / world`` of those bytes per rank and the
all-gather rebuilds exactly the single-process bytes:

* it never casts a non-float parameter (``MixedPrecisionPolicy.param_dtype`` applies to
  floating-point ones only), and it all-gathers a unit whose dtypes differ as raw bytes:
  uint8 stays uint8, nothing is reinterpreted as a float;
* the float pieces of the quantization state (fp32 scales without double quantization,
  the fp32 second-level scales and offset, ICQ shifts) stay replicated buffers, since a
  bf16 policy would round them: ``4 / (64 * 256)`` bytes per weight with double
  quantization, ``4 / 64`` without.

Per GPU that is ``(0.5 + 1 / 64) / world`` bytes per quantized weight plus the small
replicated scales, instead of ``0.52`` bytes. The layer's ``state_dict`` still has
bitsandbytes' keys, the whole tensors (every rank must call ``state_dict()``: the bytes are
gathered). Convert before ``fully_shard``; :func:`alignlab.distributed.shard_model` does.

:class:`~alignlab.quant.experts.NF4Experts` (MoE expert weights) is converted the same way: its
stacked uint8 codes ``{name}_qdata (E, ⌈out·in/2⌉)`` and 8-bit scales ``{name}_qabsmax (E, nb)``
become frozen parameters, which FSDP2 shards along the expert dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from alignlab.quant.experts import NF4Experts
from alignlab.quant.linear import _BUFFERS, NF4Linear
from alignlab.quant.nf4 import NF4Tensor

__all__ = ["ShardableNF4Experts", "ShardableNF4Linear", "shardable_nf4_"]

def _whole(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _addresses(parts: tuple) -> tuple:
    return tuple(0 if p is None else p.data_ptr() for p in parts)


class ShardableNF4Linear(NF4Linear):
    """An :class:`~alignlab.quant.NF4Linear` whose uint8 quantization tensors are frozen parameters.

    Same math, same ``state_dict`` (bitsandbytes keys, whole tensors). Made by
    :func:`shardable_nf4_`, which converts layers in place; re-quantizing it
    (``load_dense_weight_``, ``load_state_dict``) is refused once FSDP2 has sharded it.
    """

    _PACK = False  # FSDP2 shards qdata / qabsmax as parameters of their own (no packed storage to keep whole)

    def _tensor(self, name: str) -> torch.Tensor | None:
        p = self._parameters.get(name)
        return p if p is not None else self._buffers.get(name)

    @property
    def quant_weight(self) -> NF4Tensor:
        """The packed weight; inside FSDP2's forward / backward the all-gathered bytes.

        Outside them (sharded), the bytes are gathered here: a collective, so every rank must ask.
        """
        parts = tuple(self._tensor(n) for n in _BUFFERS)
        hit = self.__dict__.get("_quant_weight_of")
        # FSDP2 reuses the unsharded tensors, but frees and re-allocates their storage around each use: the same
        # objects may hold other addresses. The kept decode launchers on the NF4Tensor (and a LoRA layer's, keyed on
        # it) hold addresses, so a moved storage gets a new NF4Tensor, without them. (Traced code keeps no launchers
        # and cannot ask for addresses.)
        compiling = torch.compiler.is_compiling()
        if hit is not None and all(x is y for x, y in zip(hit[0], parts)) and (
                compiling or hit[1] == _addresses(parts)):
            return hit[2]
        whole = tuple(_whole(p) for p in parts)
        t = self._nf4_tensor(*whole)
        if not compiling and not any(x is not y for x, y in zip(parts, whole)):
            # never keep a gathered copy of sharded bytes
            self.__dict__["_quant_weight_of"] = (parts, _addresses(parts), t)
        return t

    def _make_parameters(self) -> None:
        # an NF4Linear converted in place held its buffers as views of one packed storage: each parameter gets
        # storage of its own, so that once FSDP2 has sharded them nothing keeps the whole bytes alive
        packed = self.__dict__.pop("_packed", None) is not None
        for name in ("qdata", "qabsmax"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype == torch.uint8:
                del self._buffers[name]
                self._parameters[name] = nn.Parameter(buf.clone() if packed else buf, requires_grad=False)

    def _set_weight(self, t: NF4Tensor) -> None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self._parameters.values() if p is not None):
            if _same_weight(self.quant_weight, t):  # (gathered: every rank loads) the bytes it holds: a resumed
                return  # run's load_state_dict of its own whole state dict has nothing to replace
            raise ValueError("cannot replace the NF4 weight of a layer FSDP2 has sharded: merge, re-quantize or "
                             "load the base before shard_model / fully_shard")
        for name in ("qdata", "qabsmax"):
            self._parameters.pop(name, None)
        super()._set_weight(t)
        self._make_parameters()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("qdata", "qabsmax"):  # written as bitsandbytes' weight / weight.absmax instead
            destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        ours = (prefix + "qdata", prefix + "qabsmax")  # read from bitsandbytes' keys, not under these names
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in ours]


def _same_weight(a, b) -> bool:
    """Whether two NF4 weights hold the same codes, scales and layout."""
    if (tuple(a.shape), a.dtype, a.blocksize, a.nested_blocksize) != (tuple(b.shape), b.dtype, b.blocksize,
                                                                       b.nested_blocksize):
        return False
    return all(_same(getattr(a, f), getattr(b, f)) for f in ("data", "absmax", "nested_absmax", "nested_offset", "shift"))


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    """Both None, or equal tensors of one dtype and shape (``y`` compared on ``x``'s device)."""
    if x is None or y is None:
        return x is y
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y.to(x.device))


class ShardableNF4Experts(NF4Experts):
    """An :class:`~alignlab.quant.experts.NF4Experts` whose uint8 stacks are frozen parameters (FSDP2 shards
    them along the experts); same math and state dict. Made by :func:`shardable_nf4_`. Outside FSDP2's
    forward / backward the pieces are gathered where read (a collective: every rank must ask);
    re-quantizing or restoring packed weights is refused once FSDP2 has sharded it."""

    def _part(self, name: str, part: str) -> torch.Tensor | None:
        key = f"{name}_{part}"
        p = self._parameters.get(key)
        return _whole(p) if p is not None else self._buffers.get(key)

    def _make_parameters(self) -> None:
        for key, buf in list(self._buffers.items()):
            if buf is not None and buf.dtype == torch.uint8:
                del self._buffers[key]
                self._parameters[key] = nn.Parameter(buf, requires_grad=False)

    def _set_stack(self, name: str, ts, stacks=None) -> None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self._parameters.values() if p is not None):
            raise ValueError("cannot replace the NF4 expert weights of a module FSDP2 has sharded: merge, re-quantize "
                             "or load the base before shard_model / fully_shard")
        for part in ("qdata", "qabsmax"):
            self._parameters.pop(f"{name}_{part}", None)
        super()._set_stack(name, ts, stacks)
        self._make_parameters()


def shardable_nf4_(model: nn.Module) -> nn.Module:
    """Convert every :class:`~alignlab.quant.NF4Linear` and :class:`~alignlab.quant.NF4Experts` of ``model``
    in place (see the module docstring); returns ``model``. Modules converted already are left as they are.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if type(module) is NF4Linear:
            module.__class__ = ShardableNF4Linear
            module.__dict__.pop("_quant_weight", None)
            module._make_parameters()
        elif type(module) is NF4Experts:
            module.__class__ = ShardableNF4Experts
            module._make_parameters()
    return model
