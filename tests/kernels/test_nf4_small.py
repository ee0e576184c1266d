"""Small-M NF4 kernels (alignlab.kernels.nf4_small) vs the float64 product of the reference dequantization."""

import numpy as np
import pytest
import torch

from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize

pytest.importorskip("triton")
from alignlab.kernels.nf4_small import _decode4_asm, small_m_matmul  # noqa: E402


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _case(N, K, M, dtype, blocksize, double_quant=True, icq=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.1
    t = nf4_quantize(w.to(device), blocksize=blocksize, double_quant=double_quant,
                     calibrate="icq" if icq else None, icq_steps=4)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype)
    return t, x, b, nf4_dequantize(t, torch.float32).double().cpu()


# (N, K, M, blocksize): N not a multiple of any tile, K one block / several / not a multiple of the split,
# M = 1 (GEMV) and 2..16 (tl.dot), blocksizes 32..256
CASES = [(1, 64, 1, 64), (37, 192, 1, 64), (40, 96, 1, 32), (17, 512, 1, 256), (33, 128, 2, 32), (21, 320, 5, 64),
         (16, 256, 16, 128), (9, 64, 11, 32), (19, 128, 17, 64), (23, 64, 33, 32), (5, 128, 64, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,M,bs", CASES)
def test_small_m_interpreter(N, K, M, bs, dtype, triton_mode):
    """Default kernel, the late-scaling one and the swapped ones; bf16 too (the interpreter's bf16 tl.dot once gave garbage at
    2..16 rows: the kernels take the fp32 products under the interpreter)."""
    t, x, b, wd = _case(N, K, M, dtype, bs, double_quant=(N % 2 == 1))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}[dtype]
    want = x.double().cpu() @ wd.T
    y = small_m_matmul(x, t)
    assert y.shape == (M, N) and y.dtype == dtype
    assert _rel(y, want) < tol
    yb = small_m_matmul(x, t, b)
    assert _rel(yb, want + b.double().cpu()) < tol
    for kernel in ("late", "swap", "swap_early", "swap_flat"):
        yl = small_m_matmul(x, t, b, kernel=kernel)
        assert yl.dtype == dtype and _rel(yl, want + b.double().cpu()) < tol, kernel


@pytest.mark.parametrize("kernel", ["gemv", "dot", "late", "swap", "swap_early", "swap_flat"])
@pytest.mark.parametrize("split", [1, 3, 64])
def test_split_and_icq_shift(kernel, split, triton_mode):
    """Every K split (none, uneven, more slices than blocks) and the ICQ shift tau."""
    t, x, b, wd = _case(19, 448, 1, torch.float32, 32, icq=True)
    assert t.shift is not None
    y = small_m_matmul(x, t, kernel=kernel, split=split, nb=2)
    assert _rel(y, x.double() @ wd.T) < 1e-5


@pytest.mark.parametrize("kernel", ["gemv", "dot", "late", "swap", "swap_early", "swap_flat"])
def test_split_fixup_with_bias(kernel, triton_mode):
    """The last K slice of each tile to finish sums the partials and adds the bias (uneven split: the last
    slice is shorter)."""
    t, x, b, wd = _case(37, 448, 1 if kernel == "gemv" else 3, torch.float32, 32)
    want = x.double() @ wd.T + b.double()
    for split in (1, 5):
        y = small_m_matmul(x, t, b, kernel=kernel, split=split, nb=2)
        assert _rel(y, want) < 1e-5, split


@pytest.mark.parametrize("kernel", ["gemv", "dot", "late", "swap", "swap_early", "swap_flat"])
def test_strided_x_and_bias_are_read_as_given(kernel, triton_mode):
    """A column slice of x (strided last dimension) was read as if contiguous: wrong numbers, no error."""
    t, x, b, wd = _case(24, 128, 1 if kernel == "gemv" else 3, torch.float32, 64)
    xs = torch.zeros(x.shape[1], x.shape[0]).t().copy_(x)  # same values, strides (1, M)
    bs = torch.zeros(2 * b.numel())[::2].copy_(b)
    assert _rel(small_m_matmul(xs, t, bs, kernel=kernel), x.double() @ wd.T + b.double()) < 1e-5


def _rank_want(x, wd, xa, b, bias=None):
    """x Wᵀ (+ bias) + xa c(b)ᵀ in float64, ``c`` = x's dtype."""
    want = x.double().cpu() @ wd.T + xa.double().cpu() @ b.to(x.dtype).double().cpu().T
    return want if bias is None else want + bias.double().cpu()


@pytest.mark.parametrize("kernel", ["gemv", "dot", "late", "swap", "swap_early", "swap_flat"])
@pytest.mark.parametrize("split", [1, 5])
@pytest.mark.parametrize("r", [1, 7, 16, 33])
def test_rank_term_in_the_epilogue(kernel, split, r, triton_mode):
    """``rank_term=(xa, b)``: ``x Wᵀ + bias + xa c(b)ᵀ`` from every kernel, split or not (added once, by the last K
    slice of a tile), with and without a bias, an fp32 ``b`` rounded to x's dtype first; an odd N (partial tile), a
    rank that pads the tiles."""
    for dtype in (torch.float32, torch.float16):
        t, x, bias, wd = _case(37, 448, 1 if kernel == "gemv" else 3, dtype, 32)
        g = torch.Generator().manual_seed(r)
        xa = torch.randn(x.shape[0], r, generator=g).to(dtype)
        b = torch.randn(37, r, generator=g) / 3
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        for bb in (None, bias):
            y = small_m_matmul(x, t, bb, kernel=kernel, split=split, nb=2, rank_term=(xa, b))
            assert y.dtype == dtype and _rel(y, _rank_want(x, wd, xa, b, bb)) < tol, (dtype, bb is None)


def test_rank_term_strided_factors_and_checks(triton_mode):
    """Strided ``xa`` / ``b`` are read as given (made contiguous); a wrong shape, dtype or device, or something that
    is not a pair of tensors, is an error naming ``rank_term``."""
    t, x, bias, wd = _case(24, 128, 3, torch.float32, 64)
    xa = torch.randn(16, 3).t()  # (3, 16), strides (1, 3)
    b = torch.randn(16, 24).t()  # (24, 16), column-major
    y = small_m_matmul(x, t, bias, rank_term=(xa, b))
    assert _rel(y, _rank_want(x, wd, xa, b, bias)) < 1e-5
    for bad, err in (((xa[:2], b), ValueError), ((xa.half(), b), ValueError), ((xa, b[:5]), ValueError),
                     ((xa, b.long()), ValueError), ((xa,), TypeError), ((xa, "b"), TypeError), (xa, TypeError),
                     ((xa, b.to("meta")), ValueError)):
        with pytest.raises(err, match="rank_term"):
            small_m_matmul(x, t, rank_term=bad)


@pytest.mark.parametrize("bad", ["wrong K", "3-D x", "float64 x", "dense weight", "partial blocks", "bias shape",
                                 "split -1", "split 1.5", "block_n 24", "nb 0", "num_warps 3"])
def test_inputs_and_launch_parameters_are_checked(bad, triton_mode):
    """small_m_matmul (public, the tuning entry point of benchmarks/nf4_tune.py) read an x of the wrong width
    or a bias of the wrong length out of bounds, a weight whose rows end in a partial block as whole blocks
    (values ~1e22) and a negative split as an empty grid (uninitialised output), without an error; a
    non-power-of-two tile failed inside Triton. Now a TypeError / ValueError naming the argument."""
    t, x, b, wd = _case(24, 128, 3, torch.float32, 64)
    kw, bias, want, name = {}, None, ValueError, bad.split()[-1]
    if bad == "wrong K":
        x, name = x[:, :64], "x2"
    elif bad == "3-D x":
        x, name = x[None], "x2"
    elif bad == "float64 x":
        x, want, name = x.double(), TypeError, "x2"
    elif bad == "dense weight":
        t, want, name = wd.float(), TypeError, "NF4Tensor"
    elif bad == "partial blocks":
        t, x, b, wd = _case(24, 96, 3, torch.float32, 64)
        name = "whole quantization blocks"
    elif bad == "bias shape":
        bias, name = b[:5], "bias"
    else:
        key, value = bad.split()
        kw, name = {key: float(value) if "." in value else int(value)}, key
    with pytest.raises(want, match=name):
        small_m_matmul(x, t, bias, **kw)


def test_bad_arguments(triton_mode):
    t, x, b, wd = _case(8, 64, 2, torch.float32, 32)
    with pytest.raises(ValueError, match="gemv"):
        small_m_matmul(x, t, kernel="gemv")
    with pytest.raises(ValueError, match="kernel"):
        small_m_matmul(x, t, kernel="mma")
    with pytest.raises(ValueError, match="1..64"):
        small_m_matmul(torch.randn(65, 64), t)
    with pytest.raises(ValueError, match="1..64"):  # no rows: nf4_matmul returns the empty result itself
        small_m_matmul(torch.randn(0, 64), t)
    with pytest.raises(ValueError, match="dtype"):
        _decode4_asm(torch.float32)
    with pytest.raises(TypeError, match="asm must be a bool or None, got str"):  # 'yes' ran as True
        small_m_matmul(x, t, asm="yes")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_register_codebook_matches_levels(dtype):
    """The PTX table (two byte planes of the 16-bit levels) encodes exactly the rounded NF4 codebook."""
    from alignlab.quant.nf4 import nf4_code

    asm = _decode4_asm(dtype)
    assert "\n" not in asm  # Inductor copies the string into a one-line literal of its generated source
    consts = {}
    for line in _statements(asm):
        if line.startswith("mov.b32 ") and line.split()[1].rstrip(",")[0] in "LH":
            name, value = line[len("mov.b32 "):].rstrip(";").split(", ")
            consts[name] = int(value)
    lo = b"".join(consts[f"L{i}"].to_bytes(4, "little") for i in range(4))
    hi = b"".join(consts[f"H{i}"].to_bytes(4, "little") for i in range(4))
    bits = torch.tensor([lo[i] | hi[i] << 8 for i in range(16)], dtype=torch.int32).to(torch.int16)
    levels = bits.view(dtype).float()
    assert torch.equal(levels, nf4_code(torch.device("cpu")).to(dtype).float())
    assert (levels - nf4_code(torch.device("cpu"))).abs().max() <= (3e-4 if dtype == torch.float16 else 2e-3)


def _statements(asm: str) -> list:
    """The PTX statements of an inline-asm string (one line, ``;``-terminated, in ``{ }``)."""
    return [st.strip() for st in asm.replace("{", ";").replace("}", ";").split(";") if st.strip()]


class _PTX:
    """A tiny interpreter for the integer PTX of :func:`_decode4_asm`, with the semantics the PTX ISA gives
    (``prmt``: byte ``c & 7`` of ``{b, a}``, its sign replicated when ``c & 8``).  Lets CI check the lookup and
    the byte order of the assembly on CPU; the GPU tests check the hardware."""

    def __init__(self, operands):
        self.r = {f"${i}": v for i, v in enumerate(operands)}

    def val(self, tok):
        return self.r[tok] if tok in self.r else int(tok) & 0xFFFFFFFF

    @staticmethod
    def halves(v, dtype=torch.float16):
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double().numpy()

    def run(self, asm, outputs="$0"):
        for line in _statements(asm):
            if not line or line in "{}" or line.startswith(".reg"):
                continue
            op, rest = line.split(None, 1)
            d, *a = (t.strip() for t in rest.split(","))
            v = [self.val(t) for t in a]
            if op == "mov.b32":
                out = v[0]
            elif op == "and.b32":
                out = v[0] & v[1]
            elif op == "or.b32":
                out = v[0] | v[1]
            elif op == "shr.u32":
                out = v[0] >> v[1]
            elif op == "prmt.b32":
                src = (v[1] << 32 | v[0]).to_bytes(8, "little")
                out = 0
                for i in range(4):
                    c = (v[2] >> 4 * i) & 15
                    byte = src[c & 7]
                    if c & 8:
                        byte = 0xFF if byte & 0x80 else 0
                    out |= byte << 8 * i
            else:
                raise AssertionError(f"no emulation for {op}")
            self.r[d] = out
        return [self.r[o] for o in outputs.split(",")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode4_asm_emulated_gives_levels_of_every_nibble(dtype):
    """The in-register lookup (:func:`_decode4_asm`), run by a PTX interpreter: four bytes give the 16-bit levels
    of their high nibbles in ``$0, $1`` and of their low nibbles in ``$2, $3``, byte order kept, for every code."""
    from alignlab.quant.nf4 import nf4_code

    levels = nf4_code(torch.device("cpu")).to(dtype).double().numpy()
    rng = np.random.default_rng(0)
    for trial in range(64):
        b = rng.integers(0, 256, 4) if trial else np.array([0x0F, 0xF0, 0x78, 0x87])
        word = int(b[0]) | int(b[1]) << 8 | int(b[2]) << 16 | int(b[3]) << 24
        r = _PTX([0, 0, 0, 0, word]).run(_decode4_asm(dtype), outputs="$0,$1,$2,$3")
        hi = np.concatenate([_PTX.halves(r[0], dtype), _PTX.halves(r[1], dtype)])
        lo = np.concatenate([_PTX.halves(r[2], dtype), _PTX.halves(r[3], dtype)])
        assert np.array_equal(hi, levels[b >> 4]) and np.array_equal(lo, levels[b & 15]), b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode4_asm_register_table_emulated(dtype):
    """The lookup with its table in operands (``_decode4_asm(None)``), fed the words each row of a kernel loads
    from :func:`kernel_code` (copy ``r % 32``, fp16 planes then bf16 planes after the 16 fp32 levels), operands
    numbered as Triton's ``pack=4`` call numbers them (each word four times): the same levels as the immediate
    version, for every code, from every copy."""
    from alignlab.kernels.nf4_dequant import code_planes, kernel_code
    from alignlab.quant.nf4 import nf4_code

    table = kernel_code(torch.device("cpu"))
    assert table.shape == (16 + 2 * 32 * 8,) and torch.equal(table[:16], nf4_code(torch.device("cpu")))
    words = table[16:].view(torch.int32).reshape(2, 32, 8)
    plane = 1 if dtype == torch.bfloat16 else 0
    assert all(tuple(words[plane, r].tolist()) == code_planes(dtype) for r in range(32))
    levels = nf4_code(torch.device("cpu")).to(dtype).double().numpy()
    asm = _decode4_asm(None)
    assert "\n" not in asm and "mov.b32" not in asm
    rng = np.random.default_rng(1)
    for trial in range(64):
        b = rng.integers(0, 256, 4)
        word = int(b[0]) | int(b[1]) << 8 | int(b[2]) << 16 | int(b[3]) << 24
        operands = [0, 0, 0, 0, word] + [w & 0xFFFFFFFF for w in words[plane, trial % 32].tolist() for _ in range(4)]
        r = _PTX(operands).run(asm, outputs="$0,$1,$2,$3")
        hi = np.concatenate([_PTX.halves(r[0], dtype), _PTX.halves(r[1], dtype)])
        lo = np.concatenate([_PTX.halves(r[2], dtype), _PTX.halves(r[3], dtype)])
        assert np.array_equal(hi, levels[b >> 4]) and np.array_equal(lo, levels[b & 15]), b
        assert r == _PTX([0, 0, 0, 0, word]).run(_decode4_asm(dtype), outputs="$0,$1,$2,$3")


def test_table_in_registers_rule(monkeypatch):
    """Where the lookup takes its table from registers: the GEMV only (timed on an H100: the tl.dot and late
    kernels were slower with it); the environment switch forces either way."""
    from alignlab.kernels import nf4_small

    rule = nf4_small._table_in_registers
    assert rule("gemv", 1, 3) and rule("gemv", 1, 1)
    assert not rule("dot", 16, 1) and not rule("late", 16, 1) and not rule("late", 32, 3)
    assert not rule("swap", 32, 1) and not rule("swap_early", 16, 1)
    # a swapped kernel's plan with LOOKUP_FIRST looks up as the GEMV does, and takes the registers too
    assert rule("swap", 32, 1, True) and rule("swap_early", 16, 1, True)
    monkeypatch.setattr(nf4_small, "TABLE_REGS", "0")
    assert not rule("gemv", 1, 1) and not rule("swap", 32, 1, True)
    monkeypatch.setattr(nf4_small, "TABLE_REGS", "1")
    assert rule("late", 32, 3)


@pytest.mark.parametrize("on", [False, True, "auto"])
def test_lookup_first_reaches_the_swapped_kernels_at_four_warps_or_more(on, monkeypatch):
    """LOOKUP_FIRST is a meta-parameter of the swapped kernels' plans only, set where they run 4 warps or more
    (a wgmma; with 2 warps Triton emits mma.sync and the early lookup compiled to more instructions), and with it
    the register codebook; no other kernel's signature takes it. "auto" (the default) turns it on for ``swap`` above
    32 rows at 4 warps only (where it was timed faster)."""
    from alignlab.kernels import nf4_small

    monkeypatch.setattr(nf4_small, "LOOKUP_FIRST", on)
    monkeypatch.setattr(nf4_small, "interpreting", lambda: False)  # the GPU plan (the interpreter's has no warps)
    t, x, b, wd = _case(40, 192, 5, torch.bfloat16, 64)
    for kernel in ("gemv", "dot", "late", "swap", "swap_early"):
        for warps in (2, 4, 8):
            for M in ((1,) if kernel == "gemv" else (5, 32, 33, 64)):
                meta = nf4_small._plan(M, 40, 192, torch.bfloat16, torch.device("cpu"), t, False, kernel, 64, 1, 2,
                                       warps, 1, True)[-1]
                want = (kernel == "swap" and M > 32 and warps == 4) if on == "auto" else on
                if kernel.startswith("swap"):
                    assert meta["LOOKUP_FIRST"] == (want and warps >= 4) == meta["REGS"], (kernel, warps, M)
                else:
                    assert "LOOKUP_FIRST" not in meta and meta["REGS"] == (kernel == "gemv"), (kernel, warps)


def test_lookup_first_defaults_to_auto():
    """Unset, ALIGNLAB_NF4_LOOKUP_FIRST reads "auto" (the module reads it once, at import)."""
    import os

    from alignlab.kernels import nf4_small

    assert "ALIGNLAB_NF4_LOOKUP_FIRST" in os.environ or nf4_small.LOOKUP_FIRST == "auto"


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["swap", "swap_early"])
def test_lookup_first_is_bit_identical_cuda(kernel, monkeypatch):
    """Looking the levels up before the layout change to the tensor cores (LOOKUP_FIRST, with the register table
    it brings) changes where the work happens, not the numbers."""
    from alignlab.kernels import nf4_small

    t, x, b, wd = _case(300, 640, 20, torch.bfloat16, 64, device="cuda")
    ys = []
    for on in (False, True):
        monkeypatch.setattr(nf4_small, "LOOKUP_FIRST", on)
        nf4_small._PLANS.clear()
        ys.append(small_m_matmul(x, t, b, kernel=kernel, split=4, num_warps=4))
    nf4_small._PLANS.clear()
    assert torch.equal(ys[0], ys[1])
    assert _rel(ys[1].cpu(), x.double().cpu() @ wd.T + b.double().cpu()) < 5e-3


def _x_views(x):
    """Same values as ``x`` in three layouts: contiguous, rows at an odd stride (2 bytes past a 4-byte boundary
    from the second row on, for 16-bit x) and a start 2 bytes past a 4-byte boundary."""
    M, K = x.shape
    odd = torch.zeros(M, K + 1, dtype=x.dtype, device=x.device)[:, :K]
    odd.copy_(x)
    buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
    shifted = buf[1:].view(M, K)
    shifted.copy_(x)
    return {"contiguous": x, "odd row stride": odd, "shifted start": shifted}


@pytest.mark.parametrize("kernel", ["swap", "swap_early", "swap_flat"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swap_reads_x_pairs_from_any_layout(kernel, dtype, triton_mode):
    """The swapped kernels read 16-bit x as 32-bit pairs: every row must start 4-byte aligned, so x views that
    do not (odd row stride, shifted start) are copied first; the same numbers from every layout, and the word
    read agrees with the read of the halves one by one (X_WORDS off)."""
    import alignlab.kernels.nf4_small as small

    t, x, b, wd = _case(40, 192, 5, dtype, 64)
    want = x.double() @ wd.T + b.double()
    got = {}
    for name, xv in _x_views(x).items():
        got[name] = small_m_matmul(xv, t, b, kernel=kernel)
        assert _rel(got[name], want) < 5e-3, name
        assert torch.equal(got[name], got["contiguous"]), name
    small._PLANS.clear()
    try:
        small.X_WORDS = False
        assert torch.equal(small_m_matmul(x, t, b, kernel=kernel), got["contiguous"])
    finally:
        small.X_WORDS = True
        small._PLANS.clear()


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["swap", "swap_early", "swap_flat"])
def test_swap_x_layouts_cuda(kernel):
    """The same on the GPU (bf16; wgmma path): strided and shifted x views give the contiguous result."""
    t, x, b, wd = _case(300, 640, 33, torch.bfloat16, 64, device="cuda")
    want = x.double().cpu() @ wd.T + b.double().cpu()
    ys = {name: small_m_matmul(xv, t, b, kernel=kernel) for name, xv in _x_views(x).items()}
    for name, y in ys.items():
        assert _rel(y.cpu(), want) < 5e-3 and torch.equal(y, ys["contiguous"]), name


@pytest.mark.parametrize("nb", [1, 2, 4])
def test_flat_kernel_prefetch_gives_the_same_bits(nb, triton_mode, monkeypatch):
    """The flat swapped kernel with and without loading the next step ahead (PREFETCH): the same products in the same
    order, so the same bits, at K slices that end inside a step (the prefetch past the slice is masked) and with
    the split-K fixup; both against the float64 product."""
    import alignlab.kernels.nf4_small as small

    t, x, b, wd = _case(37, 448, 6, torch.float16, 64, double_quant=True)
    want = x.double() @ wd.T + b.double()
    got = {}
    for on in (False, True):
        monkeypatch.setattr(small, "PREFETCH", on)
        small._PLANS.clear()
        for split in (1, 3):
            got[on, split] = small_m_matmul(x, t, b, kernel="swap_flat", nb=nb, split=split)
            assert _rel(got[on, split], want) < 2e-3, (on, split)
    small._PLANS.clear()
    assert torch.equal(got[False, 1], got[True, 1]) and torch.equal(got[False, 3], got[True, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,M,bs,nb,split", [(37, 448, 6, 64, 2, 3), (9, 64, 1, 32, 1, 1), (21, 320, 17, 64, 4, 2),
                                               (16, 512, 3, 256, 1, 2)])
def test_flat_kernel_interleaved_levels(N, K, M, bs, nb, split, dtype, triton_mode, monkeypatch):
    """INTERLEAVE: the levels joined into the weight's column order and x read as stored, one dot per step: the
    float64 product, with and without the ICQ shift, the split-K fixup and a last step that ends inside the slice."""
    import alignlab.kernels.nf4_small as small

    tol = 1e-5 if dtype == torch.float32 else 2e-3
    monkeypatch.setattr(small, "INTERLEAVE", True)
    small._PLANS.clear()
    try:
        for icq in (False, True):
            t, x, b, wd = _case(N, K, M, dtype, bs, double_quant=True, icq=icq)
            y = small_m_matmul(x, t, b, kernel="swap_flat", nb=nb, split=split)
            assert _rel(y, x.double() @ wd.T + b.double()) < tol, icq
    finally:
        small._PLANS.clear()


def test_flat_kernel_plan_takes_prefetch_only(monkeypatch):
    """PREFETCH is a meta-parameter of the flat kernel's plans alone, read when a plan is made."""
    import alignlab.kernels.nf4_small as small

    t = nf4_quantize(torch.randn(64, 128) * 0.1, blocksize=64)
    for on in (False, True):
        monkeypatch.setattr(small, "PREFETCH", on)
        for kernel in ("dot", "late", "swap", "swap_early", "swap_flat"):
            meta = small._plan(4, 64, 128, torch.float16, torch.device("cpu"), t, False, kernel, None, None, None,
                               4, None, None)[4]
            assert meta.get("PREFETCH", "absent") == (on if kernel == "swap_flat" else "absent"), kernel
            assert ("INTERLEAVE" in meta) == (kernel == "swap_flat"), kernel
            assert ("EARLY" in meta) == (kernel in ("swap", "swap_early")), kernel


@pytest.mark.cuda
def test_gemv_x_not_4byte_aligned():
    """The GEMV reads 16-bit x as 32-bit pairs: an x view that starts 2 bytes past a 4-byte boundary is copied
    first (it would otherwise be a misaligned read)."""
    t, x, b, wd = _case(64, 256, 1, torch.bfloat16, 64, device="cuda")
    buf = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
    xv = buf[1:].view(1, -1)
    xv.copy_(x)
    assert xv.data_ptr() % 4
    assert _rel(small_m_matmul(xv, t, b, kernel="gemv").cpu(), x.double().cpu() @ wd.T + b.double().cpu()) < 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K,M,bs", [(4096, 4096, 1, 64), (1000, 320, 1, 64), (4097, 4160, 16, 64),
                                      (129, 256, 16, 128), (65, 512, 5, 256), (33, 96, 1, 32), (300, 640, 3, 64),
                                      (4097, 4160, 33, 64), (1000, 320, 64, 64), (129, 256, 47, 128)])
