"""Per-device launch tables of the decode-sized NF4 kernels (alignlab.kernels.nf4_configs)."""

import pytest
import torch

from alignlab.kernels import nf4_configs, nf4_dequant
from alignlab.kernels.nf4_configs import heuristic_config, m_bucket, max_rows, small_choice, small_config


def test_m_bucket():
    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 33, 64)] == [1, 2, 4, 4, 8, 16, 32, 64, 64]


def test_heuristic_rules():
    """The H100-measured rules, kept for devices without a table."""
    bf16 = torch.bfloat16
    assert heuristic_config("gemv", 1, 14336, 64, bf16) == (128, 1, 8, 4, 1)
    assert heuristic_config("gemv", 1, 4096, 64, bf16) == (64, 2, 8, 4, 1)
    assert heuristic_config("dot", 4, 4096, 64, bf16) == (64, 2, 8, 4, 1)
    assert heuristic_config("dot", 16, 4096, 64, bf16) == (128, 2, 8, 8, 1)
    assert heuristic_config("dot", 16, 4096, 64, torch.float32) == (128, 1, 8, 4, 1)
    assert heuristic_config("dot", 5, 65, 256, torch.float32)[0] == 64  # 128 rows overflow shared memory
    assert heuristic_config("dot", 64, 4096, 64, bf16)[0] == 32  # the row tile grows, the column tile shrinks
    # the swapped kernels: 128 output rows (one warpgroup's wgmma tile twice) at every M
    assert heuristic_config("swap", 64, 14336, 64, bf16) == (128, 1, 8, 4, 1)
    # the flat kernel's fp32 operand holds NB blocks of a row: at most 128 bytes of them
    assert heuristic_config("swap_flat", 5, 65, 256, torch.float32)[1] == 1
    assert heuristic_config("swap_flat", 5, 65, 128, torch.float32)[1] == 2
    assert heuristic_config("swap_flat", 5, 65, 256, bf16)[1] == 2
    assert heuristic_config("swap_early", 2, 4096, 64, bf16) == (128, 2, 8, 4, 1)


def test_cpu_and_unknown_devices_fall_back():
    cpu = torch.device("cpu")
    assert nf4_configs.device_key(cpu) is None
    assert small_config("dot", 8, 4096, 4096, 64, torch.bfloat16, cpu) == heuristic_config(
        "dot", 8, 4096, 64, torch.bfloat16)
    assert max_rows(cpu) == 16


def _use_table(monkeypatch, table):
    """Every device gets ``table`` (as the GPU named "FAKE9")."""
    monkeypatch.setitem(nf4_configs.TABLES, "FAKE9", table)
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: "FAKE9")


def test_table_lookup_takes_the_nearest_measured_shape(monkeypatch):
    """A table entry is picked by row bucket and by log distance to the measured (N, K); blocksizes other
    than 64 and fp32 activations keep the fallback rules; max_rows comes from the table."""
    table = {"max_m": 64, "configs": {
        ("dot", 32): {(4096, 4096): (32, 2, 4, 4, 2), (28672, 8192): (64, 1, 16, 8, 3)},
        ("gemv", 1): {(4096, 4096): (256, 1, 4, 8, 2)},
    }}
    _use_table(monkeypatch, table)
    dev = torch.device("cpu")
    bf16 = torch.bfloat16
    assert small_config("dot", 17, 5000, 4096, 64, bf16, dev) == (32, 2, 4, 4, 2)
    assert small_config("dot", 32, 20000, 8192, 64, bf16, dev) == (64, 1, 16, 8, 3)
    assert small_config("gemv", 1, 128, 128, 64, bf16, dev) == (256, 1, 4, 8, 2)
    # no entry for this bucket / blocksize / dtype: the rules
    assert small_config("dot", 4, 4096, 4096, 64, bf16, dev) == heuristic_config("dot", 4, 4096, 64, bf16)
    assert small_config("dot", 32, 4096, 4096, 128, bf16, dev) == heuristic_config("dot", 32, 4096, 128, bf16)
    assert small_config("dot", 32, 4096, 4096, 64, torch.float32, dev) == heuristic_config(
        "dot", 32, 4096, 64, torch.float32)
    assert max_rows(dev) == 64
    # the bound is measured for the table's weights: other blocksizes and fp32 activations keep the default
    assert max_rows(dev, blocksize=128) == 16 and max_rows(dev, dtype=torch.float32) == 16
    assert max_rows(dev, dtype=torch.float16) == 64


