"""AdamW with blockwise 8-bit moments, optionally kept in pinned CPU memory.

*8-bit Optimizers via Block-wise Quantization* (Dettmers et al., 2022, arXiv 2110.02861), as QLoRA
(arXiv 2305.14314) pairs it with NF4 weights. AdamW (Loshchilov & Hutter, arXiv 1711.05101) with step
``t``, ``c1 = 1 - b1^t``, ``c2 = sqrt(1 - b2^t)``:

    m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) g^2
    p <- p (1 - lr wd) - (lr / c1) m / (sqrt(v) / c2 + eps)

Between steps ``m`` and ``v`` live as one byte per value: the flat tensor is cut into blocks of
``blocksize`` (256) values, each block keeps its absmax ``a`` in float32 and each value the index of the
nearest level of a 256-level dynamic map scaled by ``a`` -- the *signed* map for ``m``, the *unsigned*
one for ``v`` (:func:`alignlab.quant.nf4.dynamic_map`, the maps of bitsandbytes and of the double
quantization of NF4 scales). State bytes per parameter: ``2 + 8 / blocksize`` (2.03) against 8 for fp32
moments, 0.254x. Parameters with fewer than ``min_8bit_size`` elements (norms, biases) keep fp32
moments, as bitsandbytes does.

On CUDA one Triton kernel (:mod:`alignlab.kernels.adamw8bit`) does dequantize, update and requantize of a
block in registers; elsewhere (and with ``ALIGNLAB_KERNELS=torch``) :func:`adamw8bit_reference_` does the
same in PyTorch ops with the same rounding of codes.

**Offloaded state** (``offload=True``): the 8-bit moments of CUDA parameters live in pinned CPU memory.
A step streams them through two staging buffers on the GPU: while parameter ``i`` is updated on a side
stream, the state of ``i + 1`` is copied in on a copy stream and that of ``i - 1`` copied back on a
third, so PCIe transfers overlap the updates and each other (both directions). ``step()`` returns
without waiting; the current stream waits only for the last parameter update, so the next forward
starts as soon as the parameters are written while the last copies back still run. GPU memory for the
state: two staging buffers of the largest parameter, ``4 n_max`` bytes. CPU parameters take the same
staging path synchronously (the same math, how it is tested without a GPU).

**Sharded parameters** (``DTensor``: FSDP2's ``fully_shard``, :func:`alignlab.distributed.shard_model`):
each rank updates its own shard, ``p.to_local()`` with ``p.grad.to_local()``, with no communication, and
its state is sized and kept for that shard: ``n`` above is the local numel, the flat shard is cut into its
own blocks. Block boundaries therefore differ from an unsharded run wherever a shard's length is not a
multiple of ``blocksize``: the 8-bit codes differ, the error stays that of 8-bit quantization. Whether a
parameter is 8-bit is decided by its whole size, the same on every rank and as in one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, check_positive_int, is_int, is_real
from alignlab._keep import keep
from alignlab.kernels.dispatch import use_triton
from alignlab.quant.nf4 import _blocks, _quantize_blockwise_8bit, dynamic_map

__all__ = ["AdamW8bit", "adamw8bit_reference_", "dequantize_moments", "state_bytes"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, unsigned map, signed midpoints, unsigned midpoints) on ``device``."""
    if device not in _MAPS:
        s, u = dynamic_map("cpu"), dynamic_map("cpu", signed=False)
        _MAPS[device] = keep(lambda: tuple(t.to(device) for t in (s, u, (s[:-1] + s[1:]) / 2, (u[:-1] + u[1:]) / 2)),
                             device)
    return _MAPS[device]


