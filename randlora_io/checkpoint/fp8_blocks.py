"""Block-scaled FP8 weights as transformers' ``"fp8"`` quantization stores them, and the float64 reference beside them.

Layout of one weight (``…`` = any leading dims, e.g. fused experts): codes ``q`` (…, out, in) ``float8_e4m3fn``,
unpadded, and ``scale_inv`` (…, ⌈out/bm⌉, ⌈in/bn⌉) float32 for the block size (bm, bn); block (i, j) covers rows
``i·bm … min((i+1)·bm, out)`` and columns likewise (a partial last block on either axis shares its scale), and
``W = q · scale_inv[i, j]`` on it.

Quantizing a float32 ``W`` (the merge's arithmetic): per block ``scale_inv = amax|W| / 448`` (float32 division; 448
is e4m3's largest finite value), ``q = round-to-nearest-even(W / scale_inv)`` saturated to ±448. A block whose
``amax / 448`` is 0 (all zero, or below float32's smallest subnormal times 448) gets ``scale_inv = 1.0`` (finite
and positive, as transformers' own quantizer gives) and codes ``round(W / 1.0) = 0``.

:func:`quantize` / :func:`dequantize_into` work in place on the caller's float32 buffer, a few strided views per
weight (no weight-sized float32 temporary); :func:`reference_quantize` / :func:`reference_dequantize` do the
same in float64 with e4m3 rounding from the code table, not torch's cast: they are the tests' oracle.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
ZERO_BLOCK_SCALE = 1.0  # scale_inv of a block whose amax / 448 is zero


def scale_grid(shape: tuple[int, ...] | torch.Size, block: tuple[int, int]) -> tuple[int, ...]:
    """The ``scale_inv`` shape of a weight of ``shape`` (…, out, in) in blocks of ``block`` (bm, bn)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _regions(t: torch.Tensor, block: tuple[int, int]):
    """``t`` (…, out, in) as at most four strided views (…, R, bm', C', bn'): full row blocks × full column blocks,
    and the partial last row / column blocks, each with the slices of the scale grid it maps to (rows, cols). A few
    large ops per weight, not one per block row (small ops stall when the CPU is shared)."""
    rows, cols = t.shape[-2:]
    bm, bn = block
    row_parts = [(0, rows // bm * bm, bm), (rows // bm * bm, rows, rows % bm)]
    col_parts = [(0, cols // bn * bn, bn), (cols // bn * bn, cols, cols % bn)]
    for r0, r1, h in row_parts:
        for c0, c1, w in col_parts:
            if r1 > r0 and c1 > c0:
                view = t[..., r0:r1, c0:c1].unflatten(-1, ((c1 - c0) // w, w)).unflatten(-3, ((r1 - r0) // h, h))
                yield view, (slice(r0 // bm, math.ceil(r1 / bm)), slice(c0 // bn, math.ceil(c1 / bn)))


def _per_block(scale: torch.Tensor, where: tuple[slice, slice]) -> torch.Tensor:
    """The scales of one region, shaped (…, R, 1, C', 1) to broadcast over its view."""
    return scale[..., where[0], where[1]].unsqueeze(-1).unsqueeze(-3)


def dequantize_into(out32: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """``out32`` (…, out, in) float32 ← ``q · scale_inv`` per block (float32 products), on ``out32``'s device.
    ``q``: the codes (any device), ``scale_inv``: float32 of :func:`scale_grid` shape."""
    out32.copy_(q.to(out32.device))
    scale = scale_inv.to(out32.device, torch.float32)
    for view, where in _regions(out32, block):
        view.mul_(_per_block(scale, where))


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor of ``dtype``: ``q · scale_inv`` per block in float32, rounded once to ``dtype``."""
    out = torch.empty(q.shape, dtype=torch.float32)
    dequantize_into(out, q, scale_inv, block)
    return out if dtype == torch.float32 else out.to(dtype)


def quantize(w32: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` of a finite float32 weight (…, out, in) on any device, both returned on the CPU: codes
    ``float8_e4m3fn`` of ``w32``'s shape and fresh float32 scales of :func:`scale_grid` shape (rules above).
    ``w32`` is overwritten (divided by its scales in place: no second weight-sized float32 buffer)."""
    scale = torch.empty(scale_grid(w32.shape, block), dtype=torch.float32, device=w32.device)
    regions = list(_regions(w32, block))
    for view, (rs, cs) in regions:  # amax|W| per block without an |W| copy: max(max, -min)
        scale[..., rs, cs] = torch.maximum(view.amax(dim=(-3, -1)), view.amin(dim=(-3, -1)).neg())
    scale.div_(torch.full_like(scale, E4M3_MAX))  # a true division (CUDA multiplies by 1/x for a scalar x)
    scale.masked_fill_(scale == 0, ZERO_BLOCK_SCALE)
    q = torch.empty(w32.shape, dtype=FP8, device=w32.device)
    for (view, where), (qview, _) in zip(regions, _regions(q, block)):
        qview.copy_(view.div_(_per_block(scale, where)).clamp_(-E4M3_MAX, E4M3_MAX))
    return q.cpu(), scale.cpu()


def e4m3_values() -> torch.Tensor:
    """The 127 non-negative finite ``float8_e4m3fn`` values, float64, indexed by their code (0x00 … 0x7E), from the
    format's definition (bias 7, 3 mantissa bits, subnormals at exponent field 0; 0x7F is NaN)."""
    vals = []
    for code in range(0x7F):
        exp, man = code >> 3, code & 7
        vals.append(man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return torch.tensor(vals, dtype=torch.float64)


def reference_round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` rounded to the nearest e4m3 value (ties to the even code), saturated to ±448; float64 out."""
    table = e4m3_values()
    mag = x.abs().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(table, mag).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - table[lo], table[hi] - mag
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return torch.copysign(table[pick], x)


def reference_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` in float64, one block at a time: the scale is ``amax / 448`` rounded to float32 (so it is the
    float32 quotient), the codes the e4m3 rounding of the float64 quotient. ``w`` (out, in), any float dtype."""
    w = w.double()
    bm, bn = block
    scale = torch.empty(scale_grid(w.shape, block), dtype=torch.float32)
    q = torch.empty(w.shape, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            s = float(torch.tensor(float(part.abs().max()) / E4M3_MAX, dtype=torch.float32))
            s = s if s > 0 else ZERO_BLOCK_SCALE
            scale[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = reference_round_e4m3(part / s)
    return q.to(FP8), scale


def reference_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 ``q · scale_inv`` per block (exact: 4 × 24 significant bits), ``q`` (out, in)."""
    bm, bn = block
    full = scale_inv.double().repeat_interleave(bm, 0)[:q.shape[0]].repeat_interleave(bn, 1)[:, :q.shape[1]]
    return q.double() * full
