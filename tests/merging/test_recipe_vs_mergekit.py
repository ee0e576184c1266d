"""The same YAML, the same merge as mergekit 0.1.5, or an error (or, for karcher's weights, a warning) saying why not.

Three places where a recipe gave other numbers here than in mergekit, without a word, checked against mergekit's
own ``run_merge`` on tiny random Llama checkpoints:

* ``weight`` has no default in mergekit for linear and the task-vector methods ("Missing required parameter
  weight"); alignlab took 1, so a recipe that forgot one model's weight merged here. It is refused now, before
  anything is read (or, where only filters set it and none matches a tensor, at that tensor, as in mergekit).
* SLERP's ``t`` is read by mergekit from the recipe's ``parameters`` only: a ``t`` under the model is ignored there
  (mergekit stops without a recipe-wide one, and interpolates with the recipe-wide one where both are set), while
  alignlab used the model's. It is recipe-wide here too now, and one under a model is refused.
* karcher's ``weight`` is accepted and ignored by mergekit (equal weights always); alignlab applies it. Unequal
  weights now warn that the merge differs from mergekit's.
"""

import warnings
from pathlib import Path

import pytest
import torch

from conftest import load_checkpoint, mergekit_run, save_llama_finetunes

from alignlab.merging import merge_checkpoints
from alignlab.merging import methods as M

transformers = pytest.importorskip("transformers")
pytest.importorskip("mergekit.merge", reason="mergekit is the oracle for these checks")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return save_llama_finetunes(tmp_path_factory.mktemp("llamas"), num_layers=1)


def _recipe(root: Path, method: str, models: dict, parameters: dict | None = None) -> dict:
    r = {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
         "models": [{"model": str(root / m), "parameters": p} for m, p in models.items()]}
    if parameters is not None:
        r["parameters"] = parameters
    return r


SPARSE = {"density": 0.6}
WEIGHTED = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear"]


