"""LoRA: low-rank adaptation of a frozen linear layer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685::

    y = W₀x + b + s·B A dropout(x),   A: (r, in), B: (out, r)

with ``s = α / r``, or ``s = α / √r`` for rsLoRA (Kalajdzievski, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732).

Initialisations (``init=``):

* ``"kaiming"`` (default): ``A ~ kaiming_uniform(a=√5)``, ``B = 0`` -- the adapted
  layer starts equal to the base.
* ``"gaussian"``: ``A ~ N(0, 1/r²)``, ``B = 0``.
* ``"pissa"`` / ``"pissa_niter_K"``: PiSSA (Meng et al., arXiv 2404.02948). With
  ``W = U S Vᵀ``: ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ`` and the base keeps the
  residual ``W − s·BA``; ``_niter_K`` uses a randomized SVD with K subspace iterations.
* ``"olora"``: OLoRA (Büyükakyüz, arXiv 2406.01775). With ``W = QR``: ``B = Q_r``,
  ``A = R_r`` and the base keeps ``W − s·BA``.

PiSSA and OLoRA rewrite the base weight, so the layer output is unchanged at
initialisation either way. With ``use_dora=True`` the adapter is DoRA (see
``dora.py``); :class:`DoRALinear` is the same layer with that default.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from alignlab._checks import (ArgumentTypeError, as_bool, check_finite_number, check_number_in_range,
                              check_positive_int, check_positive_number, is_int)
from alignlab.adapters.base import (AdapterLayer, check_adapter_name, dense_weight, is_quantized, merge_weight,
                                    refuse_float16_merge, set_dense_weight_)
from alignlab.adapters.dora import (dora_delta, dora_merged_weight, dora_unmerged_weight, dora_weight_norm,
                                   kept_merge_norm)
from alignlab.adapters import fused
from alignlab.adapters.fused import (_autocast_dtype, _rows, dora_linear, dora_norm, functorch_active, lora_linear,
                                     dora_linear_op, lora_linear_op)
from alignlab.kernels.nf4_matmul import runner_key
from alignlab.quant import linear as _qlinear
from alignlab.quant.linear import NF4Linear

INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def _init_dtype(w: torch.Tensor, a: torch.Tensor) -> torch.dtype:
    """The dtype of PiSSA's / OLoRA's factorisation and residual: fp32, or fp64 where the base or the adapter is (an
    fp32 residual left a float64 model's output ~1e-7 off its base at initialisation)."""
    return torch.promote_types(torch.promote_types(w.dtype, a.dtype), torch.float32)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``α/r`` (LoRA) or ``α/√r`` (rsLoRA).

    Raises ``ValueError`` unless ``r`` is a positive integer and ``alpha`` a finite number, ``TypeError``
    if ``use_rslora`` is not a bool (``r=0`` divided by zero, a negative ``r`` flipped the sign of the update);
    an ``r`` or ``alpha`` of the wrong kind (a str, a bool, a float ``r``) raises
    :class:`~alignlab.ArgumentTypeError`, which is both.
    """
    r = check_positive_int(r, "r")
    check_finite_number(alpha, "alpha")  # alpha kept as given: a NumPy scalar divides as before
    return alpha / math.sqrt(r) if as_bool(use_rslora, "use_rslora") else alpha / r


def lora_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA branch ``s·B A x``: ``x (..., in)``, ``a (r, in)``, ``b (out, r)`` → ``(..., out)``."""
    return F.linear(F.linear(x, a), b) * scale


def _check_init(init: str) -> None:
    if not isinstance(init, str):
        raise TypeError(f"init must be a string, one of {INITS}, got {init!r}")
    if init in ("kaiming", "gaussian", "pissa", "olora") or _PISSA_NITER.fullmatch(init):
        return
    raise ValueError(f"init must be one of {INITS} (K an integer), got {init!r}")


@contextlib.contextmanager
def _fixed_draw(device: torch.device):
    """The CPU's and ``device``'s (CUDA) global RNG seeded with 0 inside, both restored after."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(0)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(0)
        yield


def check_adapter_dtype(dtype) -> None:
    """``TypeError`` unless ``dtype`` is None or a floating-point ``torch.dtype`` (factors must take gradients)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"adapter_dtype must be None or a floating-point torch.dtype, got {dtype!r}")


def _check_rank(r: int) -> int:
    """``r`` as a Python int (NumPy integers accepted, bools refused)."""
    if not is_int(r):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    return int(r)


