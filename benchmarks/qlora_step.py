"""QLoRA / QDoRA training steps of a Llama-3-8B-shaped stack vs PEFT + bitsandbytes and the frozen bf16 floor (GPU).

Shape (issue 18): 4 decoder layers of Llama-3-8B (hidden 4096, MLP 14336, 32 heads, 8 KV heads) and its
128k-vocabulary head, seq 2048, batch 1 and 4; LoRA r=16, alpha=32 on q/k/v/o/gate/up/down; AdamW on the
adapter weights; HF ``LlamaForCausalLM`` forward with ``labels`` (its own loss). Every contestant runs
with its library's defaults unless the row says otherwise ("bf16 adapters" = adapter weights in bf16):

* floor -- the same bf16 model, frozen, forward + backward to the input embeddings (no weight gradients);
* alignlab -- ``quantize_model`` (NF4, double quantization, blocksize 64, lm_head kept bf16) + ``inject``;
* PEFT + bitsandbytes -- ``bnb.nn.Linear4bit`` (nf4, double quantization, bf16 compute) + ``get_peft_model``.

A step is forward + backward + ``optimizer.step()`` + ``zero_grad``. Per contestant: warm-up steps, then
timed steps with CUDA events (median ms/step), tokens/s, peak allocated memory over the timed steps, and
the first and last loss of the timed steps (all contestants start from the same weights and data, so
the losses must track each other). ``--compile`` adds ``torch.compile(model)`` rows (the first step's
time, compile included, is reported as compile time).

Also the host cost of one adapted NF4 linear call (``--host``): median wall time to enqueue one forward call,
and one forward + backward, at M = 1 and M = 2048 rows, against a bf16 ``nn.Linear`` call and a
bitsandbytes + PEFT one.

Run: ``python benchmarks/qlora_step.py [--batches 1 4] [--compile [--compile-mode reduce-overhead]] [--host] [--wide-k]
[--lora-gemm] [--out PATH]`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from host_overhead import per_call_us  # noqa: E402

from alignlab.adapters import LoRAConfig, fused, inject  # noqa: E402
from alignlab.bench import library_versions, write_json  # noqa: E402
from alignlab.quant import quantize_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 2048


def llama8b_stack(layers: int = 4):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model.requires_grad_(False).cpu()  # each contestant copies it to the GPU: peaks are its own


def _randomise_b(model, seed=1):
    """Non-zero B (and so a non-trivial adapter from the first step): same values for every library."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32).mul_(0.01))


def alignlab_model(base, dora: bool, adapter_dtype):
    model = quantize_model(copy.deepcopy(base).cuda(), compute_dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    inject(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS, use_dora=dora, adapter_dtype=adapter_dtype))
    _randomise_b(model)
    return model


