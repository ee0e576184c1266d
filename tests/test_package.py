"""The package surface: version, re-exports, and the rule that peers are test oracles only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import alignlab

PKG = Path(alignlab.__file__).parent
ORACLES = {"peft", "bitsandbytes", "trl", "mergekit", "liger_kernel"}


def test_version_matches_metadata():
    from importlib.metadata import version

    assert alignlab.__version__ == version("alignlab")


def test_every_export_resolves():
    for name in alignlab.__all__:
        assert getattr(alignlab, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alignlab.nope


def test_every_documented_module_is_a_lazy_attribute():
    # Each docs/api page documents ``alignlab.<name>``; that name must resolve on the package and show in dir().
    api = PKG.parent / "docs" / "api"
    names = sorted(p.stem for p in api.glob("*.md"))
    assert "distributed" in names
    for name in names:
        assert name in dir(alignlab), name
        assert getattr(alignlab, name).__name__ == f"alignlab.{name}"


def test_every_public_function_and_class_has_a_docstring():
    # docs/api pages are generated from docstrings; a missing one is an empty API entry
    import inspect

    missing = []
    for pkg in alignlab._SUBPACKAGES:
        module = getattr(alignlab, pkg)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                missing.append(f"alignlab.{pkg}.{name}")
    assert not missing, missing


def test_library_never_imports_test_oracles():
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(PKG)}: {n}" for n in names if n.split(".")[0] in ORACLES]
    assert not offenders, offenders


def test_import_is_cheap():
    code = "import sys, alignlab; print(any(m.startswith(('transformers', 'peft', 'trl')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("interpret", [False, True])
def test_importing_the_kernel_paths_leaves_dynamo_unloaded(interpret):
    """``import torch._dynamo`` costs ~1 s, and made at import under the interpreter it also made spawned DDP ranks
    hang in torch 2.13's gloo teardown: the kernel launcher's ``torch.compiler.disable`` wrapper (for traced launches
    under the Triton interpreter) is made at the first traced launch, so an import of the library's main subpackages
    does not load Dynamo, with ``TRITON_INTERPRET=1`` or without."""
    import os

    code = ("import sys, alignlab, alignlab.quant, alignlab.adapters, alignlab.losses, alignlab.optim, "
            "alignlab.kernels.launch; print('torch._dynamo' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"


# Subpackages whose guides (docs/*.md) name every export; the others are covered by their API page only.
GUIDED = ("adapters", "context", "decoding", "losses", "merging", "optim")


def test_every_export_of_a_guided_subpackage_is_named_in_a_guide():
    # the API pages list every export by construction; a guide is where a reader learns a function
    # exists, and names exported but never mentioned there (find_targets, combine_deltas, ...) went unseen
    import re

    docs = PKG.parent / "docs"
    text = "\n".join(p.read_text(encoding="utf-8") for p in [PKG.parent / "README.md", *docs.glob("*.md")])
    missing = [f"alignlab.{pkg}.{name}" for pkg in GUIDED for name in getattr(alignlab, pkg).__all__
               if not re.search(rf"(?<![\w.]){re.escape(name)}\b", text)]
    assert not missing, f"exported but named in no docs/*.md guide: {missing}"


def test_kernel_and_quant_modules_import_first_in_a_fresh_process():
    """``alignlab.quant`` and ``alignlab.kernels`` import each other (the kernels read ``quant.nf4``, whose package
    imports ``NF4Linear``, which launches the kernels): a module-level import added on either side can make one of
    them fail when it is the first thing a user imports (``from alignlab.kernels.nf4_dequant import nf4_dequant``
    raised a circular ImportError for a while). Each module of one package that imports the other at module level
    (where a cycle can start) is imported first, in its own interpreter."""
    other = {"kernels": "alignlab.quant", "quant": "alignlab.kernels"}
    names = sorted(f"alignlab.{sub}.{p.stem}" for sub in other for p in (PKG / sub).glob("*.py")
                   if any(line.startswith((f"from {other[sub]}", f"import {other[sub]}"))
                          for line in p.read_text().splitlines()))
    names += ["alignlab.adapters.fused", "alignlab.adapters.lora"]
    procs = {}
    failed = {}
    for i in range(0, len(names), 6):  # a few at a time: each interpreter imports torch
        batch = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for n in names[i:i + 6]}
        procs.update(batch)
        for n, p in batch.items():
            out, _ = p.communicate(timeout=300)
            if p.returncode:
                failed[n] = out[-600:]
    assert len(procs) >= 8
    assert not failed, failed