def test_small_m_cuda(N, K, M, bs, dtype):
    """GPU paths: in-register codebook (16-bit x) and gathered fp32 levels (fp32 x), every kernel and split."""
    t, x, b, wd = _case(N, K, M, dtype, bs, double_quant=(N % 2 == 1), device="cuda")
    ref = x.double().cpu() @ wd.T + b.double().cpu()
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for kernel in (["gemv"] if M == 1 else []) + ["dot", "late", "swap", "swap_early", "swap_flat"]:
        for split in (1, 8):
            y = small_m_matmul(x, t, b, kernel=kernel, split=split)
            assert y.dtype == dtype and _rel(y.cpu(), ref) < tol, (kernel, split)
    for stages in (2, 3):  # the pipelined loops the per-device tables may pick
        y = small_m_matmul(x, t, b, num_stages=stages, split=4)
        assert _rel(y.cpu(), ref) < tol, stages
    assert _rel(small_m_matmul(x, t, b).cpu(), ref) < tol  # this GPU's table (or the fallback rules)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K,M,r", [(4096, 4096, 1, 16), (1000, 320, 1, 5), (4097, 4160, 16, 16), (333, 512, 7, 64)])
def test_rank_term_cuda(N, K, M, r, dtype):
    """The rank-term epilogue on the GPU: every kernel and split, fp32 ``b`` rounded to x's dtype, against float64
    (the same tolerance as the plain product: one rounding of the sum)."""
    t, x, bias, wd = _case(N, K, M, dtype, 64, device="cuda")
    g = torch.Generator().manual_seed(r)
    xa = (torch.randn(M, r, generator=g) / 4).to("cuda", dtype)
    b = (torch.randn(N, r, generator=g) / 4).cuda()
    ref = _rank_want(x, wd, xa, b, bias)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for kernel in (["gemv"] if M == 1 else []) + ["dot", "late", "swap", "swap_early", "swap_flat"]:
        for split in (1, 8):
            y = small_m_matmul(x, t, bias, kernel=kernel, split=split, rank_term=(xa, b))
            assert y.dtype == dtype and _rel(y.cpu(), ref) < tol, (kernel, split)
    assert _rel(small_m_matmul(x, t, None, rank_term=(xa, b)).cpu(), ref - bias.double().cpu()) < tol


