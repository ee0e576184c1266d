"""4-bit NormalFloat (NF4) blockwise quantization with double quantization.

From *QLoRA: Efficient Finetuning of Quantized LLMs* (Dettmers et al., 2023,
arXiv 2305.14314).  A weight ``W`` of any shape is flattened row-major and cut
into blocks of ``blocksize`` values (the last block may be shorter).  Each block
``b`` keeps its absolute maximum ``s_b = max_i |w_i|`` and every value becomes
the index of the nearest entry of the 16-level NF4 codebook ``q``:

    c_i = argmin_j | w_i / s_b - q_j |,        w_i ~ q[c_i] * s_b.

Two 4-bit codes share a byte, the even flat index in the high nibble.

**Double quantization** stores the fp32 block scales ``s`` in 8 bits: subtract
their mean ``mu``, cut ``s - mu`` into blocks of 256, and quantize each with the
signed 8-bit *dynamic* map (Dettmers, *8-bit Approximations for Parallelism in
Deep Learning*, arXiv 1511.04561) scaled by that block's own absmax.  Then
``s_b ~ d[a_b] * t_{b // 256} + mu``.

The bytes, scales and maps produced here are identical to
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``, so weights move
freely between alignlab, bitsandbytes and ``transformers`` 4-bit checkpoints
(:func:`nf4_to_bnb_state_dict`, :func:`nf4_from_bnb_state_dict`).

Optional **ICQ** calibration (IR-QLoRA, *Accurate LoRA-Finetuning Quantization
of LLMs via Information Retention*, Qin et al. 2024, arXiv 2402.05445) shifts
every block by a scalar ``tau_b`` chosen to maximise the entropy of its codes,
``w_i ~ q[c_i] * s_b + tau_b``; such tensors carry a per-block ``shift`` and have
no bitsandbytes equivalent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, check_positive_int, is_finite_real, is_int
from alignlab._keep import keep
from alignlab.kernels.nf4_configs import note_device

__all__ = [
    "NF4Tensor",
    "nf4_code",
    "dynamic_map",
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_absmax",
    "nf4_to_bnb_state_dict",
    "nf4_from_bnb_state_dict",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_compute_dtype(compute_dtype) -> None:
    """``TypeError`` naming ``compute_dtype`` unless it is one of :data:`SUPPORTED_DTYPES`."""
    if compute_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"compute_dtype must be one of {SUPPORTED_DTYPES}, got {compute_dtype}")
NESTED_BLOCKSIZE = 256

# The 16 NF4 levels: quantiles of N(0, 1) at evenly spaced probabilities between
# 1 - 0.9677083 and 0.9677083 (8 positive, 7 negative, plus an exact zero),
# normalised to [-1, 1].  Stored as the float32 values every implementation uses.
_NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 codebook, shape ``(16,)`` float32, sorted ascending."""
    return _table(("nf4", torch.device(device)), lambda d: torch.tensor(_NF4_LEVELS, dtype=torch.float32, device=d))


def _build_dynamic_map(signed: bool = True) -> torch.Tensor:
    # Dynamic-exponent map, 8 bits, up to 7 exponent bits: for decade e = 10^(i-6),
    # i = 0..6, the midpoints of evenly spaced fractions in [0.1, 1] -- 2^i + 1 of
    # them with both signs (signed), 2^(i+1) + 1 positive ones (unsigned: the sign
    # bit becomes one more fraction bit) -- plus the "no indicator bit" extras, 0 and 1.
    # Built on the CPU whatever the default device: under ``with torch.device("meta")`` (deferred init, then
    # quantize_model) a default-device map would have no values to read back with .tolist().
    values: list[float] = []
    for i in range(7):
        fractions = torch.linspace(0.1, 1, (2**i if signed else 2 ** (i + 1)) + 1, dtype=torch.float32, device="cpu")
        mids = (fractions[:-1] + fractions[1:]) / 2.0
        values += ((10 ** (i - 6)) * mids).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * mids).tolist()
    # 2^(7-7) - 1 = 0 extra items for 7 exponent bits; the last two levels:
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device="cpu")


# built at import, eagerly: a first dynamic_map call may come inside a torch.export / torch.compile trace (the
# first NF4 forward), where _build_dynamic_map's reads of tensors back to Python would be data-dependent
_DYNAMIC_MAPS = {signed: _build_dynamic_map(signed) for signed in (True, False)}


