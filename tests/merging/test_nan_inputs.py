"""A NaN in any input of a merge is a ValueError naming the input, in every method and in the checkpoint merge.

Before, the methods disagreed: linear, task arithmetic, Karcher and ChipAlign passed the NaN on to the output, as
mergekit 0.1.5 does; TIES (and DARE-TIES, breadcrumbs-TIES, DELLA) hid it, because the sign election drops an
element whose sign is NaN (and a NaN sum elects the negative sign), so the output came out finite and wrong there;
DARE hid it whenever its mask dropped that element (about one seed in two at density 0.5), breadcrumbs whenever
the NaN, which sorts as the largest magnitude, fell among the dropped outliers; SLERP read the NaN cosine as -1 and
returned a plain lerp; Model Stock read it as 0. A merge has no number to give where an input is NaN, so every
method now refuses it. mergekit writes NaN instead (the element, or the whole
tensor where a norm or a dot product sees it): the mergekit tests below check that its merge of the same inputs
is not finite, so the error only ever stands where mergekit would write a NaN. The one exception is a NaN model
whose TIES / DELLA density is 0 (mergekit drops its task vector whole and stays finite): refused here as well,
since the checkpoint itself is broken.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from alignlab.merging import merge_checkpoints, merge_tensor
from alignlab.merging import methods as M

NAN = float("nan")
SHAPE = (33, 21)
FIRST, SECOND = (20, 3), (30, 0)  # past the first chunk once the chunks are made small


def _inputs(dtype, nan_at: int):
    """``[base, model 0, model 1]``, with two NaN in input ``nan_at`` (0: the base, 2: model 1)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g)
    xs = [base] + [base + 0.1 * torch.randn(SHAPE, generator=g) for _ in range(2)]
    xs = [x.to(dtype) for x in xs]
    xs[nan_at][FIRST] = NAN
    xs[nan_at][SECOND] = NAN
    return xs


def _gen():
    return torch.Generator().manual_seed(0)


