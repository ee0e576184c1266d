"""Two gloo ranks on CPU (FSDP2 and DDP) against one process on the same global batch.

One spawn trains every case (FSDP2 / DDP x LoRA / DoRA on an NF4 Llama, plus FSDP2 with the
bf16 mixed-precision policy) and saves adapters; a second spawn -- fresh processes, as after a
kill -- resumes from the saved adapters. The oracle is the same script run here in a single
process on the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the worker by module name
import fsdp_worker as w  # noqa: E402

from alignlab.adapters import disabled, save_adapter  # noqa: E402

CASES = ("fsdp_lora", "fsdp_dora", "ddp_lora", "ddp_dora")
FILES = ("adapter_model.safetensors", "adapter_config.json")


def _spawn(out: Path, phase: str) -> dict:
    spawn_ranks(w.worker, str(out), phase)
    return torch.load(out / f"{phase}.pt", weights_only=False)


def _single(dora: bool, out: Path):
    model = w.build(dora)
    ids = w.global_batch()
    save_adapter(model, out / "init")
    losses, grads, _ = w.train(model, ids)
    save_adapter(model, out / "trained")
    with torch.no_grad():
        next_loss = float(w.loss_of(model, ids))
        with disabled(model):
            ref_loss = float(w.loss_of(model, ids))
    return model, {"losses": losses, "grads": grads, "next_loss": next_loss, "ref_loss": ref_loss}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    train = _spawn(out, "train")
    restart = _spawn(out, "restart")
    single = {}
    for dora in (False, True):
        name = "dora" if dora else "lora"
        single[name] = _single(dora, out / "single" / name)
    return out, train, restart, single


@pytest.mark.parametrize("case", CASES)
def test_loss_and_adapter_grads_match_one_process(runs, case):
    _, train, _, single = runs
    got, want = train[case], single[case.split("_")[1]][1]
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=1e-6)
    for step, (g, s) in enumerate(zip(got["grads"], want["grads"])):
        assert sorted(g) == sorted(s), f"step {step}: gradient carried by other parameters than the adapter's"
        assert all(("lora_" in n) for n in g), sorted(g)
        for n in s:
            torch.testing.assert_close(g[n], s[n], rtol=1e-4, atol=1e-6, msg=f"step {step}: {n}")
    # optimizer state exists for adapter parameters only (SGD momentum: one buffer each)
    assert got["opt_state"] == len(want["grads"][0])
    assert got["next_loss"] == pytest.approx(want["next_loss"], rel=1e-5)
    assert got["ref_loss"] == pytest.approx(want["ref_loss"], rel=1e-5)  # disabled(model): the DPO reference pass
    assert got["ref_loss"] != pytest.approx(got["next_loss"], rel=1e-3)  # and it really turned the adapters off


@pytest.mark.parametrize("case", CASES)
def test_saved_adapter_files(runs, case):
    out, _, _, _ = runs
    kind = case.split("_")[1]
    for fname in FILES:  # same adapter weights: rank 0 writes the bytes a single process writes
        assert (out / case / "init" / fname).read_bytes() == (out / "single" / kind / "init" / fname).read_bytes()
    assert (out / case / "trained" / FILES[1]).read_bytes() == (out / "single" / kind / "trained" / FILES[1]).read_bytes()
    from safetensors.torch import load_file

    got, want = (load_file(str(d / FILES[0])) for d in (out / case / "trained", out / "single" / kind / "trained"))
    assert sorted(got) == sorted(want)
    for k in want:  # trained in two ranks: equal to float tolerance (the reduction order differs)
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert not [p for p in (out / case).rglob("*.tmp")]


@pytest.mark.parametrize("case", CASES)
def test_restart_from_saved_adapter_resumes_with_the_same_loss(runs, case):
    _, train, restart, _ = runs
    assert restart[case]["loss"] == pytest.approx(train[case]["next_loss"], rel=1e-6)


def test_loading_an_adapter_the_sharded_model_lacks_is_refused(runs):
    assert "inject it before fully_shard" in runs[2]["missing_adapter_error"]


def test_fsdp_shards_parameters_and_nf4_bytes(runs):
    _, train, _, single = runs
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    for case in ("fsdp_lora", "fsdp_dora"):
        b = train[case]["bytes"]
        model = single[case.split("_")[1]][0]
        packed = [x for x in model.buffers() if x.dtype == torch.uint8]  # NF4 codes + 8-bit scales
        assert nbytes(packed) > nbytes(model.parameters()) / 10  # a real share of this tiny model
        assert b["param_bytes_full"] == nbytes(model.parameters()) + nbytes(packed)  # the bytes became parameters
        assert b["param_bytes_local"] <= b["param_bytes_full"] // 2 + 4096  # 1/world of them (+ dim-0 padding)
        assert b["buffer_bytes"] == nbytes(x for x in model.buffers() if x.dtype != torch.uint8)  # float scales


def test_full_state_dict_equals_one_process(runs):
    _, train, _, single = runs
    got, want = train["fsdp_lora"]["state_dict"], single["lora"][0].state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        if v.dtype == torch.uint8 or "lora_" not in k:  # NF4 bytes, scales, frozen weights: bit for bit
            assert torch.equal(got[k], v), k
        else:
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(k.endswith("weight.quant_state.bitsandbytes__nf4") for k in got)


def test_bf16_mixed_precision_tracks_fp32(runs):
    _, train, _, single = runs
    torch.testing.assert_close(train["fsdp_bf16"]["losses"], single["lora"][1]["losses"], rtol=2e-2, atol=0)


def test_gathered_state_dict_loads_into_transformers_4bit(runs, tmp_path):
    """The base part of the FSDP2 model's gathered state dict, put in a checkpoint directory that
    transformers wrote with BitsAndBytesConfig, loads there with no missing or unexpected key and
    holds exactly our bytes."""
    import warnings

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file, save_file

    sd = runs[1]["fsdp_lora"]["state_dict"]
    base = {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}
    transformers.LlamaForCausalLM(w.llama_config()).save_pretrained(tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg,
                                                               device_map="cpu")
        hf.save_pretrained(tmp_path / "q4")
        theirs = load_file(str(tmp_path / "q4" / "model.safetensors"))
        assert sorted(base) == sorted(theirs)  # the same layout transformers writes
        save_file(base, str(tmp_path / "q4" / "model.safetensors"), metadata={"format": "pt"})
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    layers = [k[: -len(".weight.absmax")] for k in base if k.endswith(".weight.absmax")]
    assert len(layers) == 14
    for name in layers:  # bitsandbytes' Linear4bit now holds our codes and scales
        weight = hf.get_submodule(name).weight
        assert torch.equal(weight.data.flatten(), base[f"{name}.weight"].flatten()), name
        assert torch.equal(weight.quant_state.absmax, base[f"{name}.weight.absmax"]), name
        assert torch.equal(weight.quant_state.state2.absmax, base[f"{name}.weight.nested_absmax"]), name


def test_cast_cache_is_off_under_fsdp2(runs):
    """FSDP2 refills the gathered adapter factors in place without bumping their version (version 0
    at every step on CPU; on GPU the caching allocator may also give back the same address), so the
    fused path must not reuse a compute-dtype copy keyed on (version, address)."""
    for case in ("fsdp_lora", "fsdp_dora"):
        flags = runs[1][case]["cache_casts"]
        assert flags and not any(flags)


@pytest.mark.parametrize("cache_casts", [True, False])
def test_without_the_cast_cache_a_silent_refill_is_seen(cache_casts):
    """bf16 compute with fp32 factors (the GPU default): the fused path works on bf16 copies of A, B."""
    from torch import nn

    from alignlab.adapters import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 4).to(torch.bfloat16), r=2)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    layer.cache_casts = cache_casts
    before = layer(x)
    layer.lora_A["default"].weight.data.mul_(2)  # through .data: same address, same version, as FSDP2's refill
    after = layer(x)
    assert torch.equal(after, before) == cache_casts  # the cache cannot see such a refill; off, it is read


def test_shard_model_takes_one_block_type_as_a_string(monkeypatch):
    """block_types='Block' was read as its characters ('B', 'l', ...): no block matched and the error listed
    the letters. One name or one class is one block type (no process group needed: fully_shard is recorded)."""
    import torch.distributed.fsdp as fsdp

    from alignlab.distributed import shard_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: sharded.append(module))
    mesh = object()  # handed to the recorded fully_shard only (no process group in this process)
    for block_types in ("Block", Block):
        sharded.clear()
        model = torch.nn.Sequential(Block(), Block())
        shard_model(model, block_types=block_types, mesh=mesh)
        assert sharded == [model[0], model[1], model]
    with pytest.raises(ValueError, match=r"\['Nope'\]"):
        shard_model(torch.nn.Sequential(Block()), block_types="Nope", mesh=mesh)
    with pytest.raises(TypeError, match="block_types"):
        shard_model(torch.nn.Sequential(Block()), block_types=[1], mesh=mesh)
    with pytest.raises(TypeError, match=r"^block_types must be a class, a class name or an iterable of them, got 3$"):
        shard_model(torch.nn.Sequential(Block()), block_types=3, mesh=mesh)  # was "'int' object is not iterable"


def test_shard_model_refuses_a_dtype_as_mp_policy(monkeypatch):
    """mp_policy=torch.bfloat16 (or "bf16") was handed to fully_shard, which kept it: the first forward then failed
    with "'torch.dtype' object has no attribute 'param_dtype'", far from the call that was wrong."""
    import torch.distributed.fsdp as fsdp

    from alignlab.distributed import bf16_policy, shard_model

    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: sharded.append(kwargs["mp_policy"]))
    for wrong in (torch.bfloat16, "bf16"):
        with pytest.raises(TypeError, match=r"^mp_policy must be a torch\.distributed\.fsdp\.MixedPrecisionPolicy"):
            shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), block_types="Linear", mesh=object(),
                        mp_policy=wrong)
    assert sharded == []  # refused before anything was sharded
    shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), block_types="Linear", mesh=object(),
                mp_policy=bf16_policy())
    assert sharded == [bf16_policy()] * 2


def test_ddp_model_refuses_what_is_not_a_module():
    """ddp_model("model") failed inside DDP with "'str' object has no attribute 'named_parameters'"."""
    from alignlab.distributed import ddp_model

    for wrong in ("model", None):
        with pytest.raises(TypeError, match=r"^model must be an nn\.Module, got "):
            ddp_model(wrong)


def test_like_target_refuses_another_shape():
    """like_target returned a (1, n) source for an (m, n) plain target as is, and target.copy_ broadcast it
    over every row without a word."""
    from alignlab.distributed import like_target

    target = torch.zeros(3, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"src: expected the shape of target \(3, 4\), got \(1, 4\)"):
        like_target(torch.ones(1, 4), target)
    out = like_target(torch.ones(3, 4, dtype=torch.float64), target)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4)


def test_shard_model_without_a_process_group_says_to_start_one(monkeypatch):
    """Started with plain ``python`` (no init_process_group, no torchrun environment), shard_model failed inside
    torch's implicit env:// rendezvous with 'environment variable RANK expected, but not set', which does not say
    that a process group is what is missing, nor how to make one."""
    from alignlab.distributed import shard_model

    if torch.distributed.is_initialized():  # pragma: no cover - the test process never joins a group
        pytest.skip("a process group is initialized in this process")
    import torch.distributed.fsdp as fsdp

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: sharded.append(module))
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"no torch\.distributed process group.*init_process_group.*torchrun"):
        shard_model(model, block_types="Sequential")
    # refused before anything was sharded: the first block's fully_shard went through, and the retry the message
    # asks for (after init_process_group) failed with "fully_shard has already been applied"
    assert sharded == []
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)  # torchrun's environment: fully_shard may start the group itself
    shard_model(model, block_types="Sequential")
    assert sharded == [model[0], model]
