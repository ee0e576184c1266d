"""Streaming merges of HF-style safetensors checkpoints, one tensor at a time.

``merge_checkpoints(recipe, out_dir)`` never holds a whole model: for every
output tensor it maps that tensor's bytes in each input checkpoint (one mmap per
tensor, released when the tensor is done, so the page cache pages are charged to
the process only while they are in use), merges it with the functions of
:mod:`alignlab.merging.methods`, and writes the result with positioned writes
into its place in the output shard, whose header was laid out up front from the
inputs' headers; the chunked methods write chunk by chunk, so no whole-tensor
output buffer exists. Several tensors may be in flight on worker threads, but
only as many as fit in the footprint (inputs plus output) of the largest single
tensor, so peak memory is ``O(largest tensor x number of models)``, independent
of model size.

The output is ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` (from PEFT adapter folders, one ``adapter_model.safetensors``),
built in a temporary directory next to
``out_dir`` and renamed into place only when complete: an error (missing tensor,
shape mismatch, bad parameter, full disk) leaves no partial output behind.
Non-weight files of the base model (``config.json``, tokenizer files, ...) are
copied over: all of them from a base folder, only the config, tokenizer, generation and
chat-template files from beside a base given as one ``.safetensors`` file.

safetensors layout (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
end of the header), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import uuid
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from alignlab._checks import as_bool, user_path
from alignlab._atomic import fsync_dir, fsync_file, keep_mode, made_folder, sibling
from alignlab.merging import methods as M
from alignlab.merging.recipe import DTYPES, EQUAL_INPUTS, Recipe, load_recipe, recipe_from_dict

__all__ = ["SafetensorsCheckpoint", "merge_checkpoints", "merge_tensor"]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
ADAPTER_NAME = "adapter_model.safetensors"  # with adapter_config.json: a PEFT adapter folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
# what a model folder holds besides weights: config, tokenizer, generation and chat-template files
_MODEL_FOLDER_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json",
})

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
_TORCH_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} > file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    return header, 8 + n


def _check_entry(name: str, e: _Entry, file_size: int) -> None:
    """``ValueError`` naming the file and tensor unless its bytes lie inside the file and match its shape.

    Checked when the headers are read, so a truncated download fails before anything is written,
    not as an unnamed ``mmap`` error halfway through the merge."""
    want = math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size()
    if e.nbytes != want:
        raise ValueError(f"tensor {name!r} in {e.file} holds {e.nbytes} bytes but {e.dtype} {list(e.shape)} "
                         f"needs {want}: the header is corrupt")
    if e.offset + e.nbytes > file_size:
        raise ValueError(f"tensor {name!r} in {e.file} ends at byte {e.offset + e.nbytes} but the file has "
                         f"{file_size}: the file is truncated (an interrupted download or copy?)")


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an HF ``model.safetensors.index.json``; ``ValueError`` naming the file if it has none."""
    try:
        raw = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map (tensor name -> shard file)")
    return weight_map


