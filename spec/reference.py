"""A scalar, pure-Python reference of SPEC.md §3–§4.2 (no numpy, no torch), used to produce spec/vectors/.

It is deliberately independent of the randlora_io package: the golden vectors it writes are what any
implementation, including ours, must reproduce. Slow by design: one element at a time.
"""

from __future__ import annotations

import math

M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def element_bits(seed: int, matrix_id: int, row: int, col: int) -> int:
    key = (seed & MASK, seed >> 32)
    return philox4x32_10((col // 4, row, matrix_id, 0), key)[col % 4]


def element_value(seed: int, matrix_id: int, row: int, col: int, kind: str, threshold: int | None = None) -> float:
    x = element_bits(seed, matrix_id, row, col)
    if kind == "dense":
        return ((x >> 9) * 2 + 1 - 2**23) / 2**23  # exact in binary32 and binary64
    if x < threshold:
        return -1.0
    return 1.0 if x >= 2**32 - threshold else 0.0


def normalisation(kind: str, threshold: int | None) -> float:
    return 3.0 if kind == "dense" else 2.0**31 / threshold


def delta_element(seed, kind, threshold, rank, alpha, shape, fan_in_fan_out, lam, gam, row, col) -> float:
    """One element of ΔW in stored orientation, in float64, by the defining double sum (SPEC §3)."""
    out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
    D, n = min(out_f, in_f), -(-min(out_f, in_f) // rank)
    o, i = (col, row) if fan_in_fan_out else (row, col)  # (out, in) index of the stored element
    m, j = (o, i) if in_f == D else (i, o)  # (M, D) index
    total = 0.0
    for k in range(rank * n):
        a, b = k // n, k % n
        total += (element_value(seed, 1, m, k, kind, threshold) * lam[a][b]
                  * element_value(seed, 0, a, j, kind, threshold) * gam[b][j])
    return alpha / rank * normalisation(kind, threshold) * total


def sample_scales(rank: int, n: int, D: int) -> tuple[list[list[float]], list[list[float]]]:
    """Deterministic, exactly representable scales for the ΔW vectors: multiples of 1/64 and 1/1024."""
    lam = [[((3 * a + 5 * b) % 17 - 8) / 64 for b in range(n)] for a in range(rank)]
    gam = [[((7 * b + 11 * j) % 23 - 11) / 1024 for j in range(D)] for b in range(n)]
    return lam, gam


__all__ = ["delta_element", "element_bits", "element_value", "math", "philox4x32_10", "sample_scales"]