def dynamic_map(device: torch.device | str = "cpu", signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic quantization map, ``(256,)`` float32, sorted ascending.

    ``signed=True`` (values in ``[-1, 1]``) is the map of double quantization and of
    the first Adam moment; ``signed=False`` (values in ``[0, 1]``, one more fraction
    bit per decade) that of the second moment in 8-bit optimizers (Dettmers et al.,
    *8-bit Optimizers via Block-wise Quantization*, arXiv 2110.02861). Both equal
    ``bitsandbytes.functional.create_dynamic_map(signed)``.
    """
    return _table(("dynamic" if signed else "dynamic_unsigned", torch.device(device)),
                  lambda d: _DYNAMIC_MAPS[signed].to(d))


def _table(key: tuple, make) -> torch.Tensor:
    """The table ``make(device)`` kept in ``_TABLES`` under ``key = (name, device)``. A first call inside a
    ``torch.compile`` / ``torch.export`` trace makes it without keeping it: a tensor made there is a traced
    value (a fake tensor under export), which must not outlive the trace."""
    table = _TABLES.get(key)
    if table is None:
        device = key[1]
        if torch.compiler.is_compiling():
            return make(device)
        table = _TABLES[key] = keep(lambda: make(device), device)
    return table


@dataclass
class NF4Tensor:
    """A weight stored as packed NF4 codes plus its quantization state.

    Attributes:
        data: ``(ceil(numel / 2),)`` uint8, two codes a byte, even index in the high nibble.
        absmax: ``(num_blocks,)`` float32 block scales, or uint8 codes when double-quantized.
        shape: logical shape of the weight, e.g. ``(out_features, in_features)``.
        dtype: dtype of the original weight (the default dequantization dtype).
        blocksize: values per block (power of two, 32..4096).
        nested_absmax: ``(ceil(num_blocks / 256),)`` float32 scales of the double quantization.
        nested_offset: scalar float32, the mean subtracted from ``absmax`` before double quantization.
        shift: optional ``(num_blocks,)`` float32 ICQ shifts (``None`` without calibration).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    nested_blocksize: int = field(default=NESTED_BLOCKSIZE)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def __getstate__(self) -> dict:
        # copies and pickles hold the fields only: the kernels' caches kept on this object (the decode launchers
        # NF4Linear keeps after a CUDA call, local closures bound to these very tensors; launch arguments) made
        # torch.save / pickle fail and sent a deepcopy's products through the original's tensors
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def to(self, device: torch.device | str | int) -> "NF4Tensor":
        """A copy of this tensor with every buffer on ``device``; the buffers keep their dtypes.

        Raises:
            TypeError: ``device`` is not a device (a ``torch.dtype`` would have turned the uint8 codes and
                scales into floats: use :meth:`dequantize` for a dense copy in another dtype).
        """
        if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
            raise TypeError(f"device must be a torch.device, a device string or index, got {device!r}; an NF4Tensor "
                            "keeps its packed dtypes (dequantize(dtype) gives a dense copy in another dtype)")
        device = torch.device(device)

        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            data=move(self.data),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            nested_offset=move(self.nested_offset),
            shift=move(self.shift),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """See :func:`nf4_dequantize`."""
        return nf4_dequantize(self, dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors and metadata as a flat dict of tensors (safetensors-friendly)."""
        out = {"data": self.data, "absmax": self.absmax}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_offset"] = self.nested_offset.reshape(1)
        if self.shift is not None:
            out["shift"] = self.shift
        meta = {
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "blocksize": self.blocksize,
            "nested_blocksize": self.nested_blocksize,
        }
        out["meta"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "NF4Tensor":
        """Inverse of :meth:`state_dict`; raises ``ValueError`` on inconsistent sizes."""
        missing = {"data", "absmax", "meta"} - set(sd)
        if missing:
            raise ValueError(f"NF4 state dict is missing keys {sorted(missing)}")
        meta, shape, blocksize = _read_meta(sd["meta"], "meta")
        nested = sd.get("nested_absmax")
        if nested is not None and "nested_offset" not in sd:
            raise ValueError("NF4 state dict has nested_absmax but no nested_offset")
        if nested is not None and sd["nested_offset"].numel() != 1:
            raise ValueError(f"nested_offset must hold one number, got shape {tuple(sd['nested_offset'].shape)}")
        t = cls(
            data=sd["data"],
            absmax=sd["absmax"],
            shape=shape,
            dtype=_meta_dtype(meta.get("dtype")),
            blocksize=blocksize,
            nested_absmax=nested,
            nested_offset=None if nested is None else sd["nested_offset"].reshape(()),
            shift=sd.get("shift"),
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )
        t.validate()
        return t

    def validate(self) -> None:
        """Check that buffer sizes agree with ``shape`` and ``blocksize``; raise ``ValueError`` if not."""
        _check_blocksize(self.blocksize)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype}")
        n = self.numel
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(
                f"packed data must be uint8 with {(n + 1) // 2} bytes for shape {tuple(self.shape)}, "
                f"got {self.data.dtype} with {self.data.numel()}"
            )
        nb = self.num_blocks
        if self.absmax.dim() != 1 or self.absmax.numel() != nb:  # (a (1, nb) one loaded, then failed in forward)
            raise ValueError(f"absmax must have shape ({nb},) for shape {tuple(self.shape)} and blocksize "
                             f"{self.blocksize}, got {tuple(self.absmax.shape)}")
        if self.double_quant:
            check_positive_int(self.nested_blocksize, "nested_blocksize")
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            nb2 = -(-nb // self.nested_blocksize)
            if self.nested_absmax.numel() != nb2:
                raise ValueError(f"nested_absmax must have {nb2} entries, got {self.nested_absmax.numel()}")
            if self.nested_offset is None:
                raise ValueError("nested_offset is required with nested_absmax")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {self.absmax.dtype}")
        if self.shift is not None and (self.shift.dim() != 1 or self.shift.numel() != nb
                                       or self.shift.dtype != torch.float32):
            raise ValueError(f"shift must be float32 of shape ({nb},), got {self.shift.dtype} "
                             f"{tuple(self.shift.shape)}")


def _meta_dtype(name) -> torch.dtype:
    """The torch dtype a checkpoint's metadata names (``"bfloat16"``); ``ValueError`` for anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype in the NF4 metadata must name a torch dtype, got {name!r}")
    return dtype


def _read_meta(blob: torch.Tensor, where: str) -> tuple[dict, torch.Size, int]:
    """The JSON metadata dict in ``blob`` (uint8 bytes) with its ``shape`` and ``blocksize``; ``ValueError`` naming
    ``where`` for a blob that is not such a dict (missing keys, a shape that is not a list of integers, a
    ``nested_blocksize`` that is not an integer or a ``nested_offset`` that is not a number)."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:  # (a float tensor: bytes() raised TypeError)
        got = f"{blob.dtype} tensor" if isinstance(blob, torch.Tensor) else type(blob).__name__
        raise ValueError(f"{where} must be a uint8 tensor of UTF-8 JSON bytes, got a {got}")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # (both ValueErrors, but naming neither key nor file)
        raise ValueError(f"{where} must hold UTF-8 JSON metadata: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("shape", "blocksize") if k not in meta]
    if missing:
        raise ValueError(f"{where} has no {missing}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    blocksize = meta["blocksize"]
    if not is_int(blocksize):
        raise ValueError(f"{where}: blocksize must be an integer, got {blocksize!r}")
    # read with int() / float() later: "abc" or null raised an unnamed ValueError / TypeError, 256.5 was taken as 256
    if not is_int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)):
        raise ValueError(f"{where}: nested_blocksize must be an integer, got {meta['nested_blocksize']!r}")
    if "nested_offset" in meta and not is_finite_real(meta["nested_offset"]):
        # (NaN / inf: added to every block scale, it made every weight NaN without a word)
        raise ValueError(f"{where}: nested_offset must be a finite number, got {meta['nested_offset']!r}")
    return meta, torch.Size(shape), int(blocksize)


def _check_blocksize(blocksize: int) -> int:
    """``blocksize`` as a Python int (it goes into the JSON meta of a state dict); ``ValueError`` unless it
    is an integer (NumPy's too, a bool not) and a power of two between 32 and 4096."""
    if not is_int(blocksize) or not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
        kind = ValueError if is_int(blocksize) else ArgumentTypeError
        raise kind(f"blocksize must be a power of two between 32 and 4096, got {blocksize!r}")
    return int(blocksize)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``(num_blocks, blocksize)`` view of a flat tensor, the last block zero-padded."""
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted codebook; a tie goes to the lower level."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        # the odd tail nibble encodes 0.0 (code 7), the code for an all-zero pad
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return (codes[0::2] << 4) | codes[1::2]


def _unpack(data: torch.Tensor, n: int) -> torch.Tensor:
    codes = torch.stack([data >> 4, data & 15], dim=-1).reshape(-1)
    return codes[:n].long()


def _quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of float32 ``x`` to a sorted 256-level map (default: the signed
    dynamic map): ``(codes uint8, absmax f32)``."""
    n = x.numel()
    blocks = _blocks(x.float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = _nearest_code(scaled, dynamic_map(x.device) if code is None else code)
    # an all-zero block (0 / 0 in bitsandbytes' C search) is stored as code 0; it decodes to 0 either way
    codes = torch.where(absmax[:, None] == 0, 0, codes).reshape(-1)[:n]
    return codes.to(torch.uint8), absmax


def nf4_absmax(t: NF4Tensor) -> torch.Tensor:
    """The fp32 block scales ``s`` of ``t`` (undoing double quantization), shape ``(num_blocks,)``."""
    if not t.double_quant:
        return t.absmax
    code = dynamic_map(t.device)
    nested = t.nested_absmax.float().repeat_interleave(t.nested_blocksize)[: t.num_blocks]
    return code[t.absmax.long()] * nested + t.nested_offset


def _icq_shift(blocks: torch.Tensor, lengths: torch.Tensor, lam: float, steps: int) -> torch.Tensor:
    """Per-block shift tau maximising the entropy of the NF4 codes of ``w - tau``.

    IR-QLoRA (arXiv 2402.05445) searches ``tau = tau0 + lambda * sigma`` around the
    block median ``tau0`` for ``lambda in [-lam, lam]`` (``sigma`` the block std).
    Candidates are tried in order of ``|lambda|`` so that among equal entropies the
    smallest move from the median wins.
    """
    code = nf4_code(blocks.device)
    valid = torch.arange(blocks.shape[1], device=blocks.device)[None, :] < lengths[:, None]
    masked = torch.where(valid, blocks, torch.nan)
    tau0 = masked.nanmedian(dim=1).values
    mean = masked.nanmean(dim=1)
    sigma = ((torch.where(valid, blocks - mean[:, None], 0) ** 2).sum(1) / lengths).sqrt()
    lambdas = torch.linspace(-lam, lam, 2 * steps + 1, device=blocks.device)
    lambdas = lambdas[lambdas.abs().argsort(stable=True)]
    best_h = torch.full_like(tau0, -1.0)
    best_tau = tau0.clone()
    for lmb in lambdas:
        tau = tau0 + lmb * sigma
        shifted = torch.where(valid, blocks - tau[:, None], 0)
        s = shifted.abs().amax(1).clamp(min=1e-38)
        c = _nearest_code((shifted / s[:, None]).clamp(-1, 1), code)
        # padding positions land on code 7; remove them from the histogram
        h = _entropy_masked(c, valid, lengths)
        better = h > best_h + 1e-6
        best_h = torch.where(better, h, best_h)
        best_tau = torch.where(better, tau, best_tau)
    return best_tau


def _entropy_masked(codes: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros(codes.shape[0], 16, device=codes.device)
    counts.scatter_add_(1, codes, valid.float())
    p = counts / lengths[:, None]
    return -(p * torch.log2(p.clamp(min=1e-30))).sum(-1)


def check_quantizable(w, name: str = "w") -> None:
    """The checks :func:`nf4_quantize` makes of its input, on their own (``quantize_model`` makes them for every
    weight before replacing any): ``TypeError`` for a non-tensor or an unsupported dtype, ``ValueError`` for
    an empty tensor or one with NaN or inf (a meta tensor has no values to check)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype in {SUPPORTED_DTYPES}, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} must have at least one element")
    # one NaN makes its block's scale NaN and, through the mean of the scales, every double-quantized one
    if not w.is_meta and not torch.isfinite(w).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf); its NF4 codes and scales would be NaN")


def nf4_quantize(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    calibrate: str | None = None,
    icq_lambda: float = 0.1,
    icq_steps: int = 50,
) -> NF4Tensor:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to NF4 in blocks of ``blocksize``.

    ``double_quant`` also quantizes the block scales to 8 bits (blocks of 256).
    ``calibrate="icq"`` adds IR-QLoRA's per-block entropy-maximising shift (searched
    over ``2 * icq_steps + 1`` values of ``lambda`` in ``[-icq_lambda, icq_lambda]``).

    Byte-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize=...,
    quant_type="nf4", compress_statistics=double_quant)`` without calibration (for fp32
    weights on CUDA, up to about one code in 10⁷ on a decision threshold; docs/quantization.md).

    Raises:
        TypeError: ``w`` is not a floating tensor of a supported dtype; ``double_quant`` is not a bool (a NumPy bool is one).
        ValueError: bad ``blocksize``, empty ``w``, ``w`` with NaN or inf, or unknown ``calibrate``; with
            ``calibrate="icq"``, an ``icq_lambda`` that is NaN or infinite (every shift would be NaN) or an
            ``icq_steps`` that is not a positive integer (``TypeError`` for a non-number ``icq_lambda``); a
            ``blocksize`` or ``icq_steps`` that is no int is an :class:`~alignlab.ArgumentTypeError`, a ``TypeError``
            too.
    """
    check_quantizable(w)  # a meta tensor passes (it quantizes to meta buffers of the right shapes)
    blocksize = _check_blocksize(blocksize)
    double_quant = as_bool(double_quant, "double_quant")  # a truthy string like "no" would switch it on
    if calibrate not in (None, "icq"):
        raise ValueError(f"calibrate must be None or 'icq', got {calibrate!r}")
    if calibrate == "icq":  # a NaN or infinite lambda made every shift, so every dequantized value, NaN
        icq_lambda = check_finite_number(icq_lambda, "icq_lambda")
        icq_steps = check_positive_int(icq_steps, "icq_steps")

    n = w.numel()
    flat = w.detach().reshape(-1).float()
    blocks = _blocks(flat, blocksize)
    shift = None
    if calibrate == "icq":
        lengths = torch.full((blocks.shape[0],), blocksize, device=w.device, dtype=torch.float32)
        lengths[-1] = n - (blocks.shape[0] - 1) * blocksize
        shift = _icq_shift(blocks, lengths, icq_lambda, icq_steps)
        valid = torch.arange(blocksize, device=w.device)[None, :] < lengths[:, None]
        blocks = torch.where(valid, blocks - shift[:, None], 0)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the reciprocal (not divide): this is the rounding bitsandbytes uses
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = _nearest_code(scaled.reshape(-1)[:n], nf4_code(w.device))
    t = NF4Tensor(
        data=_pack(codes),
        absmax=absmax,
        shape=torch.Size(w.shape),
        dtype=w.dtype,
        blocksize=blocksize,
        shift=shift,
    )
    if double_quant:
        offset = absmax.mean()  # in fp32, as bitsandbytes (its codes are matched bit for bit)
        # where the fp32 sum overflows (block scales near the fp32 limit: inf / NaN weights after dequantization),
        # the sum of absmax / n instead (no term, nor the sum, can overflow); no host read, no fp64 (MPS has none),
        # and the same offset wherever the fp32 mean is finite
        offset = torch.where(torch.isfinite(offset), offset, (absmax / absmax.numel()).sum())
        qabs, nested = _quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        t.absmax, t.nested_absmax, t.nested_offset = qabs, nested, offset
    note_device(w.device)  # the launch tables of this GPU, known before any torch.compile trace
    return t


def output_dtype(t: NF4Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a dequantization of ``t`` returns: ``dtype``, or ``t``'s own for None; ``TypeError`` unless
    fp32 / fp16 / bf16 (shared by every dequantization entry point)."""
    dtype = dtype or t.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    return dtype


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to a tensor of ``t.shape``: ``w_i = q[c_i] * s_b (+ tau_b)``, computed in fp32.

    This is the pure-PyTorch reference every NF4 kernel is tested against, and it
    returns the same values as ``bitsandbytes.functional.dequantize_4bit``.

    Raises:
        TypeError: ``t`` is not an NF4Tensor, or ``dtype`` is not fp32 / fp16 / bf16.
    """
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t must be an NF4Tensor, got {type(t).__name__}")
    dtype = output_dtype(t, dtype)
    n = t.numel
    values = nf4_code(t.device)[_unpack(t.data.reshape(-1), n)]
    blocks = _blocks(values, t.blocksize) * nf4_absmax(t)[:, None]
    if t.shift is not None:
        blocks = blocks + t.shift[:, None]
    return blocks.reshape(-1)[:n].reshape(t.shape).to(dtype)


# ---------------------------------------------------------------------------
# bitsandbytes / transformers checkpoint format
# ---------------------------------------------------------------------------

_QS_KEY = "quant_state.bitsandbytes__nf4"


def nf4_to_bnb_state_dict(t: NF4Tensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The entries ``bitsandbytes.nn.Linear4bit`` (and thus ``transformers``) save for a 4-bit weight.

    Keys: ``{prefix}``, ``{prefix}.absmax``, ``{prefix}.quant_map``, and with double
    quantization ``{prefix}.nested_absmax``, ``{prefix}.nested_quant_map``; plus
    ``{prefix}.quant_state.bitsandbytes__nf4``, a uint8 tensor of JSON metadata. For ``t`` on the meta device
    every entry is a meta tensor, the metadata too (its nested offset is a value meta tensors do not hold).

    Raises:
        TypeError: ``t`` is not an NF4Tensor.  ValueError: ``t`` carries ICQ shifts, which the format cannot store.
    """
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t must be an NF4Tensor, got {type(t).__name__}")
    if t.shift is not None:
        raise ValueError("ICQ-calibrated NF4 tensors (with shift) have no bitsandbytes representation")
    meta: dict = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
    }
    out = {
        prefix: t.data.reshape(-1, 1),
        f"{prefix}.absmax": t.absmax,
        f"{prefix}.quant_map": nf4_code(t.device).clone(),
    }
    if t.double_quant:
        out[f"{prefix}.nested_absmax"] = t.nested_absmax
        out[f"{prefix}.nested_quant_map"] = dynamic_map(t.device).clone()
        meta.update(
            nested_blocksize=t.nested_blocksize,
            nested_dtype="float32",
            nested_offset=0.0 if t.nested_offset.is_meta else float(t.nested_offset.item()),
        )
    # json.dumps' default separators are what bitsandbytes writes
    blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    out[f"{prefix}.{_QS_KEY}"] = blob.to("meta") if t.data.is_meta else blob
    return out


def nf4_from_bnb_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
    """Build an :class:`NF4Tensor` from the bitsandbytes/transformers keys under ``prefix``.

    Raises:
        ValueError: a key is missing, the quant type is not NF4, the codebooks differ
            from NF4 / the dynamic map, or sizes disagree with the recorded shape.
    """
    needed = [prefix, f"{prefix}.absmax", f"{prefix}.{_QS_KEY}"]
    missing = [k for k in needed if k not in sd]
    if missing:
        other = [k for k in sd if k.startswith(f"{prefix}.quant_state.") and k != f"{prefix}.{_QS_KEY}"]
        if other:
            raise ValueError(f"only NF4 weights are supported, found {other}")
        raise ValueError(f"bitsandbytes state dict is missing keys {missing}")
    meta, shape, blocksize = _read_meta(sd[f"{prefix}.{_QS_KEY}"], f"{prefix}.{_QS_KEY}")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    data = sd[prefix]
    if f"{prefix}.quant_map" in sd and not torch.equal(sd[f"{prefix}.quant_map"].cpu().float(), nf4_code()):
        raise ValueError(f"{prefix}.quant_map is not the NF4 codebook")
    nested = sd.get(f"{prefix}.nested_absmax")
    if nested is not None:
        qmap = sd.get(f"{prefix}.nested_quant_map")
        if qmap is not None and not torch.equal(qmap.cpu().float(), dynamic_map()):
            raise ValueError(f"{prefix}.nested_quant_map is not the 8-bit dynamic map")
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"nested_dtype must be float32, got {meta['nested_dtype']!r}")
        if "nested_offset" not in meta:
            raise ValueError(f"{prefix}.{_QS_KEY} has no nested_offset, which {prefix}.nested_absmax needs")
    t = NF4Tensor(
        data=data.reshape(-1).contiguous() if data.dtype == torch.uint8 else data.reshape(-1).contiguous().view(torch.uint8),
        absmax=sd[f"{prefix}.absmax"],
        shape=shape,
        dtype=_meta_dtype(meta.get("dtype")),
        blocksize=blocksize,
        nested_absmax=nested,
        nested_offset=None
        if nested is None
        else torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=nested.device),
        nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
    )
    t.validate()
    return t
