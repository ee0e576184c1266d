"""End-to-end greedy decoding with HF ``generate()``: bf16 vs alignlab NF4 vs bitsandbytes NF4 (GPU; CPU ``--quick``).

Model: the Llama-3-8B-shaped stack of ``benchmarks/qlora_step.py`` (4 decoder layers, hidden 4096, MLP 14336,
32 heads, 8 KV heads, 128k-vocabulary head), random weights, bf16. Contestants, each built from the same
weights and moved to the device on its own (so the peak memory is its own):

* ``bf16`` -- the dense model;
* ``alignlab NF4`` -- ``alignlab.quant.quantize_model(model, compute_dtype=torch.bfloat16)`` (NF4, double
  quantization, blocksize 64, head kept bf16);
* ``bnb NF4`` -- every linear but the head as ``bnb.nn.Linear4bit`` (nf4, double quantization, blocksize 64, bf16
  compute); skipped, with the reason printed, when bitsandbytes cannot run on the device.

For each batch (1, 8, 32): a 32-token random prompt (the same for every contestant), greedy decoding of exactly
128 new tokens with the KV cache. One warm-up ``generate``, then ``--reps`` timed ones (synchronize + wall clock
around each call; the median is reported), then one ``generate`` of a single token, which is the prefill alone.
Reported: tokens/s = new tokens x batch / time of the whole call, ms per decode step = (whole call - prefill call)
/ (new tokens - 1), prefill ms, peak allocated memory during the timed calls, and how many generated tokens are
identical to bf16's and to bitsandbytes' (greedy decoding of random weights is full of near-ties, so one flipped
argmax changes the rest of a row: NF4 vs bf16 differs; alignlab vs bnb compute on the same NF4 bytes and should
mostly agree).

Modes: ``eager`` (dynamic cache, no compilation: what a user's plain ``generate`` call costs, host overhead
included) and, with ``--graphs``, ``graphs``: ``cache_implementation="static"``, with which ``transformers``
compiles the decode step's forward with ``torch.compile(mode="reduce-overhead")`` (a CUDA graph replay per step;
the prefill stays eager). The first warm-up calls of that mode, compilation included, are reported as
``compile_s``.

``--host-profile``: after each contestant's eager timings, one more ``generate`` at the first batch under
``cProfile``; the functions with the most own time (and the whole profiled time) go into the JSON and the log, so
that two contestants' host work per decode step can be compared function by function (cProfile slows Python
calls down, so compare the rows with each other, not with the timed steps).

``--adapters`` adds two contestants, generation from a QLoRA policy as in RL rollouts: ``alignlab QLoRA`` and
``PEFT + bnb QLoRA`` (LoRA r = 16, alpha 32 on q/k/v/o/gate/up/down over the NF4 models above, fp32 adapters;
built as in ``benchmarks/qlora_step.py``, then the same ``A`` and ``B`` in both: :func:`same_factors`).

``--kernel-profile``: one more ``generate`` per contestant (16 new tokens, prefill included, at the last batch in
the last mode) under ``torch.profiler``: the GPU kernels with the most own time and their launch counts (what a
compiled decode step runs per layer, say).

``--interleave ROUNDS``: every contestant built first, then per mode and batch each warmed up and ``ROUNDS`` rounds of
one timed ``generate`` per contestant in turn (medians): for comparisons finer than the host's drift between the
one-contestant-after-another runs (±10% in the graphs mode, whose steps are mostly transformers' host work).

Run: ``python benchmarks/nf4_generate.py [--graphs | --only-graphs] [--batches 1 8 32] [--adapters] [--out PATH]`` on a CUDA
machine (``--tune-rows RUN.json ...``: first add the entries of ``nf4_tune.py`` runs to the GPU's launch table);
``python benchmarks/nf4_generate.py --quick --device cpu`` checks the script on a tiny random Llama.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from qlora_step import alignlab_model, bnb_nf4_model, llama8b_stack, peft_bnb_model  # noqa: E402

from alignlab.bench import library_versions, write_json  # noqa: E402
from alignlab.quant import linear as qlinear  # noqa: E402
from alignlab.quant import quantize_model  # noqa: E402

PROMPT = 32
NEW_TOKENS = 128


def tiny_llama():
    """A 2-layer random Llama with hidden size 64, bf16, on the CPU (the ``--quick`` model)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).requires_grad_(False)


