"""The smallest LoRA rank of one layer whose relative error meets a budget (``convert --to peft-lora --max-error E``).

For ΔW (out, in) with singular values σ₁ ≥ σ₂ ≥ …, the best rank-k approximation (Eckart–Young) has relative
Frobenius error ``e(k) = sqrt(Σ_{i>k} σᵢ²) / sqrt(Σ σᵢ²)``; the rank chosen is the smallest k with e(k) ≤ E. Two
ways to the σᵢ and the factors, side by side:

- :func:`full_budget_factors` (the reference): one float64 ``torch.linalg.svd``; exact σ, exact minimal k.
- :func:`randomized_budget_factors` (the fast path, for large layers that need a small rank): ``torch.svd_lowrank``
  with power iterations on q columns, q doubled until the budget is met inside them (or q grows past a quarter of
  the layer's smaller side, where a full SVD is as fast: then ``None`` and the caller uses the reference). Its σ̃ are
  the singular values of QᵀΔW, so e(k)² = 1 − Σ_{i≤k} σ̃ᵢ² / ‖ΔW‖² is the exact error of projecting onto its first k
  vectors; σ̃ᵢ ≤ σᵢ, so its k is never below the reference's (the tests check they agree).

Either way the error reported is measured, not predicted: ‖ΔW − up·down‖_F / ‖ΔW‖_F in float64 on the float32
factors that get written, and k is raised while that measurement exceeds E. A zero ΔW gets rank 0 (no factors).
"""

from __future__ import annotations

import math

import torch

from .lowrank import LowRank

RANDOMIZED_MIN_DIM = 1024  # below this smaller side a full float64 SVD takes under ~1 s here: no reason to guess
RANDOMIZED_MAX_FRACTION = 0.25  # past q = this × min(out, in) the randomised passes cost about a full SVD
OVERSAMPLE = 16
POWER_ITERS = 4
RETRIES = 8
FLOAT32_MIN_ERROR = 1e-2  # budgets below this run the randomised range finder in float64


def tail_errors(s: torch.Tensor, total: float) -> torch.Tensor:
    """Relative error at each rank k = 0 … len(s) of keeping the first k of ``s`` (descending singular values, or the
    projection energies' square roots): ``sqrt(max(total − Σ_{i<k} sᵢ², 0) / total)``, float64 (len(s) + 1,).
    ``total`` = ‖ΔW‖_F² > 0."""
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s.double() ** 2, 0)])
    return ((total - kept).clamp_min(0.0) / total).sqrt()


def smallest_rank(s: torch.Tensor, total: float, max_error: float) -> int | None:
    """The smallest k whose :func:`tail_errors` value is ≤ ``max_error``, or None when no k ≤ len(s) is."""
    ok = torch.nonzero(tail_errors(s, total) <= max_error)
    return int(ok[0]) if len(ok) else None


def measured_error(W: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm: float) -> float:
    """‖W − up·down‖_F / ``norm`` in float64: W (out, in) float64, up (out, k) and down (k, in) as written (float32)."""
    if up.shape[1] == 0:
        return float(torch.linalg.norm(W)) / norm
    return float(torch.linalg.norm(torch.addmm(W, up.double(), down.double(), alpha=-1.0))) / norm


def _factors(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced float32 factors up = U_k·√s (out, k), down = √s·Vh_k (k, in)."""
    root = s[:k].sqrt()
    return (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()


def _verified(W: torch.Tensor, U, s, Vh, k: int, total: float, max_error: float, method: str) -> LowRank | None:
    """Factors at the first rank ≥ k whose measured error is ≤ ``max_error``, within the len(s) vectors given and
    ``RETRIES`` ranks past k (float32 rounding of the factors is all that can separate the two: when a few more
    ranks do not absorb it, the bound is below what float32 holds)."""
    norm = math.sqrt(total)
    stop = min(len(s), k + RETRIES)
    while k <= stop:
        up, down = _factors(U, s, Vh, k)
        err = measured_error(W, up, down, norm)
        if err <= max_error:
            kept = float((s[:k].double() ** 2).sum()) / total
            return LowRank(up=up, down=down, kept_energy=min(kept, 1.0), rel_error=err, method=method)
        k += 1
    return None


def zero_rank(shape: tuple[int, int]) -> LowRank:
    """A zero ΔW (out, in): rank 0, no factors, nothing lost."""
    return LowRank(up=torch.zeros(shape[0], 0), down=torch.zeros(0, shape[1]), kept_energy=1.0, rel_error=0.0,
                   method="zero")


def full_budget_factors(delta: torch.Tensor, max_error: float) -> LowRank | None:
    """Reference: the smallest rank of ``delta`` (out, in), any float dtype, meeting ``max_error``, from a full
    float64 SVD; None when even the float32 factors of full rank miss it (``max_error`` below float32 rounding)."""
    W = delta.double()
    total = float((W * W).sum())
    if total == 0.0:
        return zero_rank(tuple(W.shape))
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    k = smallest_rank(s, total, max_error)
    return _verified(W, U, s, Vh, len(s) if k is None else k, total, max_error, "svd")


def randomized_budget_factors(delta: torch.Tensor, max_error: float, *, start: int = 32,
                              niter: int = POWER_ITERS, seed: int = 0) -> LowRank | None:
    """Fast path: ``torch.svd_lowrank`` (``niter`` power iterations, seeded, float32) on q = start + oversample
    columns, q doubled until the budget is met with k ≤ q − oversample; None once q passes
    ``RANDOMIZED_MAX_FRACTION`` of min(out, in) (use :func:`full_budget_factors`). ``start``: the rank expected
    (a like layer's), so most layers take one pass. ``delta`` (out, in), any float dtype; error measured in float64."""
    W = delta.double()
    total = float((W * W).sum())
    if total == 0.0:
        return zero_rank(tuple(W.shape))
    # the range finder in float32 (ΔW's own precision, ~2x faster) unless the budget is below what float32's
    # singular values resolve: energies are then picked to ~1e-7 of ‖ΔW‖², and exactness comes after either way
    single = delta.float() if max_error >= FLOAT32_MIN_ERROR else W
    limit = int(RANDOMIZED_MAX_FRACTION * min(W.shape))
    q = min(max(start, 1) + OVERSAMPLE, limit)
    while q >= 1:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, s, V = (t.double() for t in torch.svd_lowrank(single, q=q, niter=niter))
        k = smallest_rank(s, total, max_error)
        if k is not None and (k <= q - OVERSAMPLE or q == limit):
            result = _verified(W, U, s, V.T, k, total, max_error, "rsvd")
            if result is not None:
                return result
        if q == limit:
            return None
        q = min(2 * q, limit)
    return None


def budget_factors(delta: torch.Tensor, max_error: float, method: str = "auto", *, niter: int = POWER_ITERS,
                   seed: int = 0, start: int = 32) -> LowRank | None:
    """The smallest-rank factors of ``delta`` (out, in) meeting ``max_error`` (relative Frobenius, measured).
    ``method``: ``full`` (float64 SVD), ``randomized`` (svd_lowrank, falling back to full when the rank needed is
    large), ``auto`` (randomized when min(out, in) ≥ ``RANDOMIZED_MIN_DIM``); ``start``: the rank expected (see
    :func:`randomized_budget_factors`). None: float32 factors cannot meet the bound."""
    if method not in ("auto", "full", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}")
    if method == "randomized" or (method == "auto" and min(delta.shape) >= RANDOMIZED_MIN_DIM):
        result = randomized_budget_factors(delta, max_error, niter=niter, seed=seed, start=start)
        if result is not None:
            return result
    return full_budget_factors(delta, max_error)
