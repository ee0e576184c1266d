"""benchmarks/qlora_step.py: the ``--wide-k`` rows are the other setting of ``fused.WIDE_K`` than the default one, and
say so in their names, for every batch size (the step itself needs a GPU)."""

from __future__ import annotations

import pytest
from conftest import load_script

from alignlab.adapters import fused


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    return load_script("benchmarks/qlora_step.py")


@pytest.mark.parametrize("default", [True, False])
def test_wide_k_rows_flip_the_default(bench, default, monkeypatch):
    """The names come from the default given, not from ``fused.WIDE_K`` as the run left it (the loop flips it per
    row, and the table is built again for each batch size)."""
    suffix = bench.wide_k_suffix(default)
    assert suffix == (", wide K off" if default else ", wide K")
    for current in (True, False):
        monkeypatch.setattr(fused, "WIDE_K", current)
        names = list(bench.contestants(None, ["alignlab"], wide_k=True, wide_default=default))
        assert [n for n in names if n.endswith(suffix)] == [f"alignlab QLoRA, defaults{suffix}",
                                                            f"alignlab QDoRA, defaults{suffix}"]
        assert not any(n.endswith(suffix) for n in bench.contestants(None, ["alignlab"], wide_default=default))
