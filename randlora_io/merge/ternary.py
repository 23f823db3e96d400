"""Fast ΔW for ternary bases (``sparse`` / ``very_sparse`` kinds, both generators) on the CPU: exact int8 GEMMs, or
a sparse × dense product for very sparse bases. The oracle of both is the float32 ``addmm_`` in
``merge.layer.add_delta_`` (and float64 in tests/test_merge_fastpaths.py).

A ternary basis is ``B = c · b`` with one constant ``c > 0`` per matrix and ``b ∈ {−1, 0, 1}``: PEFT's c is 1/std
(rounded to bf16 when PEFT cast its bases to a bf16 model's dtype, still one value), ours is 1. So
``ΔW_MD = s · c · (b @ S)`` with ``b`` exact in int8 and S = λ ⊗ A ⊗ γ (K = r·n, D) float32.

**int8 limbs.** S is split, column by column, into ``LIMBS`` int8 limbs in base ``LIMB_BASE`` = 254::

    S[:, j] = 2^e_j · (L0 + L1/254 + L2/254²) + ρ[:, j]      |L_l| ≤ 127,   |ρ| ≤ 2^e_j · 0.51/254²

with a power-of-two unit 2^e_j ≤ max_k |S[k, j]| / 63.75 chosen from the column's max, so
``|ρ| ≤ 2^−22.9 · max_k |S[k, j]|``. Each ``b @ L_l`` is one ``torch._int_mm`` (int8 × int8 → int32, exact: no sum
exceeds K·127); P0·254 + P1 is formed exactly in int32, then rounded to float32 and combined with P2.

Accuracy bound (tested against float64): per element of ΔW, with nnz_m the nonzeros of b's row m,

    |ΔW_int8[m, j] − s·c·(b @ S)[m, j]| ≤ |s·c| · nnz_m · 2^e_j · 0.51/254²  +  5·2^−24 · |ΔW[m, j]|

— each term carried with ~23 bits relative to its column's largest term, then five float32 roundings (int32 → float32,
the last limb's add, the column factor, its product, the limbs' own). The float32 GEMM it replaces is bounded by
K·2^−24·|s·c|·Σ_k |b_mk|·|S_kj| (typically ~√K·2^−24 of it): the same class (measured: relative Frobenius error
~1e-6 against ~1e-7 for the float32 GEMM, on λ, γ spanning several binades). The integer sums do not depend on the
summation order or the BLAS, so the result does not depend on how the CPU blocks the GEMM.

**Grouped sparse product.** For very sparse bases (density ≤ ``SPARSE_MAX_DENSITY`` = 1/28) both factors are sparse:
row k = i·n + b of S is λ[i, b]·A[i, :]·γ[b, :], so the n rows of group i share A's row-i zero pattern, and its nonzero
columns J_i (about D/√min_dim of them) are all that group touches. Per group::

    ΔW[:, J_i] += s · (c·b_i) @ S_i[:, J_i]        b_i = b[:M, i·n:(i+1)·n] as a float32 CSR matrix (M, n)

with S_i[:, J_i] (n, |J_i|) built from λ, A, γ directly (the same float32 products as ``scaled_A``; the full S is never
formed). The work is nnz(b)·D/√min_dim multiply-adds instead of M·K·D: one layer takes 1/17 (1B shape) to 1/34
(7B shape) of the float32 GEMM's time, and 1/3 to 1/6 of a CSR × dense S product's (bench/RESULTS.md). Float32 arithmetic, the products of the reference GEMM minus its exact zeros,
summed per group (n terms) and then over the groups touching an element (≤ r adds): the float32 GEMM's bound
K·2⁻²⁴·|s|·Σ|B||S| holds (n + r ≤ K + 1), plus one rounding relative to |W| per group add into a nonzero W.

``torch._int_mm`` on CPU (torch 2.13) takes any shapes (checked: 5×7 @ 7×3, 1×1 @ 1×1) and non-contiguous int8
operands, so nothing is padded. Its CUDA kernel wants K and N multiples of 8 and M > 16: this module is CPU-only
(on CUDA the Triton kernel merges in float32).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch

LIMBS = 3  # int8 limbs of S: ≈ 23 bits of each column's largest value
LIMB_BASE = 254  # ratio between limbs: a rounded residual is ≤ 1/2, times 254 rounds into [−127, 127]
ROW_BLOCK = 1024  # rows of ΔW per integer GEMM: bounds the int32 scratch (ROW_BLOCK × LIMBS·D) at 12·D KiB
# int32 safety of the exact combine P0·254 + P1: K·127·255 < 2^31; longer sums are split over K
K_BLOCK = (2**31 - 1) // (127 * (LIMB_BASE + 1))
# the grouped sparse product vs the dense float32 GEMM (bench/RESULTS.md): very_sparse is 1/√min_dim, so min_dim ≳ 800
# qualifies (a measured density, so a model near the line may go either way: both paths are float32-class)
SPARSE_MAX_DENSITY = 1 / 28
_GROUP_COLUMNS = 4096  # columns of per-group products gathered before one scatter-add (bounds the (M, ·) buffer)
_SPLIT_ROWS = 512  # rows of S split at a time (cache-sized temporaries)
_CHECK_ROWS = 1024  # rows of B tested at a time by ternary_basis (bounds the boolean temporaries)
_MIN_EXP = -100  # smallest column unit exponent: its inverse 2^100 stays a finite float32 factor

_cache: dict[int, tuple[weakref.ref, TernaryBasis | None]] = {}


class Buffers(Protocol):
    """Reusable scratch tensors (``merge.layer.Workspace`` is one): ``take`` returns an uninitialised tensor."""

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


@dataclass
class TernaryBasis:
    """``B = c · b`` exactly: ``b`` int8 (B's shape) with values in {−1, 0, 1}, ``c`` a positive float, ``density``
    the fraction of nonzeros; ``groups`` caches the float32 CSR copies of a layer's column groups, keyed by (M, n, r)."""

    b: torch.Tensor
    c: float
    density: float
    groups: dict[tuple[int, int, int], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def group_csr(self, M: int, n: int, r: int) -> list[torch.Tensor]:
        """``c · b[:M, i·n:(i+1)·n]`` for i < r as float32 sparse CSR matrices (M, n), built once per layer shape
        from the int8 ``b`` (no dense float32 copy of a slice is ever made)."""
        if (M, n, r) not in self.groups:
            with warnings.catch_warnings():  # torch calls CSR support "beta"; the product is tested against float64
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                parts = []
                for i in range(r):
                    signs = self.b[:M, i * n: (i + 1) * n].to_sparse_csr()
                    parts.append(torch.sparse_csr_tensor(signs.crow_indices(), signs.col_indices(),
                                                         signs.values().to(torch.float32) * self.c, size=(M, n),
                                                         check_invariants=False))  # torch's own indices
            self.groups[(M, n, r)] = parts
        return self.groups[(M, n, r)]


def ternary_basis(B: torch.Tensor) -> TernaryBasis | None:
    """``B`` (2-D float) as ``c · b`` when every element is exactly 0, c or −c for one c > 0; else None.
    Cached for as long as ``B`` lives (the bases are model-wide and built once per merge)."""
    entry = _cache.get(id(B))
    if entry is not None and entry[0]() is B:
        return entry[1]
    found = _find_ternary(B)
    _cache[id(B)] = (weakref.ref(B), found)
    weakref.finalize(B, _cache.pop, id(B), None)
    return found


def _find_ternary(B: torch.Tensor) -> TernaryBasis | None:
    if B.dim() != 2 or not B.is_floating_point() or B.numel() == 0:
        return None
    c = 0.0
    for start in range(0, B.shape[0], _CHECK_ROWS):
        low, high = torch.aminmax(B[start: start + _CHECK_ROWS])
        c = max(c, -float(low), float(high))
    if not math.isfinite(c) or c == 0.0:
        return None
    b = torch.empty(B.shape, dtype=torch.int8, device=B.device)
    nonzero = 0
    for start in range(0, B.shape[0], _CHECK_ROWS):
        rows = B[start: start + _CHECK_ROWS]
        signs = torch.sign(rows)
        b[start: start + _CHECK_ROWS].copy_(signs)
        if not torch.equal(signs.mul_(c), rows):  # every element is exactly −c, 0 or c (NaN never equals)
            return None
        nonzero += int(torch.count_nonzero(b[start: start + _CHECK_ROWS]))
    return TernaryBasis(b=b, c=c, density=nonzero / b.numel())


@functools.cache
def has_fast_int8() -> bool:
    """True when the CPU multiplies int8 fast enough for three limbs to beat one float32 GEMM: AMX int8 tiles
    (Intel Sapphire Rapids and later: ``torch._int_mm`` ~7× the float32 rate at 4096³) or AVX-512 VNNI (AMD Zen 4:
    ~5× quiet, measured 734 vs 140 GFLOP/s; a whole sparse merge 1.25× faster than float32, bench/RESULTS.md).
    Without either, int8 GEMMs run no faster than float32 ones and ``auto`` keeps float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return "amx_int8" in flags or "avx512_vnni" in flags
    except OSError:
        pass
    return False


def auto_path(basis: TernaryBasis | None) -> str:
    """What ``precision="auto"`` runs on the CPU for these bases: ``"sparse"`` (very sparse: the grouped sparse
    product), ``"int8"`` (ternary, on a CPU with fast int8) or ``"fp32"`` (the float32 ``addmm_``)."""
    if basis is None:
        return "fp32"
    if basis.density <= SPARSE_MAX_DENSITY:
        return "sparse"
    return "int8" if has_fast_int8() else "fp32"


def split_limbs(S: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S (K, D) finite float32 → limbs (K, LIMBS·D) int8 laid out [L0 | L1 | L2] and the per-column unit exponent
    e (D,) int32, such that ``S[:, j] = 2^e_j · Σ_l L_l[:, j] / 254^l`` within :func:`limb_bound`.

    L0 is exact (S scaled by a power of two, rounded; the residual Q − round(Q) is exact in float32); each later
    limb's ``residual · 254`` is rounded once (relative 2^−24, far below the last limb's half unit)."""
    K, D = S.shape
    colmax = torch.zeros(D, dtype=S.dtype, device=S.device)
    for start in range(0, K, _SPLIT_ROWS):  # no |S| temporary of S's size
        torch.maximum(colmax, S[start: start + _SPLIT_ROWS].abs().amax(dim=0), out=colmax)
    _, E = torch.frexp(colmax)  # colmax ∈ [2^(E−1), 2^E); E = 0 for an all-zero column
    E = E.to(torch.int32)
    # unit 2^(E−7) puts colmax in [64, 128); where it would round to 128, take the next unit up
    E += (colmax * torch.exp2((7 - E).clamp(max=120).to(torch.float32)) >= 127.5).to(torch.int32)
    unit = (E - 7).clamp_min(_MIN_EXP)
    inv = torch.exp2(-unit.to(torch.float32))
    limbs = out if out is not None else torch.empty((K, LIMBS * D), dtype=torch.int8, device=S.device)
    for start in range(0, K, _SPLIT_ROWS):
        Q = S[start: start + _SPLIT_ROWS] * inv
        rounded = torch.empty_like(Q)
        for limb in range(LIMBS):
            torch.round(Q, out=rounded)
            limbs[start: start + _SPLIT_ROWS, limb * D: (limb + 1) * D].copy_(rounded)
            if limb + 1 < LIMBS:
                Q.sub_(rounded).mul_(LIMB_BASE)
    return limbs, unit


def limb_bound(unit: torch.Tensor) -> torch.Tensor:
    """Per-column bound (D,) float64 on |S − Σ limbs|: half a unit of the last limb plus the roundings of the
    ``residual · 254`` steps, 2^e · 0.51 / 254^(LIMBS−1)."""
    return torch.exp2(unit.double()) * (0.51 / LIMB_BASE ** (LIMBS - 1))


def add_ternary_int8_(target: torch.Tensor, basis: TernaryBasis, S: torch.Tensor, scale: float,
                      workspace: Buffers) -> None:
    """``target (M, D) float32 += scale · c · (b[:M, :K] @ S)`` by exact integer GEMMs on the limbs of S (K, D)
    finite float32. ``target`` may be a transposed view (the weight in (M, D) orientation)."""
    M = target.shape[0]
    K, D = S.shape
    for k0 in range(0, K, K_BLOCK):
        S_part = S[k0: k0 + K_BLOCK]
        kb = S_part.shape[0]
        limbs, unit = split_limbs(S_part, out=workspace.take("limbs", (kb, LIMBS * D), torch.int8, S.device))
        # ΔW = Σ_l 2^e·P_l/254^l = 2^e/254² · ((P0·254 + P1)·254 + P2)
        factor = (torch.exp2(unit.double()) * (scale * basis.c / LIMB_BASE ** (LIMBS - 1))).to(torch.float32)
        b = basis.b[:M, k0: k0 + kb]
        for r0 in range(0, M, ROW_BLOCK):
            rows = b[r0: r0 + ROW_BLOCK]
            n = rows.shape[0]
            P = workspace.take("P", (n, LIMBS * D), torch.int32, S.device)
            torch._int_mm(rows, limbs, out=P)
            exact = P[:, D: 2 * D].add_(P[:, :D], alpha=LIMB_BASE)  # |·| ≤ K·127·255 < 2^31
            acc = workspace.take("acc", (n, D), torch.float32, S.device).copy_(exact)
            for limb in range(2, LIMBS):
                torch.add(P[:, limb * D: (limb + 1) * D], acc, alpha=LIMB_BASE, out=acc)
            target[r0: r0 + n].addcmul_(acc, factor)


def add_ternary_sparse_(target: torch.Tensor, basis: TernaryBasis, lam: torch.Tensor, A: torch.Tensor,
                        gam: torch.Tensor, scale: float) -> bool:
    """``target (M, D) float32 += scale · (c·b[:M, :r·n]) @ S`` with S = λ ⊗ A ⊗ γ never formed: per group i of n
    rows, only A's nonzero columns J_i (see the module docstring). λ (r, n), A (r, D), γ (n, D) float32.
    ``target`` may be a transposed view. Returns False, having added nothing, when λ, γ or a product λ·A·γ is not
    finite: the float32 path then carries the NaN to the merge's finite check, as the reference does."""
    lam, gam = lam.to(torch.float32), gam.to(torch.float32)
    if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(gam).all())):
        return False
    M = target.shape[0]
    r, n = lam.shape
    groups = basis.group_csr(M, n, r)
    kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (group, J_i, S_i[:, J_i])
    for i in range(r):
        J = torch.nonzero(A[i]).squeeze(1)
        if J.numel() == 0:
            continue
        S_iJ = (lam[i][:, None] * A[i, J][None, :]) * gam[:, J]      # (n, |J|): scaled_A's products, same order
        if not bool(torch.isfinite(S_iJ).all()):
            return False
        kept.append((i, J, S_iJ))
    start = 0
    while start < len(kept):  # scatter-add the group products in batches of about _GROUP_COLUMNS columns
        stop, width = start + 1, kept[start][1].numel()
        while stop < len(kept) and width + kept[stop][1].numel() <= _GROUP_COLUMNS:
            width += kept[stop][1].numel()
            stop += 1
        batch = kept[start:stop]
        P = torch.cat([torch.mm(groups[i], S_iJ) for i, _, S_iJ in batch], dim=1).mul_(scale)   # (M, width)
        J = torch.cat([J for _, J, _ in batch])
        # scaled first: index_add_'s own alpha takes a path ~10x slower along dim 1 (torch 2.13, CPU)
        if target.stride(1) == 1:
            target.index_add_(1, J, P)
        else:  # a transposed view: add rows of the row-major weight underneath
            target.T.index_add_(0, J, P.T.contiguous())
        start = stop
    return True