def test_device_key_matches_names(monkeypatch):
    monkeypatch.setitem(nf4_configs.TABLES, "H200", {"max_m": 16, "configs": {}})
    monkeypatch.setitem(nf4_configs._NAMES, 0, "NVIDIA H200")
    monkeypatch.setattr(torch.version, "hip", None)
    assert nf4_configs.device_key(torch.device("cuda", 0)) == "H200"
    monkeypatch.setitem(nf4_configs._NAMES, 0, "NVIDIA A10G")
    assert nf4_configs.device_key(torch.device("cuda", 0)) is None


def test_shipped_tables_are_well_formed():
    """Every shipped entry: a row bucket the kernels take and a 5-value configuration of legal sizes."""
    for key, table in nf4_configs.TABLES.items():
        assert 1 <= table["max_m"] <= 64, key
        listed = {}
        for (kernel, bucket), shapes in table["configs"].items():
            assert kernel in ("gemv", "dot", *nf4_configs.ALTERNATIVES) and bucket == m_bucket(bucket)
            assert (kernel == "gemv") == (bucket == 1) and not (kernel == "late" and bucket == 1)
            assert not (kernel.startswith("swap") and bucket == 1)  # tl.dot takes 16 rows or more: M >= 2
            if kernel in nf4_configs.ALTERNATIVES:  # picked by the nearest measured shape (small_choice)
                base = "gemv" if bucket == 1 else "dot"
                pool = table.get("shapes") or table["configs"].get((base, bucket), {})
                assert set(shapes) <= set(pool), (key, kernel, bucket)
                for shape in shapes:  # one alternative per shape and bucket
                    assert listed.setdefault((bucket, shape), kernel) == kernel, (key, bucket, shape)
            for (n, k), (bn, nb, split, warps, stages) in shapes.items():
                assert n > 0 and k > 0 and bn in (16, 32, 64, 128, 256) and nb in (1, 2, 4), (key, n, k)
                assert split >= 1 and warps in (1, 2, 4, 8, 16) and stages >= 1, (key, n, k)


def test_small_choice_takes_late_where_the_table_lists_the_shape(monkeypatch):
    """The default kernel: the GEMV at M = 1, "dot" above; "late" where the nearest measured shape of that base
    kernel's bucket is listed under ("late", bucket) (M = 1 too); no table, fp32 or other blocksizes: the base
    kernel and the rules."""
    table = {"max_m": 32, "configs": {
        ("gemv", 1): {(4096, 4096): (256, 1, 4, 8, 2), (14336, 4096): (64, 1, 8, 2, 1)},
        ("late", 1): {(14336, 4096): (256, 1, 8, 8, 1)},
        ("dot", 8): {(4096, 4096): (32, 2, 4, 4, 2), (28672, 8192): (64, 1, 16, 8, 3)},
        ("late", 8): {(28672, 8192): (128, 2, 8, 4, 1)},
    }}
    _use_table(monkeypatch, table)
    dev = torch.device("cpu")
    bf16 = torch.bfloat16
    assert small_choice(1, 4096, 4096, 64, bf16, dev) == ("gemv", (256, 1, 4, 8, 2))
    assert small_choice(1, 14000, 4096, 64, bf16, dev) == ("late", (256, 1, 8, 8, 1))
    assert small_choice(1, 14000, 4096, 64, torch.float32, dev)[0] == "gemv"
    assert small_choice(5, 20000, 8192, 64, bf16, dev) == ("late", (128, 2, 8, 4, 1))
    assert small_choice(8, 5000, 4096, 64, bf16, dev) == ("dot", (32, 2, 4, 4, 2))
    assert small_choice(16, 20000, 8192, 64, bf16, dev) == ("dot", heuristic_config("dot", 16, 20000, 64, bf16))
    assert small_choice(8, 20000, 8192, 64, torch.float32, dev)[0] == "dot"
    assert small_choice(8, 20000, 8192, 128, bf16, dev)[0] == "dot"
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: None)
    assert small_choice(8, 20000, 8192, 64, bf16, dev) == ("dot", heuristic_config("dot", 8, 20000, 64, bf16))


