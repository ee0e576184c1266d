"""Streaming checkpoint merge vs mergekit on CPU: wall time, peak RSS, output parity.

Builds three synthetic Llama-shaped bf16 checkpoints (~1.5 GB each by default,
sharded safetensors + index + config.json) under ``--workdir``, then for
``ties`` (base + 2 fine-tunes) and ``slerp`` (base + 1) runs

* ours:     ``python -m alignlab.merging recipe.yaml OUT``
* mergekit: ``mergekit-yaml config.yaml OUT`` (same recipe, ``dtype: float32``
  arithmetic and ``out_dtype: bfloat16``, which is what we do)

each in its own process; peak RSS is that process's ``ru_maxrss`` (as reported
to the parent through ``RUSAGE_CHILDREN``), wall time includes start-up. The
outputs are compared tensor by tensor. For TIES on bf16 weights the task vectors
repeat values, so elements tied at the top-k threshold can be kept by one
implementation and dropped by the other (mergekit keeps whatever torch's
unstable ``argsort`` puts first; we keep the earliest positions); the script
counts differing elements and checks that every one of them sits on such a tie.

    python benchmarks/merging.py                    # ~1.5 GB checkpoints
    python benchmarks/merging.py --layers 2         # quick run (~0.4 GB)

Writes ``benchmarks/results/merging.json``. Disk use: ~7x the checkpoint size
at peak; everything under ``--workdir`` is deleted at the end unless ``--keep``. An existing ``--workdir`` must
be empty or one this script made (a kept one): any other folder is refused, not deleted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKDIR_MARKER = ".alignlab_merging_bench"  # marks a --workdir this script made, so a rerun may delete it
sys.path.insert(0, str(ROOT))

from alignlab.bench import write_json  # noqa: E402
from alignlab.merging.checkpoint import SafetensorsCheckpoint  # noqa: E402


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_models(work: Path, shapes: dict, hidden: int, inter: int, layers: int, vocab: int, shard_bytes: int) -> list[Path]:
    """Base + two fine-tunes (base + small dense noise), tensor by tensor, bf16, with safetensors' writer."""
    from safetensors.torch import save_file

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    paths = [work / name for name in ("base", "ft1", "ft2")]
    for k, path in enumerate(paths):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        g = torch.Generator().manual_seed(1234)  # same base in every model
        gn = torch.Generator().manual_seed(k)
        shard, size, n, wm = {}, 0, 1, {}

        def flush():
            nonlocal shard, size, n
            fn = f"model-{n:05d}-of-XXXXX.safetensors"
            save_file(shard, path / fn, metadata={"format": "pt"})
            wm.update({name: fn for name in shard})
            shard, size, n = {}, 0, n + 1

        for name, shape in shapes.items():
            t = torch.randn(shape, generator=g) * 0.02
            if k:
                t += torch.randn(shape, generator=gn) * 0.002
            t = t.to(torch.bfloat16)
            if shard and size + t.numel() * 2 > shard_bytes:
                flush()
            shard[name] = t
            size += t.numel() * 2
        flush()
        total = n - 1
        for f in sorted(path.glob("*-of-XXXXX.safetensors")):
            f.rename(path / f.name.replace("XXXXX", f"{total:05d}"))
        wm = {k2: v.replace("XXXXX", f"{total:05d}") for k2, v in wm.items()}
        index = {"metadata": {"total_size": sum(math_prod(s) * 2 for s in shapes.values())}, "weight_map": wm}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def math_prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def recipes(method: str, paths: list[Path]) -> tuple[str, str]:
    base, ft1, ft2 = (str(p) for p in paths)
    if method == "ties":
        models = (f"  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                  f"  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.5}}\n")
        params = "parameters: {normalize: true}\n"
    else:
        models = f"  - model: {base}\n  - model: {ft1}\n"
        params = "parameters: {t: 0.4}\n"
    common = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{params}"
    ours = common + "dtype: bfloat16\nout_shard_size: 2GB\n"
    theirs = common + "dtype: float32\nout_dtype: bfloat16\n"
    return ours, theirs


