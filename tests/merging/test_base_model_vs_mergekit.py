"""A ``base_model`` that is not listed under ``models``: merge_checkpoints vs mergekit 0.1.5 on whole checkpoints.

mergekit adds such a base to the inputs of every method ("Base model specified but not in input models -
adding", in ``mergekit/plan.py``), after the listed models and with no parameters of its own. What it then
does with it is the method's: linear and karcher have no base role, so it is one more model to average
(linear weighs it by the recipe-wide ``weight`` and refuses a recipe without one; karcher averages all its
inputs equally); the task-vector methods, Model Stock and SLERP take it as the base. The oracle is mergekit's
own ``run_merge`` on tiny random Llama checkpoints written by transformers, fp32 in and out.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import load_checkpoint, mergekit_run, save_llama_finetunes

from alignlab.merging import merge_checkpoints

transformers = pytest.importorskip("transformers")
pytest.importorskip("mergekit.merge", reason="mergekit is the oracle for these checks")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return save_llama_finetunes(tmp_path_factory.mktemp("llamas"), num_layers=2)


def _recipe(root: Path, method: str, models: dict, parameters: dict | None = None, base: bool = False) -> dict:
    """``models``: name -> its parameters; the base is listed among them only with ``base=True``."""
    listed = {**({"base": models.pop("base", {})} if base else {}), **models}
    r = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
         "models": [{"model": str(root / m), "parameters": p} for m, p in listed.items()]}
    if parameters:
        r["parameters"] = parameters
    return r


# (method, per-model parameters, recipe-wide parameters, list the base too, tolerance relative to the largest value)
CASES = [
    # no base role: the unlisted base is a third input, last, weighed by the recipe-wide weight
    ("linear", {"a": {"weight": 2.0}, "b": {"weight": 1.0}}, {"weight": 0.5}, False, 0),
    ("linear", {"a": {}, "b": {"weight": 3.0}}, {"weight": [{"filter": "mlp", "value": 0.25}, {"value": 1.0}]},
     False, 0),
    ("linear", {"a": {"weight": 2.0}, "b": {"weight": 1.0}}, {"normalize": False, "weight": 0.5}, False, 0),
    ("karcher", {"a": {}, "b": {}}, None, False, 0),
    # listed, the base is an input like any other (and linear weighs it by its own weight)
    ("linear", {"base": {"weight": 0.3}, "a": {"weight": 2.0}, "b": {"weight": 1.0}}, None, True, 0),
    ("karcher", {"base": {}, "a": {}, "b": {}}, None, True, 0),
    # the base of the task vectors, listed or not: the same merge
    ("task_arithmetic", {"a": {"weight": 0.6}, "b": {"weight": 0.4}}, {"lambda": 0.9}, False, 0),
    ("task_arithmetic", {"base": {}, "a": {"weight": 0.6}, "b": {"weight": 0.4}}, None, True, 0),
    ("ties", {"a": {"weight": 0.6, "density": 0.5}, "b": {"weight": 0.4, "density": 0.7}}, None, False, 0),
    ("breadcrumbs_ties", {"a": {"weight": 1.0, "density": 0.6}, "b": {"weight": 1.0, "density": 0.6}}, None,
     False, 0),
    ("model_stock", {"a": {}, "b": {}}, None, False, 0),
    # the t = 0 end; the cosine rounds differently in float32 (docs/merging.md, "SLERP")
    ("slerp", {"a": {}}, {"t": 0.3}, False, 2e-5),
]


@pytest.mark.parametrize("method,models,parameters,listed,tol", CASES)
def test_base_model_plays_mergekits_part(llamas, tmp_path, method, models, parameters, listed, tol):
    r = _recipe(llamas, method, dict(models), parameters, base=listed)
    theirs = mergekit_run(r, tmp_path / "mergekit")
    ours = load_checkpoint(merge_checkpoints(r, tmp_path / "ours"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == torch.float32
        torch.testing.assert_close(ours[name], t, rtol=0, atol=tol * float(t.abs().max()), msg=name)
    if method in ("linear", "karcher") and not listed:  # the base is in the average: not the listed models' alone
        without = {**r, "base_model": None}
        alone = load_checkpoint(merge_checkpoints(without, tmp_path / "without"))
        assert not torch.equal(alone["model.layers.0.mlp.up_proj.weight"],
                               ours["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("method", ["linear", "karcher"])
def test_unlisted_base_without_a_weight_is_refused(llamas, tmp_path, method):
    """The models weighted one by one and nothing for the base: mergekit's linear stops at the first tensor
    ("Missing required parameter weight" for the base), its karcher ignores every weight. Here both are
    refused before anything is read, naming the three ways out."""
    r = _recipe(llamas, method, {"a": {"weight": 2.0}, "b": {"weight": 1.0}})
    if method == "linear":
        with pytest.raises(RuntimeError, match="Missing required parameter weight"):
            mergekit_run(r, tmp_path / "mergekit")
    with pytest.raises(ValueError, match=r"base_model '.*base' is not listed under models, so "
                                         rf"{method} merges it as one more input.*no weight is set for it"):
        merge_checkpoints(r, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