@pytest.mark.parametrize("unset", ["both", "one"])
@pytest.mark.parametrize("method", WEIGHTED)
def test_a_model_without_a_weight_is_refused_as_mergekit_refuses_it(llamas, tmp_path, method, unset):
    extra = {} if method in ("linear", "task_arithmetic") else SPARSE
    models = {"a": {**extra, **({"weight": 0.5} if unset == "one" else {})}, "b": dict(extra)}
    r = _recipe(llamas, method, models)
    if method == "linear":  # without a base: linear would also merge an unlisted base (named in its own error)
        r["base_model"] = None
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        mergekit_run(r, tmp_path / "mergekit")
    missing = r"\['.*/b'\]" if unset == "one" else r"\['.*/a', '.*/b'\]"
    with pytest.raises(ValueError, match=rf"parameter 'weight' is not set for model\(s\) {missing}: {method} needs a "
                                         r"weight for every model, as in mergekit.*under the recipe's parameters"):
        merge_checkpoints(r, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties"])
def test_with_the_weights_set_the_merge_is_mergekits(llamas, tmp_path, method):
    """A weight per model or once for all (recipe-wide): both run, bit for bit the same."""
    extra = {} if method in ("linear", "task_arithmetic") else SPARSE
    r = _recipe(llamas, method, {"a": {**extra, "weight": 0.7}, "b": dict(extra)}, {"weight": 0.4})
    theirs = mergekit_run(r, tmp_path / "mergekit")
    ours = load_checkpoint(merge_checkpoints(r, tmp_path / "ours"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=0, msg=name)


def test_a_weight_set_only_by_filters_that_miss_a_tensor_is_refused_at_that_tensor(llamas, tmp_path):
    """mergekit stops at the first tensor no filter matches; alignlab took weight 1 for it."""
    r = _recipe(llamas, "task_arithmetic", {"a": {"weight": [{"filter": "mlp", "value": 0.5}]}, "b": {"weight": 1.0}})
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        mergekit_run(r, tmp_path / "mergekit")
    with pytest.raises(ValueError, match=r"while merging tensor '.*': parameter 'weight' of model '.*/a' has no filter "
                                         "matching tensor"):
        merge_checkpoints(r, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("where", ["model", "base", "model_and_recipe"])
def test_slerp_t_under_a_model_is_refused(llamas, tmp_path, where):
    """mergekit reads t from the recipe only. Under the model alone it stops ("Missing required parameter t"); beside
    a recipe-wide t it uses that one (alignlab used the model's)."""
    models = {"base": {"t": 0.2}, "a": {}} if where == "base" else {"a": {"t": 0.2}}
    r = _recipe(llamas, "slerp", models, {"t": 0.7} if where != "model" else None)
    if where == "model":
        with pytest.raises(RuntimeError, match="Missing required parameter t"):
            mergekit_run(r, tmp_path / "mergekit")
    else:
        theirs = mergekit_run(r, tmp_path / "mergekit")
        base, a = load_checkpoint(llamas / "base"), load_checkpoint(llamas / "a")
        for name, t in theirs.items():  # the recipe-wide 0.7, not the model's 0.2
            torch.testing.assert_close(t, M.slerp(base[name], a[name], 0.7), rtol=2e-5,
                                       atol=2e-5 * float(t.abs().max()), msg=name)
    with pytest.raises(ValueError, match=r"parameter 't' of model '.*': slerp's t is one value for the whole merge, "
                                         r"set under the recipe's parameters \(mergekit ignores a t under a model\)"):
        merge_checkpoints(r, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_slerp_with_a_recipe_wide_t_is_mergekits(llamas, tmp_path):
    """Within float32 rounding of the cosine (docs/merging.md, "SLERP"); without any t both stop."""
    r = _recipe(llamas, "slerp", {"a": {}}, {"t": 0.3})
    theirs = mergekit_run(r, tmp_path / "mergekit")
    ours = load_checkpoint(merge_checkpoints(r, tmp_path / "ours"))
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=2e-5 * float(t.abs().max()), msg=name)
    r = _recipe(llamas, "slerp", {"a": {}})
    with pytest.raises(RuntimeError, match="Missing required parameter t"):
        mergekit_run(r, tmp_path / "mergekit2")
    with pytest.raises(ValueError, match=r"parameter 't' is not set: slerp needs it \(under the recipe's parameters\)"):
        merge_checkpoints(r, tmp_path / "ours2")


def test_unequal_karcher_weights_warn_that_mergekit_ignores_them(llamas, tmp_path):
    r = _recipe(llamas, "karcher", {"a": {"weight": 0.2}, "b": {"weight": 0.8}})
    r["base_model"] = None
    theirs = mergekit_run(r, tmp_path / "mergekit")
    with pytest.warns(UserWarning, match="mergekit 0.1.5 ignores karcher's weight and averages equally"):
        ours = load_checkpoint(merge_checkpoints(r, tmp_path / "ours"))
    equal = load_checkpoint(merge_checkpoints({**r, "models": [{"model": str(llamas / m)} for m in "ab"]}, tmp_path / "eq"))
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(theirs[name], equal[name], rtol=0, atol=0)  # mergekit: the equal-weight mean
    assert not torch.equal(ours[name], theirs[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal weights, or one recipe-wide weight: the same merge, no warning
        for models in ([{"model": str(llamas / m), "parameters": {"weight": 0.5}} for m in "ab"],
                       [{"model": str(llamas / m)} for m in "ab"]):
            merge_checkpoints({**r, "models": models, "parameters": {"weight": 2.0}}, tmp_path / "quiet",
                              overwrite=True)


@pytest.mark.parametrize("method,weights,normalize", [
    ("linear", {"a": 0.1, "b": 0.2, "base": 0.4}, True),
    ("task_arithmetic", {"a": 0.7, "b": -0.3}, True),
    ("task_arithmetic", {"a": 0.1, "b": 0.2}, True),
])
def test_normalized_weights_whose_sum_rounds_in_float32_are_mergekits(llamas, tmp_path, method, weights, normalize):
    """The normalising divisor is the weights' sum as mergekit forms it (rounded to float32 and added there): with
    0.1 / 0.2 / 0.4 or 0.7 / -0.3 the exact sum rounded once was an ulp off it, and nearly every element of the
    merge with it (a helper's find); now bit for bit."""
    r = {"merge_method": method, "dtype": "float32", "parameters": {"normalize": normalize},
         "models": [{"model": str(llamas / m), "parameters": {"weight": w}} for m, w in weights.items()]}
    if method == "task_arithmetic":
        r["base_model"] = str(llamas / "base")
    theirs = mergekit_run(r, tmp_path / "mergekit")
    ours = load_checkpoint(merge_checkpoints(r, tmp_path / "ours"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=0, msg=name)