def check_dropout(dropout: float) -> float:
    """``dropout`` as a Python float; ``ValueError`` unless it is a real number in [0, 1) (a bool is not; the wrong
    kind raises :class:`~alignlab.ArgumentTypeError`, which is both). Here, not in ``config``, which imports this
    module: the layers and the configs share it."""
    return check_number_in_range(dropout, "dropout", 0, 1, high_open=True)


def _device_error(x: torch.Tensor, name: str, device: torch.device) -> ValueError:
    """The error for an input on another device than adapter ``name``'s factors."""
    if device.type == "meta":  # e.g. accelerate's cpu_offload: the base weight was on meta when inject built these
        return ValueError(f"adapter {name!r} has its weights on the meta device (its base layer's weight was on meta "
                          "when the adapter was made: an offloaded or not yet loaded model); add adapters to a model "
                          "whose weights are loaded, or give the adapter real tensors (to_empty + reinit)")
    return ValueError(f"input is on {x.device} but adapter {name!r} is on {device}; move the model or the input")


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own, or global module hooks): what ``nn.Module.__call__``
    checks before its fast path."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_forward_hooks or _module_hooks._global_backward_pre_hooks
                or _module_hooks._global_backward_hooks)


def _factor(factors: nn.ModuleDict, name: str) -> torch.Tensor:
    """``factors[name].weight`` by dictionary reads where it is a plain parameter (the fused path's per-call reads:
    ``ModuleDict.__getitem__`` and ``nn.Module.__getattr__`` cost host time per call), else by attribute (a
    parametrized weight, say)."""
    layer = factors._modules[name]
    weight = layer._parameters.get("weight")
    return layer.weight if weight is None else weight