def test_small_choice_matches_the_tables_measured_shapes(monkeypatch):
    """A table with "shapes" and no base-kernel entries (the H100's): a call is matched to the nearest measured
    shape; the alternative listed for it at the call's bucket is taken, in ALTERNATIVES order; a shape listed
    under none keeps the base kernel with the rules."""
    table = {"max_m": 64, "shapes": [(4096, 4096), (28672, 8192)], "configs": {
        ("swap_early", 32): {(4096, 4096): (64, 2, 8, 4, 1)},
        ("swap", 32): {(28672, 8192): (128, 2, 4, 4, 1)},
        ("swap", 4): {(28672, 8192): (64, 1, 8, 2, 3)},
    }}
    _use_table(monkeypatch, table)
    dev = torch.device("cpu")
    bf16 = torch.bfloat16
    assert small_choice(20, 5000, 4096, 64, bf16, dev) == ("swap_early", (64, 2, 8, 4, 1))
    assert small_choice(32, 20000, 8192, 64, bf16, dev) == ("swap", (128, 2, 4, 4, 1))
    assert small_choice(3, 30000, 8192, 64, torch.float16, dev) == ("swap", (64, 1, 8, 2, 3))
    assert small_choice(3, 4096, 4096, 64, bf16, dev) == ("dot", heuristic_config("dot", 3, 4096, 64, bf16))
    assert small_choice(1, 30000, 8192, 64, bf16, dev) == ("gemv", heuristic_config("gemv", 1, 30000, 64, bf16))
    assert small_choice(32, 4096, 4096, 128, bf16, dev)[0] == "dot"  # other blocksizes: the rules


