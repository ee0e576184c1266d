"""Merge recipes: a readable subset of mergekit's YAML format.

.. code-block:: yaml

    merge_method: ties            # see METHODS below
    base_model: ./llama-base
    models:
      - model: ./llama-math
        parameters: {weight: 0.6, density: 0.5}
      - model: ./llama-code
        parameters:
          weight:                 # per-tensor-name filters: first match wins,
            - {filter: mlp, value: 0.8}   # an entry without `filter` is the default
            - {value: 0.4}
          density: 0.5
    parameters: {normalize: true, lambda: 1.0}   # method-wide parameters
    dtype: bfloat16               # mergekit's compute dtype; here the output dtype unless out_dtype is set
    out_dtype: bfloat16           # output dtype (default: dtype, else the base's); arithmetic is float32
    random_seed: 0                # DARE/DELLA masks
    out_shard_size: 2GB

A parameter given under ``models[i].parameters`` applies to that model; under
the top-level ``parameters`` it applies to all models (a per-model value wins).
Parameters mean what mergekit 0.1.5 makes of the same YAML: ``weight`` has no default for
linear and the task-vector methods (a model without one is refused, as mergekit stops at it),
SLERP's ``t`` is read from the top-level ``parameters`` only (mergekit ignores a per-model ``t``,
so one is refused here), and unequal karcher weights, which mergekit ignores, warn.
As in mergekit, a filter matches the tensor names that contain it (``"*"``: all),
and a filter list with no entry for a tensor falls through to the top-level
value, then to the method's default.

``base_model`` is, as in mergekit, the origin of the task vectors (task arithmetic, TIES, DARE, breadcrumbs,
DELLA, Model Stock), the ``t = 0`` end of SLERP, ChipAlign's instruction model, and for linear and karcher
(:data:`EQUAL_INPUTS`) one more input: added after ``models`` when it is not listed there, weighted by the
recipe-wide ``weight`` (:attr:`Recipe.inputs`). Such a recipe that weights its models but not the base is
refused.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from alignlab._checks import ArgumentTypeError, check_number_in_range, is_int, is_real, user_path

# method name -> (needs a base model, min fine-tuned models, max fine-tuned models or None)
METHODS: dict[str, tuple[bool, int, int | None]] = {
    "linear": (False, 1, None),
    "karcher": (False, 1, None),
    "task_arithmetic": (True, 1, None),
    "ties": (True, 1, None),
    "dare_linear": (True, 1, None),
    "dare_ties": (True, 1, None),
    "breadcrumbs": (True, 1, None),
    "breadcrumbs_ties": (True, 1, None),
    "della": (True, 1, None),
    "della_linear": (True, 1, None),
    "model_stock": (True, 2, None),
    "slerp": (True, 1, 1),
    "chipalign": (True, 1, 1),
}

# methods whose models are all inputs of one kind: a base_model is one of them (added last if not listed), as in
# mergekit; the other methods take the task vectors (or the SLERP / ChipAlign path) from the base
EQUAL_INPUTS = frozenset({"linear", "karcher"})

# method name -> (parameters read per model, parameters read once for the whole merge). A per-model
# parameter may also be given once under the top-level `parameters` (it then applies to every model);
# anything else is a typo or a parameter the method does not use, and the recipe is refused.
_WEIGHTED = {"weight"}
_SPARSE = {"weight", "density"}
# recipe-wide options of mergekit's task-vector methods; `int8_mask` (mergekit stores its masks as int8 to save
# memory; a 0 / 1 mask multiplies exactly in any dtype) is accepted as a flag and has nothing to do here
_TASK = {"normalize", "lambda", "int8_mask"}
PARAMETERS: dict[str, tuple[frozenset, frozenset]] = {name: (frozenset(per), frozenset(wide)) for name, (per, wide) in {
    "linear": (_WEIGHTED, {"normalize"}),
    "karcher": (_WEIGHTED, {"max_iter", "tol"}),
    "task_arithmetic": (_WEIGHTED, _TASK),
    "ties": (_SPARSE, _TASK | {"consensus"}),
    "dare_linear": (_SPARSE, _TASK | {"rescale"}),
    "dare_ties": (_SPARSE, _TASK | {"rescale", "consensus"}),
    "breadcrumbs": (_SPARSE | {"gamma"}, _TASK),
    "breadcrumbs_ties": (_SPARSE | {"gamma"}, _TASK | {"consensus"}),
    "della": (_SPARSE | {"epsilon"}, _TASK | {"rescale", "consensus"}),
    "della_linear": (_SPARSE | {"epsilon"}, _TASK | {"rescale"}),
    "model_stock": (set(), {"filter_wise"}),
    "slerp": (set(), {"t"}),  # mergekit reads t from the recipe's parameters only
    "chipalign": ({"lambda"}, set()),
}.items()}


# methods that need a weight for each model they weigh: mergekit has no default for these ("Missing required
# parameter weight", at the first tensor), so neither does a recipe here; karcher's weight is optional in mergekit
WEIGHT_REQUIRED = frozenset(name for name, (per, _) in PARAMETERS.items() if "weight" in per) - {"karcher"}


def _check_names(params: Mapping[str, Any], allowed: frozenset, method: str, where: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"parameter(s) {unknown} of {where} are not used by merge_method {method!r}; "
                         f"it accepts {sorted(allowed) or 'none'} there")


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``1_000_000`` -> bytes: powers of 1000, and of 1024 for ``"2GiB"`` / ``"512MiB"``,
    as HF's ``max_shard_size``."""
    if is_int(value):
        if value <= 0:
            raise ValueError(f"out_shard_size must be positive, got {value}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:  # None or a bool is the wrong kind; a str (or a float such as 2e9) that is no size a wrong value
        kind = ValueError if isinstance(value, str) or is_real(value) else ArgumentTypeError
        raise kind(f"out_shard_size must be an int or a size like '2GB', got {value!r}")
    base = 1024 if m.group(3) else 1000  # "GiB" read as "GB" made shards 7% smaller than asked
    size = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    if size <= 0:
        raise ValueError(f"out_shard_size must be positive, got {value!r}")
    return size


@dataclass
class ModelEntry:
    """One input checkpoint (a directory) and its per-model parameters."""

    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A validated merge recipe; build it with :func:`load_recipe` or directly."""

    merge_method: str
    models: list[ModelEntry]
    base_model: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    random_seed: int = 0
    out_shard_size: int = 5 * 1000**3

    @property
    def fine_tuned(self) -> list[ModelEntry]:
        """The models other than the base: what the methods with a base role merge into it (a listed base is
        the base there, not one of these). Linear and karcher merge :attr:`inputs` instead."""
        if self.base_model is None:
            return list(self.models)
        return [m for m in self.models if m.path != self.base_model]

    @property
    def inputs(self) -> list[ModelEntry]:
        """What the methods without a base role (:data:`EQUAL_INPUTS`: linear, karcher) combine: every listed
        model, in order, then ``base_model`` when it is set and not listed, with no parameters of its own (its
        ``weight`` is the recipe-wide one). mergekit does the same ("Base model specified but not in input
        models - adding"): for these methods a base model is one more input, not only the source of the
        tensor list and side files."""
        if self.base_model is None or any(m.path == self.base_model for m in self.models):
            return list(self.models)
        return [*self.models, ModelEntry(self.base_model)]

    def value(self, name: str, tensor: str, model: ModelEntry | None = None, default: Any = None) -> Any:
        """Resolve parameter ``name`` for ``tensor`` (and ``model``), applying name filters.

        As mergekit resolves it: the model's own setting first, then the recipe-wide one, then
        ``default``. A filter list with no entry for ``tensor`` does not decide, so the next scope
        is asked (a per-model ``{filter: mlp, value: 0.8}`` leaves the other tensors to the
        recipe-wide value). A filter matches tensor names containing it; ``"*"`` matches every name.

        Raises:
            ValueError: no scope decides and there is no ``default``.
        """
        scopes = [model.parameters] if model is not None else []
        filtered = False
        for params in [*scopes, self.parameters]:
            raw = params.get(name)
            if raw is None:
                continue
            if not isinstance(raw, list):
                return raw
            filtered = True
            for entry in raw:
                filt = entry.get("filter")
                if filt is None or filt == "*" or filt in tensor:
                    return entry["value"]
        if default is not None:
            return default
        where = f" of model {str(model.path)!r}" if model is not None else ""
        if not filtered:  # the method needs it and the recipe never sets it
            scope = "the model's parameters or the recipe's" if model is not None else "the recipe's parameters"
            raise ValueError(f"parameter {name!r}{where} is not set: {self.merge_method} needs it (under {scope})")
        raise ValueError(f"parameter {name!r}{where} has no filter matching tensor {tensor!r} and no default entry")


def _check_value(name: str, value: Any, where: str, method: str) -> None:
    """Validate the numeric parameters, naming where they came from (before any tensor is read)."""
    values = [e["value"] for e in value] if isinstance(value, list) else [value]
    for v in values:
        if name in ("weight", "density", "lambda", "t", "gamma", "epsilon"):
            check_number_in_range(v, f"parameter {name!r} of {where}")  # NumPy scalars too; not a bool
        if name == "density" and not 0.0 <= v <= 1.0:
            raise ValueError(f"density of {where} must be in [0, 1], got {v}")
        if name == "lambda" and method == "chipalign" and not 0.0 <= v <= 1.0:  # else refused at the first tensor
            raise ValueError(f"parameter 'lambda' of {where} must be in [0, 1] for chipalign (the domain model's "
                             f"weight), got {v}")
        if name in ("normalize", "filter_wise", "int8_mask") and not isinstance(v, bool):
            # bool("false") is True: a quoted YAML flag would otherwise switch the option on
            raise ArgumentTypeError(f"parameter {name!r} of {where} must be true or false, got {v!r}")
        if name == "consensus" and v not in ("sum", "count"):
            raise ValueError(f"parameter 'consensus' of {where} must be 'sum' or 'count', got {v!r}")
        if name == "rescale" and not (isinstance(v, bool) or v in ("inverse", "l1")):
            raise ValueError(f"parameter 'rescale' of {where} must be true, false, 'inverse' or 'l1', got {v!r}")
        if name == "max_iter" and not (is_int(v) and v >= 0):
            kind = ValueError if is_int(v) else ArgumentTypeError
            raise kind(f"parameter 'max_iter' of {where} must be an integer >= 0, got {v!r}")
        if name == "tol":
            check_number_in_range(v, f"parameter 'tol' of {where}", 0)


def _check_filters(name: str, value: Any, where: str) -> None:
    if not isinstance(value, list):
        return
    for entry in value:
        if (not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}
                or not isinstance(entry.get("filter", ""), (str, type(None)))):
            raise ValueError(
                f"parameter {name!r} of {where}: list entries must be {{filter: <substring>, value: <x>}}, got {entry!r}"
                " (mergekit's per-layer gradients are not supported)"
            )


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    """A ``parameters`` block as a dict; ``ValueError`` naming ``where`` unless it is a mapping (or empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ArgumentTypeError(f"{where} must be a mapping of parameter names to values, got {raw!r}")
    return dict(raw)


def _resolve_path(p: Any, root: Path | None, where: str) -> Path:
    if not isinstance(p, (str, os.PathLike)):
        raise ArgumentTypeError(f"{where} must be a path (a string), got {p!r}")
    path = Path(os.path.expanduser(str(p)))
    if not path.is_absolute() and root is not None:
        path = root / path
    return path


def recipe_from_dict(data: Mapping[str, Any], root: str | os.PathLike | None = None) -> Recipe:
    """Validate a recipe mapping (as parsed from YAML); relative paths resolve against ``root``.

    Raises ``ValueError`` naming the key for a recipe that cannot be merged; where the value is of the wrong kind (a
    recipe, ``parameters`` block or model entry that is no mapping, ``models`` no list, a path no string, a number
    or flag that is none, a float ``random_seed``) it is an :class:`~alignlab.ArgumentTypeError`, a ``TypeError``
    too."""
    if not isinstance(data, Mapping):
        raise ArgumentTypeError(f"a recipe must be a mapping, got {type(data).__name__}")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "random_seed",
             "out_shard_size"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; expected some of {sorted(known)}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise ValueError(f"unknown merge_method {method!r}; expected one of {sorted(METHODS)}")
    rootp = user_path(root, "root") if root is not None else None
    base = _resolve_path(data["base_model"], rootp, "base_model") if data.get("base_model") is not None else None
    raw_models = data.get("models") or []
    if not isinstance(raw_models, list):
        raise ArgumentTypeError("models must be a list of {model: <path>, parameters: {...}}")
    models = []
    for i, entry in enumerate(raw_models):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            kind = ValueError if isinstance(entry, Mapping) else ArgumentTypeError
            raise kind(f"models[{i}] must be a mapping with a 'model' path, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ValueError(f"models[{i}]: unknown key(s) {extra}; an entry has 'model' and 'parameters'")
        path = _resolve_path(entry["model"], rootp, f"models[{i}].model")
        params = _parameters(entry.get("parameters"), f"models[{i}].parameters")
        if method == "slerp" and "t" in params:
            # mergekit reads t from the recipe's parameters only and ignores one under a model: the same recipe
            # stopped there ("Missing required parameter t") or interpolated at the recipe-wide t
            raise ValueError(f"parameter 't' of model {str(path)!r}: slerp's t is one value for the whole merge, set "
                             "under the recipe's parameters (mergekit ignores a t under a model); move it there")
        _check_names(params, PARAMETERS[method][0], method, f"model {str(path)!r}")
        for k, v in params.items():
            _check_filters(k, v, f"model {str(path)!r}")
            _check_value(k, v, f"model {str(path)!r}", method)
        if any(m.path == path for m in models):
            # a model listed twice would be merged twice (its weight doubled); mergekit keys inputs by model
            raise ValueError(f"models[{i}]: model {str(path)!r} is listed twice")
        models.append(ModelEntry(path, params))
    params = _parameters(data.get("parameters"), "parameters")
    _check_names(params, PARAMETERS[method][0] | PARAMETERS[method][1], method, "the recipe's parameters")
    for k, v in params.items():
        _check_filters(k, v, "the recipe")
        _check_value(k, v, "the recipe", method)
    # mergekit's meaning: `dtype` is the compute dtype and `out_dtype` the file's (default: `dtype`).
    # alignlab computes in float32 (float64 for float64 checkpoints) whatever `dtype` says, so here
    # `dtype` only decides the file's dtype when `out_dtype` is absent: the same YAML, the same files.
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {data[key]!r}")
    seed = data.get("random_seed", 0)
    if not is_int(seed):  # int(1.7) or int(True) would seed the masks with a number nobody wrote
        raise ArgumentTypeError(f"random_seed must be an integer, got {seed!r}")
    chosen = data.get("out_dtype") if data.get("out_dtype") is not None else data.get("dtype")
    dtype = DTYPES[chosen] if chosen is not None else None
    recipe = Recipe(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=params,
        dtype=dtype,
        random_seed=int(seed),
        out_shard_size=parse_size(data.get("out_shard_size", 5 * 1000**3)),
    )
    needs_base, lo, hi = METHODS[method]
    if needs_base and base is None:
        raise ValueError(f"merge_method {method!r} needs a base_model")
    _check_added_base_weight(recipe)
    _check_weights(recipe)
    n = len(recipe.fine_tuned)
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise ValueError(f"merge_method {method!r} needs {want} model(s) besides the base, got {n}")
    return recipe


def _check_added_base_weight(r: Recipe) -> None:
    """``ValueError`` for a linear / karcher recipe whose unlisted ``base_model`` would join the merge with a
    weight nobody wrote: the models carry their own ``weight`` and the recipe sets none for all.

    mergekit's linear refuses that recipe too (``Missing required parameter weight`` for the base); its karcher
    ignores every weight and averages equally. A linear recipe without any ``weight`` is refused by
    :func:`_check_weights` (mergekit's linear asks for a weight per input); in a karcher recipe without any, every
    input, the base included, weighs 1."""
    if r.merge_method not in EQUAL_INPUTS or len(r.inputs) == len(r.models):
        return
    if "weight" in r.parameters or not any("weight" in m.parameters for m in r.models):
        return
    raise ValueError(
        f"base_model {str(r.base_model)!r} is not listed under models, so {r.merge_method} merges it as one more "
        "input (as mergekit does), but no weight is set for it: list it under models with its weight, set a "
        "recipe-wide weight under parameters, or drop base_model (the first model then gives the tensor list "
        "and the config / tokenizer files)")


def _check_weights(r: Recipe) -> None:
    """Refuse a recipe that leaves a model's ``weight`` unset where mergekit requires it; warn where the weights of
    a karcher recipe would make its merge differ from mergekit's.

    mergekit 0.1.5 has no default ``weight`` for linear and the task-vector methods: a model without one stops its
    merge with ``Missing required parameter weight``. alignlab used to take 1 there, so a recipe that forgot one
    model's weight merged here and not in mergekit; it is refused now, before anything is read, naming the models.
    (A weight given only through filters that miss some tensor is refused at that tensor, as in mergekit.) karcher
    takes a weight in both, but mergekit ignores it: unequal weights give a different merge here, hence the warning.
    """
    if r.merge_method == "karcher":
        settings = [m.parameters.get("weight", r.parameters.get("weight", 1.0)) for m in r.inputs]
        if any(s != settings[0] for s in settings[1:]):
            warnings.warn("karcher: the models' weights differ, and this merge applies them (a weighted Karcher mean), "
                          "while mergekit 0.1.5 ignores karcher's weight and averages equally: the same recipe gives a "
                          "different merge there. Drop the weights for mergekit's numbers.", UserWarning, stacklevel=3)
        return
    if r.merge_method not in WEIGHT_REQUIRED or "weight" in r.parameters:
        return
    weighed = r.inputs if r.merge_method in EQUAL_INPUTS else r.fine_tuned
    missing = [str(m.path) for m in weighed if "weight" not in m.parameters]
    if missing:
        example = "1.0 for an equal average" if r.merge_method == "linear" else "1.0 adds a task vector whole"
        raise ValueError(
            f"parameter 'weight' is not set for model(s) {missing}: {r.merge_method} needs a weight for every model, "
            f"as in mergekit (which stops with 'Missing required parameter weight'); set it under each model's "
            f"parameters, or once for all models under the recipe's parameters (weight: {example})")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a YAML recipe (needs the optional ``pyyaml``).

    Relative model paths resolve against the current directory, as in mergekit; a leading ``~`` (in ``path`` and
    in the model paths) is the home folder.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        ValueError: the file is not valid YAML (with the line and column) or not a valid recipe.
    """
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - exercised only without pyyaml
        raise ImportError("reading YAML merge recipes needs pyyaml: pip install 'alignlab[yaml]'") from e
    path = user_path(path, "path")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    return recipe_from_dict(data)