@pytest.mark.cuda
def test_small_m_cuda_icq_shift():
    t, x, b, wd = _case(300, 640, 1, torch.bfloat16, 64, icq=True, device="cuda")
    for M in (1, 7):
        xm = torch.randn(M, 640, device="cuda", dtype=torch.bfloat16)
        assert _rel(small_m_matmul(xm, t).cpu(), xm.double().cpu() @ wd.T) < 5e-3


@pytest.mark.cuda
def test_split_counters_return_to_zero_and_graph_capture():
    """Each launch leaves its arrival counters at zero (the next launch relies on it), across kernels, shapes
    and splits; a CUDA graph captured on a fresh stream (which gets its own row of counters) replays correctly
    and leaves them at zero too."""
    from alignlab.kernels import nf4_small

    cases = [_case(N, K, M, torch.bfloat16, 64, device="cuda", seed=N) for N, K, M in
             [(1000, 512, 1), (4097, 1024, 16), (300, 640, 5), (1000, 512, 1)]]
    for _ in range(3):
        for t, x, b, wd in cases:
            for split in (3, 8):
                y = small_m_matmul(x, t, b, split=split)
                assert _rel(y.cpu(), x.double().cpu() @ wd.T + b.double().cpu()) < 5e-3
    torch.cuda.synchronize()
    pool = nf4_small._POOLS[torch.cuda.current_device()]
    assert int(pool.abs().sum()) == 0
    t, x, b, wd = cases[1]
    want = x.double().cpu() @ wd.T + b.double().cpu()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=torch.cuda.Stream()):
        y = small_m_matmul(x, t, b)
    for _ in range(3):
        y.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert _rel(y.cpu(), want) < 5e-3
    assert len(nf4_small._SLOT_OF) >= 2 and int(pool.abs().sum()) == 0