def test_device_name_is_known_before_a_trace(monkeypatch):
    """Where NF4 weights arrive on a GPU the device's name is looked up eagerly (note_device), so that a
    torch.compile trace, which cannot look it up, sees that GPU's table (max_m) and not the fallback rules."""
    from torch import nn

    from alignlab.quant import NF4Linear

    monkeypatch.setattr(nf4_configs, "_NAMES", {})
    monkeypatch.setitem(nf4_configs.TABLES, "FAKE9", {"max_m": 32, "configs": {}})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA FAKE9")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda0 = torch.device("cuda", 0)
    tables = []  # the kernels' code table and the dynamic map are made there too (CUDA tensors: recorded on CPU CI)
    monkeypatch.setattr(nf4_dequant, "kernel_code", tables.append)
    import alignlab.quant.nf4 as nf4_tables

    real_map = nf4_tables.dynamic_map

    def dynamic_map(device="cpu", signed=True):
        if torch.device(device).type == "cuda":
            return tables.append(("dynamic", device, signed))
        return real_map(device, signed)

    monkeypatch.setattr(nf4_tables, "dynamic_map", dynamic_map)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert max_rows(cuda0) == 16 and nf4_configs.note_device(cuda0) is None and not nf4_configs._NAMES
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    nf4_configs.note_device(torch.device("cpu"))
    assert not nf4_configs._NAMES and not tables
    nf4_configs.note_device(cuda0)
    assert tables == [cuda0, ("dynamic", cuda0, True)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside a trace
    assert max_rows(cuda0) == 32
    # the places that call it: quantization and NF4Linear's device moves
    seen = []
    import alignlab.quant.linear as linear_mod
    import alignlab.quant.nf4 as nf4_mod

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(nf4_mod, "note_device", seen.append)
    monkeypatch.setattr(linear_mod, "note_device", seen.append)
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    layer.to(torch.float32)
    assert seen == [torch.device("cpu")] * 2


def test_register_table_adds_a_gpu_and_takes_the_shipped_tables(monkeypatch):
    """A table printed by nf4_tune.py on another GPU, registered at run time: calls on a GPU whose name holds the
    key take it (plans made before are dropped); the shipped tables pass the same checks unchanged."""
    import copy

    from alignlab.kernels import nf4_small

    for key, table in nf4_configs.TABLES.items():
        fresh = copy.deepcopy(table)
        monkeypatch.setitem(nf4_configs.TABLES, key, fresh)  # restored after the test
        nf4_configs.register_table(key, copy.deepcopy(table))
        assert nf4_configs.TABLES[key] == table
    monkeypatch.setattr(nf4_configs, "TABLES", dict(nf4_configs.TABLES))
    monkeypatch.setitem(nf4_small._PLANS, ("stale",), "plan")
    nf4_configs.register_table("L40S", {"max_m": 32, "shapes": [[4096, 4096], [14336, 4096]], "configs": {
        ("swap_early", 32): {(14336, 4096): [128, 2, 4, 4, 1]}}})
    assert not nf4_small._PLANS
    monkeypatch.setitem(nf4_configs._NAMES, 0, "NVIDIA L40S")
    monkeypatch.setattr(torch.version, "hip", None)
    dev = torch.device("cuda", 0)
    assert nf4_configs.device_key(dev) == "L40S" and max_rows(dev) == 32
    assert small_choice(20, 14000, 4096, 64, torch.bfloat16, dev) == ("swap_early", (128, 2, 4, 4, 1))
    assert small_choice(20, 4096, 4096, 64, torch.bfloat16, dev)[0] == "dot"
    # the late kernel may take one row too, matched by the GEMV's measured shapes
    nf4_configs.register_table("L4", {"max_m": 16, "configs": {("gemv", 1): {(4096, 4096): (64, 2, 8, 4, 1)},
                                                                ("late", 1): {(4096, 4096): (128, 1, 8, 4, 1)}}})
    monkeypatch.setitem(nf4_configs._NAMES, 0, "NVIDIA L4")
    assert small_choice(1, 4096, 4096, 64, torch.bfloat16, dev) == ("late", (128, 1, 8, 4, 1))


@pytest.mark.parametrize("key,table,error,match", [
    ("", {"max_m": 16, "configs": {}}, ValueError, "key must be a non-empty str"),
    (3, {"max_m": 16, "configs": {}}, TypeError, "key must be a non-empty str"),
    ("X", [], TypeError, "table must be a dict with a 'configs' dict"),
    ("X", {"max_m": 65, "configs": {}}, ValueError, r"max_m'\] must be an int in 1..64, got 65"),
    ("X", {"max_m": 16, "configs": {}, "max_rows": 3}, ValueError, "unknown fields"),
    ("X", {"max_m": 32, "max_m_listed": 16, "configs": {}}, ValueError, r"max_m_listed'\] must be an int in max_m..64 \(32..64\), got 16"),
    ("X", {"max_m": 32, "max_m_listed": 128, "configs": {}}, ValueError, "max_m_listed"),
    ("X", {"max_m": 16, "configs": {("mma", 4): {}}}, ValueError, "kernel must be one of"),
    ("X", {"max_m": 16, "configs": {("dot", 3): {}}}, ValueError, "power of two in 1..64, got 3"),
    ("X", {"max_m": 16, "configs": {("gemv", 2): {}}}, ValueError, "the GEMV takes bucket 1 only"),
    ("X", {"max_m": 16, "configs": {("swap", 1): {}}}, ValueError, "the GEMV takes bucket 1 only"),
    ("X", {"max_m": 16, "configs": {("dot", 4): {(4096, 0): (64, 1, 8, 4, 1)}}}, ValueError, "positive ints"),
    ("X", {"max_m": 16, "configs": {("dot", 4): {(4096, 4096): (64, 1, 8, 4)}}}, ValueError, "5 positive ints"),
    ("X", {"max_m": 16, "configs": {("dot", 4): {(4096, 4096): (96, 1, 8, 4, 1)}}}, ValueError,
     "block_n must be a power of two, got 96"),
    ("X", {"max_m": 16, "configs": {("late", 4): {(4096, 4096): (64, 1, 8, 4, 1)}}}, ValueError,
     "neither in table\\['shapes'\\] nor base-kernel entries"),
])
def test_register_table_refuses_what_the_kernels_cannot_take(key, table, error, match, monkeypatch):
    monkeypatch.setattr(nf4_configs, "TABLES", dict(nf4_configs.TABLES))
    before = dict(nf4_configs.TABLES)
    with pytest.raises(error, match=match):
        nf4_configs.register_table(key, table)
    assert nf4_configs.TABLES == before  # nothing registered


def test_rows_above_max_m_take_the_small_kernels_only_at_shapes_listed_for_their_bucket(monkeypatch):
    """The H200 and H100 tables: up to max_m (32) rows every shape takes the small-M kernels; 33..64 rows (max_m_listed) only
    where the nearest measured shape lists an alternative at that bucket (the five large shapes), so the 1024-row
    k / v shapes, not measured there, and what lies nearest to them keep dequantize + cuBLAS; as do other
    blocksizes, fp32 activations, more than 64 rows, and a GPU without a table."""
    from alignlab.kernels.nf4_configs import takes_small

    monkeypatch.setattr(nf4_configs, "device_key", lambda device: "H200")
    dev, bf16 = torch.device("cuda", 0), torch.bfloat16
    for N, K in [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (11008, 4096)]:
        assert takes_small(40, N, K, dev) and takes_small(64, N, K, dev, dtype=torch.float16), (N, K)
        assert small_choice(64, N, K, 64, bf16, dev)[0].startswith("swap")
        assert not takes_small(65, N, K, dev)
        assert not takes_small(64, N, K, dev, blocksize=128) and not takes_small(64, N, K, dev, dtype=torch.float32)
    for N, K in [(1024, 4096), (1024, 8192), (2048, 4096)]:
        assert takes_small(32, N, K, dev) and not takes_small(33, N, K, dev), (N, K)
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: "H100")  # the same bounds, measured at k / v too
    assert takes_small(64, 4096, 4096, dev) and not takes_small(65, 4096, 4096, dev)
    # at k / v the H100's flat kernel won at 64 rows for 1024 x 4096 only (listed there); 1024 x 8192 stops at 32
    assert takes_small(33, 1024, 4096, dev) and takes_small(64, 1024, 4096, dev)
    assert takes_small(32, 1024, 8192, dev) and not takes_small(33, 1024, 8192, dev)
    assert small_choice(32, 1024, 4096, 64, bf16, dev) == ("swap", (32, 4, 8, 4, 2))
    assert small_choice(32, 1024, 8192, 64, bf16, dev) == ("swap_flat", (64, 4, 16, 4, 1))
    monkeypatch.setattr(nf4_configs, "device_key", lambda device: None)
    assert takes_small(16, 4096, 4096, dev) and not takes_small(17, 4096, 4096, dev)


def test_register_table_keeps_max_m_listed(monkeypatch):
    monkeypatch.setattr(nf4_configs, "TABLES", dict(nf4_configs.TABLES))
    nf4_configs.register_table("X", {"max_m": 16, "max_m_listed": 64, "shapes": [(64, 64)],
                                     "configs": {("swap", 64): {(64, 64): (64, 1, 1, 4, 1)}}})
    assert nf4_configs.TABLES["X"]["max_m_listed"] == 64
    nf4_configs.register_table("Y", {"max_m": 16, "max_m_listed": 16, "configs": {}})
    assert "max_m_listed" not in nf4_configs.TABLES["Y"]  # no wider than max_m: nothing to keep