def bnb_unavailable(device: str) -> str | None:
    """Why bitsandbytes NF4 cannot run here, or ``None`` when it can."""
    if device != "cuda":
        return f"bitsandbytes NF4 rows need CUDA (device is {device})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
            import bitsandbytes.functional as F

            w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
            F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    except Exception as exc:  # noqa: BLE001 - any failure means "no bnb here"
        return f"bitsandbytes cannot run on CUDA here: {type(exc).__name__}: {exc}"
    return None


def builders(base, device: str, skip_bnb: str | None, adapters: bool = False) -> dict:
    def bf16():
        return copy.deepcopy(base).to(device)

    def alignlab():
        return quantize_model(copy.deepcopy(base).to(device), compute_dtype=torch.bfloat16)

    # "-L": the eager decode launchers turned off (alignlab.quant.linear.DECODE_LAUNCHERS)
    table = {"bf16": bf16, "alignlab NF4": alignlab, "alignlab NF4-L": alignlab}
    if skip_bnb is None:
        table["bnb NF4"] = lambda: bnb_nf4_model(base)
    if adapters:  # generation from a QLoRA policy (RL rollouts): LoRA r = 16 on all seven projections
        table["alignlab QLoRA"] = lambda: same_factors(alignlab_model(base, False, None))
        if skip_bnb is None:
            table["PEFT + bnb QLoRA"] = lambda: same_factors(peft_bnb_model(base, False, torch.float32))
    return table


def same_factors(model, seed: int = 2):
    """Every LoRA ``A`` and ``B`` drawn from one seeded generator in the order of their sorted parameter names (the
    same order in both libraries: ``....<module>.lora_A.default.weight``), so that the two QLoRA policies are the
    same function and their generated tokens can be compared (each library's own random init of ``A`` differs)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                std = p.shape[1] ** -0.5 if "lora_A" in name else 0.01
                p.copy_(torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32).mul_(std))
    return model


def prompt_ids(vocab: int, batch: int, device: str) -> torch.Tensor:
    """The random ``(batch, PROMPT)`` prompt of a batch size: the same for every contestant and mode (seeded by it)."""
    return torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)).to(device)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _generate(model, ids, new_tokens: int, graphs: bool):
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, use_cache=True, pad_token_id=0)
    if graphs:  # a compileable cache on CUDA: transformers compiles the decode forward (its CompileConfig)
        kwargs["cache_implementation"] = "static"
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def run_generate(model, ids, new_tokens: int, reps: int, graphs: bool, device: str) -> dict:
    """Warm-up, timed whole calls, one prefill-only call; returns timings, peak memory and the new tokens."""
    warmups = 2 if graphs else 1  # reduce-overhead records its CUDA graph on a later call than the first
    warm_s = []
    for _ in range(warmups):
        _, s = _timed(lambda: _generate(model, ids, new_tokens, graphs), device)
        warm_s.append(s)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        out, s = _timed(lambda: _generate(model, ids, new_tokens, graphs), device)
        times.append(s)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    _, prefill_s = _timed(lambda: _generate(model, ids, 1, graphs), device)
    row = _summary(times, prefill_s, out, ids, new_tokens)
    row.update(peak_gib=peak, compile_s=sum(warm_s) - warmups * row["s"] if graphs else None)
    return row


def _summary(times: list[float], prefill_s: float, out: torch.Tensor, ids: torch.Tensor, new_tokens: int) -> dict:
    """A contestant's row from its timed whole calls, its prefill-only call and the last call's output."""
    new = out[:, ids.shape[1]:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens, expected {new_tokens}")
    total = statistics.median(times)
    return dict(s=total, s_min=min(times), s_max=max(times), tokens_per_s=new_tokens * ids.shape[0] / total,
                decode_step_ms=1e3 * (total - prefill_s) / max(new_tokens - 1, 1), prefill_ms=1e3 * prefill_s,
                tokens=new.cpu())


def run_interleaved(models: dict, ids, new_tokens: int, rounds: int, graphs: bool, device: str) -> dict:
    """``--interleave``: every contestant warmed up (compiled, in the graphs mode), then ``rounds`` rounds of one timed
    ``generate`` per contestant in turn, so that the host's drift between them hits all alike; then a prefill-only
    call each. Rows as :func:`run_generate`'s, without peak memory (the models share the device) or compile time."""
    warmups = 2 if graphs else 1
    for model in models.values():
        for _ in range(warmups):
            _generate(model, ids, new_tokens, graphs)
    times, outs = {name: [] for name in models}, {}
    for _ in range(rounds):
        for name, model in models.items():
            outs[name], s = _timed(lambda: _generate(model, ids, new_tokens, graphs), device)
            times[name].append(s)
    rows = {}
    for name, model in models.items():
        _, prefill_s = _timed(lambda: _generate(model, ids, 1, graphs), device)
        rows[name] = dict(_summary(times[name], prefill_s, outs[name], ids, new_tokens), peak_gib=None,
                          compile_s=None, rounds=rounds)
    return rows