class SafetensorsCheckpoint:
    """Lazy view of a checkpoint directory (or a single ``.safetensors`` file).

    Only the JSON headers are read on construction; :meth:`read` loads one
    tensor with positioned reads. Shards are found through
    ``model.safetensors.index.json`` when present, else every ``*.safetensors``
    file in the directory is used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = user_path(path, "path")
        if self.path.is_file():
            files = [self.path]
        elif self.path.is_dir():
            index = self.path / INDEX_NAME
            if index.exists():
                files = [self.path / f for f in dict.fromkeys(_weight_map(index).values())]
            else:
                files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in checkpoint {str(self.path)!r}")
        else:
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} does not exist")
        self.entries: dict[str, _Entry] = {}
        for file in files:
            header, start = _read_header(file)
            size = file.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                    raise ValueError(f"tensor {name!r} in {file}: a header entry needs dtype, shape and data_offsets, "
                                     f"got {info!r}")
                if info["dtype"] not in _ST_TO_TORCH:
                    raise ValueError(f"tensor {name!r} in {file} has unsupported dtype {info['dtype']}")
                entry = _Entry(file, _ST_TO_TORCH[info["dtype"]], tuple(info["shape"]), start + info["data_offsets"][0],
                               info["data_offsets"][1] - info["data_offsets"][0])
                _check_entry(name, entry, size)
                self.entries[name] = entry
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def map(self, name: str) -> Tensor:
        """Tensor ``name`` as a private (copy-on-write) memory map of its bytes in the file.

        Nothing is copied or allocated: the pages come straight from the page cache, many per
        fault, and leave the process when the returned tensor (the last reference to the map) is
        freed. Writes to the tensor stay private. The file must not be truncated while it is mapped.
        """
        e = self.entries[name]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        start = e.offset - e.offset % mmap.ALLOCATIONGRANULARITY
        with open(e.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), e.offset + e.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        # the tensor keeps the map alive; it is unmapped when the tensor is freed
        return torch.frombuffer(mm, dtype=torch.uint8, count=e.nbytes, offset=e.offset - start).view(
            e.dtype).reshape(e.shape)

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        """Load tensor ``name`` into a fresh CPU tensor (or into the ``uint8`` buffer ``out``)."""
        e = self.entries[name]
        buf = torch.empty(e.nbytes, dtype=torch.uint8) if out is None else out
        if buf.dtype != torch.uint8 or buf.numel() != e.nbytes or not buf.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 tensor of {e.nbytes} bytes for {name!r}")
        fh = self._handles.get(e.file)
        if fh is None:
            fh = self._handles[e.file] = open(e.file, "rb", buffering=0)
        view, done = memoryview(buf.numpy()), 0
        while done < e.nbytes:
            got = os.preadv(fh.fileno(), [view[done:]], e.offset + done)
            if got <= 0:
                raise OSError(f"unexpected end of file reading {name!r} from {e.file}")
            done += got
        return buf.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- merging one tensor


def _rescale_arg(value: Any) -> str | None:
    if value is True:
        return "inverse"
    if value is False or value is None:
        return None
    if value in ("inverse", "l1"):
        return value
    raise ValueError(f"rescale must be true, false, 'inverse' or 'l1', got {value!r}")


def _generator(recipe: Recipe, name: str) -> torch.Generator:
    # Seeded per (random_seed, tensor name), so that masks do not depend on the order tensors are visited in. One
    # 32-bit hash of both: the CPU generator keeps a seed's low 32 bits only, and the seed sat in the high ones
    # (every random_seed gave the same masks)
    return torch.Generator().manual_seed(zlib.crc32(name.encode(), zlib.crc32(str(recipe.random_seed).encode())))


def merge_tensor(recipe: Recipe | Mapping[str, Any] | str | os.PathLike, name: str, tensors: Mapping[Path, Tensor],
                 out_dtype: torch.dtype | None = None, *, out: Any = None) -> Tensor | None:
    """Merge one tensor ``name`` given each input checkpoint's copy (keyed by path).

    This is what :func:`merge_checkpoints` runs per tensor; it is exposed so that
    in-memory state dicts can be merged with exactly the same semantics. ``recipe`` is what
    :func:`merge_checkpoints` takes: a :class:`~alignlab.merging.recipe.Recipe`, a mapping in the YAML
    schema or the path of a YAML file (validated on every call: over a whole state dict, build the
    ``Recipe`` once with :func:`~alignlab.merging.recipe.recipe_from_dict` or ``load_recipe``).
    ``tensors`` may be keyed by ``Path`` or by the strings written in the recipe
    (``{"./llama-math": t, ...}``). The arithmetic is float32 (float64 for float64 inputs) and the
    result is rounded once, to ``out_dtype`` (default: the dtype of the first input).

    ``base_model`` plays mergekit's part in each method: the task vectors' origin for task arithmetic, TIES,
    DARE, breadcrumbs, DELLA and Model Stock, the ``t = 0`` end for SLERP and the instruction model for
    ChipAlign; for linear and karcher it is one more input (after the listed models, weighted by the recipe-wide
    ``weight``; karcher's default is 1) when it is not listed under ``models``, so ``tensors`` needs its copy then
    too.

    Parameters are read as mergekit reads the same recipe: ``weight`` has no default for linear and the task-vector
    methods (set it per model or once under the recipe's ``parameters``), and SLERP's ``t`` is recipe-wide.

    Raises:
        ValueError: an invalid recipe, a model of the recipe missing from ``tensors`` (named), an fp8 tensor
            (meaningless without its scale), a NaN in any model's tensor (naming the model and the first NaN's
            index: mergekit would write NaN there), or what the method raises (shapes, parameters, a float16
            result beyond float16's range).
        TypeError: ``recipe`` is none of the above, ``tensors`` is not a mapping.

    ``out`` (internal): a chunk writer that the chunked methods (slerp, task arithmetic, TIES, DARE,
    breadcrumbs, DELLA) write the result into, chunk by chunk, returning None; the other methods
    ignore it and return the merged tensor.
    """
    r = _as_recipe(recipe)  # a mapping raised AttributeError: 'dict' object has no attribute 'merge_method'
    tensors = _by_path(r, name, tensors)
    for p, t in tensors.items():
        if isinstance(t, Tensor) and t.dtype in _FP8:
            raise ValueError(f"tensor {name!r} of model {str(p)!r} is {t.dtype}: fp8 weights mean something only "
                             f"with their scales, which merge_tensor does not see; {_DEQUANTIZE}")
    try:
        return _merge(r, name, tensors, out_dtype, out)
    except M._NaNInput as e:  # named by argument (models[0]); here by the model it came from
        paths = [m.path for m in r.inputs] if r.merge_method in EQUAL_INPUTS else [r.base_model,
                                                                                  *(m.path for m in r.fine_tuned)]
        raise ValueError(f"tensor {name!r} of model {str(paths[e.position])!r} holds {e.count} NaN value(s), the "
                         f"first at index {e.first}: {M.NAN_ADVICE}") from None


def _merge(r: Recipe, name: str, tensors: dict[Path, Tensor], out_dtype: torch.dtype | None, out: Any):
    """:func:`merge_tensor` once the recipe and the tensors are checked."""
    method = r.merge_method
    if method in EQUAL_INPUTS:  # the base, when not listed, is the last input (mergekit's order)
        inputs = [tensors[m.path] for m in r.inputs]
        # linear needs a weight per input, as in mergekit; karcher's default 1 is mergekit's (it ignores weights)
        weights = [r.value("weight", name, m, None if method == "linear" else 1.0) for m in r.inputs]
        if method == "linear":
            return M.linear(inputs, weights, out_dtype=out_dtype,
                            normalize=r.value("normalize", name, default=True))
        return M.karcher(inputs, weights, out_dtype=out_dtype, max_iter=int(r.value("max_iter", name, default=10)),
                         tol=float(r.value("tol", name, default=1e-5)))
    base = tensors[r.base_model]
    ft = r.fine_tuned
    others = [tensors[m.path] for m in ft]
    if method == "slerp":
        t = r.value("t", name)  # recipe-wide, as mergekit reads it; ValueError naming 't' where it is not set
        return M.slerp(base, others[0], float(t), out_dtype=out_dtype, out=out)
    if method == "chipalign":
        lam = r.value("lambda", name, ft[0])  # likewise
        return M.chipalign(base, others[0], float(lam), out_dtype=out_dtype)
    if method == "model_stock":
        return M.model_stock(base, others, out_dtype=out_dtype,
                             filter_wise=r.value("filter_wise", name, default=False))

    weights = [float(r.value("weight", name, m)) for m in ft]  # no default: mergekit requires it too
    lam = float(r.value("lambda", name, default=1.0))
    if method == "task_arithmetic":
        return M.task_arithmetic(base, others, weights, out_dtype=out_dtype, out=out,
                                 normalize=r.value("normalize", name, default=False),
                                 lambda_=lam)
    density = [r.value("density", name, m, 1.0) for m in ft]
    consensus = "sum" if method.endswith("ties") or method == "della" else None
    consensus = r.value("consensus", name, default=consensus) if consensus else None
    if method == "ties":
        return M.ties(base, others, weights, out_dtype=out_dtype, out=out, density=density, consensus=consensus,
                      normalize=r.value("normalize", name, default=True), lambda_=lam)
    if method in ("dare_linear", "dare_ties"):
        return M.dare(base, others, weights, out_dtype=out_dtype, out=out, density=density, consensus=consensus,
                      rescale=_rescale_arg(r.value("rescale", name, default=True)),
                      normalize=r.value("normalize", name, default=False), lambda_=lam,
                      generator=_generator(r, name))
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        gamma = [float(r.value("gamma", name, m, 0.01)) for m in ft]
        return M.breadcrumbs(base, others, weights, out_dtype=out_dtype, out=out, density=density, gamma=gamma,
                             consensus=consensus, normalize=r.value("normalize", name, default=False),
                             lambda_=lam)
    if method in ("della", "della_linear"):
        eps = [float(r.value("epsilon", name, m, 0.15)) for m in ft]
        if len(set(eps)) > 1:
            raise ValueError("della: per-model epsilon values must be equal")
        return M.della(base, others, weights, out_dtype=out_dtype, out=out, density=density, epsilon=eps[0],
                       consensus=consensus,
                       rescale=_rescale_arg(r.value("rescale", name, default=True)),
                       normalize=r.value("normalize", name, default=method == "della"), lambda_=lam,
                       generator=_generator(r, name))
    raise ValueError(f"unknown merge_method {method!r}")  # recipe validation makes this unreachable


def _by_path(r: Recipe, name: str, tensors: Mapping) -> dict[Path, Tensor]:
    """``tensors`` keyed by ``Path``; ``ValueError`` naming the recipe's models that have no tensor there."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must map each model's path to its tensor {name!r}, got {type(tensors).__name__}")
    out = {Path(os.path.expanduser(str(k))) if isinstance(k, (str, os.PathLike)) else k: v
           for k, v in tensors.items()}
    if r.merge_method in EQUAL_INPUTS:  # no base role: every listed model and an unlisted base are inputs
        needed = [m.path for m in r.inputs]
    else:
        needed = [r.base_model] + [m.path for m in r.fine_tuned]
    missing = [str(p) for p in dict.fromkeys(needed) if p not in out]
    if missing:
        raise ValueError(f"tensors has no {name!r} for model(s) {missing} of the recipe; "
                         f"got keys {[str(k) for k in out]}")
    return out


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _plan_shards(specs: list[_OutSpec], max_bytes: int) -> list[list[_OutSpec]]:
    shards: list[list[_OutSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header_bytes(specs: list[_OutSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for s in specs:
        header[s.name] = {"dtype": _TORCH_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _side_files(base_dir: Path, dtype: torch.dtype | None, model_folder: bool) -> dict[Path, str | None]:
    """The base's non-weight files in ``base_dir`` to copy, each with its new text (``config.json`` with the
    output dtype) or ``None`` for a plain copy. Read before the merge: a ``config.json`` that is not JSON failed
    only after every tensor was merged, with a ``JSONDecodeError`` that named no file.

    ``model_folder``: the base was given as this folder, and all of its files are the model's. Otherwise it
    was one weights file, and its folder may be anything (Downloads): only :data:`_MODEL_FOLDER_FILES` come."""
    out: dict[Path, str | None] = {}
    for src in sorted(base_dir.iterdir()):
        if not src.is_file() or src.name.endswith(_WEIGHT_SUFFIXES) or src.name.endswith(".index.json"):
            continue
        if not model_folder and src.name not in _MODEL_FOLDER_FILES:
            continue
        out[src] = None
        if src.name == "config.json" and dtype is not None:
            try:
                cfg = json.loads(src.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{src}: not valid JSON ({e}); its torch_dtype cannot be set to the output "
                                 f"dtype {_TORCH_NAMES[dtype]}") from None
            if isinstance(cfg, dict):
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = _TORCH_NAMES[dtype]
            out[src] = json.dumps(cfg, indent=2) + "\n"
    return out


def _copy_side_files(files: dict[Path, str | None], out: Path) -> None:
    """Write :func:`_side_files` into ``out``: each new text, or a copy of the file."""
    for src, text in files.items():
        if text is not None:
            (out / src.name).write_text(text)
        else:
            shutil.copy2(src, out / src.name)


def _as_recipe(recipe: Recipe | Mapping[str, Any] | str | os.PathLike) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise TypeError(f"recipe must be a Recipe, a mapping or a path to a YAML file, got {type(recipe).__name__}")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.info("tqdm is not installed; merging without a progress bar")
        return None
    return tqdm(total=total, unit="tensor", desc="merging")


def merge_checkpoints(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
    prefetch: bool = True,
) -> Path:
    """Merge checkpoints tensor by tensor according to ``recipe``; write ``out_dir``.

    Args:
        recipe: a :class:`~alignlab.merging.recipe.Recipe`, a mapping in the
            YAML schema, or the path of a YAML file.
        out_dir: output directory; must not exist (or be empty) unless ``overwrite``. A symlink to a
            directory is followed: the merge replaces the directory it points to, and the link stays. A
            leading ``~`` is the home folder. Missing parent folders are created (and removed again if the
            merge fails); a replaced directory's permissions carry over to the new one.
        overwrite: replace an existing non-empty ``out_dir`` (only after the new
            merge has fully succeeded).
        progress: show a tqdm bar over tensors (silently off without tqdm).
        prefetch: merge up to ``torch.get_num_threads()`` tensors at once on worker
            threads (each with single-threaded torch ops; the thread setting is
            restored afterwards), each writing its result into its place in the shard;
            the tensors in flight never exceed the largest single tensor's inputs plus output.
            False: one tensor at a time.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``out_dir`` is an empty string, is (or holds) an input checkpoint that ``overwrite``
            would delete, or lies inside an input checkpoint's folder; unknown method, bad parameters, a tensor missing from a
            model or with a different shape (the message names model and tensor); a quantized
            checkpoint (fp8 weights, a float scale beside integer weights, bitsandbytes 4-bit / 8-bit
            state such as ``weight.absmax`` or ``SCB``: dequantize first); a
            float16 output whose merged values leave float16's range (named, with the largest magnitude); a
            base ``config.json`` that is not JSON when ``dtype`` changes it (named, before any tensor is merged).
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
        FileNotFoundError: an input checkpoint does not exist.
        TypeError: ``out_dir`` is not a str / ``os.PathLike``, or a flag is not a bool (``overwrite="no"``
            would replace the directory).
    """
    given = out = user_path(out_dir, "out_dir")
    if not os.fspath(out_dir):  # Path("") is ".": with overwrite=True, the folder one is in would be replaced
        raise ValueError("out_dir must name a folder, got an empty path (write '.' for the current folder)")
    overwrite, progress, prefetch = (as_bool(v, f) for v, f in ((overwrite, "overwrite"), (progress, "progress"),
                                                                 (prefetch, "prefetch")))
    r = _as_recipe(recipe)
    if out.name in ("", ".."):
        # "." (merging into the empty folder one is in) or "..": named, as the parent's entry that is renamed
        # aside and replaced; "." itself cannot be renamed ("Device or resource busy" after the whole merge)
        out = Path(os.path.abspath(out))
    if out.is_symlink() and out.is_dir():
        # a link to a folder (on a bigger disk, say): the merge goes into that folder and the link stays; it
        # was replaced by a new folder beside the link, on the link's disk, and the folder kept its old files
        out = Path(os.path.realpath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"out_dir {str(given)!r} exists and is not empty (pass overwrite=True, or --overwrite on "
                              "the command line, to replace it)")
    ref_path = r.base_model if r.base_model is not None else r.models[0].path
    paths = list(dict.fromkeys([ref_path, *(m.path for m in r.models)]))
    _refuse_replacing_inputs(out, paths)

    with ExitStack() as stack:
        ckpts = {p: stack.enter_context(SafetensorsCheckpoint(p)) for p in paths}
        specs = _validate(r, ckpts, ref_path)
        # a PEFT adapter in gives a PEFT adapter out: one adapter_model.safetensors (PEFT reads no shards and no
        # index) beside the copied adapter_config.json; as model shards neither PEFT nor load_adapter found it
        adapter = _is_adapter(ref_path)
        if adapter:
            _refuse_unequal_adapter_scales(ref_path, paths)
        model_folder = ref_path.is_dir()
        side = _side_files(ref_path if model_folder else ref_path.parent, r.dtype, model_folder)
        shards = [specs] if adapter else _plan_shards(specs, r.out_shard_size)
        tmp = sibling(out, f"partial-{uuid.uuid4().hex[:8]}")
        with made_folder(out.parent):  # parent folders made for out_dir go again if the merge fails
            try:
                tmp.mkdir()
                _write_shards(r, ckpts, shards, tmp, progress, prefetch, single=ADAPTER_NAME if adapter else None)
                _copy_side_files(side, tmp)
                for f in tmp.iterdir():  # the shards are fsynced already; the index and the copied files too
                    if not f.name.endswith(".safetensors"):
                        fsync_file(f)
                fsync_dir(tmp)
                _install(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return given


def _refuse_replacing_inputs(out: Path, inputs: list[Path]) -> None:
    """``ValueError`` if ``out`` is an input checkpoint, holds one (``.`` in the folder of the models, say: with
    ``overwrite`` the merge would succeed, and the replaced folder, inputs and all, be removed) or lies inside an
    input's folder (``model/model.safetensors`` with ``overwrite`` replaced that input's weights by a folder)."""
    root = os.path.realpath(out)
    for p in inputs:
        real = os.path.realpath(p)
        if os.path.commonpath([root, real]) == root:
            raise ValueError(f"out_dir {str(out)!r} is or holds {str(p)!r}: overwrite=True would delete input "
                             "checkpoint(s) of the recipe; write the merge to another folder")
        if os.path.isdir(real) and os.path.commonpath([root, real]) == real:
            raise ValueError(f"out_dir {str(out)!r} lies inside the input checkpoint {str(p)!r}: the merge could "
                             "replace that input's files, and would be read as part of it; write it to another folder")


def _is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors`` as its
    only weights (a model folder that also ships its adapter is read, and written, as the model)."""
    return (path.is_dir() and (path / "adapter_config.json").is_file() and not (path / INDEX_NAME).exists()
            and [p.name for p in path.glob("*.safetensors")] == [ADAPTER_NAME])


# the adapter_config.json fields that set an adapter's scale s (alpha / r, or alpha / sqrt(r)) per module, with
# PEFT's defaults for a file that leaves one out
_SCALE_FIELDS = {"peft_type": None, "r": 8, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {},
                 "alpha_pattern": {}, "use_dora": False}


def _refuse_unequal_adapter_scales(ref_path: Path, paths: list[Path]) -> None:
    """``ValueError`` unless every PEFT adapter folder among ``paths`` has the scale of ``ref_path``'s: the merge
    combines the stored factors ``A``, ``B`` and copies the reference's ``adapter_config.json``, so an adapter with
    another ``lora_alpha`` (or rank pattern, rsLoRA, DoRA) would be read with the reference's scale."""
    def fields(path: Path) -> dict[str, Any]:
        try:
            config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{str(path)!r}: adapter_config.json cannot be read as JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{str(path)!r}: adapter_config.json is not a JSON object")
        return {k: config.get(k, default) for k, default in _SCALE_FIELDS.items()}

    ref = fields(ref_path)
    for p in paths:
        if p != ref_path and _is_adapter(p):
            other = fields(p)
            differ = {k: (ref[k], other[k]) for k in ref if ref[k] != other[k]}
            if differ:
                shown = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in differ.items())
                raise ValueError(
                    f"adapter {str(p)!r} has another scale than {str(ref_path)!r} ({shown}): its factors would be "
                    "merged as if they had the reference's scale; combine them with their own scales through "
                    "alignlab.merging.lora (lora_linear / lora_cat / lora_svd take one scale per adapter)")


def _mergeable(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` are merged (16/32/64-bit floats) rather than copied from the reference."""
    return dtype.is_floating_point and dtype.itemsize > 1


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# the float tensor that scales a quantized weight beside it: `weight_scale_inv` (DeepSeek-V3, Qwen3-FP8),
# `weight_scale` / `input_scale` (compressed-tensors), `scales` (GPTQ, AWQ)
_SCALE_LEAF = re.compile(r"(?:^|_)scales?(?:_inv)?$")
_DEQUANTIZE = ("dequantize every checkpoint to bfloat16 first (each weight times its scale, the scale repeated over "
               "its block) and merge those")


# bitsandbytes state beside a quantized weight, as transformers saves a BitsAndBytesConfig model: 4-bit
# (`<w>.absmax`, `<w>.quant_map`, `<w>.nested_absmax`, `<w>.nested_quant_map`, `<w>.quant_state.bitsandbytes__nf4`
# or `__fp4`, next to `<w>` itself: uint8, two 4-bit codes a byte, shape (n/2, 1)) and 8-bit LLM.int8
# (`<m>.SCB`, one float32 scale per row, and `<m>.weight_format`, next to the int8 `<m>.weight`)
_BNB_4BIT = re.compile(r"^(.+)\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$")
_BNB_8BIT = re.compile(r"^(.+)\.(?:SCB|weight_format)$")
_BNB_DEQUANTIZE = ("load it dequantized (transformers: from_pretrained with its BitsAndBytesConfig, then "
                   "model.dequantize(); or the unquantized original), save that in bfloat16 and merge those")


def _bnb_quantized(name: str, ck: SafetensorsCheckpoint) -> tuple[str, str] | None:
    """``(weight, kind)`` if tensor ``name`` is bitsandbytes quantization state: the weight it belongs to and
    ``"4-bit (nf4)"``, ``"4-bit (fp4)"``, ``"4-bit"`` or ``"8-bit (LLM.int8)"``; else None. A state key counts
    only beside its quantized weight (a model may have a tensor that merely ends in ``absmax``)."""
    m = _BNB_4BIT.match(name)
    if m and m.group(1) in ck and not _mergeable(ck.entries[m.group(1)].dtype):
        weight = m.group(1)
        types = [t for t in ("nf4", "fp4") if f"{weight}.quant_state.bitsandbytes__{t}" in ck]
        return weight, f"4-bit ({types[0]})" if types else "4-bit"
    m = _BNB_8BIT.match(name)
    if m and f"{m.group(1)}.weight" in ck and not _mergeable(ck.entries[f"{m.group(1)}.weight"].dtype):
        return f"{m.group(1)}.weight", "8-bit (LLM.int8)"
    return None


def _scale_of(name: str, ck: SafetensorsCheckpoint) -> str | None:
    """The scale tensor stored next to the quantized weight ``name`` in ``ck``, if one is there."""
    prefix, _, leaf = name.rpartition(".")
    for cand in (f"{name}_scale_inv", f"{name}_scale", f"{prefix}.{leaf.split('_')[0]}_scale"):
        if cand != name and cand in ck:
            return cand
    return None


def _refuse_quantized(ckpts: dict[Path, SafetensorsCheckpoint]) -> None:
    """``ValueError`` for a quantized checkpoint, naming the tensor: its weights are copied, not merged,
    while their float scales would be merged, an inconsistent pair (and the fine-tuned weights lost)."""
    for p, ck in ckpts.items():
        copied_modules = {}
        for name, e in ck.entries.items():
            bnb = _bnb_quantized(name, ck)
            if bnb is not None:
                weight, kind = bnb
                w = ck.entries[weight]
                raise ValueError(
                    f"tensor {name!r} of model {str(p)!r} is bitsandbytes {kind} quantization state of {weight!r} "
                    f"({w.dtype}, shape {list(w.shape)}: quantized codes, not weights): a merge would copy the codes "
                    f"from one model and merge their float state; {_BNB_DEQUANTIZE}")
            if e.dtype in _FP8:
                scale = _scale_of(name, ck)
                raise ValueError(
                    f"tensor {name!r} of model {str(p)!r} is {e.dtype}"
                    + (f" with its scale {scale!r}" if scale else "")
                    + ": fp8 weights mean something only with their scales, and a merge can neither merge the "
                    f"stored fp8 values nor copy them from one model; {_DEQUANTIZE}")
            if not _mergeable(e.dtype) and len(e.shape) >= 2:
                copied_modules.setdefault(name.rpartition(".")[0], name)
        for name, e in ck.entries.items():
            prefix, _, leaf = name.rpartition(".")
            if _mergeable(e.dtype) and _SCALE_LEAF.search(leaf) and prefix in copied_modules:
                raise ValueError(
                    f"tensor {name!r} of model {str(p)!r} ({e.dtype}) scales the quantized tensor "
                    f"{copied_modules[prefix]!r}, which is {ck.entries[copied_modules[prefix]].dtype}: a merge would "
                    f"merge the scale but copy the quantized values from one model; {_DEQUANTIZE}")


def _validate(r: Recipe, ckpts: dict[Path, SafetensorsCheckpoint], ref_path: Path) -> list[_OutSpec]:
    """Check every tensor of the reference model against all models before writing anything."""
    _refuse_quantized(ckpts)
    ref = ckpts[ref_path]
    specs = []
    for name in ref.names():
        e = ref.entries[name]
        for p, ck in ckpts.items():
            if p == ref_path:
                continue
            if name not in ck:
                raise ValueError(f"model {str(p)!r} has no tensor {name!r} (present in {str(ref_path)!r})")
            if ck.entries[name].shape != e.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {list(ck.entries[name].shape)} in model {str(p)!r} "
                    f"but {list(e.shape)} in {str(ref_path)!r}"
                )
            if _mergeable(ck.entries[name].dtype) != _mergeable(e.dtype):
                # a weight in one model and an integer buffer in another: no merge is meaningful,
                # and copying the reference's would drop the other model's values without a word
                raise ValueError(
                    f"tensor {name!r} is {ck.entries[name].dtype} in model {str(p)!r} but {e.dtype} in "
                    f"{str(ref_path)!r}: a 16/32/64-bit float tensor is merged, any other is copied, not both"
                )
        floating = _mergeable(e.dtype)
        specs.append(_OutSpec(name, r.dtype if (floating and r.dtype is not None) else e.dtype, e.shape))
    for p, ck in ckpts.items():
        extra = set(ck.names()) - set(ref.names())
        if extra:
            log.warning("model %s has %d tensors not in %s; they are ignored (e.g. %s)", p, len(extra), ref_path,
                        sorted(extra)[0])
    return specs


class _FileDest:
    """Writes one merged tensor into its place in an output shard, chunk by chunk (positioned
    writes from the worker thread, out of order across tensors), through one small reused buffer."""

    __slots__ = ("fd", "offset", "dtype", "itemsize", "buf", "saw_inf")

    def __init__(self, fd: int, offset: int, dtype: torch.dtype):
        self.fd, self.offset, self.dtype = fd, offset, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.buf: Tensor | None = None
        self.saw_inf = False  # float16 only: an inf was written (an overflow unless an input had one)

    def _watch(self, values: Tensor) -> None:
        if self.dtype == torch.float16 and not self.saw_inf:
            self.saw_inf = bool(torch.isinf(values).any())

    def chunk(self, start: int, length: int) -> Tensor:
        if self.buf is None or self.buf.numel() < length:
            self.buf = torch.empty(length, dtype=self.dtype)
        return self.buf[:length]

    def put(self, start: int, values: Tensor) -> None:
        self._watch(values)
        _pwrite(self.fd, values, self.offset + start * self.itemsize)

    def write(self, tensor: Tensor) -> None:
        self._watch(tensor)
        _pwrite(self.fd, tensor, self.offset)


def _start_writeback():
    """``start(fd, offset, nbytes)``: ask the kernel to begin writing a finished file range to disk
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the disk works while
    the merge goes on and the closing fsync only waits for the tail. A no-op elsewhere."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError, TypeError):
        return lambda fd, offset, nbytes: None
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE; errors ignored


_WRITEBACK_BYTES = 64 << 20  # start writing back a shard's finished bytes whenever this many have accumulated


def _pwrite(fd: int, tensor: Tensor, pos: int) -> None:
    data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)


def _refuse_float16_overflow(r: Recipe, name: str, tensors: Mapping[Path, Tensor]) -> None:
    """``ValueError`` naming tensor ``name``, whose float16 output got an inf from finite inputs, with the
    largest magnitude the merge reaches (merged again in float32 to find it: the merge is deterministic)."""
    peak = float(merge_tensor(r, name, tensors, out_dtype=torch.float32).abs().amax())
    raise ValueError(
        f"tensor {name!r}: merged values reach {peak:.6g} in magnitude, beyond float16's largest finite value "
        f"{torch.finfo(torch.float16).max:.0f}; written as float16 they would be inf. Write bfloat16 (dtype: "
        f"bfloat16, float32's range) or float32, or check the weights / lambda of the recipe")


def _write_shards(r: Recipe, ckpts, shards: list[list[_OutSpec]], tmp: Path, progress: bool, prefetch: bool,
                  single: str | None = None) -> None:
    """Map, merge and write every tensor as a bounded pipeline.

    Worker threads (as many as ``torch.get_num_threads()``, one with ``prefetch=False``) each map one
    tensor's inputs, merge it with single-threaded torch ops and write the result into its place in
    the output shard (all shards are created, headers written and sized up front). This thread
    admits tensors in file order and collects them in that order. A tensor is started only while
    the bytes of the tensors in flight (inputs plus output) stay within the footprint of the
    largest single tensor, so peak memory is that of about one largest tensor however many run at
    once, and never depends on the model size. Independent tensors on separate threads keep both
    cores busy without the per-op barriers of intra-op parallelism, which stall whenever another
    process holds a core. Each shard is fsynced once, at the end.
    """
    n = len(shards)
    # ``single``: one file of that name and no index (a PEFT adapter), else HF's sharded layout
    names = [single] if single is not None else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    order = [(i, s) for i, shard in enumerate(shards) for s in shard]
    bar = _progress(len(order), progress)
    ref_path = r.base_model if r.base_model is not None else r.models[0].path

    def cost(spec: _OutSpec) -> int:
        return sum(ck.entries[spec.name].nbytes for ck in ckpts.values()) + spec.nbytes

    budget = max((cost(s) for _, s in order), default=0)

    def job(fd: int, offset: int, spec: _OutSpec) -> None:
        tensors = {p: ck.map(spec.name) for p, ck in ckpts.items()}
        ref = tensors[ref_path]
        dest = _FileDest(fd, offset, spec.dtype)
        if not (ref.dtype.is_floating_point and ref.dtype.itemsize > 1) or ref.numel() == 0:
            res = ref.to(spec.dtype)  # integer buffers and empty tensors are copied from the reference
        else:
            try:  # rounded once, to the output dtype; the chunked methods write through dest themselves
                res = merge_tensor(r, spec.name, tensors, out_dtype=spec.dtype, out=dest)
            except M._Float16Overflow:  # the methods that return their result check it themselves
                res, dest.saw_inf = None, True
            except (ValueError, TypeError) as e:
                raise type(e)(f"while merging tensor {spec.name!r}: {e}") from e
        if res is not None:
            if res.dtype != spec.dtype or tuple(res.shape) != spec.shape:
                raise RuntimeError(f"merged {spec.name!r} came out {res.dtype}{tuple(res.shape)}")
            dest.write(res)
        if dest.saw_inf and not any(bool(torch.isinf(t).any()) for t in tensors.values()):
            _refuse_float16_overflow(r, spec.name, tensors)

    workers = max(1, torch.get_num_threads()) if prefetch else 1
    threads = torch.get_num_threads()
    weight_map, total = {}, 0
    fds: list[int] = []
    writeback = _start_writeback()
    flushed = {}  # shard index -> end of the range already handed to writeback
    try:
        offsets = {}
        for i, shard in enumerate(shards if order else shards[:1]):  # an empty model still gets its shard
            header = _header_bytes(shard)
            path = tmp / names[i]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides, as for any file
            fds.append(fd)
            os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
            _pwrite(fd, torch.frombuffer(bytearray(header), dtype=torch.uint8), 0)
            pos = len(header)
            for spec in shard:
                offsets[spec.name] = pos
                pos += spec.nbytes
        torch.set_num_threads(1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()  # (shard index, spec, future), in file order
            in_flight, nxt = 0, 0
            try:
                while nxt < len(order) or pending:
                    # admit tensors while they fit (always at least one), keeping every worker fed
                    while nxt < len(order) and len(pending) <= workers and (
                            not pending or in_flight + cost(order[nxt][1]) <= budget):
                        i, spec = order[nxt]
                        pending.append((i, spec, pool.submit(job, fds[i], offsets[spec.name], spec)))
                        in_flight += cost(spec)
                        nxt += 1
                    i, spec, fut = pending.popleft()
                    fut.result()
                    end = offsets[spec.name] + spec.nbytes  # everything before it in the shard is written too
                    if end - flushed.get(i, 0) >= _WRITEBACK_BYTES:
                        writeback(fds[i], flushed.get(i, 0), end - flushed.get(i, 0))
                        flushed[i] = end
                    weight_map[spec.name] = names[i]
                    total += spec.nbytes
                    in_flight -= cost(spec)
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                for _, _, fut in pending:
                    fut.cancel()
                raise
        for fd in fds:
            os.fsync(fd)
    finally:
        torch.set_num_threads(threads)
        for fd in fds:
            os.close(fd)
    if bar is not None:
        bar.close()
    if single is None:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is removed only afterwards. The parent folder
    is fsynced after the rename, so a crash right after the merge finds the new folder in place."""
    if not out.exists():
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    if out.is_dir():  # a private (0700) output stays private, as a file rewritten in place keeps its mode
        keep_mode(tmp, out)
    old = sibling(out, f"old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file (or link) replaced with overwrite=True: rmtree would leave it behind
        try:
            old.unlink(missing_ok=True)
        except OSError:
            pass
    if os.path.lexists(old):
        # the merge is in place; what is left is the replaced output, as large as a model, under a hidden name
        warnings.warn(f"merge_checkpoints: the previous {out} was replaced, but not all of it could be removed: "
                      f"it remains in {old}; delete that by hand", RuntimeWarning, stacklevel=3)