def bnb_linear4bit(lin: nn.Linear):
    """``bnb.nn.Linear4bit`` on the GPU holding ``lin``'s weight (nf4, double quantization, blocksize 64, bf16 compute)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return q.cuda()


def bnb_nf4_model(base):
    """A GPU copy of ``base`` with every ``nn.Linear`` but the head replaced by :func:`bnb_linear4bit`."""
    model = copy.deepcopy(base)
    for name, module in list(model.named_modules()):  # everything but the linears to quantize goes to the GPU
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                t.data = t.data.cuda()
    for name, lin in list(model.named_modules()):
        if type(lin) is not nn.Linear or name.endswith("lm_head"):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear4bit(lin))
    torch.cuda.empty_cache()
    return model


def peft_bnb_model(base, dora: bool, adapter_dtype, targets=TARGETS):
    import peft

    model = bnb_nf4_model(base)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, use_dora=dora, lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=adapter_dtype == torch.float32)
    if adapter_dtype == torch.bfloat16:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    _randomise_b(model)
    return model


def floor_model(base):
    model = copy.deepcopy(base).cuda()
    model.enable_input_require_grads()  # backward runs to the input embeddings, no weight gradients
    return model


def run_steps(model, ids, warmup: int, steps: int, compiled: bool, compile_mode: str | None = None,
              profile: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    fwd = torch.compile(model, mode=compile_mode) if compiled else model

    def step():
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(step())
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    r = dict(ms=statistics.median(times), ms_p10=sorted(times)[len(times) // 10],
             ms_p90=sorted(times)[(9 * len(times)) // 10], first_step_s=first_step_s,
             peak_gib=torch.cuda.max_memory_allocated() / 2**30,
             first_loss=losses[0].item(), last_loss=losses[-1].item())
    if profile:  # after the timed steps, so that the profiler's own cost stays out of them
        r["profile"] = profile_step(step)
    return r


def wide_k_suffix(default: bool) -> str:
    """The name suffix of the ``--wide-k`` rows, which run with ``fused.WIDE_K`` the other way than ``default``."""
    return ", wide K off" if default else ", wide K"


GEMM_SUFFIX = ", epilogue GEMM"  # the --lora-gemm rows, run with alignlab.adapters.fused.LORA_GEMM forced on


def contestants(base, which: list[str], wide_k: bool = False, wide_default: bool = True, lora_gemm: bool = False):
    table = {
        "floor (bf16, frozen)": lambda: floor_model(base),
        "alignlab QLoRA, defaults": lambda: alignlab_model(base, False, None),
        "alignlab QLoRA, bf16 adapters": lambda: alignlab_model(base, False, torch.bfloat16),
        "PEFT + bnb QLoRA, defaults": lambda: peft_bnb_model(base, False, torch.float32),
        "PEFT + bnb QLoRA, bf16 adapters": lambda: peft_bnb_model(base, False, torch.bfloat16),
        "alignlab QDoRA, defaults": lambda: alignlab_model(base, True, None),
        "alignlab QDoRA, bf16 adapters": lambda: alignlab_model(base, True, torch.bfloat16),
        "PEFT + bnb QDoRA, defaults": lambda: peft_bnb_model(base, True, torch.float32),
    }
    if wide_k:  # the same models, run with alignlab.adapters.fused.WIDE_K flipped (see main)
        for name in ("alignlab QLoRA, defaults", "alignlab QDoRA, defaults"):
            table[name + wide_k_suffix(wide_default)] = table[name]
    if lora_gemm:  # the same models, run with alignlab.adapters.fused.LORA_GEMM forced on for every pass (see main)
        for name in ("alignlab QLoRA, defaults", "alignlab QDoRA, defaults"):
            table[name + GEMM_SUFFIX] = table[name]
    return {k: v for k, v in table.items() if not which or any(w in k for w in which)}


def host_cost(base, reps: int = 300):
    """Median host time to enqueue one forward call (and one forward + backward) of a single adapted layer
    (q_proj-shaped, 4096x4096)."""
    import bitsandbytes as bnb  # noqa: F401
    import peft

    lin = copy.deepcopy(base.model.layers[0].self_attn.q_proj).cuda()
    ours = alignlab_model_layer(lin)
    wrapper = nn.Module()
    wrapper.lin = copy.deepcopy(lin)
    bnb_model = peft_bnb_model(wrapper, False, torch.float32, targets=["lin"])
    theirs = bnb_model.base_model.model.lin
    rows = {}
    for m in (1, SEQ):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        for name, layer in (("bf16 nn.Linear (frozen)", lin), ("alignlab QLoRA layer", ours),
                            ("PEFT + bnb QLoRA layer", theirs)):
            # forward alone, and forward + backward (the host work of a training step's layer call)
            for what, call in (("", lambda: layer(x)), (" fwd+bwd", lambda: layer(x).backward(gy))):
                rows[f"{name}{what}, M={m}"] = per_call_us(call, reps=reps, warmup=20, sync_every=20)
    del peft
    return rows


def profile_step(step, top: int = 40):
    """One step (``step()``, already warmed up) under torch.profiler: wall time, summed GPU kernel time, and the
    costliest kernels. GPU-side user annotations (``Optimizer.step#AdamW.step``, a range over the optimizer's own
    kernels) are left out: counted, they added their span to the kernels inside them (0.46 ms of a batch-1 QLoRA
    step on an H200, 2026-12-06)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kernels = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False):
            kernels.setdefault(e.name, [0.0, 0])
            kernels[e.name][0] += e.device_time / 1e3
            kernels[e.name][1] += 1
    busy = sum(v[0] for v in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    print(f"    profile: wall {wall:.1f} ms, GPU kernels {busy:.1f} ms, {sum(v[1] for v in kernels.values())} launches")
    for name, (ms, n) in ranked[:top]:
        print(f"      {ms:7.2f} ms  {n:5d}x  {name[:110]}")
    return dict(wall_ms=wall, gpu_ms=busy, kernels=[(n, ms, c) for n, (ms, c) in ranked])


def host_profile(base, calls: int = 200):
    """Where the host time of one adapted NF4 layer's forward call, and of its forward + backward, goes (cProfile,
    M = 1 and 2048), and which CUDA kernels one forward + backward launches (torch.profiler)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    lin = copy.deepcopy(base.model.layers[0].self_attn.q_proj).cuda()
    layer = alignlab_model_layer(lin)
    for m in (1, SEQ):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        for what, call in (("forward", lambda: layer(x)), ("forward + backward", lambda: layer(x).backward(gy))):
            for _ in range(20):
                call()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for i in range(calls):
                call()
                if i % 50 == 49:
                    torch.cuda.synchronize()
            prof.disable()
            print(f"--- host profile, alignlab QLoRA layer {what}, M={m}, {calls} calls")
            pstats.Stats(prof).sort_stats("tottime").print_stats(24)
        with profile(activities=[ProfilerActivity.CUDA]) as kprof:
            layer(x).backward(gy)
            torch.cuda.synchronize()
        kernels = [e.name for e in kprof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        print(f"--- CUDA kernels and copies of one forward + backward, M={m}: {len(kernels)}")
        for k in kernels:
            print(f"    {k[:110]}")


def alignlab_model_layer(lin):
    holder = nn.Module()
    holder.lin = copy.deepcopy(lin).cuda()
    quantize_model(holder, skip=())
    inject(holder, LoRAConfig(r=16, alpha=32, target_modules=["lin"]))
    _randomise_b(holder)
    return holder.lin


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--only-compile", action="store_true")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the compiled rows, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--host", action="store_true", help="host cost of one adapted layer call")
    parser.add_argument("--profile", action="store_true",
                        help="per-contestant profile of one step after the timed ones (eager or compiled): GPU busy time and "
                             "every kernel's summed time (the top 40 printed)")
    parser.add_argument("--host-profile", action="store_true", help="cProfile of one adapted layer's calls")
    parser.add_argument("--which", nargs="*", default=[], help="substrings of contestant names to run")
    parser.add_argument("--wide-k", action="store_true",
                        help="also the alignlab default rows with alignlab.adapters.fused.WIDE_K flipped (on by "
                             "default: the adapter term inside the NF4 base's GEMM where that moves fewer bytes), "
                             "named '..., wide K off' (or '..., wide K' under ALIGNLAB_LORA_WIDE_K=0)")
    parser.add_argument("--lora-gemm", action="store_true",
                        help="also the alignlab default rows with alignlab.adapters.fused.LORA_GEMM forced on (every "
                             "fp16 / bf16 pass from fused.LORA_GEMM_FORCED_MIN_ROWS = 1024 rows: the rank-r term in "
                             "the base GEMM's own epilogue; 'auto' by default), named '..., epilogue GEMM'")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qlora_step.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/qlora_step.py needs a CUDA GPU")
    base = llama8b_stack(args.layers)
    wide_default = fused.WIDE_K  # ALIGNLAB_LORA_WIDE_K; the --wide-k rows flip it, every other row runs with it
    gemm_default = fused.LORA_GEMM  # ALIGNLAB_LORA_GEMM ("auto" unless set); the --lora-gemm rows force it on
    suffix = wide_k_suffix(wide_default)
    modes = ([] if args.only_compile else [False]) + ([True] if args.compile or args.only_compile else [])
    results = []
    for compiled in modes:
        for batch in args.batches:
            ids = torch.randint(0, base.config.vocab_size, (batch, SEQ), device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(batch))
            for name, build in contestants(base, args.which, args.wide_k, wide_default, args.lora_gemm).items():
                fused.WIDE_K = wide_default != name.endswith(suffix)
                fused.LORA_GEMM = True if name.endswith(GEMM_SUFFIX) else gemm_default
                model = build()
                if compiled:
                    torch._dynamo.reset()
                r = run_steps(model, ids, args.warmup, args.steps, compiled, args.compile_mode, args.profile)
                r.update(name=name, batch=batch, compiled=compiled, compile_mode=args.compile_mode if compiled else None,
                         tokens_per_s=batch * SEQ / (r["ms"] / 1e3))
                results.append(r)
                print(f"{'compiled' if compiled else 'eager   '} b{batch} {name:34s} {r['ms']:8.1f} ms "
                      f"(p10 {r['ms_p10']:.1f}, p90 {r['ms_p90']:.1f})  {r['tokens_per_s']:9.0f} tok/s  "
                      f"{r['peak_gib']:6.2f} GiB  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}  "
                      f"first step {r['first_step_s']:.1f} s", flush=True)
                del model
                gc.collect()
                torch.cuda.empty_cache()
    fused.WIDE_K, fused.LORA_GEMM = wide_default, gemm_default  # the host-cost rows below run with the defaults
    print()
    for compiled in modes:
        for batch in args.batches:
            rows = [r for r in results if r["batch"] == batch and r["compiled"] == compiled]
            floor = next((r for r in rows if r["name"].startswith("floor")), None)
            print(f"| {'compiled' if compiled else 'eager'}, batch {batch} | ms/step (x floor) | tokens/s | peak GiB "
                  f"| loss first -> last | first step s |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                ratio = f" ({r['ms'] / floor['ms']:.2f})" if floor else ""
                print(f"| {r['name']} | {r['ms']:.1f}{ratio} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | "
                      f"{r['first_loss']:.4f} -> {r['last_loss']:.4f} | {r['first_step_s']:.1f} |")
            print()
    if args.host_profile:
        host_profile(base)
    host = host_cost(base) if args.host else {}
    for k, v in host.items():
        print(f"host enqueue per call: {k:48s} {v:7.1f} us")
    write_json(args.out, {"versions": library_versions(), "device": torch.cuda.get_device_name(),
                          "steps": results, "host_us": host})


if __name__ == "__main__":
    main()