def host_profile(model, ids, new_tokens: int, device: str, top: int = 30, graphs: bool = False) -> dict:
    """One ``generate`` (eager, or with ``graphs`` the static-cache mode, its decode step captured) under
    ``cProfile``: the profiled wall time, the number of Python calls, and the ``top`` functions by own time
    (``name``, ``calls``, own and cumulative seconds), per decode step."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    _sync(device)
    t0 = time.perf_counter()
    prof.enable()
    _generate(model, ids, new_tokens, graphs)
    _sync(device)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    steps = max(new_tokens, 1)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return dict(wall_ms_per_step=1e3 * wall / steps, calls_per_step=sum(v[1] for v in stats.values()) / steps,
                top=[dict(name=f"{Path(f).name}:{line}({fn})", calls_per_step=v[1] / steps,
                          own_us_per_step=1e6 * v[2] / steps, cum_us_per_step=1e6 * v[3] / steps)
                     for (f, line, fn), v in rows])


def kernel_profile(model, ids, new_tokens: int, device: str, graphs: bool, top: int = 30) -> dict:
    """One ``generate`` of ``new_tokens`` (prefill included) under ``torch.profiler``: the GPU kernels (on the CPU, the
    ops) with the most own time, as ``name``, launches and own ms, and the total own time of all of them."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        _generate(model, ids, new_tokens, graphs)
        _sync(device)
    rows = []
    for ev in prof.key_averages():
        own = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if own > 0 and (not cuda or ev.device_type.name == "CUDA"):
            rows.append(dict(name=ev.key, calls=ev.count, own_ms=own / 1e3))
    rows.sort(key=lambda r: -r["own_ms"])
    return dict(new_tokens=new_tokens, total_ms=sum(r["own_ms"] for r in rows), top=rows[:top])


