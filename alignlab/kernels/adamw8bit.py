"""Triton kernel: one fused AdamW step with blockwise 8-bit moments.

One program owns one quantization block of ``BLOCK`` elements (256, as bitsandbytes' blockwise
optimizers). It reads the parameter, the gradient and the two moment codes once, and in registers

    m = map_s[c_m] * a_m,   v = map_u[c_v] * a_v                 (dequantize, one absmax per block)
    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
    p <- p (1 - lr wd) - (lr / c1) m / (sqrt(v) / c2 + eps)     (c1 = 1 - b1^t, c2 = sqrt(1 - b2^t))
    a_m <- max |m|,  a_v <- max v (over finite values),  c_m, c_v <- nearest level of m / a_m, v / a_v
                                                                 (a positive v: at least the smallest positive level)

and writes the parameter, the new codes and the two new absmax values (Dettmers et al., *8-bit
Optimizers via Block-wise Quantization*, arXiv 2110.02861). The nearest level is found by an 8-step
binary search over the 255 midpoints of the sorted map; a value exactly on a midpoint goes to the lower
level, as ``torch.bucketize`` does in the reference, so both paths give the same codes. An all-zero
block stores code 0 (as :func:`alignlab.quant.nf4._quantize_blockwise_8bit`).

The torch reference and the dispatch are in :mod:`alignlab.optim.adamw8bit`.
"""

from __future__ import annotations

import torch

from alignlab.kernels.launch import cdiv, launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["adamw8bit_kernel_step"]

if triton is not None:

    @triton.jit
    def _nearest_level(x, mid_ptr):
        # number of midpoints strictly below x = index of the nearest level (ties to the lower one)
        idx = tl.zeros(x.shape, dtype=tl.int32)
        for k in tl.static_range(8):
            cand = idx + (128 >> k)
            below = tl.load(mid_ptr + cand - 1) < x
            idx = tl.where(below, cand, idx)
        return idx

    @triton.jit
    def _finite_absmax(x):
        # max |x| over finite values; inf where there is none above 0 but an inf (NaN counts as neither)
        ax = tl.abs(x)
        finite = tl.max(tl.where(ax < float("inf"), ax, 0.0), axis=0)
        inf = tl.max(tl.where(ax == float("inf"), float("inf"), 0.0), axis=0)
        return tl.where(finite > 0.0, finite, inf)

    @triton.jit
    def _adamw8bit_kernel(
        p_ptr, g_ptr, mq_ptr, vq_ptr, ma_ptr, va_ptr,
        smap_ptr, umap_ptr, smid_ptr, umid_ptr, scal_ptr,
        n,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # the scalars that change every step live in a tensor, so the compiled-kernel key stays fixed
        decay = tl.load(scal_ptr)
        step_size = tl.load(scal_ptr + 1)
        c2 = tl.load(scal_ptr + 2)
        beta1 = tl.load(scal_ptr + 3)
        one_m_beta1 = tl.load(scal_ptr + 4)
        beta2 = tl.load(scal_ptr + 5)
        one_m_beta2 = tl.load(scal_ptr + 6)
        eps = tl.load(scal_ptr + 7)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cm = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
        cv = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
        # the zero level decodes to 0 in a block of absmax inf too (0 * inf would be NaN)
        lm = tl.load(smap_ptr + cm)
        lv = tl.load(umap_ptr + cv)
        m = tl.where(lm == 0.0, 0.0, lm * tl.load(ma_ptr + pid))
        v = tl.where(lv == 0.0, 0.0, lv * tl.load(va_ptr + pid))
        m = beta1 * m + one_m_beta1 * g
        v = beta2 * v + one_m_beta2 * (g * g)
        p = p * decay - step_size * (m / (tl.sqrt(v) / c2 + eps))
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

        m = tl.where(mask & (v < float("inf")), m, 0.0)  # an overflowed (or NaN) v restarts its moments
        v = tl.where(mask, v, 0.0)
        # absmax: the largest finite |value| (a NaN or inf spoils its own value only, stored at the top level, -inf
        # at the bottom); a block whose finite values are all 0 and that holds an inf keeps absmax inf (every v of
        # it overflowed: it stays inf and the step 0, as in fp32 AdamW). As _quantize_moment in the reference.
        am = _finite_absmax(m)
        av = _finite_absmax(v)
        rm = m * (1.0 / tl.maximum(am, 1e-38))
        rv = v * (1.0 / tl.maximum(av, 1e-38))
        # A NaN ratio (NaN / a, or inf / inf) takes the top level, as torch.bucketize puts NaN last in the
        # reference; +-inf / a clamps to the top / bottom level. Clamped first, NaN became -1 on the GPU (max
        # ignores NaN) or stayed NaN (interpreter).
        xm = tl.where(rm != rm, 1.0, tl.minimum(tl.maximum(rm, -1.0), 1.0))
        xv = tl.where(rv != rv, 1.0, tl.minimum(tl.maximum(rv, -1.0), 1.0))
        qm = tl.where(am == 0.0, 0, _nearest_level(xm, smid_ptr))
        qv = tl.where(av == 0.0, 0, _nearest_level(xv, umid_ptr))
        qv = tl.where((qv == 0) & (v > 0.0), 1, qv)  # a positive v never stored as 0 (_quantize_moment)
        tl.store(mq_ptr + offs, qm.to(tl.uint8), mask=mask)
        tl.store(vq_ptr + offs, qv.to(tl.uint8), mask=mask)
        tl.store(ma_ptr + pid, am)
        tl.store(va_ptr + pid, av)


def adamw8bit_kernel_step(
    p: torch.Tensor,
    g: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scalars: torch.Tensor,
    blocksize: int,
) -> None:
    """Launch the fused step in place on ``p`` (contiguous), ``codes`` ``(2, n)`` uint8 and ``absmax``
    ``(2, num_blocks)`` float32. ``maps`` = (signed map, unsigned map, their midpoints), on ``p``'s device;
    ``scalars`` = float32 ``[1 - lr wd, lr / c1, c2, b1, 1 - b1, b2, 1 - b2, eps]`` there too. Shapes are
    checked by the caller."""
    n = p.numel()
    grid = (cdiv(n, blocksize),)
    smap, umap, smid, umid = maps
    launch(
        _adamw8bit_kernel, grid,
        (p, g, codes[0], codes[1], absmax[0], absmax[1], smap, umap, smid, umid, scalars, n),
        {"BLOCK": blocksize, "num_warps": 4 if blocksize <= 512 else 8},
    )
