"""Every notebook in notebooks/ runs top to bottom in a fresh ``python3`` kernel without a cell error.

Each notebook is executed with nbclient from a clean kernel whose working directory is a temporary
folder, so a notebook that writes files cannot touch the repository; the notebooks' own last cells
assert what they show (losses fell, the reloaded adapter matches, ...). The committed notebooks must
carry no outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Per-notebook wall-clock limit: a notebook is meant to take 10-25 s on a 2-core CPU.
TIMEOUT_S = 240


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected the notebooks in {ROOT / 'notebooks'}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[dev]')")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: cell {i} holds outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[dev]')")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[dev]')")
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
    nb = nbformat.read(path, as_version=4)
    before = _tree_snapshot()
    # The kernel inherits this environment: the inline backend (whatever MPLBACKEND the caller set)
    # turns figures into image/png outputs; the kernel runs in a temporary folder.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{str(exc)[-4000:]}")
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    images = sum(
        1 for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if "image/png" in out.get("data", {})
    )
    assert images >= 1, f"{path.name} drew no plot"
    assert _tree_snapshot() == before, f"{path.name} wrote into the repository"


def _tree_snapshot() -> set[str]:
    """Files under notebooks/, docs/ and the repository root (what a careless notebook would write to)."""
    found = set()
    for folder in (ROOT, ROOT / "notebooks", ROOT / "docs"):
        found |= {str(p.relative_to(ROOT)) for p in folder.iterdir() if p.is_file()}
    return found