@pytest.mark.parametrize("M,bias,K", [(1, False, 64), (1, True, 192), (5, True, 192), (40, False, 192), (64, True, 64)])
@pytest.mark.parametrize("rank", [False, True], ids=["plain", "rank_term"])
def test_runner_passes_the_arguments_small_m_matmul_passes(M, bias, K, rank, triton_mode, monkeypatch):
    """small_m_runner's argument tuples, checked on CPU: its launches go through the interpreter (Triton's
    compiled launcher, which it binds on a GPU, does not exist here; the runner hands it data pointers, which the
    stand-in maps back to the tensors they belong to). Rows at a stride (a slice of a wider tensor, leading dims
    collapsed), repeated calls on new inputs, the kept workspace; with ``rank_b``, a new ``xa`` per call."""
    from alignlab.kernels import nf4_small

    tensors = {}  # data pointer -> the last tensor seen with it

    def track(t):
        tensors[t.data_ptr()] = t
        return t

    def fake_bind(kernel, grid, args, meta):
        for a in args:
            if isinstance(a, torch.Tensor):
                track(a)
        return lambda stream, a: kernel[grid](*[tensors[v] if type(v) is int and v in tensors else v for v in a],
                                              **meta)

    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: track(new_empty(self, *a, **k)))
    monkeypatch.setattr(nf4_small, "bind", fake_bind)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(nf4_small, "_PLANS", {})  # other tests may have planned this shape already
    t, _, b, wd = _case(37, K, M, torch.float32, 64)
    b = b if bias else None
    wide = torch.randn(2, M, K + 8)
    x = wide[:1, :, 4:K + 4]  # (1, M, K), rows K + 8 apart
    lb = torch.randn(37, 5) if rank else None
    assert nf4_small.small_m_runner(x, t, b, rank_b=lb) is None  # no plan for this shape yet
    small_m_matmul(x.reshape(M, K), t, b, rank_term=None if lb is None else (torch.randn(M, 5), lb))
    run = nf4_small.small_m_runner(x, t, b, rank_b=lb)
    assert run is not None
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        wide.copy_(torch.randn(2, M, K + 8, generator=g))
        track(x)
        if b is not None:
            track(b)
        xa = track(torch.randn(M, 5, generator=g)) if rank else None
        y = run(x, b, xa) if rank else run(x, b)
        want = x.reshape(M, K).double() @ wd.T + (0 if b is None else b.double())
        if rank:
            want = want + xa.double() @ lb.double().T
        assert y.shape == (1, M, 37) and _rel(y.reshape(M, 37), want) < 1e-5
    if M > 1:  # rows that do not sit at one stride: no runner (the caller takes small_m_matmul)
        assert nf4_small.small_m_runner(torch.randn(M, 2, K + 8)[:, :1, 4:K + 4], t, b) is None