_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); p = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('RESULT', p.returncode, t, u.ru_maxrss, u.ru_utime + u.ru_stime)\n"
)


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as the only child of a fresh interpreter: wall time and that child's peak RSS."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, stderr=f, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    rc, wall, rss_kb, cpu = int(line[1]), float(line[2]), int(line[3]), float(line[4])
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} failed (rc={rc}); see {log}:\n" + log.read_text()[-3000:])
    # CPU seconds (user + system) depend much less than wall time on what else the machine runs
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1), "cpu_s": round(cpu, 2),
            "load_avg_after": round(os.getloadavg()[0], 2)}


def threshold_ties(base: torch.Tensor, models: list[torch.Tensor], density: float) -> torch.Tensor:
    """Positions whose |delta| equals some model's k-th largest |delta| (where top-k may break ties either way)."""
    hit = torch.zeros(base.shape, dtype=torch.bool)
    for m in models:
        d = (m.float() - base.float()).abs()
        k = max(1, int(density * d.numel()))
        thr = torch.kthvalue(d.reshape(-1), d.numel() - k + 1).values
        hit |= d == thr
    return hit


def slerp_float64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of the flattened tensors evaluated in float64 (mergekit's thresholds), as the exact reference."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm(), y.norm()
    nx, ny = (nx if nx > 1e-8 else 1.0), (ny if ny > 1e-8 else 1.0)
    dot = float(torch.dot(x / nx, y / ny).clamp(-1, 1))
    if abs(dot) > 0.9995:
        ca, cb = 1 - t, t
    else:
        om = math.acos(dot)
        ca, cb = math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)
    return (ca * x + cb * y).reshape(a.shape)


