"""benchmarks/moe_nf4_bytes.py: the --quick check writes its report where --out says, and nowhere by default."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("benchmarks_moe_nf4_bytes", ROOT / "benchmarks" / "moe_nf4_bytes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_to_out_when_given(bench, tmp_path):
    """--quick --out PATH wrote nothing, without a word; --quick alone still leaves the committed results alone."""
    committed = ROOT / "benchmarks" / "results" / "moe_nf4_bytes.json"
    before = committed.read_bytes() if committed.exists() else None
    rows = bench.main(["--quick"])
    assert (committed.read_bytes() if committed.exists() else None) == before
    out = tmp_path / "sub" / "bytes.json"
    assert bench.main(["--quick", "--out", str(out)]) == rows
    doc = json.loads(out.read_text())
    assert doc["tiny"]["ratio"] == pytest.approx(rows["tiny"]["ratio"]) and 0.25 < doc["tiny"]["ratio"] < 0.27
    assert [p.name for p in out.parent.iterdir()] == ["bytes.json"]