def test_traced_small_m_product_is_one_graph(triton_mode):
    """Under torch.compile (fullgraph, dynamic row counts) nf4_matmul's small-M path is the opaque op
    alignlab::nf4_small_matmul: no graph break, and the values of the eager call (GEMV and tl.dot, bias)."""
    from alignlab.kernels.nf4_matmul import nf4_matmul

    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        torch._dynamo.reset()
        t, x, b, wd = _case(37, 192, 3, dtype, 64)
        f = torch.compile(lambda x, b: nf4_matmul(x, t, b), backend="aot_eager", fullgraph=True, dynamic=True)
        for M in (1, 3, 5):
            xm = torch.randn(M, 192).to(dtype)
            y = f(xm, b)
            assert y.shape == (M, 37) and _rel(y, xm.double() @ wd.T + b.double()) < tol, (dtype, M)


def test_kernel_code_under_torch_compile(monkeypatch):
    """A first call of kernel_code inside a torch.compile trace (fullgraph) builds the table in the graph and keeps
    nothing (no worker thread, no host read-back); the eager call after it keeps one."""
    from alignlab.kernels import nf4_dequant

    monkeypatch.setattr(nf4_dequant, "_KERNEL_CODES", {})
    f = torch.compile(lambda x: nf4_dequant.kernel_code(x.device) + x, fullgraph=True)
    got = f(torch.zeros(16 + 512))
    assert nf4_dequant._KERNEL_CODES == {}
    assert torch.equal(got, nf4_dequant.kernel_code(torch.device("cpu")))
    assert list(nf4_dequant._KERNEL_CODES) == [torch.device("cpu")]


