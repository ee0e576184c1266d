"""Frozen NF4 linear layer: the quantized base of QLoRA / QDoRA.

``NF4Linear`` computes ``y = x W^T + b`` with ``W`` stored as 4-bit NormalFloat
(QLoRA, Dettmers et al. 2023, arXiv 2305.14314; format in
:mod:`alignlab.quant.nf4`).  The weight is frozen: the only gradient is the one
to the input, ``dx = dy W``, which the backward recomputes from the packed
weight (fused kernel, or a transient dequantization) instead of keeping a
dequantized copy alive between forward and backward.

Its ``state_dict`` uses the keys ``bitsandbytes.nn.Linear4bit`` and
``transformers`` write (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``, ``bias``), so a 4-bit checkpoint saved
by ``transformers`` loads into a model converted with :func:`quantize_model`, and
saving writes that format back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from types import SimpleNamespace
from typing import Iterable, NamedTuple

import torch
from torch import nn

from alignlab._checks import as_bool, env_switch
from alignlab._ties import module_names, parameter_owners, put_module, untie_changes_outputs
from alignlab.kernels.dispatch import functorch_active
from alignlab.kernels.nf4_configs import DECODE_ROWS, note_device
from alignlab.quant.nf4 import (
    SUPPORTED_DTYPES,
    NF4Tensor,
    _check_blocksize,
    check_compute_dtype,
    check_quantizable,
    nf4_dequantize,
    nf4_from_bnb_state_dict,
    nf4_quantize,
    nf4_to_bnb_state_dict,
)

__all__ = ["DequantizedWeight", "NF4Linear", "quantize_model"]

# Eager decode launchers (NF4Linear.forward and the fused QLoRA / QDoRA base product: kernels.nf4_matmul.decode_matmul):
# on by default since measured on an H200 (issue 24, benchmarks/RESULTS.md: a median 20 us per eager call at M <= 32
# instead of 48-94 us); ALIGNLAB_DECODE_LAUNCHERS=0 (read at import) or this attribute set to False turns them off.
DECODE_LAUNCHERS = env_switch("ALIGNLAB_DECODE_LAUNCHERS", True)
# A compiled forward reads the weight from the two packed storages (_Packed) instead of the buffers;
# ALIGNLAB_NF4_PACKED_INPUTS=0 (read at import) or this attribute set to False (before compiling) reads the buffers.
PACKED_INPUTS = env_switch("ALIGNLAB_NF4_PACKED_INPUTS", True)
_nm = None  # alignlab.kernels.nf4_matmul, imported at the first call (at import time that import would be circular)
_BUFFERS = ("qdata", "qabsmax", "qnested_absmax", "qnested_offset", "qshift")
_ICQ_KEY = "weight.icq_shift"
# the state-dict keys of a packed weight: bitsandbytes' (transformers' 4-bit checkpoints) and the ICQ shifts
_WEIGHT_KEYS = frozenset({"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                          "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", _ICQ_KEY})


def _kernels():
    global _nm
    import alignlab.kernels.nf4_matmul as nm

    _nm = nm
    return nm


class _Packed(NamedTuple):
    """An NF4 weight's tensors in two storages: ``u8`` holds the codes and, with double quantization, the 8-bit
    block scales (16-byte aligned); ``f32`` the float32 pieces (block scales without double quantization, second-level
    scales, offset, ICQ shifts). ``parts``: per buffer of ``_BUFFERS``, ``None`` or ``(in_u8, start, numel, shape)``;
    ``views``: the buffer objects built from it (the layer's buffers while nothing replaced them).

    A compiled forward reads the weight from these two tensors (sliced inside the graph) instead of four or five
    buffers: each tensor a graph reads is an input that Dynamo and CUDA-graph replays handle per call, and at a
    decode step of a 4-layer Llama-3-8B-shaped stack the NF4 model's three extra inputs per linear cost
    ~0.13 ms of host time per step on an H100 (benchmarks/RESULTS.md, issue 24, twenty-third pass)."""

    u8: torch.Tensor
    f32: torch.Tensor
    parts: tuple
    views: tuple


def _pack(values: tuple) -> _Packed | None:
    """The :class:`_Packed` form of ``values`` (the ``_BUFFERS`` tensors, ``None`` where absent), or ``None`` where
    their dtypes do not fit it (codes not uint8, a float piece not float32, devices differing)."""
    data = values[0]
    if data is None or data.dtype != torch.uint8 or any(v is not None and v.device != data.device for v in values):
        return None
    pieces = {True: [], False: []}  # in the uint8 storage or not: its tensors, and its length so far
    ends = {True: 0, False: 0}
    parts = []
    for i, v in enumerate(values):
        if v is None:
            parts.append(None)
            continue
        in_u8 = v.dtype == torch.uint8 and i < 2  # the codes, and 8-bit block scales
        if not in_u8 and v.dtype != torch.float32:
            return None
        start = ends[in_u8]
        pieces[in_u8].append(v.reshape(-1))
        parts.append((in_u8, start, v.numel(), tuple(v.shape)))
        end = start + v.numel()
        pad = -end % (16 // v.element_size())  # the next piece 16-byte aligned, as an allocation of its own would be
        if pad:
            pieces[in_u8].append(v.new_zeros(pad))
        ends[in_u8] = end + pad
    u8, f32 = (torch.cat(pieces[k]) if pieces[k] else torch.empty(0, dtype=dt, device=data.device)
               for k, dt in ((True, torch.uint8), (False, torch.float32)))
    return _repacked(u8, f32, tuple(parts))


def _repacked(u8: torch.Tensor, f32: torch.Tensor, parts: tuple) -> _Packed:
    """A :class:`_Packed` over the storages ``u8`` and ``f32`` (views made anew). Dynamo marks tensor attributes
    of a module as static inputs, as it does buffers, so a CUDA-graph replay reads the storages in place: no
    ``mark_static_address`` here (it cannot be traced, and importing ``torch._dynamo`` at a device move is what
    processes that never compile should not pay)."""
    return _Packed(u8, f32, parts, _views(u8, f32, parts))


def _holds(packed: _Packed, buffers: dict, storages: bool = True) -> bool:
    """Whether ``buffers`` (a module's) are ``packed``'s views, on its storages (``storages=False``: the views on
    the storages' device, what traced code can ask: a view moved by ``tensor.data = ...``, as FSDP2 moves the
    buffers of a layer it does not shard, is the same object on another device)."""
    for name, view in zip(_BUFFERS, packed.views):
        if buffers.get(name) is not view:
            return False
        if view is not None and view.device != packed.u8.device:
            return False
        if storages and view is not None and view.untyped_storage().data_ptr() != (
                packed.u8 if view.dtype == torch.uint8 else packed.f32).untyped_storage().data_ptr():
            return False
    return True


def _views(u8: torch.Tensor, f32: torch.Tensor, parts: tuple) -> tuple:
    out = []
    for part in parts:
        if part is None:
            out.append(None)
            continue
        in_u8, start, numel, shape = part
        out.append((u8 if in_u8 else f32)[start:start + numel].view(shape))
    return tuple(out)


class DequantizedWeight(torch.Tensor):
    """Read-only stand-in for a quantized layer's ``.weight``: the dense weight, rebuilt from the NF4 codes on use.

    Model code reads a linear's weight directly: T5 / NLLB-MoE / SeamlessM4T cast their input to
    ``fc.weight.dtype`` in every forward, Mamba computes ``dt_proj.weight @ x``. This tensor reports the shape,
    dtype (``dtype``, default that of the weight that was quantized) and device of that dense weight at no cost,
    and any operation on it first dequantizes the whole matrix (a temporary, never kept, no gradient). Writing into it
    (``w.add_(d)``, ``w.data.copy_(...)``, ``init.normal_(w)``) raises ``RuntimeError``: the codes would not
    change, so a silent no-op is refused; :meth:`NF4Linear.load_dense_weight_` re-quantizes a new weight.
    """

    @staticmethod
    def __new__(cls, t: NF4Tensor, dtype: torch.dtype | None = None):
        return torch.Tensor._make_wrapper_subclass(cls, t.shape, dtype=dtype or t.dtype, device=t.data.device,
                                                   requires_grad=False)

    def __init__(self, t: NF4Tensor, dtype: torch.dtype | None = None) -> None:
        self.nf4 = t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"DequantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, NF4)"

    def data_ptr(self) -> int:  # a Triton kernel handed this tensor asks for its memory, which does not exist
        raise RuntimeError("a quantized layer's .weight has no memory of its own (a view of NF4 codes): pass "
                           "layer.dequantize() to code that needs a dense tensor in memory, such as a kernel")

    def dense(self) -> torch.Tensor:
        """The dequantized weight as a plain tensor (a new one per call)."""
        from alignlab.kernels.nf4_dequant import nf4_dequant

        return nf4_dequant(self.nf4, self.dtype)

    # copies, pickles (torch.save) and host conversions hold the dense weight: they need memory of their own
    def __deepcopy__(self, memo) -> torch.Tensor:
        return self.dense()

    def __reduce_ex__(self, protocol):
        return self.dense().__reduce_ex__(protocol)

    def numpy(self, *, force: bool = False):
        return self.dense().numpy(force=force)

    def tolist(self):
        return self.dense().tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, cls) and arg.alias_info is not None and arg.alias_info.is_write:
                raise RuntimeError(f"{func.__name__}: a quantized layer's .weight is a read-only view of its NF4 "
                                   "codes (writing into it would change nothing); use "
                                   "NF4Linear.load_dense_weight_ to re-quantize a new weight")
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return cls(args[0].nf4, args[0].dtype)  # .data / .detach() stay views: a later write is refused too
        args, kwargs = torch.utils._pytree.tree_map_only(cls, lambda w: w.dense(), (args, kwargs))
        return func(*args, **kwargs)


class NF4Linear(nn.Module):
    """``y = x W^T + b`` with a frozen NF4 weight ``W`` of shape ``(out_features, in_features)``.

    Inputs are cast to ``compute_dtype`` for the product and the result is cast
    back to the input dtype (any floating dtype, float64 too; other dtypes raise
    ``TypeError``).  Shapes: ``x (..., in_features) -> (..., out_features)``.
    The layer has no trainable parameters (the bias, if any, is frozen too).

    Build one with :meth:`from_linear`; :func:`quantize_model` converts a whole model. ``NF4Linear(weight, bias,
    compute_dtype, calibrate)`` takes a packed weight as it is; ``calibrate`` (None or ``"icq"``) is how a
    re-quantization (a merge, :meth:`load_dense_weight_`) quantizes, by default that of ``weight`` (ICQ where it holds
    shifts, as ``load_state_dict`` infers it).
    """

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        calibrate: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weight, NF4Tensor):
            raise TypeError(f"weight must be an NF4Tensor, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        check_compute_dtype(compute_dtype)
        if calibrate not in (None, "icq"):  # else accepted here and refused only by a later merge's re-quantization
            raise ValueError(f"calibrate must be None or 'icq', got {calibrate!r}")
        weight.validate()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype = compute_dtype
        # an ICQ weight held without calibrate="icq" lost its calibration at the next re-quantization
        self.calibrate = calibrate if calibrate is not None else ("icq" if weight.shift is not None else None)
        self._set_weight(weight)
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        calibrate: str | None = None,
    ) -> "NF4Linear":
        """Quantize ``linear.weight`` (``(out, in)``, fp32/fp16/bf16) and keep ``linear.bias`` frozen.

        Raises:
            TypeError: ``linear`` has no tensor ``weight`` or an unsupported dtype; ``double_quant`` is not a bool (a NumPy bool is one).
            ValueError: the weight is not 2-D or has NaN or inf, or ``blocksize`` is not a power of two in 32..4096.
        """
        if isinstance(linear, NF4Linear):  # its .weight is the dequantized view: quantizing it again only loses
            raise TypeError("linear is already an NF4Linear; its quantization is kept as it is")
        w = getattr(linear, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"linear must have a tensor .weight, got {type(linear).__name__}")
        if w.dim() != 2:
            raise ValueError(f"linear.weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
        if w.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"linear.weight must be fp32/fp16/bf16, got {w.dtype}")
        t = nf4_quantize(w.detach(), blocksize=blocksize, double_quant=double_quant, calibrate=calibrate)
        bias = getattr(linear, "bias", None)
        return cls(t, bias if isinstance(bias, torch.Tensor) else None, compute_dtype, calibrate)

    def _set_weight(self, t: NF4Tensor) -> None:
        self._shape = torch.Size(t.shape)
        self._orig_dtype = t.dtype
        self.blocksize = t.blocksize
        self.double_quant = t.double_quant
        self._nested_blocksize = t.nested_blocksize
        self._store_buffers((t.data, t.absmax, t.nested_absmax, t.nested_offset, t.shift))

    def _store_buffers(self, values: tuple) -> None:
        """The ``_BUFFERS`` tensors ``values`` as the layer's buffers: views of two packed storages (_Packed) where
        they fit them and the class packs, else as they are."""
        packed = _pack(values) if self._PACK else None
        # non-persistent: the state dict is written in bitsandbytes' layout instead
        for name, value in zip(_BUFFERS, values if packed is None else packed.views):
            self.register_buffer(name, value, persistent=False)
        if packed is not None:  # the buffers are views of its two storages (see _Packed)
            self.__dict__["_packed"] = packed

    def _nf4_tensor(self, data, absmax, nested_absmax, nested_offset, shift) -> NF4Tensor:
        """An :class:`NF4Tensor` of this layer's shape, dtype and blocksizes over the given quantization tensors."""
        return NF4Tensor(data=data, absmax=absmax, shape=self._shape, dtype=self._orig_dtype, blocksize=self.blocksize,
                         nested_absmax=nested_absmax, nested_offset=nested_offset, shift=shift,
                         nested_blocksize=self._nested_blocksize)

    # the weight's buffers as views of two storages (_Packed), which a compiled forward reads; ShardableNF4Linear
    # turns the uint8 ones into parameters for FSDP2 to shard instead
    _PACK = True

    def __setstate__(self, state):
        super().__setstate__(state)
        packed = self.__dict__.get("_packed")
        if packed is not None and not _holds(packed, self._buffers):
            # a pickle restores each tensor with storage of its own (a deepcopy or torch.load keeps them shared):
            # pack the restored buffers again, so that the layer holds one copy of its weight
            self._store_buffers(tuple(self._buffers.get(name) for name in _BUFFERS))
        qdata = self._buffers.get("qdata")
        if qdata is not None:
            note_device(qdata.device)  # unpickled onto a GPU (map_location): its launch tables before any trace

    def register_buffer(self, name, tensor, persistent=True):
        if name in _BUFFERS:  # a buffer replaced: the packed storages no longer hold the weight
            self.__dict__.pop("_packed", None)
        super().register_buffer(name, tensor, persistent)

    def __setattr__(self, name, value):
        if name in _BUFFERS:
            self.__dict__.pop("_packed", None)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in _BUFFERS:
            self.__dict__.pop("_packed", None)
        super().__delattr__(name)

    @property
    def quant_weight(self) -> NF4Tensor:
        """The packed weight as an :class:`~alignlab.quant.nf4.NF4Tensor` (shares storage with the buffers).

        The same object is handed out until a buffer is replaced (device moves, loading, re-quantizing):
        building it anew per forward call cost host time. Treat it as read-only.
        """
        packed = self.__dict__.get("_packed")
        if PACKED_INPUTS and torch.compiler.is_compiling():
            # two graph inputs instead of four or five (see _Packed), while the buffers are its views: a buffer put
            # in place without the module's setattr (torch.func.functional_call, accelerate) is read as it is
            if packed is not None and _holds(packed, self._buffers, storages=False):
                return self._nf4_tensor(*_views(packed.u8, packed.f32, packed.parts))
        t, b = self.__dict__.get("_quant_weight"), self._buffers
        if packed is not None and packed.u8.device != b["qdata"].device and not torch.compiler.is_compiling():
            del self.__dict__["_packed"]  # moved by `.data =` (see _holds): storages left behind, a host copy
        if (t is None or t.data is not b["qdata"] or t.absmax is not b["qabsmax"] or t.shift is not b["qshift"]
                or t.nested_absmax is not b["qnested_absmax"] or t.nested_offset is not b["qnested_offset"]
                or t.dtype is not self._orig_dtype or t.shape is not self._shape):
            t = self._nf4_tensor(*(b[name] for name in _BUFFERS))
            if not torch.compiler.is_compiling():  # a write traced inside HF checkpointing is an "unsafe side effect"
                self.__dict__["_quant_weight"] = t
        return t

    @property
    def weight(self) -> DequantizedWeight:
        """The dense weight ``(out_features, in_features)`` for model code that reads ``layer.weight``, as a
        :class:`DequantizedWeight`: shape, dtype and device for free, values dequantized on use, writes refused.
        The dtype is the quantized weight's own, or the last floating cast of the module to fp32 / fp16 / bf16
        (``.half()``, ``.to(torch.bfloat16)``: the dtype a dense weight would have now; the packed codes are
        untouched). A ``.double()`` leaves it as it was: NF4 dequantizes to fp32 at most (the layer itself still
        takes fp64 inputs).
        Under ``torch.compile`` / ``torch.export`` it is the dequantized weight as a plain tensor, made by PyTorch ops
        (Dynamo cannot build the wrapper inside a graph; model code that read ``.weight`` broke the graph): the
        compiler drops that dequantization where only the shape / dtype / device are read.
        (bitsandbytes exposes its packed codes here instead.)"""
        if torch.compiler.is_compiling():
            return nf4_dequantize(self.quant_weight, self.__dict__.get("_view_dtype"))
        return DequantizedWeight(self.quant_weight, self.__dict__.get("_view_dtype"))

    # -- the adapter contract -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # else AttributeError: 'list' object has no attribute 'requires_grad'
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        t = self.quant_weight
        bias = self.bias
        grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        key = None
        if (DECODE_LAUNCHERS and x.dtype is self.compute_dtype and x.is_cuda
                and not (grad and bias is not None and bias.requires_grad)
                and x.numel() <= DECODE_ROWS * self.in_features and not torch.compiler.is_compiling()
                and not functorch_active()):  # (a kernel cannot read a vmap'd tensor)
            # decode path: a launcher kept per input layout and stream (kernels.nf4_matmul.keep_runner), ~one launch
            # of host work; an input that needs a gradient gets it through kept_matmul (dx = dy W)
            nm = _nm or _kernels()
            key = nm.runner_key(x, bias)
            run = nm.kept_runner(t, key)
            if run:
                return nm.kept_matmul(x, run, bias, t) if grad else run(x, bias)
            if run is None:  # this layout is known not to take the decode kernels
                key = None
        if not x.is_floating_point():  # after the decode path: it takes compute_dtype inputs only
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[-1:] != (self.in_features,):  # a 0-d input too
            raise ValueError(f"x.shape[-1] must be in_features={self.in_features}, got {tuple(x.shape)}")
        in_dtype = x.dtype
        bias_c = None if bias is None else bias.to(self.compute_dtype)
        xc = x.to(self.compute_dtype)
        # the product as a function of x and bias (W frozen): saves only references to the packed weight; under a
        # torch.func transform nf4_matmul's plain ops instead (the Function has no vmap rule)
        if grad and not functorch_active():
            from alignlab.kernels.nf4_matmul import _NF4Matmul

            y = _NF4Matmul.apply(xc, bias_c, t)
        else:  # inference / generation: no autograd bookkeeping per call
            from alignlab.kernels.nf4_matmul import nf4_matmul

            y = nf4_matmul(xc, t, bias_c)
        if key is not None and bias_c is bias:  # a bias in another dtype is cast per call: no launcher
            _kernels().keep_runner(x, t, bias, key)
        return y.to(in_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out_features, in_features)`` in ``dtype`` (default ``compute_dtype``; float64 too, as the
        layer takes float64 inputs: the fp32 values, which float64 holds exactly)."""
        from alignlab.kernels.nf4_dequant import nf4_dequant

        if dtype == torch.float64:
            return nf4_dequant(self.quant_weight, torch.float32).double()
        return nf4_dequant(self.quant_weight, dtype or self.compute_dtype)

    @torch.no_grad()
    def load_dense_weight_(self, w: torch.Tensor) -> "NF4Linear":
        """Re-quantize a dense ``(out_features, in_features)`` weight into this layer, in place.

        Keeps blocksize, double quantization and calibration; used by adapter merge / PiSSA.

        Raises:
            ValueError: ``w`` has the wrong shape.  TypeError: unsupported dtype.
        """
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (self.out_features, self.in_features):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"w must have shape ({self.out_features}, {self.in_features}), got {got}")
        t = nf4_quantize(w.detach().to(self.qdata.device), blocksize=self.blocksize,
                         double_quant=self.double_quant, calibrate=self.calibrate)
        t.dtype = self._orig_dtype
        self._set_weight(t)
        return self

    @torch.no_grad()
    def load_quant_weight_(self, t: NF4Tensor) -> "NF4Linear":
        """Put a packed weight back in place (e.g. :attr:`quant_weight` saved earlier); no re-quantization.

        Raises:
            TypeError: ``t`` is not an NF4Tensor.  ValueError: its shape differs from the layer's, or its buffers
            do not fit its shape and blocksize (:meth:`NF4Tensor.validate`: e.g. codes that are not uint8).
        """
        if not isinstance(t, NF4Tensor):
            raise TypeError(f"t must be an NF4Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (self.out_features, self.in_features):
            raise ValueError(f"t must have shape ({self.out_features}, {self.in_features}), got {tuple(t.shape)}")
        t.validate()  # a broken tensor is refused here, not at the next forward
        self._set_weight(t.to(self.qdata.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    # -- device moves keep the quantization buffers' dtypes ---------------------------------------
    def _apply(self, fn, recurse=True):
        # .to() out of meta raises here, as torch does; a floating cast (.half(), .to(bf16)) shows in its dtype
        probe = fn(torch.empty(0, dtype=torch.float64, device=self.qdata.device))
        # the quantization tensors held as buffers (ShardableNF4Linear holds its uint8 ones as parameters, which
        # nn.Module._apply moves and never casts)
        saved = {name: self._buffers[name] for name in _BUFFERS if name in self._buffers}
        for name in saved:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        except BaseException:  # a failed move leaves the layer as it was, packed weight included
            self._buffers.update(saved)
            raise

        def moved(buf):
            if buf is not None and buf.is_meta:  # to_empty: storage without values, for a state dict to fill
                buf = torch.empty_like(buf, device=probe.device)
            return None if buf is None else buf.to(probe.device)

        packed = self.__dict__.get("_packed")
        if packed is not None and _holds(packed, saved):
            # the two storages move (one copy each) and the buffers are their views again
            u8, f32 = moved(packed.u8), moved(packed.f32)
            if u8 is not packed.u8 or f32 is not packed.f32:
                packed = _repacked(u8, f32, packed.parts)
                self.__dict__["_packed"] = packed
            self._buffers.update(zip(_BUFFERS, packed.views))
        else:
            self.__dict__.pop("_packed", None)
            for name, buf in saved.items():
                self._buffers[name] = moved(buf)
        note_device(probe.device)  # this GPU's launch tables, known before any torch.compile trace
        if probe.dtype in SUPPORTED_DTYPES:  # what .weight reports from now on (the codes keep their dtypes)
            self._view_dtype = probe.dtype
        return self

    # -- bitsandbytes / transformers state dict ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        t = self.quant_weight
        shift = t.shift
        # the packed buffers are views of two shared storages (_Packed): entries of one storage in a state dict
        # read as tied copies to savers (accelerate's save_model dropped every weight.absmax); the small scale
        # pieces get storages of their own, the codes stay a view (no copy of the large piece; safetensors'
        # save_model, which wants each tensor to cover its whole storage, still refuses the codes' view)
        own = "_packed" in self.__dict__
        for k, v in nf4_to_bnb_state_dict(dataclasses.replace(t, shift=None), prefix=f"{prefix}weight").items():
            v = v if keep_vars else v.detach()
            if own and k in (f"{prefix}weight.absmax", f"{prefix}weight.nested_absmax"):
                v = v.clone()
            destination[k] = v
        if shift is not None:
            destination[f"{prefix}{_ICQ_KEY}"] = shift.clone() if own else shift

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        mine = {k: v for k, v in mine.items() if k == "weight" or k.startswith("weight.")}
        for k in mine:  # the keys this layer reads; another weight.* key (a typo, fp4's state) stays unexpected
            if k in _WEIGHT_KEYS and prefix + k in unexpected_keys:
                unexpected_keys.remove(prefix + k)
        if "weight" not in mine:
            missing_keys.append(prefix + "weight")
            return
        try:
            t = nf4_from_bnb_state_dict(mine, prefix="weight")
        except ValueError as e:
            error_msgs.append(f"{prefix}weight: {e}")
            return
        if tuple(t.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{prefix}weight: checkpoint has shape {tuple(t.shape)}, "
                f"this layer expects ({self.out_features}, {self.in_features})"
            )
            return
        if _ICQ_KEY in mine:
            t.shift = mine[_ICQ_KEY]
            try:  # the shifts came after nf4_from_bnb_state_dict's checks: one float32 per block, checked here
                t.validate()
            except ValueError as e:
                error_msgs.append(f"{prefix}{_ICQ_KEY}: {e}")
                return
        # re-quantization (merges) keeps the calibration of the weight held, as it keeps its blocksize
        self.calibrate = "icq" if t.shift is not None else None
        dev = self.qdata.device
        if dev.type == "meta" and local_metadata.get("assign_to_params_buffers", False):
            dev = t.data.device  # assign=True into a layer built on meta: keep the checkpoint's tensors
        self._set_weight(t.to(dev))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(p == name or p == last or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _keep_in_fp32(model: nn.Module) -> tuple[str, ...]:
    """Names a ``transformers`` model (or any of its sub-models) asks to keep in full precision."""
    names = []
    for m in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            value = getattr(type(m), attr, None)
            if isinstance(value, (list, tuple, set)):
                names.extend(v for v in value if isinstance(v, str))
    return tuple(dict.fromkeys(names))


def _kept(name: str, keep: Iterable[str]) -> bool:
    """Whether module ``name`` is, or sits inside, an entry of ``keep`` (dotted segments; a trailing
    ``.weight`` / ``.bias`` names the module holding it), the way ``transformers`` reads those lists."""
    dotted = f".{name}."
    for entry in keep:
        entry = entry.removesuffix(".weight").removesuffix(".bias")
        if entry and f".{entry}." in dotted:
            return True
    return False


def _last_parameter_module(model: nn.Module) -> set[str]:
    """The module holding a ``transformers`` model's last parameter, which ``transformers`` + ``bitsandbytes`` keep
    dense besides the output embeddings (``get_keys_to_not_convert``): a classifier's head, e.g. a reward model's
    ``score``. Their rule exactly: the name loses only a ``.weight`` suffix, so a last parameter that is a bias (BERT's
    ``classifier.bias``) names no module and the head is quantized there too, as in their 4-bit checkpoints."""
    if not callable(getattr(model, "get_output_embeddings", None)):  # not a transformers model
        return set()
    last = None
    for last, _ in model.named_parameters():
        pass
    return set() if last is None or not last.endswith(".weight") else {last.removesuffix(".weight")}


def _untie_quantized(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Warn where a weight to quantize is tied to a tensor of another module (``quantize_head=True`` on a model
    whose ``lm_head`` shares the input embedding): the NF4 layer holds its own copy, so the tie is gone, and
    ``config.tie_word_embeddings`` is set to False, else ``transformers``' ``tie_weights()`` would hang the dense
    table on the NF4 layer as an unused ``weight`` parameter."""
    owners = parameter_owners(model)
    done = {id(m) for _, m in targets}
    tied = []
    for name, module in targets:
        weight = getattr(module, "weight", None)
        others = [o for o in owners.get(id(weight), []) if o.rpartition(".")[0] not in (name, "")
                  and id(model.get_submodule(o.rpartition(".")[0])) not in done]
        if others:
            tied.append(f"{name}.weight (tied to {others})")
    if not tied:
        return
    if untie_changes_outputs(model):
        raise ValueError(f"quantize_model: {', '.join(tied)}: an NF4 copy unties it and sets config.tie_word_embeddings "
                         f"= False, and {type(model).__name__}.forward reads that flag (it rescales the decoder output "
                         "only while tied), so the model would compute other logits; leave the head dense "
                         "(quantize_head=False)")
    warnings.warn(f"quantize_model: {', '.join(tied)}: the NF4 layer gets its own copy, so the tie is broken (the "
                  "other module keeps the dense tensor, and config.tie_word_embeddings is set to False)", stacklevel=3)
    configs = [getattr(model, "config", None)]
    get_text = getattr(configs[0], "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())
    for config in configs:
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _no_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: its presence keeps ``nn.TransformerEncoderLayer`` off its fused
    inference path, which hands ``linear1.weight`` / ``linear2.weight`` to one native kernel (an NF4Linear
    has no dense ``.weight``: every eval forward raised AttributeError)."""
    return None


def _keep_encoder_layers_off_fast_path(model: nn.Module) -> None:
    for m in model.modules():
        if (isinstance(m, nn.TransformerEncoderLayer)
                and any(isinstance(getattr(m, n, None), NF4Linear) for n in ("linear1", "linear2"))
                and _no_fast_path not in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(_no_fast_path)


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = (),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    calibrate: str | None = None,
    quantize_head: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` leaf of ``model`` by an :class:`NF4Linear`, in place; returns ``model``.

    The fused 3-D expert weights of ``transformers`` 5.x mixture-of-experts blocks (``mlp.experts``
    modules of Mixtral, Qwen3-MoE, gpt-oss, ...) are quantized too: each experts module becomes an
    :class:`~alignlab.quant.experts.NF4Experts`, every expert's ``(out, in)`` matrix quantized as
    bitsandbytes would quantize that 2-D weight (``skip=["experts"]`` keeps them dense).

    ``transformers``' ``Conv1D`` leaves (GPT-2; weight stored transposed, ``(in, out)``) are
    quantized too, as ``transformers`` + ``bitsandbytes`` do: the ``NF4Linear`` holds the
    ``(out, in)`` matrix, so it computes the same map and its codes are those of that matrix.

    The output head (``model.get_output_embeddings()`` for HF models, else a module named
    ``lm_head``) stays in full precision, as in QLoRA, unless ``quantize_head=True``; so does, in a
    ``transformers`` model, the module of its last ``….weight`` parameter (a classifier's ``score``: a reward
    model's head), as ``transformers`` + ``bitsandbytes`` keep it, so their 4-bit checkpoints load. So do the
    modules a ``transformers`` model lists in ``_keep_in_fp32_modules`` (T5's ``wo``, whose forward
    reads ``wo.weight.dtype``), as ``transformers`` + ``bitsandbytes`` leave them. ``skip``
    names further modules to leave alone (full dotted name, last component, dotted suffix or an
    ``fnmatch`` pattern); each must match at least one ``nn.Linear``.

    Quantize before adding adapters: a model that already holds adapter layers is refused.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``compute_dtype`` is not fp32, fp16 or bf16; ``skip`` is not
            a name or names; ``double_quant`` or
            ``quantize_head`` is not a bool (a NumPy bool is one); ``blocksize`` is not an int (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
        ValueError: bad ``blocksize``; a ``skip`` name that matches no linear layer or experts module;
            adapters present; ``calibrate`` with expert weights to quantize (ICQ is for linears only); a weight
            with NaN or inf (the message starts with the module's name).
        A refusal (these errors, and an experts module :meth:`NF4Experts.from_experts` refuses) comes before
        any module is replaced: the model is left as it was.
    """
    from alignlab.adapters.base import AdapterLayer, is_conv1d
    from alignlab.adapters.inject import _output_head_names  # the head "all-linear" leaves out, too
    from alignlab.quant.experts import NF4Experts, is_fused_experts

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    double_quant = as_bool(double_quant, "double_quant")  # a truthy string like "no" would switch it on
    quantize_head = as_bool(quantize_head, "quantize_head")
    _check_blocksize(blocksize)  # here, not in the first layer's quantization (named after that layer there)
    check_compute_dtype(compute_dtype)  # likewise; the tied head was untied before the first layer refused it
    if calibrate not in (None, "icq"):  # likewise
        raise ValueError(f"calibrate must be None or 'icq', got {calibrate!r}")
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, Iterable):
        raise TypeError(f"skip must be a module name or an iterable of names, got {skip!r}")
    skip = tuple(skip)
    if not all(isinstance(p, str) for p in skip):
        raise TypeError(f"skip must hold module names (strings), got {skip!r}")
    adapted = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if adapted:
        raise ValueError(f"model already has adapter layers (e.g. {adapted[0]!r}); call quantize_model before "
                         "inject, so that the adapters wrap the NF4 layers")
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear or is_conv1d(m)]
    experts = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    # a module reachable under several names (one layer shared by two blocks) is one module: it is quantized
    # once, only if every one of its names qualifies, and the NF4 layer is put back under all of them
    aliases = module_names(model)
    unmatched = [p for p in skip if not any(_matches(n, (p,)) for _, m in linears + experts for n in aliases[id(m)])]
    if unmatched:
        raise ValueError(f"skip: {unmatched} match no nn.Linear, Conv1D or experts module of the model "
                         "(names, suffixes or fnmatch patterns)")
    keep = _keep_in_fp32(model)

    def leave(module: nn.Module, dense_names: set) -> bool:
        return any(n in dense_names or _matches(n, skip) or _kept(n, keep) for n in aliases[id(module)])

    experts = [(name, m) for name, m in experts if not leave(m, set())]
    if experts and calibrate is not None:
        raise ValueError(f"calibrate={calibrate!r} is not supported for expert weights (e.g. {experts[0][0]!r}); "
                         "pass skip=['experts'] to keep them dense, or calibrate=None")
    head = set() if quantize_head else _output_head_names(model) | _last_parameter_module(model)
    targets = [(name, m) for name, m in linears if not leave(m, head)]
    # everything is checked before anything is replaced: a refused module leaves the model as it was
    for name, module in targets + experts:
        try:
            if is_fused_experts(module):
                NF4Experts.check_convertible(module)
            else:
                check_quantizable(module.weight, "weight")
        except (TypeError, ValueError) as e:  # e.g. a NaN in one weight of many: say which
            raise type(e)(f"{name}: {e}") from e
    _untie_quantized(model, targets)
    for name, module in targets:
        lin = module
        if is_conv1d(lin):  # quantize the (out, in) matrix; from_linear reads only .weight and .bias
            lin = SimpleNamespace(weight=lin.weight.detach().T.contiguous(), bias=lin.bias)
        try:
            q = NF4Linear.from_linear(lin, blocksize=blocksize, double_quant=double_quant,
                                      compute_dtype=compute_dtype, calibrate=calibrate)
        except ValueError as e:  # e.g. a NaN in one weight of many: say which (and keep an ArgumentTypeError one)
            raise type(e)(f"{name}: {e}") from e
        put_module(model, aliases[id(module)], q)
    for name, module in experts:
        try:
            q = NF4Experts.from_experts(module, blocksize=blocksize, double_quant=double_quant,
                                        compute_dtype=compute_dtype)
        except ValueError as e:
            raise type(e)(f"{name}: {e}") from e
        put_module(model, aliases[id(module)], q)
    _keep_encoder_layers_off_fast_path(model)
    return model
