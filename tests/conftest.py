"""Shared test set-up.

Triton's interpreter must be switched on before anything imports triton, so
this runs first: without a GPU every Triton kernel test runs under
``TRITON_INTERPRET=1`` on CPU tensors (keep those shapes small).
"""

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

_HAS_GPU = shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")
if not _HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# intra-op threads: up to 4, shared among pytest-xdist workers (README's `-n auto` runs one per core; each with all
# the cores' threads would oversubscribe them)
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Device for Triton kernel tests: the GPU when there is one, else CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_mode(monkeypatch):
    """Force the Triton path (interpreter on CPU) for the duration of a test."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ALIGNLAB_KERNELS", "triton")
    yield


@pytest.fixture
def torch_mode(monkeypatch):
    """Force the PyTorch reference path for the duration of a test."""
    monkeypatch.setenv("ALIGNLAB_KERNELS", "torch")
    yield


@pytest.fixture(params=["torch", "triton"])
def kernel_mode(request, monkeypatch):
    """Each test twice: on the PyTorch reference path and on the Triton path (interpreter on CPU)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ALIGNLAB_KERNELS", request.param)
    return request.param


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random-weight Llama (no hub download) for parity tests."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 8,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def make_experts(kind: str = "mixtral", hidden: int = 64, intermediate: int = 32, num_experts: int = 3,
                 std: float = 0.1, seed: int = 0) -> "torch.nn.Module":
    """A tiny ``transformers`` experts module (fused 3-D weights; ``kind`` "mixtral" or "gpt_oss", whose biases
    are parameters too) with every parameter drawn from N(0, std²)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    sizes = dict(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=num_experts)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        experts = MixtralExperts(transformers.MixtralConfig(**sizes))
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        experts = GptOssExperts(transformers.GptOssConfig(**sizes))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, std)
    # a model sets this on its config; transformers 5.0's expert dispatch reads it (None raised KeyError there)
    if getattr(experts.config, "_experts_implementation", None) is None:
        experts.config._experts_implementation = "eager"
    return experts


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def make_tiny_t5():
    """A tiny random T5 (shared input table under encoder/decoder ``embed_tokens`` and ``shared``), eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def enable_checkpointing(model, use_reentrant: bool, **options) -> None:
    """HF activation checkpointing on ``model`` under the name the installed transformers gives it: newer releases
    renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name warns that it goes
    in v6) and added ``every_n_layers`` / ``offload``, which ``options`` passes on (they need the new name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant}, **options)
    elif options:
        pytest.skip(f"transformers {importlib.metadata.version('transformers')} has no activation checkpointing options")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def disable_checkpointing(model) -> None:
    """The undo of :func:`enable_checkpointing`, by the installed transformers' name for it."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def load_script(relpath: str):
    """A script of this repository (``benchmarks/x.py``, ``examples/y.py``) imported as a module, so a CPU test can
    call its parts."""
    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tied_llama():
    """A tiny random Llama whose ``lm_head`` shares the input embedding (``tie_word_embeddings``), eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def randomise_trainable(model, scale: float = 0.3, seed: int = 1):
    """Add seeded noise (the same draw for every tensor) to each trainable parameter, in place, so that a
    freshly initialised adapter changes the output; returns ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return model


def logits_of(model, ids):
    """``model(input_ids=ids).logits`` without a graph."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_adapter_config(path, cfg) -> dict:
    """The ``adapter_config.json`` that ``save_adapter`` writes for ``cfg`` injected into a tiny Llama."""
    import json

    from alignlab.adapters import inject, save_adapter

    save_adapter(inject(make_tiny_llama(), cfg), path)
    return json.loads((path / "adapter_config.json").read_text())


def config_fields(cfg) -> dict:
    """Every attribute with its type but the targets (our file lists the adapted modules by full name) and the mark of
    a config read from a file (``_task_type_from_file``, see ``alignlab.adapters.config.with_task_heads``)."""
    return {k: (v, type(v)) for k, v in vars(cfg).items() if k not in ("target_modules", "_task_type_from_file")}


def run_cpu_example(script: str, *args: str, timeout: int = 180) -> str:
    """Run ``examples/<script>`` with ``args`` in a fresh process on the CPU (no GPU visible), from the
    repository root; assert it exits 0 and return its stdout."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "examples" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def step_losses(stdout: str) -> list[float]:
    """The last number of each ``step ...`` line an example prints."""
    return [float(line.split()[-1]) for line in stdout.splitlines() if line.startswith("step")]


_VIEW_OPS = (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.view.default,
             torch.ops.aten.alias.default, torch.ops.aten.detach.default, torch.ops.aten.t.default,
             torch.ops.aten.transpose.int, torch.ops.aten.as_strided.default, torch.ops.aten._unsafe_view.default)


@contextlib.contextmanager
def saved_numels(keep=lambda t: True):
    """A list of the numels of the tensors autograd saves for backward while active (those with ``keep(t)``)."""
    saved = []

    def pack(t):
        if keep(t):
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


class LargestOutput(TorchDispatchMode):
    """Records the numel of the largest tensor any op *makes* while active (views do not count): a test that a
    function does not copy a big input (e.g. ``reshape`` of a non-contiguous slice)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _VIEW_OPS:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone (rank 0 of 1), torn down after the test."""
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - every CPU wheel ships gloo
        pytest.skip("torch.distributed is not available in this build")
    if dist.is_initialized():  # pragma: no cover - the test process never joins a group otherwise
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free local port, for the ranks of a test's process group (or torchrun's) to meet on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, *args, world: int = 2) -> None:
    """``worker(rank, world, port, *args)`` in ``world`` spawned processes on a free port; returns when all have
    (``torch.multiprocessing.spawn`` pickles ``worker`` by module name: keep it in a module of its own)."""
    torch.multiprocessing.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)


def load_checkpoint(folder) -> dict:
    """Every tensor of the ``*.safetensors`` files in ``folder`` (a saved or merged checkpoint)."""
    from pathlib import Path

    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def mergekit_run(recipe: dict, out) -> dict:
    """mergekit's own ``run_merge`` of ``recipe`` (a dict as the YAML holds it) into ``out``; its tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_checkpoint(out)


def save_llama_finetunes(root, num_layers: int = 2):
    """``root/base`` and two fine-tunes of it, ``root/a`` and ``root/b`` (base + 0.05·noise), as transformers saves
    them (a tiny fp32 Llama with an untied head): the checkpoints the merges are compared with mergekit on."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).float()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        model = transformers.LlamaForCausalLM(cfg).float()
        model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        model.save_pretrained(root / name)
    return root


# a tiny config shared by the task-head tests (classifier / QA models of several architectures)
TINY_HEAD_CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, pad_token_id=0)


def make_tiny_llama_classifier():
    """A random tiny ``LlamaForSequenceClassification`` (3 labels, pad id 0), in eval mode."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_HEAD_CONFIG, num_key_value_heads=2)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def make_tiny_bert(head: str = "ForSequenceClassification"):
    """A random tiny ``Bert<head>`` (3 labels; 2 for question answering), in eval mode."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(**TINY_HEAD_CONFIG | {"num_labels": 2 if "Question" in head else 3},
                                  max_position_embeddings=64)
    return getattr(transformers, "Bert" + head)(cfg).eval()


def printed_in_fresh_process(expr: str, env: dict) -> str:
    """What ``print(expr)`` shows in a new interpreter whose environment is this one's with ``env`` applied (a value
    of None unsets the variable): for switches read once at import."""
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k not in env}
    environ.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", f"print({expr})"], env=environ, capture_output=True, text=True,
                          check=True).stdout.strip()