# name -> (merge of [base, m0, m1], the function named in the error, names of inputs 0 and 2)
TASK = ("base", "models[1]")
CASES = {
    "task_arithmetic": (lambda x: M.task_arithmetic(x[0], x[1:], [0.6, 0.4]), "task_arithmetic", TASK),
    "ties": (lambda x: M.ties(x[0], x[1:], [0.6, 0.4], density=0.5), "ties", TASK),
    "ties_whole": (lambda x: M.ties(x[0], x[1:], [0.6, 0.4], density=1.0), "ties", TASK),
    "ties_count": (lambda x: M.ties(x[0], x[1:], density=0.5, consensus="count"), "ties", TASK),
    # model 1's task vector is dropped whole; its NaN is refused all the same
    "ties_density_0": (lambda x: M.ties(x[0], x[1:], density=[0.5, 0.0]), "ties", TASK),
    "ties_out": (lambda x: M.ties(x[0], x[1:], density=0.5, out=torch.empty_like(x[0])), "ties", TASK),
    "dare": (lambda x: M.dare(x[0], x[1:], density=0.5, generator=_gen()), "dare", TASK),
    "dare_ties_l1": (lambda x: M.dare(x[0], x[1:], density=0.5, consensus="sum", rescale="l1", generator=_gen()),
                     "dare", TASK),
    "breadcrumbs": (lambda x: M.breadcrumbs(x[0], x[1:], density=0.5, gamma=0.05), "breadcrumbs", TASK),
    "breadcrumbs_ties": (lambda x: M.breadcrumbs(x[0], x[1:], density=0.5, consensus="sum"), "breadcrumbs", TASK),
    "della": (lambda x: M.della(x[0], x[1:], density=0.5, epsilon=0.1, generator=_gen()), "della", TASK),
    "model_stock": (lambda x: M.model_stock(x[0], x[1:]), "model_stock", TASK),
    "model_stock_rows": (lambda x: M.model_stock(x[0], x[1:], filter_wise=True), "model_stock", TASK),
    "combine_deltas": (lambda x: M.combine_deltas(x[0], [x[1] - x[0], x[2] - x[0]], [1.0, 1.0], consensus="sum"),
                       "combine_deltas", ("base", "deltas[1]")),
    "linear": (lambda x: M.linear(x, [0.2, 0.5, 0.0]), "linear", ("tensors[0]", "tensors[2]")),  # NaN·0 is NaN
    "karcher": (lambda x: M.karcher(x), "karcher", ("tensors[0]", "tensors[2]")),
    "slerp": (lambda x: M.slerp(x[0], x[2], 0.3), "slerp", ("a", "b")),
    "chipalign": (lambda x: M.chipalign(x[0], x[2], 0.3), "chipalign", ("instruct", "domain")),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements: the NaN lies in the 7th chunk, after finite ones were merged (and written)."""
    for name in ("_CHUNK", "_FAST_CHUNK", "_SLERP_CHUNK"):
        monkeypatch.setattr(M, name, 64)
    monkeypatch.setattr(M, "_RADIX_MIN", 0)  # TIES / breadcrumbs: the histogram selection, not one kthvalue


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])  # float64: the TIES reference
@pytest.mark.parametrize("nan_at", [0, 2], ids=["in_base", "in_model"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_nan_input_is_refused_naming_it(small_chunks, case, nan_at, dtype):
    merge, where, names = CASES[case]
    name = names[0] if nan_at == 0 else names[1]
    with pytest.raises(ValueError, match=rf"^{where}: {re.escape(name)} holds 2 NaN value\(s\), the first at index "
                                         rf"\(20, 3\): a merge has no number to give there.*torch.nan_to_num"):
        merge(_inputs(dtype, nan_at))


@pytest.mark.parametrize("case", list(CASES))
def test_an_inf_or_a_huge_sum_is_not_taken_for_a_nan(small_chunks, case):
    """The NaN checks look at sums first; an inf input, or finite values whose sum overflows, make those sums
    non-finite too, and must still merge as before (the scan that follows finds no NaN)."""
    merge = CASES[case][0]
    xs = _inputs(torch.float32, 0)
    xs[0][FIRST] = xs[0][SECOND] = 0.0
    xs[2][FIRST] = float("inf")
    merge(xs)
    huge = [torch.full(SHAPE, 3e38), torch.full(SHAPE, -3e38), torch.full(SHAPE, 3e38)]
    merge(huge)


@pytest.mark.parametrize("nan_at", [0, 2], ids=["in_base", "in_model"])
@pytest.mark.parametrize("method,merge", [
    ("task_arithmetic", lambda x: M.task_arithmetic(x[0], x[1:], [0.6, 0.4])),
    ("ties", lambda x: M.ties(x[0], x[1:], [0.6, 0.4], density=0.5)),
    ("ties", lambda x: M.ties(x[0], x[1:], [0.6, 0.4], density=1.0)),
    ("dare_linear", lambda x: M.dare(x[0], x[1:], [0.6, 0.4], density=0.5, rescale="l1", generator=_gen())),
    ("dare_ties", lambda x: M.dare(x[0], x[1:], [0.6, 0.4], density=0.5, rescale="l1", consensus="sum",
                                   generator=_gen())),
    ("breadcrumbs", lambda x: M.breadcrumbs(x[0], x[1:], [0.6, 0.4], density=0.5)),
    ("breadcrumbs_ties", lambda x: M.breadcrumbs(x[0], x[1:], [0.6, 0.4], density=0.5, consensus="sum")),
    ("della", lambda x: M.della(x[0], x[1:], [0.6, 0.4], density=0.5, rescale="l1", generator=_gen())),
    ("model_stock", lambda x: M.model_stock(x[0], x[1:])),
    ("linear", lambda x: M.linear(x, [0.2, 0.5, 0.3])),
    ("karcher", lambda x: M.karcher(x)),
    ("slerp", lambda x: M.slerp(x[0], x[2], 0.3)),
])
def test_mergekit_writes_nan_where_a_merge_is_refused(method, merge, nan_at):
    """mergekit 0.1.5 on the same inputs: its merge is not finite. Our TIES gave a finite merge here before
    (as did DARE-TIES, breadcrumbs-TIES, DELLA, Model Stock and SLERP), silently."""
    mk = pytest.importorskip("mergekit.merge_methods", reason="mergekit is the oracle for these checks")
    xs = _inputs(torch.float32, nan_at)
    equal_inputs = method in ("linear", "karcher")
    tensors = [xs[0], xs[2]] if method == "slerp" else xs
    params = {"slerp": {"t": 0.3}, "linear": {"weight": [0.2, 0.5, 0.3]}, "karcher": {},
              "model_stock": {}}.get(method, {"weight": {1: 0.6, 2: 0.4}, "density": 0.5})
    theirs = mk.merge_tensors(tensors, method, parameters=params, base_index=None if equal_inputs else 0,
                              dtype=torch.float32, out_dtype=torch.float32)
    assert not bool(torch.isfinite(theirs).all())
    assert bool(torch.isnan(theirs[FIRST]))
    with pytest.raises(ValueError, match="holds 2 NaN value"):
        merge(xs)


def _write(folder, tensors):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float32"}')


@pytest.mark.parametrize("method,nan_in", [("ties", "b"), ("task_arithmetic", "base"), ("slerp", "a"),
                                           ("linear", "base"), ("karcher", "a"), ("model_stock", "b")])
def test_merge_checkpoints_names_the_model_and_the_tensor(tmp_path, method, nan_in):
    """The methods name their argument (``models[1]``); a checkpoint merge names the model's folder and the tensor,
    and leaves no output behind. For linear the unlisted base is the last input (as in mergekit)."""
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(6, 4, generator=g), "layers.0.w": torch.randn(5, 3, generator=g)}
    for name in ("base", "a", "b"):
        st = {k: v + (0.1 * torch.randn(v.shape, generator=g) if name != "base" else 0) for k, v in base.items()}
        if name == nan_in:
            st["layers.0.w"][1, 2] = NAN
        _write(tmp_path / name, st)
    models = ["a"] if method == "slerp" else ["a", "b"]
    recipe = {"merge_method": method, "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / m)} for m in models],
              "parameters": {"t": 0.4} if method == "slerp" else {"weight": 1.0} if method != "model_stock" else {}}
    with pytest.raises(ValueError, match=rf"while merging tensor 'layers.0.w': tensor 'layers.0.w' of model "
                                         rf"'{re.escape(str(tmp_path / nan_in))}' holds 1 NaN value\(s\), the first at "
                                         r"index \(1, 2\)"):
        merge_checkpoints(recipe, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base"]  # no output, no partial folder
    ok = {k: torch.zeros(2) for k in ("base", "a", "b")}
    torch.testing.assert_close(merge_tensor(recipe, "w", {str(tmp_path / k): v for k, v in ok.items()}),
                               torch.zeros(2))
    ok[nan_in] = torch.tensor([0.0, NAN])
    with pytest.raises(ValueError, match=rf"tensor 'w' of model '.*/{nan_in}' holds 1 NaN value\(s\), the first at "
                                         r"index \(1,\)"):
        merge_tensor(recipe, "w", {str(tmp_path / k): v for k, v in ok.items()})