def compare(ours: Path, theirs: Path, method: str, paths: list[Path]) -> dict:
    a, b = SafetensorsCheckpoint(ours), SafetensorsCheckpoint(theirs)
    inputs = [SafetensorsCheckpoint(p) for p in paths]
    if set(a.names()) != set(b.names()):
        return {"same_tensor_names": False}
    identical = diff = outside = total = 0
    off_exact = {"ours": 0, "mergekit": 0}  # SLERP: elements that differ from the float64 formula rounded alike
    max_abs = 0.0
    for name in a.names():
        x, y = a.read(name), b.read(name)
        if method == "slerp" and x.is_floating_point():
            exact = slerp_float64(inputs[0].read(name), inputs[1].read(name), 0.4).to(x.dtype)
            off_exact["ours"] += int((x != exact).sum())
            off_exact["mergekit"] += int((y != exact).sum())
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_tensor_names": True, "dtype_or_shape_mismatch": name}
        ne = x != y
        n = int(ne.sum())
        total += x.numel()
        if n == 0:
            identical += 1
            continue
        diff += n
        max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
        if method == "ties":
            ties_at = threshold_ties(inputs[0].read(name), [inputs[1].read(name), inputs[2].read(name)], 0.5)
            outside += int((ne & ~ties_at).sum())
        else:
            outside += n
    for c in (a, b, *inputs):
        c.close()
    out = {"same_tensor_names": True, "tensors": len(a.names()), "identical_tensors": identical,
           "differing_elements": diff, "differing_fraction": diff / max(total, 1),
           "differing_not_explained_by_threshold_ties": outside, "max_abs_diff": max_abs}
    if method == "slerp":
        out["elements_off_the_float64_formula"] = off_exact
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/alignlab_merge_bench")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--methods", nargs="+", default=["ties", "slerp"])
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per tool; medians are reported")
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" / "merging.json"))
    args = ap.parse_args()

    work = Path(os.path.expanduser(args.workdir))  # "~/w" was ./~/w here but the home folder to alignlab.merging
    # the workdir is deleted at the start and at the end: only one this script made (its marker file) or an empty one
    if work.exists() and not (work / WORKDIR_MARKER).is_file() and (not work.is_dir() or any(work.iterdir())):
        ap.error(f"--workdir {args.workdir!r} exists and holds files this benchmark did not write; it deletes its "
                 "workdir, so give a new or empty folder")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORKDIR_MARKER).write_text("made by benchmarks/merging.py; deleted with this folder\n")
    results = {
        "benchmark": "merging", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(), "runs": [],
    }
    try:
        import mergekit  # noqa: F401
        from importlib.metadata import version

        results["mergekit"] = version("mergekit")
        mk_cli = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
        have_mk = not args.no_mergekit and Path(mk_cli).exists()
    except ImportError:
        have_mk, mk_cli = False, ""
    try:
        shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
        t0 = time.perf_counter()
        paths = write_models(work, shapes, args.hidden, args.intermediate, args.layers, args.vocab,
                             args.shard_mb * 1000**2)
        size_gb = sum(f.stat().st_size for f in paths[0].glob("*.safetensors")) / 1e9
        results["checkpoint_gb"] = round(size_gb, 3)
        results["params"] = sum(math_prod(s) for s in shapes.values())
        print(f"wrote 3 checkpoints of {size_gb:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        for method in args.methods:
            ours_yaml, mk_yaml = recipes(method, paths)
            (work / f"{method}.ours.yaml").write_text(ours_yaml)
            (work / f"{method}.mk.yaml").write_text(mk_yaml)
            run = {"method": method, "load_avg_before": os.getloadavg()[0], "repeats": args.repeats}
            ours_cmd = [sys.executable, "-m", "alignlab.merging", str(work / f"{method}.ours.yaml"),
                        str(work / f"out_{method}_ours"), "--no-progress"]
            mk_cmd = [mk_cli, str(work / f"{method}.mk.yaml"), str(work / f"out_{method}_mk"), "--quiet",
                      "--no-copy-tokenizer", "--no-write-model-card"]
            samples = {"ours": [], "mergekit": []}
            for rep in range(args.repeats):  # alternate the two, so load changes hit both alike
                last = rep == args.repeats - 1
                for who, cmd in (("ours", ours_cmd), ("mergekit", mk_cmd)):
                    if who == "mergekit" and not have_mk:
                        continue
                    samples[who].append(measure(cmd, work / f"{method}.{who}.log"))
                    print(method, who, samples[who][-1], flush=True)
                    if not last:
                        shutil.rmtree(cmd[4] if who == "ours" else cmd[2], ignore_errors=True)
            for who, ss in samples.items():
                if ss:
                    run[who] = {k: sorted(s[k] for s in ss)[len(ss) // 2] for k in ("wall_s", "peak_rss_mb", "cpu_s")}
                    run[who]["samples"] = ss
            if have_mk:
                run["speedup"] = round(run["mergekit"]["wall_s"] / run["ours"]["wall_s"], 2)
                run["rss_ratio"] = round(run["ours"]["peak_rss_mb"] / run["mergekit"]["peak_rss_mb"], 3)
                run["parity"] = compare(work / f"out_{method}_ours", work / f"out_{method}_mk", method, paths)
                print(method, "parity", run["parity"], flush=True)
                shutil.rmtree(work / f"out_{method}_mk", ignore_errors=True)
            shutil.rmtree(work / f"out_{method}_ours", ignore_errors=True)
            results["runs"].append(run)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'method':8} {'ours s':>8} {'mk s':>8} {'speedup':>8} {'ours MB':>9} {'mk MB':>9} {'RSS ratio':>9}  parity")
    for r in results["runs"]:
        mk = r.get("mergekit", {})
        par = r.get("parity", {})
        parity = (f"{par.get('identical_tensors')}/{par.get('tensors')} identical, "
                  f"{par.get('differing_elements')} diff elems ({par.get('differing_not_explained_by_threshold_ties')} "
                  "not at top-k ties)") if par else "-"
        print(f"{r['method']:8} {r['ours']['wall_s']:8.1f} {mk.get('wall_s', float('nan')):8.1f} "
              f"{r.get('speedup', float('nan')):8.2f} {r['ours']['peak_rss_mb']:9.0f} "
              f"{mk.get('peak_rss_mb', float('nan')):9.0f} {r.get('rss_ratio', float('nan')):9.3f}  {parity}")
    out = write_json(args.out_json, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