def _print_profile(name: str, prof: dict) -> None:
    print(f"host profile {name}: {prof['wall_ms_per_step']:.2f} ms per step under cProfile, "
          f"{prof['calls_per_step']:.0f} Python calls per step; own / cumulative us per step:")
    for r in prof["top"]:
        print(f"  {r['own_us_per_step']:8.1f} {r['cum_us_per_step']:9.1f} {r['calls_per_step']:7.1f}x  {r['name']}")


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Fraction of identical generated tokens, and the mean position of the first difference per row."""
    same = a == b
    first = torch.where(same.all(1), torch.full((a.shape[0],), a.shape[1]), (~same).int().argmax(1))
    return dict(identical=same.float().mean().item(), first_diff=first.float().mean().item())


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_tables(results: list[dict], modes: list[str], batches: list[int]):
    for mode in modes:
        for batch in batches:
            rows = [r for r in results if r["mode"] == mode and r["batch"] == batch]
            if not rows:
                continue
            ref = {r["name"]: r for r in rows if "tokens_per_s" in r}
            print(f"\n| {mode}, batch {batch} | tokens/s | x bf16 | x bnb | ms/decode step | prefill ms | peak GiB "
                  f"| same tokens as bf16 | same as bnb |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                if "error" in r:
                    print(f"| {r['name']} | error: {r['error'][:120]} |||||||")
                    continue
                tps = r["tokens_per_s"]
                x_bf16 = tps / ref["bf16"]["tokens_per_s"] if "bf16" in ref else None
                x_bnb = tps / ref["bnb NF4"]["tokens_per_s"] if "bnb NF4" in ref else None
                print(f"| {r['name']} | {tps:.0f} | {_fmt(x_bf16, '.2f')} | {_fmt(x_bnb, '.2f')} "
                      f"| {r['decode_step_ms']:.2f} | {r['prefill_ms']:.1f} | {_fmt(r['peak_gib'], '.2f')} "
                      f"| {_fmt(r.get('vs_bf16', {}).get('identical'), '.1%')} "
                      f"| {_fmt(r.get('vs_bnb NF4', {}).get('identical'), '.1%')} |")


def targets(results: list[dict]) -> list[dict]:
    """Issue targets: alignlab NF4 >= bf16 and >= 1.2x bnb NF4 in tokens/s, per mode and batch."""
    out = []
    for r in results:
        if not r["name"].startswith("alignlab NF4") or "error" in r:
            continue
        peers = {p["name"]: p for p in results if p["mode"] == r["mode"] and p["batch"] == r["batch"]
                 and "tokens_per_s" in p}
        for peer, factor in (("bf16", 1.0), ("bnb NF4", 1.2)):
            if peer not in peers:
                continue
            ratio = r["tokens_per_s"] / peers[peer]["tokens_per_s"]
            out.append(dict(name=r["name"], mode=r["mode"], batch=r["batch"], target=f">= {factor}x {peer}",
                            ratio=ratio, met=ratio >= factor))
    return out


def register_tuned(paths: list[Path], device: str) -> None:
    """Take the entries of the ``nf4_tune.py`` runs in ``paths`` into this GPU's table (``--tune-rows``)."""
    import json

    from alignlab.kernels import nf4_configs
    from nf4_tune import merged_table

    key = nf4_configs.device_key(torch.device(device))
    if key is None:
        sys.exit(f"--tune-rows: no launch table for this device ({device}) to add to")
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    table = merged_table(nf4_configs.TABLES[key], rows)
    nf4_configs.register_table(key, table)
    print(f"TABLES[{key!r}] with the entries of {', '.join(map(str, paths))}: {table}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true",
                        help="tiny random Llama (hidden 64, 2 layers), 8 new tokens; runs on the CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (--quick: 1 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"default {NEW_TOKENS} (--quick: 8)")
    parser.add_argument("--reps", type=int, default=None, help="timed generate calls per contestant and batch; "
                                                                "default 3 (--quick: 1)")
    parser.add_argument("--graphs", action="store_true",
                        help="also the static-cache mode, decode step compiled with reduce-overhead (CUDA graphs)")
    parser.add_argument("--only-graphs", action="store_true", help="the static-cache mode alone")
    parser.add_argument("--which", nargs="*", default=[], help="substrings of contestant names to run")
    parser.add_argument("--tune-rows", type=Path, nargs="+", default=[],
                        help="nf4_tune.py JSON results (runs of the swapped kernels): their entries are added to this "
                        "GPU's launch table for the run (nf4_tune.merged_table, nf4_configs.register_table), to "
                        "measure a tuning run end to end before its table is pasted into nf4_configs.py")
    parser.add_argument("--host-profile", action="store_true",
                        help="one more generate per contestant under cProfile (eager at the first batch; with "
                        "--only-graphs, the static-cache mode at the last batch): the functions with the most own "
                        "time per decode step (compare contestants' host work)")
    parser.add_argument("--adapters", action="store_true",
                        help="also alignlab QLoRA and PEFT + bitsandbytes QLoRA (LoRA r = 16 on q/k/v/o/gate/up/down, "
                        "fp32 adapters, the libraries' defaults): generation from a QLoRA policy; CUDA only")
    parser.add_argument("--kernel-profile", action="store_true",
                        help="one more generate per contestant (16 new tokens at the last batch, in the last mode) under "
                        "torch.profiler: the GPU kernels with the most own time and their launch counts")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="build every contestant first, then per mode and batch time ROUNDS rounds of one generate "
                        "per contestant in turn (medians; no peak memory); the '-L' contestant is left out (its switch "
                        "is a global that compiled code guards on)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nf4_generate.json")
    args = parser.parse_args(argv)
    if args.interleave < 0:
        parser.error(f"--interleave takes a number of rounds >= 1 (0: off), got {args.interleave}")
    if args.interleave and (args.host_profile or args.kernel_profile):
        parser.error("--interleave only times; run --host-profile / --kernel-profile without it")
    device = args.device
    if args.tune_rows:
        register_tuned(args.tune_rows, device)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/nf4_generate.py needs a CUDA GPU (or --quick --device cpu)")
    new_tokens = args.new_tokens or (8 if args.quick else NEW_TOKENS)
    args.batches = args.batches or ([1, 4] if args.quick else [1, 8, 32])
    args.reps = args.reps or (1 if args.quick else 3)
    modes = ([] if args.only_graphs else ["eager"]) + (["graphs"] if args.graphs or args.only_graphs else [])
    if "graphs" in modes and device != "cuda":
        print("note: on the CPU transformers does not compile the decode step; graphs mode = static cache only")
    skip_bnb = bnb_unavailable(device)
    if skip_bnb:
        print(f"bnb NF4 skipped: {skip_bnb}")
    t_start = time.perf_counter()
    base = tiny_llama() if args.quick else llama8b_stack()
    base.generation_config.eos_token_id = None  # exactly new_tokens per row
    if args.adapters and device != "cuda":
        sys.exit("--adapters needs CUDA (the adapter rows are built as benchmarks/qlora_step.py builds them)")
    table = {k: v for k, v in builders(base, device, skip_bnb, args.adapters).items()
             if not args.which or any(w in k for w in args.which)}
    print(f"model built in {time.perf_counter() - t_start:.1f} s; modes {modes}, batches {args.batches}, "
          f"prompt {PROMPT}, new tokens {new_tokens}", flush=True)

    results, profiles, kernel_profiles = [], {}, {}
    launchers_default = qlinear.DECODE_LAUNCHERS
    if args.interleave:
        table = {k: v for k, v in table.items() if not k.endswith("-L")}
        models = {name: build() for name, build in table.items()}
        for mode in modes:
            for batch in args.batches:
                ids = prompt_ids(base.config.vocab_size, batch, device)
                if mode == "graphs":
                    torch._dynamo.reset()
                rows = run_interleaved(models, ids, new_tokens, args.interleave, mode == "graphs", device)
                for name, row in rows.items():
                    results.append(dict(name=name, mode=mode, batch=batch, **row))
                    print(f"{mode:6s} b{batch:<3d} {name:13s} {row['tokens_per_s']:9.0f} tok/s  "
                          f"{row['decode_step_ms']:7.2f} ms/step  prefill {row['prefill_ms']:7.1f} ms  "
                          f"(interleaved, {args.interleave} rounds)", flush=True)
        table = {}  # measured above
    for name, build in table.items():
        qlinear.DECODE_LAUNCHERS = launchers_default and not name.endswith("-L")
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001 - a broken contestant is reported, the others still run
            print(f"{name}: build failed: {type(exc).__name__}: {exc}", flush=True)
            results += [dict(name=name, mode=m, batch=b, error=f"build: {exc}") for m in modes for b in args.batches]
            continue
        if device == "cuda":
            torch.cuda.empty_cache()
        for mode in modes:
            for batch in args.batches:
                ids = prompt_ids(base.config.vocab_size, batch, device)
                if mode == "graphs":
                    torch._dynamo.reset()  # one compilation per contestant and batch, never hitting the recompile limit
                row = dict(name=name, mode=mode, batch=batch)
                try:
                    row.update(run_generate(model, ids, new_tokens, args.reps, mode == "graphs", device))
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"
                results.append(row)
                if "error" in row:
                    print(f"{mode:6s} b{batch:<3d} {name:13s} error: {row['error'][:300]}", flush=True)
                    continue
                comp = "" if row["compile_s"] is None else f"  warm-up/compile {row['compile_s']:.1f} s"
                print(f"{mode:6s} b{batch:<3d} {name:13s} {row['tokens_per_s']:9.0f} tok/s  "
                      f"{row['decode_step_ms']:7.2f} ms/step  prefill {row['prefill_ms']:7.1f} ms  "
                      f"peak {_fmt(row['peak_gib'], '.2f')} GiB{comp}", flush=True)
        if args.host_profile:  # eager at the first batch; in the graphs mode alone, at the last (compiled) batch
            graphs = "eager" not in modes
            batch = args.batches[-1] if graphs else args.batches[0]
            ids = prompt_ids(base.config.vocab_size, batch, device)
            profiles[name] = host_profile(model, ids, new_tokens, device, graphs=graphs)
            _print_profile(f"{name} ({'graphs' if graphs else 'eager'}, batch {batch})", profiles[name])
        if args.kernel_profile:  # the last mode and batch, after its timings
            graphs = modes[-1] == "graphs"
            batch = args.batches[-1]
            ids = prompt_ids(base.config.vocab_size, batch, device)
            kprof = kernel_profile(model, ids, min(new_tokens, 16), device, graphs)
            kernel_profiles[name] = kprof
            print(f"kernel profile {name} ({modes[-1]}, batch {batch}, {kprof['new_tokens']} new tokens): "
                  f"{kprof['total_ms']:.2f} ms of {'GPU kernels' if device == 'cuda' else 'CPU ops'}; own ms, launches:")
            for r in kprof["top"]:
                print(f"  {r['own_ms']:8.3f} {r['calls']:6d}x  {r['name'][:110]}")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    for r in results:  # token agreement with each reference contestant of the same mode and batch
        if "tokens" not in r:
            continue
        for ref in results:
            if (ref["name"] in ("bf16", "bnb NF4", "PEFT + bnb QLoRA") and ref["name"] != r["name"] and "tokens" in ref
                    and (ref["mode"], ref["batch"]) == (r["mode"], r["batch"])):
                r[f"vs_{ref['name']}"] = _agreement(r["tokens"], ref["tokens"])
    print_tables(results, modes, args.batches)
    goals = targets(results)
    if goals:
        print()
    for g in goals:
        print(f"target {g['mode']:6s} b{g['batch']:<3d} {g['name']:14s} {g['target']:14s}: {g['ratio']:.2f}x "
              f"{'met' if g['met'] else 'MISSED'}")
    for r in results:  # --adapters: the two QLoRA policies against each other
        peer = next((p for p in results if p["name"] == "PEFT + bnb QLoRA" and "tokens_per_s" in p
                     and (p["mode"], p["batch"]) == (r["mode"], r["batch"])), None)
        if r["name"] == "alignlab QLoRA" and "tokens_per_s" in r and peer is not None:
            same = r.get("vs_PEFT + bnb QLoRA", {}).get("identical")
            print(f"QLoRA {r['mode']:6s} b{r['batch']:<3d}: alignlab {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x "
                  f"PEFT + bnb tokens/s ({r['decode_step_ms']:.2f} vs {peer['decode_step_ms']:.2f} ms per decode step; "
                  f"same tokens {_fmt(same, '.1%')})")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")

    for r in results:
        r.pop("tokens", None)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    write_json(args.out, {"versions": library_versions(), "device": device_name,
                          "model": "tiny random Llama (--quick)" if args.quick else "llama8b_stack(4)",
                          "prompt": PROMPT, "new_tokens": new_tokens, "reps": args.reps,
                          "results": results, "targets": goals, "host_profiles": profiles,
                          "kernel_profiles": kernel_profiles})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
