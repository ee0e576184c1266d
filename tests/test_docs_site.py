"""The docs site builds with ``mkdocs build --strict``: broken links, missing anchors and unresolved
API references fail the build, so they fail this test."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _needs_site_tools():
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (pip install -e '.[dev]' or '.[docs]')")


def _subpackages() -> list[str]:
    import alignlab

    return sorted(m.name for m in pkgutil.iter_modules(alignlab.__path__) if m.ispkg)


def test_every_subpackage_has_an_api_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in _subpackages():
        page = ROOT / "docs" / "api" / f"{name}.md"
        assert page.is_file(), f"docs/api/{name}.md is missing"
        assert f"::: alignlab.{name}" in page.read_text()
        assert f"api/{name}.md" in nav, f"docs/api/{name}.md is not in mkdocs.yml's nav"


def test_every_notebook_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "notebooks/ holds no notebook"
    for name in notebooks:
        assert f"notebooks/{name}" in nav, f"notebooks/{name} is not in mkdocs.yml's nav"


def test_mkdocs_build_strict(tmp_path):
    _needs_site_tools()
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", ALIGNLAB_DOCS_EXECUTE="false")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    # the API reference really holds the documented objects, not an empty page
    adapters = (site / "api" / "adapters" / "index.html").read_text(encoding="utf-8")
    assert "alignlab.adapters.inject" in adapters and "LoRAConfig" in adapters
    quant = (site / "api" / "quant" / "index.html").read_text(encoding="utf-8")
    assert "nf4_quantize" in quant
    # the notebooks are rendered as pages
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert (site / "notebooks" / nb.stem / "index.html").is_file(), f"{nb.name} was not rendered"