def _hyper(step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> list[float]:
    """The per-step scalars ``[1 - lr wd, lr / c1, c2, b1, 1 - b1, b2, 1 - b2, eps]``, rounded to float32
    once, so that the kernel and the reference multiply by the same numbers."""
    b1, b2 = betas
    c1 = 1.0 - b1**step
    c2 = math.sqrt(1.0 - b2**step)
    values = [1.0 - lr * weight_decay, lr / c1, c2, b1, 1.0 - b1, b2, 1.0 - b2, eps]
    return torch.tensor(values, dtype=torch.float32).tolist()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2's parameters, their gradients, torch AdamW's moments of them),
    else ``t`` itself. Under ``no_grad`` the shard is the DTensor's own storage: in-place updates land in it."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``level · absmax`` per value; the zero level decodes to 0 in a block of absmax ``inf`` too (not NaN)."""
    n = codes.numel()
    level = code[codes.reshape(-1).long()]
    return torch.where(level == 0, 0.0, level * absmax.repeat_interleave(blocksize)[:n])


def _quantize_moment(x: torch.Tensor, blocksize: int, code: torch.Tensor,
                     floor_positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes and absmax of a float32 moment ``x`` (``(n,)``) that may hold NaN or ``inf`` (a NaN
    or overflowing gradient): a non-finite value spoils its own value only, as in fp32 AdamW.

    A block's absmax is the largest finite ``|x|``; its NaN and ``+inf`` values take the top level and ``-inf`` the
    bottom one (they decode to ``±absmax``). Taking them into the absmax (``inf``) put every other value of the
    block at level 0, decoded as ``0 · inf = NaN``: 255 NaN parameters at the next step. A block whose finite values
    are all 0 and that holds an ``inf`` (every ``v`` of a block overflowed) keeps absmax ``inf``, its zeros at the
    zero level (decoded as 0, :func:`_dequantize`) and the rest at the top level: ``v`` stays ``inf`` and the step
    0, as in fp32 AdamW. The kernel (:mod:`alignlab.kernels.adamw8bit`) stores the same codes.

    The step's caller sets ``m`` to 0 where ``v`` is not finite before storing both: the value's moments restart
    (``m`` from 0, ``v`` from its block's largest finite ``v``), where a stored ``m`` of ~1e19 over that ``v`` sent
    its parameter to ~1e17 at the next step. fp32 AdamW keeps ``v = inf`` there and never moves the parameter
    again.

    ``floor_positive`` (the second moment ``v``): a positive finite value whose nearest level is 0 (below half the
    map's smallest positive level times its block's absmax, ~1.6e-7 of it on the unsigned map) takes that smallest
    level instead. Stored as 0 next to an ``m`` that kept a level, it made the next step ``lr · m / eps``: thousands of
    times ``lr`` for a value whose gradient was ~1e-4 of its block's largest and then 0 (an unused embedding row; a
    helper's find, bitsandbytes stores a non-zero level there). Rounded up, ``v`` is over-estimated there, so that
    step is smaller than fp32 AdamW's, never larger."""
    n = x.numel()
    bad = ~x.isfinite()
    q, a = _quantize_blockwise_8bit(torch.where(bad, 0.0, x), blocksize, code)
    spread = a.repeat_interleave(blocksize)[:n]
    q = torch.where(bad & (spread != 0), torch.where(x == -math.inf, 0, 255).to(q.dtype), q)
    inf_block = (a == 0) & _blocks(x.isinf(), blocksize).any(dim=1)
    zero_level = (code < 0).sum().to(q.dtype)  # the index of the map's 0 level (sorted; no host sync)
    if floor_positive:
        q = torch.where((q == zero_level) & (x > 0) & ~bad, zero_level + 1, q)
    inside = inf_block.repeat_interleave(blocksize)[:n]
    q = torch.where(inside, torch.where(bad, 255, zero_level).to(q.dtype), q)
    return q, torch.where(inf_block, math.inf, a)


def dequantize_moments(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 moments ``(m, v)``, each ``(n,)``, from an 8-bit state's ``codes`` ``(2, n)`` uint8 and
    ``absmax`` ``(2, ceil(n / blocksize))`` float32. Pass the optimizer's ``blocksize``.

    Raises ``ValueError`` if the shapes do not fit each other and ``blocksize`` (the default 256 on the state
    of an optimizer with ``blocksize=64`` would read a quarter of the scales, without a word)."""
    if codes.dim() != 2 or codes.shape[0] != 2:
        raise ValueError(f"codes: expected shape (2, n), got {tuple(codes.shape)}")
    check_positive_int(blocksize, "blocksize")
    nb = -(-codes.shape[1] // blocksize)
    if tuple(absmax.shape) != (2, nb):
        raise ValueError(f"absmax: expected shape (2, {nb}) for {codes.shape[1]} values in blocks of {blocksize}, "
                         f"got {tuple(absmax.shape)} (is blocksize the optimizer's?)")
    s, u, _, _ = _maps(codes.device)
    return _dequantize(codes[0], absmax[0], s, blocksize), _dequantize(codes[1], absmax[1], u, blocksize)


def adamw8bit_reference_(
    p: torch.Tensor, g: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, hyper: list[float], blocksize: int
) -> None:
    """One AdamW step in place on ``p`` (any shape, ``n`` elements), ``codes`` ``(2, n)`` uint8 and
    ``absmax`` ``(2, ceil(n / blocksize))`` float32, in PyTorch ops. ``hyper`` as ``_hyper`` builds it."""
    decay, step_size, c2, b1, omb1, b2, omb2, eps = hyper
    s, u, _, _ = _maps(codes.device)
    m = _dequantize(codes[0], absmax[0], s, blocksize)
    v = _dequantize(codes[1], absmax[1], u, blocksize)
    g32 = g.reshape(-1).float()
    m = b1 * m + omb1 * g32
    v = b2 * v + omb2 * (g32 * g32)
    p32 = p.reshape(-1).float() * decay - step_size * (m / (v.sqrt() / c2 + eps))
    p.copy_(p32.view_as(p))
    m = torch.where(v.isfinite(), m, 0.0)  # an overflowed (or NaN) v restarts its value's moments: _quantize_moment
    for row, (x, code) in enumerate(((m, s), (v, u))):
        q, a = _quantize_moment(x, blocksize, code, floor_positive=row == 1)
        codes[row].copy_(q)
        absmax[row].copy_(a)


def _fp32_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: list[float]) -> None:
    decay, step_size, c2, b1, omb1, b2, omb2, eps = hyper
    g32 = g.float()
    m.mul_(b1).add_(g32, alpha=omb1)
    v.mul_(b2).addcmul_(g32, g32, value=omb2)
    p.copy_(p.float() * decay - step_size * (m / (v.sqrt() / c2 + eps)))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (on any device), for memory accounting.

    Raises ``TypeError`` unless ``optimizer`` is a ``torch.optim.Optimizer``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments (module docstring: the math, the state layout, offloading).

    Args:
        params: parameters or parameter groups (float32, float16 or bfloat16).
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW` (decoupled weight decay).
        blocksize: values per quantization block, a power of two in ``[32, 4096]`` (256 as bitsandbytes).
        min_8bit_size: parameters with fewer elements keep fp32 moments.
        offload: keep the 8-bit moments of CUDA parameters in pinned CPU memory (module docstring).

    State per parameter: ``step`` (int) and either ``codes`` ``(2, n)`` uint8 (row 0 ``m``, row 1 ``v``)
    with ``absmax`` ``(2, ceil(n / blocksize))`` float32, or ``exp_avg`` / ``exp_avg_sq`` float32.
    ``state_dict()`` / ``load_state_dict()`` round-trip them bit for bit. For a sharded (``DTensor``)
    parameter ``n`` is the rank's local numel and the state tensors are plain tensors of its shard (fp32
    moments of the local shape): each rank saves its own pieces and loads them into the same sharding.

    Raises:
        ValueError: a hyper-parameter out of range (named in the message); one of the wrong kind (a str, None, a
            float ``blocksize``) is an :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too.
        TypeError: a parameter that is not a float32/float16/bfloat16 tensor, or a sparse gradient.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
        offload: bool = False,
    ):
        if not is_int(blocksize) or not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
            kind = ValueError if is_int(blocksize) else ArgumentTypeError
            raise kind(f"blocksize: expected a power of two in [32, 4096], got {blocksize!r}")
        if not is_int(min_8bit_size) or min_8bit_size < 0:
            kind = ValueError if is_int(min_8bit_size) else ArgumentTypeError
            raise kind(f"min_8bit_size: expected an int >= 0, got {min_8bit_size!r}")
        blocksize, min_8bit_size = int(blocksize), int(min_8bit_size)
        offload = as_bool(offload, "offload")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.blocksize, self.min_8bit_size, self.offload = blocksize, min_8bit_size, offload
        self._staging: dict[torch.device, list] = {}
        self._streams: dict[torch.device, tuple] = {}
        self._pending: list = []
        self._free: dict[tuple[torch.device, int], Any] = {}  # (device, staging buffer) -> its last copy back
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        """torch's Optimizer pickles only ``defaults``, ``state`` and ``param_groups``: ``copy.deepcopy(opt)`` and
        ``torch.save(opt)`` lost ``blocksize``, ``min_8bit_size`` and ``offload`` (the copy's ``step()`` raised
        AttributeError). They travel now; staging buffers, streams and pending copies stay with this process."""
        self._wait_pending()
        return {**super().__getstate__(), "blocksize": self.blocksize, "min_8bit_size": self.min_8bit_size,
                "offload": self.offload}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._staging, self._streams, self._pending, self._free = {}, {}, [], {}
        if self.offload and torch.cuda.is_available():  # a copy of pinned memory is pageable: pin it again
            for st in self.state.values():
                for key in ("codes", "absmax"):
                    t = st.get(key) if isinstance(st, dict) else None
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_pinned():
                        st[key] = t.pin_memory()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`, then the checks of the class docstring; a group
        that fails them is taken out again (a caught error must not leave a NaN ``lr`` to the next step)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            for i, p in enumerate(group["params"]):
                if p.dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"params[{i}]: expected a float32, float16 or bfloat16 tensor, got {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # ---- state -------------------------------------------------------------------------------------------

    def _quantized(self, p: torch.Tensor) -> bool:
        # the whole parameter's numel for a DTensor: every rank, and one process, choose alike
        return p.numel() >= self.min_8bit_size

    def _home(self, p: torch.Tensor) -> tuple[torch.device, bool]:
        """Where the 8-bit state of ``p`` lives and whether that memory is pinned."""
        if self.offload and p.is_cuda:
            return torch.device("cpu"), True
        return p.device, False

    def _new_state(self, p: torch.Tensor) -> dict[str, Any]:
        x = _local(p)
        if not self._quantized(p):
            return {"step": 0, "exp_avg": torch.zeros(x.shape, dtype=torch.float32, device=x.device),
                    "exp_avg_sq": torch.zeros(x.shape, dtype=torch.float32, device=x.device)}
        device, pin = self._home(x)
        nb = -(-x.numel() // self.blocksize)
        # code 0 with absmax 0 decodes to 0 in both maps: m = v = 0
        return {"step": 0,
                "codes": torch.zeros((2, x.numel()), dtype=torch.uint8, device=device, pin_memory=pin),
                "absmax": torch.zeros((2, nb), dtype=torch.float32, device=device, pin_memory=pin)}

    def state_dict(self) -> dict[str, Any]:
        self._wait_pending()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (torch's own loader would cast every saved tensor to its
        parameter's dtype and device; here float32 moments stay float32, 8-bit state goes back to its home
        device, and nothing but the state itself is allocated).

        A state saved by :class:`torch.optim.AdamW` loads too: the float32 moments of a parameter with at
        least ``min_8bit_size`` elements are quantized, as a step would (else a migrated optimizer would
        keep 8 bytes of state per parameter for good), and ``step`` becomes an int. On sharded parameters
        the state is this rank's (:meth:`state_dict` there holds the local pieces; torch AdamW's
        ``DTensor`` moments are taken as their local shards): load it into the same sharding.

        Raises:
            ValueError: a saved hyper-parameter out of range or missing (as :meth:`add_param_group` checks
                it), a saved state without either AdamW8bit's or torch AdamW's keys (another optimizer's),
                or a saved tensor whose shape does not fit its parameter. All are checked before anything
                is loaded: after the error the optimizer is as it was.
        """
        self._wait_pending()
        for group in state_dict["param_groups"]:
            missing = [key for key in ("lr", "betas", "eps", "weight_decay") if key not in group]
            if missing:
                raise ValueError(f"state_dict: a param group has no {', '.join(missing)}: "
                                 "not the state of AdamW8bit or torch.optim.AdamW")
            _check_group(dict(group))  # a copy: nothing is stored before every check passed
        saved = state_dict["state"]
        ids = [g["params"] for g in state_dict["param_groups"]]
        for group, group_ids in zip(self.param_groups, ids):
            for p, i in zip(group["params"], group_ids):
                if i in saved:
                    self._check_saved_state(p, i, saved[i])
        # torch's loader casts every saved tensor to its parameter's dtype and device before it is stored:
        # the uint8 codes became float32 (bf16) copies on the parameter's device, for all parameters at once,
        # the 8 (4) bytes per parameter of fp32 AdamW state that this optimizer exists to avoid (on the GPU
        # with offload=True too), only to be replaced below. torch loads the groups; the state is built here,
        # straight from the saved tensors, in a post-hook that runs before any other (which then see it).
        mapped = {i for group_ids in ids for i in group_ids}
        handle = self.register_load_state_dict_post_hook(lambda opt: self._load_state(saved, ids), prepend=True)
        try:
            super().load_state_dict({**state_dict, "state": {k: v for k, v in saved.items() if k not in mapped}})
        finally:
            handle.remove()

    def _load_state(self, saved: dict[Any, dict[str, Any]], ids: list[list[Any]]) -> None:
        """Store the checked saved state ``saved`` of the parameters with saved ids ``ids`` (per group)."""
        moments = ("step", "codes", "absmax", "exp_avg", "exp_avg_sq")
        for group, group_ids in zip(self.param_groups, ids):
            _check_group(group)  # stores the saved values as Python floats
            for p, i in zip(group["params"], group_ids):
                if i not in saved:
                    continue
                src = saved[i]
                st = self.state[p] = {k: v for k, v in src.items() if k not in moments}
                st["step"] = int(src["step"])  # torch.optim.AdamW saves a float tensor
                if "codes" in src:
                    fresh = self._new_state(p)
                    fresh["codes"].copy_(src["codes"])
                    fresh["absmax"].copy_(src["absmax"])
                    st["codes"], st["absmax"] = fresh["codes"], fresh["absmax"]
                elif self._quantized(p):  # torch.optim.AdamW's fp32 moments: quantize them, as a step would
                    fresh = self._new_state(p)
                    s, u, _, _ = _maps(fresh["codes"].device)
                    for row, (key, code) in enumerate((("exp_avg", s), ("exp_avg_sq", u))):
                        x = _local(src[key]).to(device=fresh["codes"].device, dtype=torch.float32).reshape(-1)
                        q, a = _quantize_moment(x, self.blocksize, code, floor_positive=row == 1)
                        fresh["codes"][row].copy_(q)
                        fresh["absmax"][row].copy_(a)
                    st["codes"], st["absmax"] = fresh["codes"], fresh["absmax"]
                else:
                    for key in ("exp_avg", "exp_avg_sq"):
                        st[key] = _local(src[key]).to(device=_local(p).device, dtype=torch.float32, copy=True)

    def _check_saved_state(self, p: torch.Tensor, i: Any, src: dict[str, Any]) -> None:
        """``ValueError`` unless the saved state ``src`` of parameter ``i`` fits ``p``."""
        if not ({"step", "codes", "absmax"} <= src.keys() or {"step", "exp_avg", "exp_avg_sq"} <= src.keys()):
            raise ValueError(f"state_dict: the state of parameter {i} has keys {sorted(src)}, expected step, codes "
                             "and absmax (AdamW8bit) or step, exp_avg and exp_avg_sq (torch.optim.AdamW)")
        x = _local(p)
        shard = " (this rank's shard)" if x is not p else ""
        if "codes" in src:
            nb = -(-x.numel() // self.blocksize)
            if not self._quantized(p) or tuple(src["codes"].shape) != (2, x.numel()) \
                    or tuple(src["absmax"].shape) != (2, nb):
                raise ValueError(f"state_dict: 8-bit state of parameter {i} has codes "
                                 f"{tuple(src['codes'].shape)}, which does not fit a parameter{shard} of "
                                 f"{x.numel()} elements with min_8bit_size={self.min_8bit_size}, "
                                 f"blocksize={self.blocksize}")
            return
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(_local(src[key]).shape) != tuple(x.shape):
                raise ValueError(f"state_dict: {key} of parameter {i} has shape "
                                 f"{tuple(_local(src[key]).shape)}, expected {tuple(x.shape)}{shard}")

    # ---- step --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # the parameters with a gradient, all checked before any moves (as torch's AdamW)
        for g_i, group in enumerate(self.param_groups):
            for p_i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"AdamW8bit does not support sparse gradients: parameter {p_i} of param group "
                                    f"{g_i} has one (nn.Embedding(sparse=True)?); nothing was updated")
                work.append((group, p))
        hyper_cache: dict[tuple, tuple[list[float], dict]] = {}
        streamed: dict[torch.device, list] = {}
        for group, p in work:
            st = self.state[p]
            if not st:
                st.update(self._new_state(p))
            st["step"] += 1
            x, g = _local(p), _local(p.grad)  # p and p.grad themselves unless p is sharded
            if x.numel() == 0:  # a rank's empty shard (fewer rows than ranks): nothing to update
                continue
            key = (st["step"], group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
            if key not in hyper_cache:
                hyper_cache[key] = (_hyper(*key), {})
            hyper, on_device = hyper_cache[key]
            if "exp_avg" in st:
                _fp32_step_(x, g, st["exp_avg"], st["exp_avg_sq"], hyper)
            elif self.offload:
                streamed.setdefault(x.device, []).append((x, g, st, hyper, on_device))
            else:
                self._update(x, g, st["codes"], st["absmax"], hyper, on_device)
        for device, items in streamed.items():
            self._offloaded_step(device, items)
        return loss

    def _update(self, p, g, codes, absmax, hyper, on_device) -> None:
        if use_triton(p, g, codes) and p.is_contiguous() and p.numel() < 2**31:  # int32 offsets in the kernel
            from alignlab.kernels.adamw8bit import adamw8bit_kernel_step

            if p.device not in on_device:
                host = torch.tensor(hyper, dtype=torch.float32)
                # from pageable memory the copy would first wait for the stream (the backward): pin it
                on_device[p.device] = (host.pin_memory() if p.is_cuda else host).to(p.device, non_blocking=True)
            scal = on_device[p.device]
            if p.is_cuda:
                scal.record_stream(torch.cuda.current_stream(p.device))
            adamw8bit_kernel_step(p, g.contiguous(), codes, absmax, _maps(p.device), scal, self.blocksize)
        else:
            adamw8bit_reference_(p, g, codes, absmax, hyper, self.blocksize)

    def _buffers(self, device: torch.device, items: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = max(p.numel() for p, *_ in items)
        bufs = self._staging.get(device)
        if bufs is None or bufs[0][0].numel() < 2 * n:
            self._wait_pending()
            nb = -(-n // self.blocksize)
            bufs = [(torch.empty(2 * n, dtype=torch.uint8, device=device),
                     torch.empty(2 * nb, dtype=torch.float32, device=device)) for _ in range(2)]
            self._staging[device] = bufs
        return bufs

    def _offloaded_step(self, device: torch.device, items: list) -> None:
        bufs = self._buffers(device, items)
        cuda = device.type == "cuda"
        if cuda and device not in self._streams:
            self._streams[device] = tuple(torch.cuda.Stream(device) for _ in range(3))
        h2d, comp, d2h = self._streams[device] if cuda else (None, None, None)
        main = torch.cuda.current_stream(device) if cuda else None
        ctx = torch.cuda.stream if cuda else (lambda s: contextlib.nullcontext())
        ready = _record(main)
        done = None
        for i, (p, g, st, hyper, on_device) in enumerate(items):
            k = i % 2
            n, nb = p.numel(), st["absmax"].shape[1]
            codes, absmax = bufs[k][0][: 2 * n].view(2, n), bufs[k][1][: 2 * nb].view(2, nb)
            with ctx(h2d):
                if cuda and (device, k) in self._free:
                    h2d.wait_event(self._free[device, k])
                codes.copy_(st["codes"], non_blocking=True)
                absmax.copy_(st["absmax"], non_blocking=True)
                loaded = _record(h2d)
            with ctx(comp):
                if cuda:
                    comp.wait_event(ready)
                    comp.wait_event(loaded)
                    g.record_stream(comp)  # zero_grad on the main stream must not free it under us
                self._update(p, g, codes, absmax, hyper, on_device)
                done = _record(comp)
            with ctx(d2h):
                if cuda:
                    d2h.wait_event(done)
                st["codes"].copy_(codes, non_blocking=True)
                st["absmax"].copy_(absmax, non_blocking=True)
                if cuda:
                    self._free[device, k] = _record(d2h)
        if cuda:
            main.wait_event(done)
            self._pending = list(self._free.values())

    def _wait_pending(self) -> None:
        """Block the host until the copies back of the last offloaded step have landed in CPU memory."""
        for event in self._pending:
            event.synchronize()
        self._pending = []


def _record(stream):
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _check_group(group: dict[str, Any]) -> None:
    """Validate a param group's hyper-parameters and store them as Python floats, in place.

    Python and NumPy reals are accepted; a bool, a tensor, NaN or inf is not (a NaN ``lr`` would pass a
    ``< 0`` test and turn every parameter into NaN at the first step). ``torch.optim.AdamW``'s
    ``maximize`` / ``amsgrad`` switched on in a group (a migrated config) are refused: they would be ignored; so is
    ``torch.optim.Adam``'s ``decoupled_weight_decay=False`` with a weight decay (L2 added to the gradient, which
    this optimizer would turn into AdamW's decay of the weights)."""
    for key in ("maximize", "amsgrad"):
        if group.get(key):
            raise ValueError(f"{key}: AdamW8bit has no {key} (the group asks for {key}={group[key]!r})")
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if group.get("decoupled_weight_decay") is False and is_real(wd) and wd != 0:
        raise ValueError(f"decoupled_weight_decay=False: the group decays weights as torch.optim.Adam does (L2 in the "
                         f"gradient, weight_decay={wd!r}); AdamW8bit's weight decay is decoupled (AdamW)")
    lr = check_finite_number(lr, "lr", minimum=0)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_real(b) for b in betas)
        kind = ValueError if pair else ArgumentTypeError
        raise kind(f"betas: expected two floats in [0, 1), got {betas!r}")
    eps, wd = check_finite_number(eps, "eps", minimum=0), check_finite_number(wd, "weight_decay", minimum=0)
    group.update(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=wd)
