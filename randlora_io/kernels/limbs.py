"""bf16 limb arithmetic of the merge kernel's default ``split`` precision, emulated in torch (its CPU oracle).

Tensor cores multiply bf16 operands exactly (8-bit × 8-bit significands fit a float32 product) and accumulate in
float32. An fp32 value x splits into three bf16 limbs with round-to-nearest::

    hi = bf16(x);  mid = bf16(x − hi);  lo = bf16(x − hi − mid);   x == hi + mid + lo exactly

(x has 24 significant bits; each rounding keeps the next 8 and leaves an exact float32 residual; bf16 has float32's
exponent range, so this holds for every normal float32.) The kernel forms U·S from bf16 MMAs of limb pairs:

* ``U`` exactly representable in bf16 (PEFT's dense bases drawn in bf16, ternary bases): 3 MMAs
  u·s_hi + u·s_mid + u·s_lo — every product is exact; the only error is float32 accumulation.
* otherwise (the native philox dense bases have 24-bit values): 6 MMAs, the limb pairs (i, j) with i + j ≤ 2.
  The dropped pairs (mid·lo, lo·mid, lo·lo) bound the product error by (2^−23 + 2^−32)·Σ_k |u_k|·|s_k|.

On top of that, both add float32 rounding of the accumulation, as any float32 GEMM (IEEE ``tl.dot``, cuBLAS) does:
at most K·2^−24·Σ|u||s| in the worst case, ≈ √K·2^−24 in practice. So ``split`` is float32-class; ``bf16``
(one MMA of bf16-rounded operands) is ≈ 2^−8 relative per product. Tests compare these functions against float64.
"""

from __future__ import annotations

import torch

PRODUCT_BOUND = {1: 0.0, 3: 2.0**-23 + 2.0**-32}  # per-product relative error of ``split``, by the limb count of U


def split3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 x → bf16 limbs (hi, mid, lo), round-to-nearest-even, with hi + mid + lo == x exactly."""
    x = x.to(torch.float32)
    hi = x.to(torch.bfloat16)
    r1 = x - hi.to(torch.float32)
    mid = r1.to(torch.bfloat16)
    lo = (r1 - mid.to(torch.float32)).to(torch.bfloat16)
    return hi, mid, lo


def is_bf16_exact(x: torch.Tensor, rows: int = 1024) -> bool:
    """True when every element of the 2-D ``x`` is exactly a bf16 value (checked ``rows`` rows at a time, so
    the temporaries stay small)."""
    for start in range(0, x.shape[0], rows):
        block = x[start: start + rows]
        if not torch.equal(block.to(torch.bfloat16).to(torch.float32), block.to(torch.float32)):
            return False
    return True


def limb_pairs(u_limbs: int) -> list[tuple[int, int]]:
    """The (U limb, S limb) pairs the kernel multiplies, smallest terms first (the kernel's order)."""
    if u_limbs == 1:
        return [(0, 2), (0, 1), (0, 0)]
    return [(2, 0), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0)]


def split_matmul(u: torch.Tensor, s: torch.Tensor, u_limbs: int, accumulate: torch.dtype = torch.float32,
                 block_k: int = 32) -> torch.Tensor:
    """U (M, K) @ S (K, D) the way the ``split`` kernel computes it: limb products exact, summed in ``accumulate``.

    float32 ``accumulate`` follows the kernel's order (K in ``block_k`` steps, the limb pairs of each step in
    :func:`limb_pairs` order, each one MMA into the float32 accumulator); float64 isolates the limb error."""
    us = split3(u) if u_limbs == 3 else (u.to(torch.bfloat16),)
    if u_limbs == 1 and not torch.equal(us[0].to(torch.float32), u.to(torch.float32)):
        raise ValueError("u_limbs=1 needs U exactly representable in bf16")
    ss = split3(s)
    acc = torch.zeros(u.shape[0], s.shape[1], dtype=accumulate)
    for k0 in range(0, u.shape[1], block_k):
        for i, j in limb_pairs(u_limbs):
            a = us[i][:, k0: k0 + block_k].to(torch.float64)
            b = ss[j][k0: k0 + block_k].to(torch.float64)
            acc += (a @ b).to(accumulate)  # bf16·bf16 products and their short sums are exact in float64
    return acc


def product_error_bound(u: torch.Tensor, s: torch.Tensor, u_limbs: int) -> torch.Tensor:
    """Σ_k |u_k|·|s_k| times the per-product bound: the limb error allowed per output element (M, D), float64."""
    return PRODUCT_BOUND[u_limbs] * (u.double().abs() @ s.double().abs())


__all__ = ["PRODUCT_BOUND", "is_bf16_exact", "limb_pairs", "product_error_bound", "split3", "split_matmul"]
