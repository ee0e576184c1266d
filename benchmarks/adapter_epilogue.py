"""A/B of how the rank-r LoRA term reaches the base GEMM's output (issue 18), per Llama-3-8B projection shape.

The QLoRA step's largest remaining extra cost at batch 4 (profile in RESULTS.md) is the ``addmm_`` that adds
``(x Aᵀ) Bᵀ`` into ``y`` in forward and ``(dy B) A`` into ``dx`` in backward: a rank-r GEMM that reads and writes
the whole ``(tokens, features)`` output once more. The alternative timed here puts the rank-r term inside the
one big GEMM by concatenating along its reduction dimension::

    forward   y  = [x | s·x Aᵀ] [W | B]ᵀ          (K = in + r;  costs a copy of x:  tokens × in)
    backward  dx = [dy | s·dy B] [W ; A]          (K = out + r; costs a copy of dy: tokens × out)

against the current epilogue's pass over ``y`` (tokens × out) or ``dx`` (tokens × in). It can only win where the
copied operand is narrower than the output: forward of gate/up (in 4096 < out 14336), backward of k/v and down
(out < in). The concatenated weight is the NF4 dequantization's temporary (free to lay out) in the library; here it
is prebuilt, so those rows time the GEMMs and copies only; ``pass = "dequant"`` rows time the NF4 dequantization
into a fresh tensor against the same into the widened buffers (strided columns, leading rows). ``pad`` rounds the extra K up to 64 (zero columns), in
case cuBLAS prefers aligned K. One JSON line per (tokens, shape, pass); the summary estimates the time a 4-layer
step would save with the best variant per pass.

With ``--kernel`` each pass also times ``kernels.lora_gemm.adapted_matmul``: the base GEMM with the rank-r term in
its own epilogue (one Triton kernel, the output written once), at its default tiles (``kernel``) and, with
``--sweep``, at each tile configuration of :data:`SWEEP` (``kernel_<BM>x<BN>x<BK>_g<GROUP>_w<warps>_s<stages>``, and
the same reading its tiles by tensor descriptors, ``..._tma``);
``--proj q,k,gate,down`` skips the shapes that repeat.

    python benchmarks/adapter_epilogue.py [--tokens 2048,8192] [--proj q,k,gate,down] [--kernel [--sweep]]
        [--out benchmarks/results/adapter_epilogue.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from alignlab.bench import library_versions, measure, write_json
from alignlab.kernels.lora_gemm import adapted_matmul
from alignlab.quant.nf4 import nf4_quantize

SHAPES = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
          "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}  # name: (in, out)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tried by --sweep: large bf16 tiles that fit Hopper's
# shared memory at these pipeline depths
SWEEP = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
         (128, 128, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3)]


def _name(config, tma: bool) -> str:
    bm, bn, bk, group, warps, stages = config
    return f"kernel_{bm}x{bn}x{bk}_g{group}_w{warps}_s{stages}" + ("_tma" if tma else "")


def _kernel_forms(first, second, c_of, d, configs) -> dict:
    """``adapted_matmul(first, second, c_of(), d)`` at the default tiles and at each of ``configs``, by pointers
    and by tensor descriptors."""
    forms = {"kernel": lambda: adapted_matmul(first, second, c_of(), d)}
    for config in configs:
        for tma in (False, True):
            forms[_name(config, tma)] = lambda config=config, tma=tma: adapted_matmul(first, second, c_of(), d,
                                                                                       config=config, tma=tma)
    return forms


def _us(fn) -> float:
    return measure(fn, warmup=10, memory=False).median_ms * 1e3


def _widened(w: torch.Tensor, extra: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """``w`` with ``extra`` appended along ``dim`` (1: columns, 0: rows) and zeros up to ``pad`` new entries."""
    shape = list(w.shape)
    n = shape[dim]
    shape[dim] += pad
    wk = w.new_zeros(shape)
    wk.narrow(dim, 0, n).copy_(w)
    wk.narrow(dim, n, extra.shape[dim]).copy_(extra)
    return wk


def forward_forms(x, w, a, b, scale: float, pads=(16, 64), configs=None) -> dict:
    """Callables giving ``y = x Wᵀ + s (x Aᵀ) Bᵀ``: ``base`` (``x Wᵀ`` alone), ``epilogue`` (what the library does)
    and ``concat<pad>`` (one GEMM over ``[x | s x Aᵀ | 0]``, the weight widened beforehand)."""
    n_tok, n_in = x.shape
    r = a.shape[0]

    def epilogue():
        xa = x.new_empty(n_tok, r).addmm_(x, a.T, beta=0, alpha=scale)
        return (x @ w.T).addmm_(xa, b.T)

    forms = {"base": lambda: x @ w.T, "epilogue": epilogue}
    if configs is not None:
        forms.update(_kernel_forms(x, w.T, lambda: x.new_empty(n_tok, r).addmm_(x, a.T, beta=0, alpha=scale), b.T,
                                   configs))
    for pad in pads:
        def concat(wk=_widened(w, b, pad, 1), pad=pad):
            xk = x.new_empty(n_tok, n_in + pad)
            xk[:, :n_in].copy_(x)
            xk[:, n_in:n_in + r].addmm_(x, a.T, beta=0, alpha=scale)  # the rank-r product written in place
            if pad > r:
                xk[:, n_in + r:].zero_()
            return xk @ wk.T
        forms[f"concat{pad}"] = concat
    return forms


def backward_forms(g, w, a, b, scale: float, pads=(16, 64), configs=None) -> dict:
    """Callables giving ``dx = dy W + s (dy B) A``, named as in :func:`forward_forms`."""
    n_tok, n_out = g.shape
    r = a.shape[0]

    def epilogue():
        gb = g.new_empty(n_tok, r).addmm_(g, b, beta=0, alpha=scale)
        return (g @ w).addmm_(gb, a)

    forms = {"base": lambda: g @ w, "epilogue": epilogue}
    if configs is not None:
        forms.update(_kernel_forms(g, w, lambda: g.new_empty(n_tok, r).addmm_(g, b, beta=0, alpha=scale), a, configs))
    for pad in pads:
        def concat(wk=_widened(w, a, pad, 0), pad=pad):
            gk = g.new_empty(n_tok, n_out + pad)
            gk[:, :n_out].copy_(g)
            gk[:, n_out:n_out + r].addmm_(g, b, beta=0, alpha=scale)
            if pad > r:
                gk[:, n_out + r:].zero_()
            return gk @ wk
        forms[f"concat{pad}"] = concat
    return forms


def dequant_forms(t, dtype: torch.dtype, r: int) -> dict:
    """Callables dequantizing the NF4 weight ``t`` ``(out, in)``: into a fresh tensor (the default form), into the
    first ``in`` columns of an ``(out, in + r)`` buffer (the widened forward's strided store) and into the first
    ``out`` rows of an ``(out + r, in)`` one (the widened backward)."""
    from alignlab.kernels.nf4_dequant import nf4_dequant

    n_out, n_in = t.shape
    device = t.data.device
    return {"dequant": lambda: nf4_dequant(t, dtype),
            "dequant_cols": lambda: nf4_dequant(t, dtype, out=torch.empty(n_out, n_in + r, dtype=dtype,
                                                                          device=device)[:, :n_in]),
            "dequant_rows": lambda: nf4_dequant(t, dtype, out=torch.empty(n_out + r, n_in, dtype=dtype,
                                                                          device=device)[:n_out])}


def _time_forms(forms: dict) -> dict:
    ref = forms["epilogue"]().float()
    out = {}
    for name, fn in forms.items():
        out[f"{name}_us"] = _us(fn)
        if name.startswith(("concat", "kernel")):
            out[f"{name}_maxdiff"] = (fn().float() - ref).abs().max().item()
    return out


def main(tokens: list[int], out: Path, r: int = 16, layers: int = 4, projs=None, configs=None,
         dequant: bool = True) -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/adapter_epilogue.py needs a CUDA GPU")
    torch.manual_seed(0)
    dev, dt, scale = "cuda", torch.bfloat16, 2.0
    rows, saved = [], {}
    for n_tok in tokens:
        saved[n_tok] = 0.0
        for name, (n_in, n_out) in SHAPES.items():
            if projs is not None and name not in projs:
                continue
            x = torch.randn(n_tok, n_in, device=dev, dtype=dt)
            g = torch.randn(n_tok, n_out, device=dev, dtype=dt)
            w = torch.randn(n_out, n_in, device=dev, dtype=dt) * 0.02
            a = torch.randn(r, n_in, device=dev, dtype=dt) * 0.02
            b = torch.randn(n_out, r, device=dev, dtype=dt) * 0.02
            if dequant and n_tok == tokens[0]:  # the dequantizations do not depend on the token count
                t = nf4_quantize(w, blocksize=64, double_quant=True)
                row = {"proj": name, "in": n_in, "out": n_out, "pass": "dequant",
                       **{f"{k}_us": _us(f) for k, f in dequant_forms(t, dt, r).items()}}
                rows.append(row)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                del t
            for pass_, forms in (("forward", forward_forms(x, w, a, b, scale, configs=configs)),
                                 ("backward", backward_forms(g, w, a, b, scale, configs=configs))):
                row = {"tokens": n_tok, "proj": name, "in": n_in, "out": n_out, "pass": pass_, **_time_forms(forms)}
                best = min(v for k, v in row.items() if k.startswith(("concat", "kernel")) and k.endswith("_us"))
                row["gain_us"] = max(0.0, row["epilogue_us"] - best)
                saved[n_tok] += layers * row["gain_us"]
                rows.append(row)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            del x, g, w, a, b
    summary = {f"{layers}-layer step, tokens {k}: ms saved by the better form per pass": round(v / 1e3, 3)
               for k, v in saved.items()}
    if configs is not None:  # each tile configuration's total over the timed passes, against cuBLAS + addmm_ and the base alone
        passes = [row for row in rows if row["pass"] in ("forward", "backward")]
        for form in ["kernel", *(_name(c, t) for c in configs for t in (False, True))]:
            summary[f"{form}: sum us (epilogue {sum(p['epilogue_us'] for p in passes):.0f}, "
                    f"base {sum(p['base_us'] for p in passes):.0f})"] = round(sum(p[f"{form}_us"] for p in passes), 1)
    print(json.dumps(summary))
    write_json(out, {"device": torch.cuda.get_device_name(), "versions": library_versions(), "r": r,
                     "rows": rows, "summary": summary})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192", help="comma-separated token counts (batch × 2048)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adapter_epilogue.json")
    p.add_argument("--proj", default=None, help="comma-separated projections to time (default: all seven)")
    p.add_argument("--kernel", action="store_true", help="also time kernels.lora_gemm.adapted_matmul")
    p.add_argument("--sweep", action="store_true", help="with --kernel: each tile configuration of SWEEP too")
    p.add_argument("--no-dequant", action="store_true", help="skip the dequantization rows")
    a = p.parse_args()
    main([int(v) for v in a.tokens.split(",")], a.out, projs=None if a.proj is None else a.proj.split(","),
         configs=(SWEEP if a.sweep else []) if a.kernel else None, dequant=not a.no_dequant)
