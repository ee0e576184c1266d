"""One module registered under two names (``self.b = self.a``): the adapter wraps it under both, so a call through
either name runs it, and unloading / deleting puts the original back under both. Before, ``inject`` wrapped the
first name only: calls through the second skipped the adapter, and the two names no longer shared a module."""

import warnings

import torch
from torch import nn

from alignlab.adapters import (LoRAConfig, delete_adapter, inject, load_adapter, merge_and_unload, save_adapter)
from alignlab.adapters.lora import LoRALinear


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a  # the same module under a second name
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def _model(seed=0):
    torch.manual_seed(seed)
    return _Shared()


def _adapted(seed=0):
    model = _model(seed)
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["a", "c"]))
    with torch.no_grad():
        model.a.lora_B["default"].weight.normal_()
    return model


def _formula(model, x):
    layer = model.a
    w = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    lin = lambda t: t @ w.T + layer.base_layer.bias  # noqa: E731
    return model.c(lin(torch.relu(lin(x))))


def test_both_names_hold_the_adapter_and_both_calls_run_it():
    model = _adapted()
    assert isinstance(model.a, LoRALinear) and model.b is model.a
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), _formula(model, x))


def test_merge_and_unload_and_delete_put_one_module_back_under_both_names():
    model = _adapted()
    x = torch.randn(4, 6)
    want = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one module under two names is no tie to break: no untie warning
        merged = merge_and_unload(model)
    assert type(merged.a) is nn.Linear and merged.b is merged.a
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    model = _adapted()
    original = model.a.base_layer
    delete_adapter(model, "default")
    assert model.a is original and model.b is original


def test_save_and_load_keep_one_set_of_tensors(tmp_path):
    model = _adapted()
    x = torch.randn(4, 6)
    want = model(x).detach()
    save_adapter(model, tmp_path / "ad")
    fresh = _model()
    load_adapter(fresh, tmp_path / "ad")
    assert fresh.b is fresh.a and isinstance(fresh.a, LoRALinear)
    torch.testing.assert_close(fresh(x), want)


def test_inject_and_unload_walk_the_model_a_fixed_number_of_times(monkeypatch):
    """Looking up a module's other names walks the whole model; doing that per target made ``inject`` and
    ``merge_and_unload`` quadratic in the model's size (3.4 s / 2.8 s for 80 Llama-shaped layers on CPU). Both now
    walk it as often for 12 shared-module blocks as for 2, and still wrap and unwrap each shared module under both
    names."""
    real = nn.Module.named_modules

    def walks(blocks: int) -> tuple[int, int]:
        model = nn.Sequential(*[_Shared() for _ in range(blocks)])
        seen = []

        def counting(self, *args, **kwargs):
            if self is model and kwargs.get("remove_duplicate", args[2] if len(args) > 2 else True) is False:
                seen.append(1)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "named_modules", counting)
        inject(model, LoRAConfig(r=2, target_modules=["a", "c"]))
        injected = len(seen)
        assert all(isinstance(m.b, LoRALinear) and m.b is m.a for m in model)
        merge_and_unload(model)
        assert all(type(m.b) is nn.Linear and m.b is m.a for m in model)
        monkeypatch.setattr(nn.Module, "named_modules", real)
        return injected, len(seen) - injected

    assert walks(12) == walks(2)


def test_either_name_selects_or_excludes_the_shared_module():
    """``target_modules`` / ``exclude_modules`` naming the second name of a shared module select / leave out that
    module (PEFT looks at the first name only: ``["b"]`` matched nothing, and excluding ``"b"`` warned that it
    matched no module while the module was adapted)."""
    model = _model()
    inject(model, LoRAConfig(r=2, target_modules=["b"]))
    assert isinstance(model.a, LoRALinear) and model.b is model.a and type(model.c) is nn.Linear
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "matches no module" warning
        inject(model, LoRAConfig(r=2, target_modules=["a", "c"], exclude_modules=["b"]))
    assert type(model.a) is nn.Linear and model.b is model.a and isinstance(model.c, LoRALinear)


def test_a_module_that_holds_its_ancestor_is_injected_and_unloaded():
    """A submodule that keeps a reference to its parent (``child.up = parent``, a back-pointer registered as a module)
    is a cycle: ``named_modules(remove_duplicate=False)`` recursed without end there, so ``inject`` failed with a
    RecursionError; the walks now stop at a module already on the path. Outputs: the adapter's formula, then the base
    again after ``merge_and_unload`` with B = 0."""
    from alignlab._ties import module_names, parameter_owners

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

    model = nn.Sequential(Block(), nn.Linear(6, 3))
    model[0].up = model  # the cycle
    names = module_names(model)
    assert names[id(model[0].lin)] == ["0.lin"] and names[id(model)] == ["", "0.up"]
    assert parameter_owners(model)[id(model[0].lin.weight)] == ["0.lin.weight"]
    x = torch.randn(4, 6)
    want = model[1](model[0].lin(x))
    inject(model, LoRAConfig(r=2, target_modules=["lin"]))
    assert isinstance(model[0].lin, LoRALinear)
    torch.testing.assert_close(model[1](model[0].lin(x)), want)  # B = 0 at init
    merge_and_unload(model)
    assert type(model[0].lin) is nn.Linear and model[0].up is model
    torch.testing.assert_close(model[1](model[0].lin(x)), want)