class LoRALinear(AdapterLayer):
    """A linear layer (``nn.Linear`` or a quantized linear such as ``NF4Linear``) with LoRA adapters.

    ``LoRALinear(base, r, alpha)`` computes ``y = base(x) + s·B A dropout(x)``; several named
    adapters can live side by side (``add_adapter``), any subset active at once.

    Args:
        base: the layer to adapt, ``(..., in) -> (..., out)``; it is frozen.
        r: rank (> 0).
        alpha: scaling numerator (``s = α/r``, or ``α/√r`` with ``use_rslora``).
        dropout: dropout probability on the adapter input.
        init: one of ``"kaiming"``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``.
        use_rslora: rank-stabilised scaling.
        use_dora: make this adapter DoRA (magnitude + direction).
        adapter_name: name of the first adapter.
        adapter_dtype: dtype of ``A``/``B``/``m``; default fp32 for 16-bit or quantized bases
            (as PEFT does), else the base dtype.
        exact_fp32: run the adapter branch in fp32 and round once into the output (slower). By
            default (False) the adapter math follows the activations, as under ``torch.autocast``:
            fp32 factors are cast to the compute dtype per call (fused path, fp32 accumulation,
            fp32 gradients; see :mod:`alignlab.adapters.fused`). A plain attribute: flip it any time.
    Raises:
        TypeError/ValueError: bad rank, alpha, dropout or init; a base without ``in_features``; ``use_dora`` or a
            PiSSA/OLoRA init on a tied head whose trainable token rows sit under this layer (ValueError).
        In ``forward`` (with an adapter active): TypeError for a non-floating input, ValueError for an
        input whose last dimension is not ``in_features``.
    """

    mergeable = True
    linear_base = True
    #: opt-in: keep the compute-dtype copies of A and B (and DoRA's row norm) between calls while the
    #: factors' version counters and addresses stay the same. Off by default because some writes are
    #: invisible to both: ``p.data.add_(...)`` / ``p.data.copy_(...)`` (common in hand-written update
    #: loops) and FSDP2's in-place refill of gathered parameters leave the version unchanged at the same
    #: address, so a cached cast would silently be stale. Safe when the factors change only through
    #: optimizer steps, ``copy_`` under ``no_grad``, or replacement; it saves two casts per call.
    cache_casts = False

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_name: str = "default",
        adapter_dtype: torch.dtype | None = None,
        exact_fp32: bool = False,
    ) -> None:
        super().__init__(base)
        self.exact_fp32 = as_bool(exact_fp32, "exact_fp32")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.init: dict[str, str] = {}
        self._merge_norms: dict[str, torch.Tensor] = {}
        # fused path, per adapter: A and B in the compute dtype, and DoRA's row norm, kept while the parameters
        # (and the base weight) are unchanged -- the version counters say so -- instead of re-made every call
        self._casts: dict[str, tuple] = {}
        self._norms: dict[str, tuple] = {}
        self._decode_runs: dict[tuple, tuple] = {}  # (adapter, input layout) -> kept decode launchers (_decode_run)
        self.add_adapter(adapter_name, r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
        self.active_adapters = [adapter_name]

    # -- adapters -------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        """Add a named adapter (inactive until listed in ``active_adapters``)."""
        check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        r = _check_rank(r)
        alpha = check_positive_number(alpha, "alpha")
        check_dropout(dropout)
        use_rslora = as_bool(use_rslora, "use_rslora")
        use_dora = as_bool(use_dora, "use_dora")
        check_adapter_dtype(adapter_dtype)
        _check_init(init)
        if self.merged:
            raise ValueError("cannot add an adapter while adapters are merged; unmerge first")
        rewrites = init in ("pissa", "olora") or init.startswith("pissa_niter_")
        if isinstance(self.base_layer, AdapterLayer) and (use_dora or rewrites):  # trainable token rows under a head
            raise ValueError(f"{'use_dora=True' if use_dora else f'init={init!r}'} is not supported on a head whose "
                             "trainable token rows sit under the LoRA (it would read the frozen table, not the trained "
                             "rows); use plain LoRA with init 'kaiming' or 'gaussian' there")
        if rewrites:
            if is_quantized(self.base_layer):
                raise ValueError(f"init={init!r} rewrites the base weight and is not supported on a quantized base")
            if self.adapter_names():
                raise ValueError(f"init={init!r} rewrites the base weight; it must be the first adapter on a layer")

        weight = dense_weight(self.base_layer)
        if adapter_dtype is None:
            adapter_dtype = weight.dtype if weight.dtype == torch.float32 or weight.dtype == torch.float64 else torch.float32
            if is_quantized(self.base_layer):
                adapter_dtype = torch.float32
        device = weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name], self.use_rslora[name], self.init[name] = r, float(alpha), use_rslora, init
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        self._initialise(name, init)
        if use_dora:
            w = dense_weight(self.base_layer)
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            with torch.no_grad():
                m = dora_weight_norm(w, a, b, self.scaling[name]).to(adapter_dtype)
            self.lora_magnitude_vector[name] = nn.Parameter(m)

    def _initialise(self, name: str, init: str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        r, s = self.r[name], self.scaling[name]
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
                nn.init.zeros_(b)
            elif init == "olora":
                w = dense_weight(self.base_layer)
                q, rr = torch.linalg.qr(w.to(_init_dtype(w, a)))
                b_new, a_new = q[:, :r], rr[:r]
                self._set_factors_and_residual(name, a_new, b_new, w)
            else:  # PiSSA
                w = dense_weight(self.base_layer)
                niter = _PISSA_NITER.fullmatch(init)
                if niter:
                    # a fixed draw: load_adapter re-runs this init on the original base and must form the same residual
                    with _fixed_draw(w.device):
                        u, sv, v = torch.svd_lowrank(w.to(_init_dtype(w, a)), q=r, niter=int(niter.group(1)))
                    vh = v.T
                else:
                    u, sv, vh = torch.linalg.svd(w.to(_init_dtype(w, a)), full_matrices=False)
                root = (sv[:r] / s).sqrt()
                self._set_factors_and_residual(name, root[:, None] * vh[:r], u[:, :r] * root, w)

    def _set_factors_and_residual(self, name: str, a_new, b_new, w) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = _init_dtype(w, a)
        if a_new.shape != a.shape:  # rank larger than min(in, out): pad the extra rows/cols with zeros
            a_pad, b_pad = torch.zeros_like(a, dtype=dtype), torch.zeros_like(b, dtype=dtype)
            a_pad[: a_new.shape[0]], b_pad[:, : b_new.shape[1]] = a_new, b_new
            a_new, b_new = a_pad, b_pad
        a.copy_(a_new)
        b.copy_(b_new)
        residual = w.to(dtype) - self.scaling[name] * (b.to(dtype) @ a.to(dtype))
        set_dense_weight_(self.base_layer, residual.to(w.dtype))

    def delete_adapter(self, name: str) -> None:
        self._check_name(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        for store in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        for store in (self.r, self.alpha, self.scaling, self.use_rslora, self.init, self._casts, self._norms):
            store.pop(name, None)
        for key in [k for k in self._decode_runs if k[0] == name]:
            del self._decode_runs[key]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·B A`` in fp32 (fp64 for fp64 factors), ``(out, in)`` (plain LoRA; for DoRA see ``merge``)."""
        self._check_name(name)
        b, a = self.lora_B[name].weight, self.lora_A[name].weight
        dt = torch.promote_types(b.dtype, torch.float32)  # an fp64 model merged through fp32 lost ~1e-8 per weight
        return self.scaling[name] * (b.to(dt) @ a.to(dt))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # submodules are read from self._modules on this path: an attribute read of one (nn.Module.__getattr__)
        # costs 1-2 us of host time, and decode / small-batch calls are host-bound
        mods = self._modules
        if self.disabled:
            return mods["base_layer"](x)
        factors = mods["lora_A"]._modules  # (ModuleDict's __contains__ / __getitem__ are Python calls)
        active = self.active_adapters
        if len(active) == 1 and not self.merged_adapters:  # the common case, without building a list
            names = active if active[0] in factors else ()
        else:
            names = [n for n in active if n not in self.merged_adapters and n in factors]
        if not names:
            return mods["base_layer"](x)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"input must be a floating-point tensor, got {got}")
        n_in = factors[names[0]].in_features  # a plain attribute: cheaper than the in_features property
        if x.shape[-1:] != (n_in,):  # a 0-d input too
            raise ValueError(f"input.shape[-1] must be in_features={n_in}, got shape {tuple(x.shape)}")
        in_dtype = None
        # torch.func transforms (grad, vmap: per-sample gradients) cannot transform the fused functions: plain path.
        # torch.compile never traces the fused autograd functions (with torch 2.11 it dropped their gradients, seen
        # on an H200): from fused.OP_MIN_ROWS rows the layer runs as the opaque custom ops of lora_linear_op /
        # dora_linear_op there, the plain path below that
        if len(names) == 1 and not functorch_active():
            dtype = self._fused_dtype(x, names[0])
            if dtype is not None:
                if not torch.compiler.is_compiling():
                    return self._fused(x, names[0], dtype)
                if self._op_applies(x, dtype, names[0]):
                    return self._fused(x, names[0], dtype, traced=True)
                if dtype != x.dtype:  # an NF4 base computing in another dtype than x's: as the fused path
                    in_dtype, x = x.dtype, x.to(dtype)  # does, the plain ops below run in that dtype, then one cast
        # the plain ops stay in this frame (not a helper's): a traced call that breaks the graph inside them (a Triton
        # launch under the interpreter) resumes here as before, with the same ops in and out of the graph
        for name in names:
            device = self.lora_A[name].weight.device
            if device != x.device:
                raise _device_error(x, name, device)
        out = self.base_layer(x)
        for name in names:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if not self.exact_fp32 and a.dtype != out.dtype:  # autocast semantics: the factors come to the activations
                a, b = a.to(out.dtype), b.to(out.dtype)
            xa = self.lora_dropout[name](x.to(a.dtype))
            if self.is_dora(name):
                out = (out + self._dora(x, xa, out, name, a, b)).to(out.dtype)
            elif a.dtype == out.dtype:  # one GEMM adds s·(xA)Bᵀ into out in its epilogue: no extra pass
                flat = _rows(out)  # not reshape(-1, out): a layer may have no outputs
                # in out's dtype: under autocast the addmm runs in 16 bits, and a base that returns its input's
                # dtype (NF4Linear) keeps it, as on the fused path
                out = torch.addmm(flat, F.linear(xa, a).reshape(-1, a.shape[0]), b.T,
                                  alpha=self.scaling[name]).view(out.shape).to(out.dtype)
            else:
                out = (out + lora_forward(xa, a, b, self.scaling[name])).to(out.dtype)  # add in fp32, round once
        return out if in_dtype is None else out.to(in_dtype)

    def _fused_dtype(self, x: torch.Tensor, name: str) -> torch.dtype | None:
        """The compute dtype of the fused path for this call, or None where it does not apply.

        It applies to one active adapter without active dropout on a plain ``nn.Linear`` whose weight
        has ``x``'s dtype, or on an ``NF4Linear`` (compute dtype = its ``compute_dtype``), either without
        module hooks (its own or global ones: pruning's weight pre-hook, forward / backward hooks); with
        ``exact_fp32`` only where that compute dtype is at least fp32. Under ``torch.autocast`` an
        ``nn.Linear`` (and an ``NF4Linear``'s product) computes in the autocast dtype, not its weight's
        (compute) dtype: where that differs, the plain path runs, so that the layer follows autocast as the
        base alone would (its output dtype included).
        """
        mods = self._modules  # as in forward
        if self.training and not isinstance(mods["lora_dropout"][name], nn.Identity):
            return None
        base = mods["base_layer"]
        if _has_hooks(base):  # the fused path reads the base's weight without calling it: its hooks would not run
            return None
        if type(base) is nn.Linear:
            dtype = base.weight.dtype
            if x.dtype != dtype:
                return None
        elif isinstance(base, NF4Linear):  # and its FSDP2-shardable form (alignlab.quant.fsdp)
            dtype = base.compute_dtype
        else:
            return None
        autocast = _autocast_dtype(x)  # None off autocast, on a device without it, and for fp64 (left alone)
        if autocast is not None and autocast != dtype:
            return None
        if self.exact_fp32 and dtype.itemsize < 4:
            return None
        return dtype

    def _fused(self, x: torch.Tensor, name: str, dtype: torch.dtype, traced: bool = False) -> torch.Tensor:
        """The fused path; ``traced``: as the custom ops of :func:`lora_linear_op` / :func:`dora_linear_op`
        (torch.compile, see :meth:`_op_applies`), which cast the factors and make the norm themselves."""
        mods = self._modules  # as in forward
        base, a, b = mods["base_layer"], _factor(mods["lora_A"], name), _factor(mods["lora_B"], name)
        if not (x.get_device() == a.get_device() if x.is_cuda and a.is_cuda else x.device == a.device):
            raise _device_error(x, name, a.device)
        dense = type(base) is nn.Linear
        weight = base.weight if dense else base.quant_weight
        scale = self.scaling[name]
        magnitudes = mods["lora_magnitude_vector"]
        dora = name in getattr(magnitudes, "_keys", magnitudes)  # (ParameterDict.__contains__ is a Python call)
        if traced:
            if dora:
                return dora_linear_op(x, weight, base.bias, a, b, scale, self.lora_magnitude_vector[name], dtype)
            return lora_linear_op(x, weight, base.bias, a, b, scale, dtype)
        bias = base.bias
        if (self._decode_runs and x.is_cuda and not dora and not self.cache_casts and x.dtype is dtype
                and (bias is None or not bias.requires_grad)
                and fused.DECODE_KERNELS and fused.DECODE_RUNNERS and _qlinear.DECODE_LAUNCHERS):
            # a runner kept for this layout: its key (rows, strides, dtype, device, stream, Triton mode) and entry
            # (these factors at these addresses: the rank) imply what takes_decode_kernels and _decode_run check
            # below, so the lookup comes first (a decode call's host time is the point)
            run = self._kept_decode_run((name, runner_key(x, bias)), weight, bias, a, b, scale)
            if run is None:  # a layout kept as taking no runner: what _decode_run's None gives below
                return lora_linear(x, weight, bias, a, b, scale, dtype)
            if run:
                if not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                                     or dense and weight.requires_grad)):
                    return run(x)[0]
                if not (dense and weight.requires_grad):  # (a dense base weight that trains: the GEMMs below)
                    return fused.decode_apply(x, weight, a, b, scale, run)
        if not dora and not self.cache_casts and fused.takes_decode_kernels(x, a, dtype):
            # decode sizes (generation; small-batch calls with a gradient too): the decode kernels read the factors
            # as they are, so no cast is made for them; over an NF4 base through launchers kept per input layout
            # (DECODE_RUNNERS). A call whose gradient they cannot give (an input in another dtype, a base weight or
            # bias that trains) takes the cast below and the GEMMs
            dense_w = weight if dense else None
            grad = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or (
                dense_w is not None and dense_w.requires_grad) or (bias is not None and bias.requires_grad))
            if not grad or fused.decode_grad_applies(x, dense_w, bias, dtype):
                run = self._decode_run(x, name, base, weight, a, b, scale, dtype) if x.is_cuda else None
                if run is None:
                    return lora_linear(x, weight, bias, a, b, scale, dtype)
                return fused.decode_apply(x, weight, a, b, scale, run) if grad else run(x)[0]
        cast = self._cast_factors(name, a, b, dtype, scale, scaled=not dora)
        if dora:  # without cache_casts dora_linear makes the norm and g, s·g, s·g ⊙ B by one kernel
            norm = self._row_norm(name, weight, a, b, scale, dtype, cast) if self.cache_casts else None
            return dora_linear(x, weight, base.bias, a, b, scale, self.lora_magnitude_vector[name], dtype,
                               cast=cast, norm=norm)
        return lora_linear(x, weight, base.bias, a, b, scale, dtype, cast=cast)

    def _decode_run(self, x: torch.Tensor, name: str, base: nn.Module, weight, a: torch.Tensor, b: torch.Tensor,
                    scale: float, dtype: torch.dtype):
        """The kept :func:`~alignlab.adapters.fused.decode_runner` of adapter ``name`` for ``x``'s layout over an
        NF4 or dense base (made at the layout's first call), or None where none applies (an input in another dtype, a
        bias in another dtype or one that trains): up to 16 layouts per adapter, keyed as the runner says (input
        layout, the factors as objects, addresses and dtypes, the packed or dense weight, the bias, the scale); a
        device move or cast of the layer drops them (``_apply``). The call that builds a runner gets one that returns
        the product made while binding the launchers (this very ``x``'s), so that call makes each product once."""
        bias = base.bias
        if (not fused.DECODE_RUNNERS or not _qlinear.DECODE_LAUNCHERS or x.dtype is not dtype
                or (bias is not None and (bias.dtype is not dtype or bias.requires_grad))):
            return None
        key = (name, runner_key(x, bias))
        run = self._kept_decode_run(key, weight, bias, a, b, scale)
        return self._build_decode_run(x, key, weight, bias, a, b, scale) if run is False else run

    def _kept_decode_run(self, key: tuple, weight, bias, a: torch.Tensor, b: torch.Tensor, scale: float):
        """The runner kept for ``key`` (None where that layout takes no runner) while it was made for these very
        factors, packed weight, bias and scale; False where none is kept for them."""
        hit = self._decode_runs.get(key)
        if (hit is not None and hit[0] is a and hit[1] is b and hit[2] is weight and hit[3] is bias
                and hit[4] == scale and hit[5] == (a.data_ptr(), b.data_ptr(), a.dtype, b.dtype)):
            return hit[6]
        return False

    def _build_decode_run(self, x: torch.Tensor, key: tuple, weight, bias, a: torch.Tensor, b: torch.Tensor,
                          scale: float):
        """:meth:`_decode_run` where nothing is kept for ``key`` yet: builds and keeps the runner."""
        runs = self._decode_runs
        with torch.no_grad():  # the product made on the way is this call's (a gradient is _LoRADecodeFn's to give)
            built = fused.decode_runner(x, weight, bias, a, b, scale)
        if built is None and torch.cuda.is_current_stream_capturing():
            return None  # none is made during capture: the next call outside it may still get one
        run, first = (None, None) if built is None else built
        if len(runs) >= 16:
            runs.pop(next(iter(runs)))
        runs[key] = (a, b, weight, bias, scale, (a.data_ptr(), b.data_ptr(), a.dtype, b.dtype), run)
        # this call's result came with the launchers (binding runs them once): handed back rather than made again
        return None if run is None else (lambda xx: first)

    def __getstate__(self) -> dict:
        # copies and pickles leave the kept decode launchers behind (local closures over this layer's tensors), as
        # nn.Module's own leaves a compiled call behind
        state = super().__getstate__()
        state["_decode_runs"] = {}
        return state

    def _apply(self, fn, recurse=True):
        # a device move or cast (.to, .cuda, .half) makes new tensors: launchers kept for the old ones are dropped
        # rather than left holding them (and the packed weight, and a split-K workspace) until their layout comes back
        self._decode_runs.clear()
        return super()._apply(fn, recurse)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_decode_runs", {})  # a layer pickled before the launchers were kept

    def _op_applies(self, x: torch.Tensor, dtype: torch.dtype, name: str) -> bool:
        """Whether a traced call takes :func:`lora_linear_op` / :func:`dora_linear_op`: a frozen base (no dense
        weight or bias that trains), 16- or 32-bit compute, and ``fused.OP_MIN_ROWS`` rows or more, or a LoRA
        adapter at decode rows (:func:`~alignlab.adapters.fused.takes_decode_op`; guards on the row count where
        shapes are dynamic)."""
        mods = self._modules
        base = mods["base_layer"]
        weight = base.weight if type(base) is nn.Linear else None
        if not (dtype != torch.float64 and (weight is None or not weight.requires_grad)
                and (base.bias is None or not base.bias.requires_grad)):
            return False
        if x.numel() >= fused.OP_MIN_ROWS * x.shape[-1]:
            return True
        return not self.is_dora(name) and fused.takes_decode_op(x, _factor(mods["lora_A"], name), dtype)

    def _cast_factors(self, name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float,
                      scaled: bool) -> tuple:
        """``(A, B)`` in ``dtype``, detached, plus ``s·B`` when ``scaled`` (LoRA's backward uses it). With
        ``cache_casts`` they are kept until a factor or the scale changed as far as version counters and
        addresses tell (see ``cache_casts`` for the writes they miss); otherwise made per call, without
        ``s·B`` (the backward then scales ``B`` itself: the same op, not spent on calls with no backward)."""
        if not self.cache_casts:  # the default; detached tensors record no graph, so no no_grad context either
            if self._casts:
                self._casts.clear()
            a, b = a.detach(), b.detach()
            if a.dtype == dtype or b.dtype == dtype or a.dtype != b.dtype:
                return a.to(dtype), b.to(dtype)
            # both cast by one launch on CUDA (a multi-tensor copy; the CPU runs it as two copies)
            ac = torch.empty(a.shape, dtype=dtype, device=a.device)
            bc = torch.empty(b.shape, dtype=dtype, device=b.device)
            torch._foreach_copy_([ac, bc], [a, b])
            return ac, bc
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), dtype, scale, scaled,
               torch.is_inference_mode_enabled())
        hit = self._casts.pop(name, None)
        if self.cache_casts and hit is not None and hit[0] == key:
            cast = hit[1]
        else:
            with torch.no_grad():
                bc = b.detach().to(dtype)
                cast = (a.detach().to(dtype), bc, bc * scale) if scaled else (a.detach().to(dtype), bc)
        if self.cache_casts:
            self._casts[name] = (key, cast)
        return cast

    def _row_norm(self, name: str, weight, a, b, scale: float, dtype: torch.dtype, cast: tuple) -> torch.Tensor:
        """DoRA's ``‖W + s·B A‖_row`` for the fused path; with ``cache_casts``, recomputed only when ``cast``
        (so A or B), the base weight or the scale changed: eval, generation, gradient accumulation and
        checkpoint recomputation then reuse it."""
        if not self.cache_casts:
            self._norms.pop(name, None)
            return dora_norm(weight, a, b, scale, dtype, cast)
        version = weight._version if isinstance(weight, torch.Tensor) else 0
        hit = self._norms.get(name)
        if hit is not None and hit[0] is cast and hit[1] is weight and hit[2] == version and hit[3] == scale:
            return hit[4]
        norm = dora_norm(weight, a, b, scale, dtype, cast)
        self._norms[name] = (cast, weight, version, scale, norm)
        return norm

    def _dora(self, x: torch.Tensor, xa: torch.Tensor, out: torch.Tensor, name: str, a: torch.Tensor,
              b: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            base_out = out if bias is None else out - bias
        else:  # dropout changed the input: the base term is taken on the dropped input, as PEFT does
            base_out = self.base_layer(xa.to(x.dtype))
            base_out = base_out if bias is None else base_out - bias
        base = self.base_layer
        # the packed weight goes to the row-norm kernel as it is; other bases are dequantized first
        weight = base.quant_weight if isinstance(base, NF4Linear) else dense_weight(base)
        return dora_delta(xa, base_out, weight, a, b, self.scaling[name], self.lora_magnitude_vector[name])

    # -- merge ----------------------------------------------------------------------------------
    # merge()/unmerge() come from AdapterLayer; plain LoRA adds delta_weight, DoRA needs its own fold.
    def _check_mergeable(self, names: list[str], merging_below: frozenset = frozenset()) -> None:
        """Trainable token rows under this head (a tied ``lm_head``) that stay active and unmerged after a merge of
        ``names`` (``merging_below``: the rows' adapters merged by the same call, first) would overwrite the merged
        ``ΔW`` in their logits (they are ``x Dᵀ``): refused, so that the merge keeps the output. DoRA adapters left
        active and unmerged beside the merge: ``UserWarning`` (see :meth:`_dora_left_unmerged`)."""
        staying = self._dora_left_unmerged(names)
        if staying:
            # the default filter shows it once per calling line, not once per layer
            warnings.warn(f"DoRA adapter(s) {staying} stay active and unmerged: until they are merged too, they "
                          f"scale the ΔW of {names} merged under them with their magnitude, so the output differs "
                          "from the unmerged one; merge the DoRA adapters first or in the same call", UserWarning,
                          stacklevel=3)
        inner = self.base_layer
        if not names or not isinstance(inner, AdapterLayer) or inner.disabled:
            return
        live = [n for n in inner.active_adapters if n not in inner.merged_adapters and n not in merging_below]
        if live:
            raise ValueError(f"the trainable token rows of adapters {live} under this head are active and not merged: "
                             f"their logits would lose the ΔW of {names} merged into the head's weight; merge those "
                             "adapters first or in the same call")

    def _dora_left_unmerged(self, names: list[str]) -> list[str]:
        """The DoRA adapters that stay active and unmerged while ``names`` are merged: until they are merged too,
        each scales the merged ``ΔW`` with its magnitude (its forward takes the base output, and the row norm, on
        the current weight), so the output differs from the unmerged one (PEFT's does too). Merging the DoRA
        adapters first, or in the same call, keeps it."""
        if not names or self.disabled:
            return []
        return [n for n in self.active_adapters if n not in names and n not in self.merged_adapters and self.is_dora(n)]

    def _merge_one(self, name: str) -> None:
        if not self.is_dora(name):
            return super()._merge_one(name)
        w = merge_weight(self.base_layer)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        unmerged = self._unmerged_weight() if self.merged_adapters else None
        magnitude = self.lora_magnitude_vector[name]
        new, norm = dora_merged_weight(w, a, b, self.scaling[name], magnitude, unmerged)
        refuse_float16_merge(new, (w, a, b, magnitude), name)
        self._merge_norms[name] = norm
        set_dense_weight_(self.base_layer, new)

    def _merges_additively(self, name: str) -> bool:
        return not self.is_dora(name)

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight without the adapters merged so far, fp32 (fp64 for fp64) ``(out, in)``: DoRA's row norm
        is taken on it, in merge as in forward. A quantized base kept its packed weight from before the first
        merge; a dense one is replayed backwards, last merged first (one rounding per step)."""
        snapshot = getattr(self, "_premerge_weight", None)
        if snapshot is not None:  # kept at the first merge, on the device of that time: the layer may have moved since
            return snapshot.to(self.lora_A[self.merged_adapters[0]].weight.device).dequantize(torch.float32)
        w = dense_weight(self.base_layer)
        w = w.to(torch.promote_types(w.dtype, torch.float32), copy=True)
        for name in reversed(self.merged_adapters):
            if self.is_dora(name):
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                norm = kept_merge_norm(self._merge_norms, name, f" {name!r}")
                w = dora_unmerged_weight(w, a, b, self.scaling[name], self.lora_magnitude_vector[name], norm)
            else:
                w -= self.delta_weight(name)
        return w

    def _forget_merge(self, name: str) -> None:
        self._merge_norms.pop(name, None)

    def _unmerge_one(self, name: str) -> None:
        if not self.is_dora(name):
            return super()._unmerge_one(name)
        w = dense_weight(self.base_layer)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        norm = kept_merge_norm(self._merge_norms, name, f" {name!r}")  # dropped once the unmerge succeeded (it can refuse)
        set_dense_weight_(self.base_layer, dora_unmerged_weight(w, a, b, self.scaling[name], self.lora_magnitude_vector[name], norm))
        del self._merge_norms[name]

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, s={self.scaling[n]:g}{', dora' if self.is_dora(n) else ''}" for n in self.adapter_names()]
        return f"in={self.in_features}, out={self.out_features}, adapters=[{'; '.join(parts)}], active={self.active_adapters}"


class DoRALinear(LoRALinear):
    """:class:`LoRALinear` whose adapters are DoRA (``use_dora=True`` by default); see ``dora.py``."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, init: str = "kaiming",
                 use_rslora: bool = False, use_dora: bool = True, adapter_name: str = "default",
                 adapter_dtype: torch.dtype | None = None, exact_fp32: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, init, use_rslora, use_dora, adapter_name, adapter_dtype, exact_fp32)
