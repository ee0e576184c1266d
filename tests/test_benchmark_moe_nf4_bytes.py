"""benchmarks/moe_nf4_bytes.py: the --quick check writes its report where --out says, and nowhere by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    return load_script("benchmarks/moe_nf4_bytes.py")


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