def test_runner_holds_the_workspace_it_writes_when_a_larger_call_replaces_the_kept_one(triton_mode, monkeypatch):
    """A runner hands the kernel its split-K workspace as a bare pointer, so it must hold that memory itself: a
    later, larger call on the same stream replaces the stream's kept buffer (in _WS), and memory freed then could
    be handed to another tensor while the runner still writes its partial sums there."""
    import gc

    from alignlab.kernels import nf4_small

    seen = []  # the argument tuples the runner launched with
    monkeypatch.setattr(nf4_small, "bind", lambda kernel, grid, args, meta: (lambda stream, a: seen.append(a)))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(nf4_small, "_PLANS", {})
    monkeypatch.setattr(nf4_small, "_WS", {})
    t, x, _, _ = _case(37, 1024, 2, torch.float32, 64)
    small_m_matmul(x, t)
    plan, = nf4_small._PLANS.values()
    assert plan[2] > 1  # a K split: the product needs a workspace
    run = nf4_small.small_m_runner(x, t, None)
    (key, kept), = nf4_small._WS.items()
    nf4_small._workspace(x.device, kept.numel() * 4)  # a larger call on this stream replaces the kept buffer
    assert nf4_small._WS[key].data_ptr() != kept.data_ptr()
    del kept
    gc.collect()
    run(x, None)
    ws_ptr = seen[-1][9]  # x, the seven weight pointers, y, then the workspace
    held = [a for a in run.keep if isinstance(a, torch.Tensor)]
    assert any(h.data_ptr() == ws_ptr for h in held)
