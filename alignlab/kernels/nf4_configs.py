"""Launch configurations of the decode-sized NF4 kernels (:mod:`alignlab.kernels.nf4_small`), per GPU.

A configuration is ``(block_n, nb, split, num_warps, num_stages)``: output rows per program,
quantization blocks per loop step, K slices, warps, software-pipeline stages. The best one depends on
the GPU (an H200 moves ~1.45x the bytes per second of an H100 with the same SMs, so it wants more bytes
in flight per SM) and on the shape, so the tables below are *measured*: ``benchmarks/nf4_tune.py``
times every candidate on the GPU at hand (CUDA graphs over rotating weights, bf16 activations,
blocksize 64 with double quantization) at the five benchmark shapes and ``M = 1, 2, 4, ..., 64``,
and prints the table to paste here.

At run time :func:`small_config` picks the table by the device's name (:func:`device_key`) and, within
it, the entry of the measured shape nearest to the call's ``(N, K)`` (log distance) at the call's row
bucket (``M`` rounded up to a power of two). Devices without a table, blocksizes other than 64 and fp32
activations take :func:`heuristic_config`: the rules measured on an H100 before the tables existed.

:func:`max_rows` is the largest ``M`` for which the table's device measured the small-``M`` kernels
faster than dequantize + cuBLAS; above it :func:`alignlab.kernels.nf4_matmul.nf4_matmul` dequantizes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["device_key", "note_device", "small_config", "small_choice", "heuristic_config", "max_rows",
           "takes_small", "TABLES", "ALTERNATIVES", "register_table"]

# inputs with more rows never take a kept decode launcher (kernels.nf4_matmul.decode_matmul, NF4Linear's decode path):
# no lookup for them
DECODE_ROWS = 64

# device key -> {"max_m": int, "configs": {(kernel, m_bucket): {(N, K): (block_n, nb, split, warps, stages)}},
#                "shapes": [(N, K), ...] (optional), "max_m_listed": int (optional, see takes_small)}.
# A shape listed under ("swap_early", m), ("swap", m), ("late", m) or ("swap_flat", m) takes that kernel at that bucket (it measured
# faster there than the default of the same shape in the same run); the other shapes keep the base kernel ("gemv"
# at M = 1, "dot" above), with the table's entry or else the rules (see small_choice). "shapes" lists the measured
# shapes a call is matched to where the base kernel has no entries of its own (the H100 table).
# ALTERNATIVES: the order small_choice looks in (a shape is listed under one of them at most).
ALTERNATIVES = ("swap_early", "swap", "late", "swap_flat")
TABLES: dict[str, dict] = {
    # benchmarks/nf4_tune.py --kernel swap_early / --kernel swap on one H100 80GB HBM3, 2026-12-05 (torch 2.11,
    # Triton 3.6; results/nf4_tune_swap_h100.json, nf4_tune_swap_early_h100.json): the swapped-operand kernels where their best configuration
    # took <= 0.95x the time of the default (the rules below: "dot") in the same run at M = 2..16, and at every
    # shape at M = 32 / 64 (0.35-0.91x the time of dequantize + cuBLAS, the path those rows took before: max_m
    # was 16). The 1024-row shapes (k / v) from a run of 2026-12-06 (--shapes 1024x4096,1024x8192;
    # results/nf4_tune_swap_kv_h100.json; before it they took the 4096 x 4096 entries, 1.2-1.6x slower): `swap` at
    # M = 2..32; at M = 64 no small kernel beat dequantize + cuBLAS there (12.3 vs 12.2 us, 16.5 vs 15.8), so
    # max_m is 32 and 33..64 rows take the small kernels at the five shapes listed at that bucket ("max_m_listed").
    # The other shapes and buckets keep the rules (heuristic_config). ("swap_flat", 64): `nf4_tune.py --kernels
    # swap_flat --ms 2 16 32 64` on one H100, 2026-12-07 (results/nf4_tune_flat_h100_1207.json): 0.89-0.95x the time
    # of the entries it replaces (swap_early at 4096², swap at the other three) in the same run; at 2 / 16 / 32 rows
    # and at 4096 x 14336 it was not faster than the default. Then `--kernels swap_flat --ms 32 64 --exhaustive
    # --space block_n=32,64,128 nb=1,2,4 split=2,4,8 num_warps=4,8 num_stages=1` the same day
    # (results/nf4_tune_flat_exh_h100_1207.json, merged as nf4_tune.merged_table does): every shape at 32 rows
    # (0.82-0.92x the table's time then, and below bf16 cuBLAS's at all five) and the four 64-row entries
    # (0.80-0.92x; 4096² kept its entry, the same configuration). Then two more exhaustive swap_flat runs:
    # `--ms 16` (results/nf4_tune_flat16_h100_1207.json: 4096² and 4096 x 14336, 0.90 / 0.95x) and the k / v
    # shapes at 16 / 32 / 64 rows (results/nf4_tune_flat_kv_h100_1207.json: 1024 x 8192 at 32 rows, 0.90x, and
    # 1024 x 4096 at 64 rows, 11.2 us against 11.9 for dequantize + cuBLAS, so those rows take it; 1024 x 8192 at
    # 64 rows still lost to dequantize + cuBLAS, 15.6 vs 15.4 us, and is not listed there).
    "H100": {"max_m": 32, "max_m_listed": 64,
             "shapes": [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (1024, 4096),
                        (1024, 8192)],
             "configs": {
        ("swap", 2): {(1024, 4096): (32, 2, 16, 2, 2), (1024, 8192): (32, 2, 16, 2, 3)},
        ("swap_early", 2): {(8192, 8192): (64, 1, 8, 2, 3)},
        ("swap_early", 4): {(4096, 14336): (64, 4, 16, 4, 1), (28672, 8192): (128, 1, 4, 4, 3)},
        ("swap", 4): {(8192, 8192): (128, 1, 8, 2, 3), (1024, 4096): (32, 4, 8, 2, 3), (1024, 8192): (32, 1, 16, 2, 3)},
        ("swap_early", 8): {(4096, 14336): (64, 4, 16, 4, 1), (8192, 8192): (64, 1, 8, 2, 3)},
        ("swap", 8): {(1024, 4096): (32, 4, 8, 2, 3), (1024, 8192): (32, 1, 16, 2, 3)},
        ("swap_early", 16): {(14336, 4096): (64, 4, 4, 4, 1)},
        ("swap", 16): {(8192, 8192): (64, 1, 8, 2, 2), (28672, 8192): (64, 1, 4, 2, 2),
                       (1024, 4096): (32, 2, 16, 2, 2), (1024, 8192): (32, 2, 16, 2, 3)},
        ("swap_flat", 16): {(4096, 4096): (64, 2, 8, 4, 1), (4096, 14336): (32, 2, 8, 2, 1)},
        ("swap", 32): {(1024, 4096): (32, 4, 8, 4, 2)},
        ("swap_flat", 32): {(4096, 4096): (64, 4, 4, 4, 1), (14336, 4096): (64, 2, 2, 4, 1),
                            (4096, 14336): (64, 2, 8, 4, 1), (8192, 8192): (64, 2, 4, 4, 1),
                            (28672, 8192): (128, 1, 4, 4, 1), (1024, 8192): (64, 4, 16, 4, 1)},
        ("swap_flat", 64): {(4096, 4096): (64, 4, 4, 4, 1), (14336, 4096): (128, 2, 2, 8, 1),
                            (4096, 14336): (64, 4, 4, 4, 1), (8192, 8192): (128, 2, 4, 8, 1),
                            (28672, 8192): (128, 2, 2, 8, 1), (1024, 4096): (64, 4, 8, 4, 1)},
    }},
    # benchmarks/nf4_tune.py on one H200, 2026-12-04 (torch 2.11, Triton 3.6); the 1024-row shapes (the k / v
    # projections of Llama-3 8B and 70B) from a later run the same day (--shapes 1024x4096,1024x8192; before
    # it they took the 4096 x 4096 entries: 1.2-1.8x slower). max_m: at M = 32 the small kernel measured 0.74x
    # the time of dequantize + cuBLAS at four shapes and 1.01x at 4096 x 4096 (at the 1024-row shapes 1.2x and
    # 1.4x, kept: the bound is per device); at M = 64 it was slower at every shape.
    "H200": {"max_m": 32, "max_m_listed": 64,
             "shapes": [(1024, 4096), (1024, 8192), (4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192),
                        (28672, 8192)], "configs": {
        ("gemv", 1): {(1024, 4096): (32, 4, 8, 4, 2), (1024, 8192): (32, 4, 8, 4, 2), (4096, 4096): (64, 2, 8, 4, 1),
                      (14336, 4096): (64, 1, 8, 2, 1), (4096, 14336): (64, 2, 8, 4, 3),
                      (8192, 8192): (128, 1, 8, 4, 3), (28672, 8192): (64, 1, 16, 2, 1)},
        ("dot", 2): {(1024, 4096): (64, 4, 16, 4, 1), (1024, 8192): (32, 1, 16, 4, 1), (4096, 4096): (64, 2, 8, 4, 1),
                     (14336, 4096): (128, 1, 8, 4, 1), (4096, 14336): (64, 2, 8, 4, 1),
                     (8192, 8192): (128, 1, 8, 4, 1), (28672, 8192): (128, 1, 8, 4, 1)},
        ("dot", 4): {(1024, 4096): (64, 4, 16, 4, 1), (1024, 8192): (32, 1, 16, 4, 1), (4096, 4096): (64, 2, 8, 4, 1),
                     (14336, 4096): (128, 1, 8, 4, 1), (4096, 14336): (64, 2, 8, 4, 1),
                     (8192, 8192): (128, 1, 8, 4, 1), (28672, 8192): (128, 1, 8, 4, 1)},
        ("dot", 8): {(1024, 4096): (64, 4, 8, 8, 1), (1024, 8192): (64, 2, 16, 8, 1), (4096, 4096): (128, 2, 8, 8, 1),
                     (14336, 4096): (128, 1, 8, 4, 1), (4096, 14336): (128, 2, 8, 8, 1),
                     (8192, 8192): (128, 1, 8, 4, 1), (28672, 8192): (128, 1, 8, 4, 1)},
        ("dot", 16): {(1024, 4096): (64, 4, 16, 8, 1), (1024, 8192): (64, 4, 16, 8, 1),
                      (4096, 4096): (128, 2, 8, 8, 1), (14336, 4096): (128, 1, 8, 4, 1),
                      (4096, 14336): (128, 2, 8, 8, 1), (8192, 8192): (128, 1, 8, 4, 1),
                      (28672, 8192): (128, 1, 8, 4, 1)},
        ("dot", 32): {(1024, 4096): (64, 4, 16, 8, 1), (1024, 8192): (64, 4, 8, 8, 1),
                      (4096, 4096): (256, 4, 8, 8, 1), (14336, 4096): (256, 1, 4, 4, 3),
                      (4096, 14336): (256, 4, 8, 8, 1), (8192, 8192): (256, 2, 8, 4, 1),
                      (28672, 8192): (256, 2, 8, 4, 1)},
        ("dot", 64): {(4096, 4096): (256, 2, 8, 8, 1), (14336, 4096): (256, 1, 4, 4, 1),
                      (4096, 14336): (256, 2, 8, 8, 1), (8192, 8192): (256, 1, 8, 4, 1),
                      (28672, 8192): (256, 1, 2, 4, 1)},
        # nf4_tune.py --kernel late, same GPU kind, 2026-12-04 (RESULTS.md, issue 24): the shapes where the late
        # kernel took <= 0.98x the time of the "dot" entry above in the same run (0.81-0.97x); a shape the swapped
        # kernels took over since (below) is no longer listed here
        ("late", 4): {(14336, 4096): (128, 2, 8, 4, 1)},
        ("late", 8): {(14336, 4096): (128, 2, 8, 4, 1)},
        ("late", 16): {(14336, 4096): (128, 2, 8, 4, 1)},
        ("late", 32): {(1024, 8192): (128, 4, 16, 8, 1)},
        # nf4_tune.py --kernels swap_early swap on one H200, 2026-12-05 (torch 2.11, Triton 3.6;
        # results/nf4_tune_swap_h200.json): the swapped-operand kernels where their best configuration took
        # <= 0.95x the time of the entries above (dot / late) in the same run (table_from_rows); at M = 64 where
        # they took 0.64-0.89x the time of dequantize + cuBLAS (all five shapes; 1.35-1.6x bf16's). max_m stays 32:
        # the 1024-row shapes (k / v) were not measured at M = 64, so 33..64 rows take these kernels only at the
        # shapes listed at that bucket ("max_m_listed", takes_small), the others dequantize + cuBLAS as before
        ("swap_early", 2): {(14336, 4096): (64, 1, 8, 2, 2), (4096, 14336): (64, 1, 16, 2, 2),
                            (8192, 8192): (64, 1, 8, 2, 2), (28672, 8192): (64, 1, 4, 2, 2)},
        ("swap_early", 4): {(4096, 14336): (64, 1, 16, 2, 2), (8192, 8192): (64, 1, 8, 2, 2),
                            (28672, 8192): (64, 1, 4, 2, 2)},
        ("swap_early", 8): {(4096, 14336): (64, 1, 16, 2, 2), (8192, 8192): (64, 1, 8, 2, 2),
                            (28672, 8192): (64, 1, 4, 2, 2)},
        ("swap_early", 16): {(4096, 4096): (64, 4, 8, 4, 1), (4096, 14336): (64, 1, 16, 2, 3)},
        ("swap_early", 32): {(4096, 4096): (64, 4, 8, 4, 1), (14336, 4096): (64, 4, 4, 4, 1),
                             (4096, 14336): (64, 4, 16, 4, 1), (28672, 8192): (128, 1, 8, 4, 1)},
        ("swap_early", 64): {(4096, 4096): (64, 2, 8, 4, 1), (14336, 4096): (64, 2, 2, 4, 1),
                             (4096, 14336): (64, 2, 8, 4, 1), (8192, 8192): (64, 4, 4, 4, 1)},
        ("swap", 64): {(28672, 8192): (128, 1, 4, 8, 3)},
        # nf4_tune.py --kernels swap_early swap --shapes 1024x4096,1024x8192 on one H200, 2026-12-06 (torch 2.11,
        # Triton 3.6; results/nf4_tune_kv_h200_1206.json): the k / v shapes where `swap` took <= 0.95x the time of
        # the entries above in the same run (7.3-9.8 us against 8.0-17.5 at M = 2..16, bf16 7.1-9.3); 1024 x 4096
        # at M = 8 leaves the late kernel for it
        ("swap", 2): {(1024, 8192): (32, 2, 16, 2, 3)},
        ("swap", 4): {(1024, 8192): (32, 2, 16, 2, 3)},
        ("swap", 8): {(1024, 4096): (32, 1, 16, 2, 3), (1024, 8192): (32, 2, 16, 2, 3)},
        ("swap", 16): {(8192, 8192): (64, 1, 8, 2, 3), (28672, 8192): (128, 1, 4, 4, 3),
                       (1024, 4096): (32, 4, 8, 2, 3), (1024, 8192): (32, 2, 16, 2, 3)},
        ("swap", 32): {(8192, 8192): (128, 1, 8, 2, 2), (1024, 4096): (32, 4, 8, 4, 2)},
    }},
}


def register_table(key: str, table: dict) -> None:
    """Add (or replace) the launch table of the GPUs whose name contains ``key`` (``"L40S"``, ``"A100"``), e.g. the
    ``TABLES[...]`` literal ``benchmarks/nf4_tune.py`` prints on such a GPU, without editing this file.

    ``table``: ``{"max_m": 1..64, "configs": {(kernel, bucket): {(N, K): (block_n, nb, split, num_warps,
    num_stages)}}, "shapes": [(N, K), ...], "max_m_listed": max_m..64}`` (``"shapes"`` optional; needed where the
    base kernel has no entries of its own, see :func:`small_choice`; ``"max_m_listed"`` optional, see
    :func:`takes_small`). Checked before anything changes; stored with tuples. Launch plans made
    before are dropped, but decode launchers kept on NF4 weights by earlier eager calls keep theirs: register
    before the first NF4 product (or move / reload the weights).

    Raises:
        TypeError / ValueError: naming the field that is not what the kernels take (a kernel name, a row bucket
            that is not a power of two in 1..64, the GEMV outside bucket 1, a swapped kernel at 1, a launch value
            that is not a positive int or power of two, an alternative's shape outside the measured ones).
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a non-empty str (part of the GPU's name), got {key!r}")
    if not key.strip():
        raise ValueError(f"key must be a non-empty str (part of the GPU's name), got {key!r}")
    if not isinstance(table, dict) or not isinstance(table.get("configs"), dict):
        raise TypeError(f"table must be a dict with a 'configs' dict, got {type(table).__name__}")
    max_m = table.get("max_m")
    if not _is_pos_int(max_m) or max_m > 64:
        raise ValueError(f"table['max_m'] must be an int in 1..64, got {max_m!r}")
    unknown = set(table) - {"max_m", "max_m_listed", "configs", "shapes"}
    if unknown:
        raise ValueError(f"table has unknown fields {sorted(unknown)} (max_m, max_m_listed, configs, shapes)")
    listed = table.get("max_m_listed", max_m)
    if not _is_pos_int(listed) or not max_m <= listed <= 64:
        raise ValueError(f"table['max_m_listed'] must be an int in max_m..64 ({max_m}..64), got {listed!r}")
    shapes = [_shape(s, "table['shapes']") for s in table.get("shapes") or []]
    configs: dict = {}
    for where, entries in table["configs"].items():
        if not (isinstance(where, tuple) and len(where) == 2):
            raise ValueError(f"table['configs'] keys must be (kernel, row bucket), got {where!r}")
        kernel, bucket = where
        if kernel not in ("gemv", "dot", *ALTERNATIVES):
            raise ValueError(f"table['configs'] kernel must be one of gemv, dot, {', '.join(ALTERNATIVES)}; "
                             f"got {kernel!r}")
        if not _is_pos_int(bucket) or bucket > 64 or bucket & (bucket - 1):
            raise ValueError(f"table['configs'] row bucket must be a power of two in 1..64, got {bucket!r}")
        if (kernel == "gemv" and bucket != 1) or (kernel not in ("gemv", "late") and bucket == 1):
            raise ValueError(f"table['configs'][{where!r}]: the GEMV takes bucket 1 only, dot and the swapped "
                             "kernels 2..64 (late takes 1 too)")
        if not isinstance(entries, dict):
            raise TypeError(f"table['configs'][{where!r}] must be a dict {{(N, K): config}}, got "
                            f"{type(entries).__name__}")
        configs[(kernel, int(bucket))] = {_shape(nk, f"table['configs'][{where!r}]"): _config(c, where)
                                          for nk, c in entries.items()}
    for (kernel, bucket), entries in configs.items():  # small_choice matches an alternative by a measured shape
        if kernel in ALTERNATIVES:
            pool = set(shapes) or set(configs.get(("gemv" if bucket == 1 else "dot", bucket), {}))
            outside = sorted(set(entries) - pool)
            if outside:
                raise ValueError(f"table['configs'][{(kernel, bucket)!r}] lists {outside}, which are neither in "
                                 "table['shapes'] nor base-kernel entries of that bucket: small_choice would never "
                                 "take them")
    TABLES[key] = {"max_m": int(max_m), "configs": configs, **({"shapes": shapes} if shapes else {}),
                   **({"max_m_listed": int(listed)} if listed > max_m else {})}
    from alignlab.kernels import nf4_small  # here: nf4_small imports this module

    nf4_small._PLANS.clear()


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _shape(nk, where: str) -> tuple[int, int]:
    if not (isinstance(nk, (tuple, list)) and len(nk) == 2 and all(_is_pos_int(v) for v in nk)):
        raise ValueError(f"{where}: a shape must be (N, K) of positive ints, got {nk!r}")
    return int(nk[0]), int(nk[1])


def _config(c, where) -> tuple:
    names = ("block_n", "nb", "split", "num_warps", "num_stages")
    if not (isinstance(c, (tuple, list)) and len(c) == 5 and all(_is_pos_int(v) for v in c)):
        raise ValueError(f"table['configs'][{where!r}]: a config must be 5 positive ints {names}, got {c!r}")
    for name, v in zip(names, c):
        if name in ("block_n", "nb", "num_warps") and v & (v - 1):
            raise ValueError(f"table['configs'][{where!r}]: {name} must be a power of two, got {v}")
    return tuple(int(v) for v in c)


_NAMES: dict[int, str] = {}


def _device_name(index: int) -> str | None:
    """The CUDA device's name, looked up once per index (a plain dict: ``torch.compile`` traces a lookup of
    it; while tracing, an index not seen eagerly yet gives ``None`` and so the fallback rules)."""
    name = _NAMES.get(index)
    if name is None and not torch.compiler.is_compiling():
        name = _NAMES[index] = torch.cuda.get_device_name(index)
    return name


def note_device(device: torch.device) -> None:
    """Look ``device``'s name up now, outside any trace (a CUDA device; a no-op otherwise and while compiling).

    Called where NF4 weights arrive on a GPU (quantization, ``NF4Linear`` moves): ``torch.compile`` then
    traces :func:`max_rows` / :func:`device_key` with the real table, also when no eager NF4 product ran
    before the first compiled call (it would otherwise trace the fallback rules, e.g. ``M <= 16``). The
    kernels' code table of the device (:func:`alignlab.kernels.nf4_dequant.kernel_code`) and double quantization's
    dynamic map (:func:`alignlab.quant.nf4.dynamic_map`) are made here too, so a compiled first call finds them
    kept rather than copying one from the CPU per traced call (a CPU graph input splits a CUDA graph)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        device_key(device)
        from alignlab.kernels.nf4_dequant import kernel_code  # here: nf4_dequant imports alignlab.quant.nf4
        from alignlab.quant.nf4 import dynamic_map

        kernel_code(device)
        dynamic_map(device, True)


def device_key(device: torch.device) -> str | None:
    """``"H200"``, ``"H100"``, ... for an NVIDIA GPU whose name holds one of the table keys, else ``None``."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    if name is None:
        return None
    for key in sorted(TABLES, key=len, reverse=True):
        if key in name:
            return key
    return None


def m_bucket(m: int) -> int:
    """``m`` rounded up to a power of two (the tables' row buckets)."""
    return 1 << max(0, (m - 1).bit_length())


def heuristic_config(kernel: str, M: int, N: int, blocksize: int, dtype: torch.dtype) -> tuple:
    """The H100-measured rules: 128 rows x 1 block per step when ``N > 4096``; else 64 x 2 (GEMV, and
    ``tl.dot`` at ``M <= 4``) or 128 x 2 with 8 warps; K split 8 ways; one pipeline stage. fp32
    activations with blocksize 256 take 64 rows (128 overflow the shared memory of the fp32 product)."""
    if kernel.startswith("swap"):  # the accumulator is (block_n, M): 128 rows fill one warpgroup's wgmma twice
        nb = 1 if N > 4096 else 2
        if kernel == "swap_flat" and dtype == torch.float32:  # one fp32 operand of NB blocks: at most 128 bytes a
            nb = max(1, min(nb, 256 // blocksize))  # row (NB x blocksize 256 ran out of shared memory on an H100)
        return 128, nb, 8, 4, 1
    if kernel == "gemv":
        bn, nb, warps = (128, 1, 4) if N > 4096 else (64, 2, 4)
    elif N > 4096 or blocksize > 64 or dtype == torch.float32:
        bn, nb, warps = (64 if dtype == torch.float32 and blocksize > 128 else 128), 1, 4
    else:
        bn, nb, warps = (64, 2, 4) if M <= 4 else (128, 2, 8)
    if M > 16:  # larger row tiles: keep the register tile (BLOCK_M x BLOCK_N) at the 16-row size
        bn = max(32, bn * 16 // m_bucket(M))
    return bn, nb, 8, warps, 1


def _nearest(shapes, N: int, K: int) -> tuple[int, int]:
    """The measured ``(N, K)`` of ``shapes`` nearest to ``(N, K)`` (log distance, ties by shape)."""
    return min(shapes, key=lambda s: (abs(math.log2(s[0] / N)) + abs(math.log2(s[1] / K)), s))


def small_config(kernel: str, M: int, N: int, K: int, blocksize: int, dtype: torch.dtype,
                 device: torch.device) -> tuple:
    """``(block_n, nb, split, num_warps, num_stages)`` for one call shape on ``device``."""
    key = device_key(device)
    if key is None or blocksize != 64 or dtype == torch.float32:
        return heuristic_config(kernel, M, N, blocksize, dtype)
    shapes = TABLES[key]["configs"].get((kernel, m_bucket(M)))
    if not shapes:
        return heuristic_config(kernel, M, N, blocksize, dtype)
    near = _nearest(shapes, N, K)
    return shapes[near]


def small_choice(M: int, N: int, K: int, blocksize: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[str, tuple]:
    """``(kernel, configuration)`` of the default small-``M`` product on ``device``: the base kernel is the GEMV
    at ``M = 1`` and ``"dot"`` above; one of :data:`ALTERNATIVES` instead where the table's nearest measured shape
    (of the table's ``"shapes"``, else of the base kernel's bucket) is listed under ``(alternative, bucket)``
    (``nf4_tune.py --kernel late / swap / swap_early`` measures such entries); else the base kernel with
    :func:`small_config`'s configuration."""
    kernel = "gemv" if M == 1 else "dot"
    key = device_key(device)
    if key is not None and blocksize == 64 and dtype != torch.float32:
        found = _listed_alternative(TABLES[key], kernel, M, N, K)
        if found is not None:
            return found
    return kernel, small_config(kernel, M, N, K, blocksize, dtype, device)


def _listed_alternative(table: dict, kernel: str, M: int, N: int, K: int) -> tuple[str, tuple] | None:
    """``(alternative, configuration)`` where ``table`` lists one at ``M``'s bucket for the measured shape nearest
    to ``(N, K)`` (of its ``"shapes"``, else of the base kernel's bucket), else None."""
    configs = table["configs"]
    pool = table.get("shapes") or configs.get((kernel, m_bucket(M)))
    if pool:
        near = _nearest(pool, N, K)
        for alt in ALTERNATIVES:
            entry = configs.get((alt, m_bucket(M)), {}).get(near)
            if entry is not None:
                return alt, entry
    return None


def takes_small(M: int, N: int, K: int, device: torch.device, default: int = 16, *, blocksize: int = 64,
                dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``M`` rows take the small-``M`` kernels on ``device`` for an ``(N, K)`` weight: up to
    :func:`max_rows`; above it, up to the table's ``"max_m_listed"`` where the nearest measured shape lists one of
    :data:`ALTERNATIVES` at ``M``'s bucket (a bound measured per shape: the H200's M = 33..64 entries, the k / v
    shapes it did not measure there keeping dequantize + cuBLAS)."""
    if M <= max_rows(device, default, blocksize=blocksize, dtype=dtype):
        return True
    key = device_key(device)
    if key is None or blocksize != 64 or dtype == torch.float32 or M > TABLES[key].get("max_m_listed", 0):
        return False
    return _listed_alternative(TABLES[key], "dot", M, N, K) is not None


def max_rows(device: torch.device, default: int = 16, *, blocksize: int = 64,
             dtype: torch.dtype = torch.bfloat16) -> int:
    """Largest ``M`` the small-``M`` kernels take on ``device`` for weights of ``blocksize`` and activations of
    ``dtype``: the table's measured bound where its entries apply (blocksize 64, 16-bit activations), else
    ``default`` (the other weights take the rules, measured at ``M <= 16`` only)."""
    key = device_key(device)
    if key is None or blocksize != 64 or dtype == torch.float32:
        return default
    return TABLES[key].get("max_m", default)
