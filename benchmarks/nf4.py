"""NF4 kernels (issue 4): alignlab vs bitsandbytes vs bf16 cuBLAS, one run, one GPU.

For each weight shape ``out x in`` (4096x4096, 14336x4096, 4096x14336, 8192x8192,
28672x8192), bf16 activations, blocksize 64 with double quantization:

* ``dequant``: NF4 -> bf16.  Bytes: packed codes ``N K / 2`` + 8-bit scales
  ``N K / 64`` + nested scales, read; ``2 N K`` written.
* ``M=1`` and ``M=16``: ``y = x W^T``.  Bytes: the packed weight and its scales,
  plus ``x`` and ``y``.  bf16 cuBLAS reads ``2 N K``.
* ``M=4096`` forward ``x W^T`` and backward ``dy W`` (training).  FLOP ``2 M N K``.

Contestants: ``alignlab`` (dispatching :func:`alignlab.kernels.nf4_matmul.nf4_matmul`
/ ``nf4_matmul_t`` / ``nf4_dequant``), ``bnb`` (bitsandbytes' ``dequantize_4bit``,
``matmul_4bit`` -- its GEMV kernel at M=1 -- and for the backward what its
``MatMul4Bit.backward`` does: dequantize, then ``dy @ W``), ``bf16`` (cuBLAS with a
dense bf16 weight), and at M>=16 ``alignlab_fused`` (the fused kernel forced) /
``alignlab_dequant_mm`` (Triton dequant + cuBLAS) so the dispatch rule is visible.
Times: CUDA-event medians, L2 flushed before each call (``alignlab.bench.compare``);
"% copy BW" uses the device-to-device copy measured in the same run.  With
``--graphs`` the dequantize and M <= 16 rows are instead CUDA-graph replays over
rotating weights (no host overhead, no L2 reuse), each against a device copy of
the same number of bytes timed the same way (:func:`decode_rows`).

Section ``eager`` (on by default): one layer call per contestant -- ``NF4Linear``, bitsandbytes'
``Linear4bit``, bf16 ``nn.Linear`` -- at M = 1, 2, 4, ..., 64: the eager per-call wall time (median of
``perf_counter`` around single calls, the queue drained every 50 calls: ``host_overhead.per_call_us``) next to
the CUDA-graph kernel time of the same call over rotating layers (:func:`eager_rows`).  Where the eager time is
the larger, a plain eager loop (``generate()``) is bound by the host, not by the kernel.

Also checks, on the GPU, that alignlab's quantization gives the same bytes as
bitsandbytes' CUDA ``quantize_4bit``.

    python benchmarks/nf4.py [--quick] [--graphs] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from host_overhead import per_call_us  # noqa: E402
from qlora_step import bnb_linear4bit  # noqa: E402

from alignlab.bench import compare, copy_bandwidth, matmul_tflops, save_results
from alignlab.kernels import nf4_matmul as mm
from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t
from alignlab.quant import linear as qlinear
from alignlab.quant import NF4Linear
from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as F
        except Exception as exc:  # pragma: no cover - depends on the machine
            print(f"bitsandbytes not importable ({exc}); bnb rows skipped")
            return None, None
    return bnb, F


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _with(module, attr, value, fn):
    """``fn`` run with ``module.attr = value`` (a dispatch knob), restored afterwards."""

    def wrapped():
        old = getattr(module, attr)
        setattr(module, attr, value)
        try:
            return fn()
        finally:
            setattr(module, attr, old)

    return wrapped


def _nf4_bytes(N, K, t):
    return N * K / 2 + t.absmax.numel() * t.absmax.element_size() + 4 * t.nested_absmax.numel()


def byte_check(F, shapes):
    """alignlab quantization vs bitsandbytes' CUDA quantize_4bit on the benchmark shapes."""
    out = {}
    for N, K in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        t = nf4_quantize(w, blocksize=64, double_quant=True)
        res = {
            "packed_equal": bool(torch.equal(q.reshape(-1), t.data)),
            "nested_absmax_equal": bool(torch.equal(st.state2.absmax, t.nested_absmax)),
            "offset_equal": bool(st.offset.item() == t.nested_offset.item()),
            "absmax_code_mismatches": int((st.absmax != t.absmax).sum().item()),
            "dequant_equal_on_bnb_state": None,
        }
        from alignlab.quant.nf4 import nf4_from_bnb_state_dict

        sd = {"weight": q, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
        t2 = nf4_from_bnb_state_dict(sd)
        res["dequant_equal_on_bnb_state"] = bool(torch.equal(nf4_dequant(t2, torch.bfloat16),
                                                             F.dequantize_4bit(q, st, quant_type="nf4")))
        out[f"{N}x{K}"] = res
        print(f"byte check {N}x{K}: {res}", flush=True)
    return out


L2_BYTES = 200e6  # rotate inputs until each timed graph touches this much (H100 L2: 50 MB)


def _graph_us(fns, reps=7):
    """Median µs per call of a CUDA graph that calls ``fns[0]``, ``fns[1]``, ... once each.

    Decode-sized calls move a few MB in a few µs: timed eagerly they measure the
    host's launch overhead, and repeated on one buffer they measure the L2 cache.
    So each contestant is captured as one graph over ``len(fns)`` calls on
    *different* inputs (together larger than the L2) and the replay time is divided
    by that count.  The copy it is compared with is timed the same way.
    """
    for f in fns[:2]:
        f()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


def _copy_us(nbytes):
    """Device-to-device copy moving ``nbytes`` (read + written), best of torch's memcpy and a Triton copy."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + o, tl.load(src + o, mask=o < n), mask=o < n)

    half = int(nbytes // 2)
    count = max(2, -(-int(L2_BYTES) // max(half, 1)))
    src = [torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda") for _ in range(count)]
    dst = [torch.empty_like(b) for b in src]
    memcpy = _graph_us([lambda b=b, d=d: d.copy_(b) for b, d in zip(src, dst)])
    grid = (triton.cdiv(half, 8192),)
    kernel = _graph_us([lambda b=b, d=d: _copy[grid](b, d, half, BLOCK=8192, num_warps=8)
                        for b, d in zip(src, dst)])
    return min(memcpy, kernel)


def decode_rows(bnb, F, N, K, sections, dt=torch.bfloat16):
    """Dequantize and M = 1 / 4 / 16 products on rotating weights, CUDA-graph timed; one dict per row."""
    t = nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64, double_quant=True)
    wbytes = _nf4_bytes(N, K, t)
    count = max(3, -(-int(L2_BYTES) // int(wbytes)))
    ts = [t] + [nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64)
                for _ in range(count - 1)]
    qs = []
    if F is not None:
        qs = [F.quantize_4bit(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64, quant_type="nf4",
                              compress_statistics=True) for _ in range(count)]
    wds = [nf4_dequantize(t, dt)] + [torch.randn(N, K, device="cuda", dtype=dt)
                                     for _ in range(max(1, -(-int(L2_BYTES) // (2 * N * K)) - 1))]
    rows = []

    def row(name, moved, cont, **extra):
        copy = _copy_us(moved)
        r = {"name": name, "N": N, "K": K, "bytes": moved, "copy_us": copy, **extra}
        for k, fns in cont.items():
            r[f"{k}_us"] = _graph_us(fns)
            r[f"{k}_pct_copy"] = 100 * copy / r[f"{k}_us"]
        for k in cont:
            if k != "alignlab":
                r[f"{k}_over_alignlab"] = r[f"{k}_us"] / r["alignlab_us"]
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        rows.append(r)

    if "dequant" in sections:
        out = nf4_dequant(t, dt)
        torch.testing.assert_close(out, wds[0], rtol=2 ** -7, atol=0)
        cont = {"alignlab": [lambda tt=tt: nf4_dequant(tt, dt) for tt in ts]}
        if F is not None:
            cont["bnb"] = [lambda q=q: F.dequantize_4bit(q[0], q[1], quant_type="nf4") for q in qs]
        row("dequant", wbytes + 2 * N * K, cont)
    for M in (1, 4, 16):
        if f"m{M}" not in sections:
            continue
        x = torch.randn(M, K, device="cuda", dtype=dt)
        ref = x.double() @ wds[0].double().T
        err = _rel(nf4_matmul(x, t), ref)
        assert err < 1e-2, err
        cont = {"alignlab": [lambda tt=tt: nf4_matmul(x, tt) for tt in ts]}
        extra = {"M": M, "rel_err": err}
        if F is not None:
            cont["bnb"] = [lambda q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1]) for q in qs]
            extra["bnb_rel_err"] = _rel(bnb.matmul_4bit(x, qs[0][0].t(), quant_state=qs[0][1]),
                                        x.double() @ F.dequantize_4bit(qs[0][0], qs[0][1]).double().T)
        cont["bf16"] = [lambda wd=wd: torch.nn.functional.linear(x, wd) for wd in wds]
        if M > 1:
            cont["alignlab_dequant_mm"] = [lambda tt=tt: torch.nn.functional.linear(x, nf4_dequant(tt, dt))
                                           for tt in ts]
        row(f"M={M}", wbytes + 2 * M * (N + K), cont, **extra)
    return rows


EAGER_M = (1, 2, 4, 8, 16, 32, 64)


_LAUNCHERS_DEFAULT = qlinear.DECODE_LAUNCHERS


def eager_rows(with_bnb, N, K, ms=EAGER_M, dt=torch.bfloat16):
    """Eager per-call wall time and CUDA-graph kernel time of one layer call, per contestant and M; one dict per M.

    Contestants are whole modules, as a model calls them: ``NF4Linear`` (alignlab), ``bnb.nn.Linear4bit``
    and a bf16 ``nn.Linear``.  The graph time is :func:`_graph_us` over enough copies of the layer (different
    random weights) to exceed the L2 cache; the eager time is the median host time of single calls on the
    first copy (``host_overhead.per_call_us``).  ``*_eager_over_graph`` > 1: an eager loop of such calls
    waits on Python, not on the GPU.
    """
    def count(nbytes):
        return max(2, -(-int(L2_BYTES) // int(nbytes)))

    def linear():
        lin = nn.Linear(K, N, bias=False, device="cuda", dtype=dt).requires_grad_(False)
        nn.init.normal_(lin.weight, std=0.02)
        return lin

    nf4 = [NF4Linear.from_linear(linear()) for _ in range(count(N * K * 0.53))]
    # "alignlab-L": the same layers with the decode launchers off (alignlab.quant.linear.DECODE_LAUNCHERS)
    layers = {"alignlab": nf4, "alignlab-L": nf4, "bf16": [linear() for _ in range(count(2 * N * K))]}
    if with_bnb:
        layers["bnb"] = [bnb_linear4bit(linear()) for _ in range(count(N * K * 0.53))]
    rows = []
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        r = {"name": f"eager M={M}", "N": N, "K": K, "M": M}
        with torch.no_grad():
            for k, mods in layers.items():
                qlinear.DECODE_LAUNCHERS = _LAUNCHERS_DEFAULT and k != "alignlab-L"
                for m in mods:
                    m(x)  # first-call work (autotune, lazy state) outside timing and capture
                r[f"{k}_eager_us"] = per_call_us(lambda m=mods[0]: m(x))
                r[f"{k}_graph_us"] = _graph_us([lambda m=m: m(x) for m in mods])
                r[f"{k}_eager_over_graph"] = r[f"{k}_eager_us"] / r[f"{k}_graph_us"]
        qlinear.DECODE_LAUNCHERS = _LAUNCHERS_DEFAULT
        rows.append(r)
        print(f"{N}x{K} M={M:3d} per call, eager wall / CUDA-graph kernel (us): "
              + "  ".join(f"{k} {r[f'{k}_eager_us']:6.1f} / {r[f'{k}_graph_us']:6.1f}" for k in layers), flush=True)
    del layers
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="first two shapes only")
    p.add_argument("--out", default="benchmarks/results/nf4.json")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--sections", default="check,eager,dequant,m1,m4,m16,m4096,bwd")
    p.add_argument("--graphs", action="store_true",
                   help="dequant / M<=16 rows: CUDA-graph replays over rotating weights, against a copy of the "
                        "same bytes timed the same way (decode-style; see decode_rows)")
    p.add_argument("--variants", action="store_true",
                   help="also time the fused tl.dot kernel and the pipelined path at M=4096 (slow)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/nf4.py needs a CUDA GPU")
    sections = set(args.sections.split(","))
    bnb, F = _bnb()
    shapes = SHAPES[:2] if args.quick else SHAPES
    dt = torch.bfloat16
    torch.manual_seed(0)
    # bring the clocks up before anything is timed (the GPU idles at a few hundred MHz)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(60):
        a @ a
    torch.cuda.synchronize()
    del a
    copy_bw = copy_bandwidth("cuda")
    tflops = matmul_tflops("cuda", torch.bfloat16)
    print(f"device {torch.cuda.get_device_name()}  copy {copy_bw / 1e9:.0f} GB/s  bf16 matmul {tflops:.0f} TFLOP/s",
          flush=True)
    meta = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": copy_bw / 1e9, "bf16_tflops": tflops}
    if F is not None and "check" in sections:
        meta["byte_check_vs_bnb_cuda"] = byte_check(F, shapes[:2])
    comps = []
    summary = []
    kw = dict(rep=args.rep, memory=False)

    def run(name, contestants, shape_meta, bytes_moved=None, flops=None):
        c = compare(contestants, name=name, bytes_moved=bytes_moved, flops=flops, meta=shape_meta, **kw)
        print(c.table(), flush=True)
        comps.append(c)
        row = {"name": name, **shape_meta}
        for k, m in c.results.items():
            row[f"{k}_ms"] = m.median_ms if m.ok else None
            if bytes_moved and m.ok:
                row[f"{k}_pct_copy"] = m.pct_copy_bandwidth()
            if flops and m.ok:
                row[f"{k}_pct_matmul"] = m.pct_matmul_peak()
            if not m.ok:
                row[f"{k}_error"] = m.error
        summary.append(row)
        meta["summary"] = summary
        save_results(args.out, comps, meta=meta)  # after every row: a cut-off run keeps what it measured
        return c

    for N, K in shapes:
        if "eager" in sections:
            summary.extend(eager_rows(F is not None, N, K))
            meta["summary"] = summary
            save_results(args.out, comps, meta=meta)
        if args.graphs:
            summary.extend(decode_rows(bnb, F, N, K, sections))
            meta["summary"] = summary
            save_results(args.out, comps, meta=meta)
            sections_here = sections - {"dequant", "m1", "m4", "m16"}
        else:
            sections_here = sections
        w = (torch.randn(N, K, device="cuda", dtype=dt) * 0.02)
        t = nf4_quantize(w, blocksize=64, double_quant=True)
        wd = nf4_dequantize(t, dt)
        wbytes = _nf4_bytes(N, K, t)
        if F is not None:
            qb, stb = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            # the weight bnb's layers hold: Params4bit layout, used as W^T by matmul_4bit
        del w
        sm = {"N": N, "K": K}

        if "dequant" in sections_here:
            out = nf4_dequant(t, dt)
            # the kernel may fuse the double-quant scale into an FMA: allow one 16-bit rounding step
            torch.testing.assert_close(out, wd, rtol=2 ** -7, atol=0)
            cont = {"alignlab": lambda: nf4_dequant(t, dt)}
            if F is not None:
                cont["bnb"] = lambda: F.dequantize_4bit(qb, stb, quant_type="nf4")
            cont["copy_bf16"] = lambda: wd.clone()
            run("dequant", cont, sm, bytes_moved=wbytes + 2 * N * K)

        for M in [1, 4, 16]:
            if f"m{M}" not in sections_here:
                continue
            x = torch.randn(M, K, device="cuda", dtype=dt)
            ref = x.double() @ wd.double().T
            err = _rel(nf4_matmul(x, t), ref)
            assert err < 1e-2, err
            cont = {"alignlab": lambda: nf4_matmul(x, t)}
            if F is not None:
                cont["bnb"] = lambda: bnb.matmul_4bit(x, qb.t(), quant_state=stb)
                summary.append({"name": f"bnb_err_m{M}", "N": N, "K": K,
                                "rel_err": _rel(bnb.matmul_4bit(x, qb.t(), quant_state=stb), ref)})
            cont["bf16"] = lambda: torch.nn.functional.linear(x, wd)
            if M > 1:
                cont["alignlab_dequant_mm"] = lambda: torch.nn.functional.linear(x, nf4_dequant(t, dt))
            run(f"M={M}", cont, {**sm, "M": M, "rel_err": err}, bytes_moved=wbytes + 2 * M * (N + K))

        if "m4096" in sections or "bwd" in sections:
            M = 4096
            x = torch.randn(M, K, device="cuda", dtype=dt)
            dy = torch.randn(M, N, device="cuda", dtype=dt)
            if "m4096" in sections:
                cont = {"alignlab": lambda: nf4_matmul(x, t)}
                if F is not None:
                    cont["bnb"] = lambda: bnb.matmul_4bit(x, qb.t(), quant_state=stb)
                cont["bf16"] = lambda: torch.nn.functional.linear(x, wd)
                if args.variants:  # LARGE_M past any M forces the fused tl.dot kernel
                    cont["alignlab_fused"] = _with(mm, "LARGE_M", 1 << 30, lambda: nf4_matmul(x, t))
                for ch in (2, 4) if args.variants else ():
                    cont[f"alignlab_pipe{ch}"] = _with(mm, "PIPELINE_CHUNKS", ch, lambda: nf4_matmul(x, t))
                run("M=4096 fwd", cont, {**sm, "M": M}, flops=2 * M * N * K)
            if "bwd" in sections:
                cont = {"alignlab": lambda: nf4_matmul_t(dy, t)}
                if F is not None:
                    cont["bnb"] = lambda: dy @ F.dequantize_4bit(qb, stb, quant_type="nf4").to(dt)
                cont["bf16"] = lambda: dy @ wd
                if args.variants:  # LARGE_M past any M forces the fused tl.dot kernel
                    cont["alignlab_fused"] = _with(mm, "LARGE_M", 1 << 30, lambda: nf4_matmul_t(dy, t))
                for ch in (2, 4) if args.variants else ():
                    cont[f"alignlab_pipe{ch}"] = _with(mm, "PIPELINE_CHUNKS", ch, lambda: nf4_matmul_t(dy, t))
                run("M=4096 bwd dX", cont, {**sm, "M": M}, flops=2 * M * N * K)
            del x, dy
        del t, wd
        torch.cuda.empty_cache()

    if "crossover" in sections:
        N, K = 4096, 4096
        t = nf4_quantize(torch.randn(N, K, device="cuda", dtype=dt) * 0.02, blocksize=64)
        wd = nf4_dequantize(t, dt)
        for M in [32, 64, 128, 256, 512, 1024]:
            x = torch.randn(M, K, device="cuda", dtype=dt)

            def fused():
                old, mm.LARGE_M = mm.LARGE_M, 1 << 30
                try:
                    return nf4_matmul(x, t)
                finally:
                    mm.LARGE_M = old

            run("crossover", {"fused": fused,
                              "dequant_mm": lambda: torch.nn.functional.linear(x, nf4_dequant(t, dt)),
                              "bf16": lambda: torch.nn.functional.linear(x, wd)},
                {"N": N, "K": K, "M": M}, flops=2 * M * N * K)

    meta["summary"] = summary
    save_results(args.out, comps, meta=meta)
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
