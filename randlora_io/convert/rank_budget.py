"""The smallest LoRA rank of one layer whose relative error meets a budget (``convert --to peft-lora --max-error E``).

For ΔW (out, in) with singular values σ₁ ≥ σ₂ ≥ …, the best rank-k approximation (Eckart–Young) has relative
Frobenius error ``e(k) = sqrt(Σ_{i>k} σᵢ²) / sqrt(Σ σᵢ²)``; the rank chosen is the smallest k with e(k) ≤ E. Three
ways to it, side by side, which return the same k (the two fast ones return None where they cannot prove it):

- :func:`full_budget_factors` (the reference): one float64 ``torch.linalg.svd``; exact σ, exact minimal k.
- :func:`randomized_budget_factors` (the fast path, for large layers whose spectrum decays past the rank needed):
  ``torch.svd_lowrank`` finds a q-dimensional row space, one float64 product projects ΔW onto it, and its k is
  returned only when it is *proven* minimal; otherwise ``None`` and the caller runs the reference. The proof: the
  singular values s₁ ≥ … ≥ s_q of the projection interlace ΔW's (sᵢ ≤ σᵢ), and ‖ΔW‖² − Σ sᵢ² is the energy left
  outside the subspace, so

  - rank k suffices when Σ_{i>k} sᵢ² + (‖ΔW‖² − Σ sᵢ²) ≤ E²‖ΔW‖²: the subspace's own rank-k factors meet E;
  - rank k − 1 cannot when Σ_{k≤i≤q} sᵢ² > E²‖ΔW‖²: e(k−1)²‖ΔW‖² = Σ_{i≥k} σᵢ² ≥ Σ_{k≤i≤q} sᵢ².

  Both hold at once when the energy left outside is below about σ_k², i.e. when q reaches well past the ranks
  where the spectrum has fallen below σ_k (2–3× the rank on the 7B bench's layers); q grows until it does. On a
  flat or slowly falling spectrum, or for a budget within float64 rounding of a tail value, it never does, and the
  reference decides. Only the proof makes k exact: the σ̃ of ``svd_lowrank`` alone underestimate σ, and a k read
  off them can be above the optimum (issue 28's audit: 134 for 128 on σ = linspace(1, 0.5)).
- :func:`gram_budget_factors` (for the layers the randomised path hands over: flat or slowly falling spectra): the
  float64 eigendecomposition of the smaller Gram matrix, whose eigenvalues σᵢ² decide k up to a stated rounding
  margin; 1.7–1.8× cheaper than the full SVD here (σᵢ = i^-½, E = 0.3, rank 1840: 20 s against 34 s at
  4096 × 4096, 29 s against 53 s at 11008 × 4096, on 2 cores).

Either way the error reported is measured, not predicted: ‖ΔW − up·down‖_F / ‖ΔW‖_F in float64 on the float32
factors that get written. The reference raises k while that measurement exceeds E (float32 rounding of the factors
can push a budget within ~1e-7 of e(k) over it); the fast path hands such a layer to the reference instead, so the
ranks agree by construction there too. A zero ΔW gets rank 0 (no factors).
"""

from __future__ import annotations

import math

import torch

from .lowrank import LowRank

RANDOMIZED_MIN_DIM = 1024  # below this smaller side a full float64 SVD takes under ~1 s here: no reason to guess
RANDOMIZED_MAX_FRACTION = 0.25  # past q = this × min(out, in) the randomised passes cost about a full SVD
OVERSAMPLE = 16
POWER_ITERS = 1  # with q ~3x the rank and the float64 projection after, more passes barely move the proof
RETRIES = 8
FLOAT32_MIN_ERROR = 1e-2  # budgets below this run the randomised range finder in float64
# Float64 rounding in the proof's Σ_{k≤i≤q} sᵢ², as a multiple of q·(out + in)·‖ΔW‖²: with u = 2⁻⁵³, the product
# ΔW·X₀ moves each sᵢ by ≤ in·u·√q·‖ΔW‖_F, X₀'s departure from orthonormal (≤ ~in·u) and the SVD's backward error
# (≤ ~out·u·‖ΔW‖₂) by less; over q terms that is ≤ 2·q·(out + in)·u·‖ΔW‖², taken 4 times over
CERT_ROUNDING = 8 * 2.0**-53


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


def _project(A: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of A restricted to the row space spanned by X: A (M, N) float64 (ΔW or ΔWᵀ), X (N, q) any float dtype (a
    range finder's approximate top right singular vectors). Returns U (M, q), s (q,), Vh (q, N), float64, with
    U·diag(s)·Vh = A·P for P the orthogonal projector onto span(X): s are the singular values of A·X₀ (X₀ (N, q)
    orthonormal), exact to float64, so they interlace A's (sᵢ ≤ σᵢ), and ‖A‖² − Σ sᵢ² = ‖A − A·P‖²."""
    X0, _ = torch.linalg.qr(X.double())
    Uc, s, Vhc = torch.linalg.svd(A @ X0, full_matrices=False)
    return Uc, s, Vhc @ X0.T


def _next_q(q: int, s2: torch.Tensor, outside: float, target: float) -> int:
    """The q at which the energy left outside the subspace (``outside`` at q, from ``s2`` = s² (q,)) should fall to
    ``target``, extrapolating its decay over the last q/2 ranks as geometric; between 1.25·q and 2·q. Only how fast
    the proof is reached depends on this guess, never what it proves."""
    before = outside + float(s2[q // 2:].sum())  # ≈ the energy outside the first q/2 ranks
    if target <= 0 or outside <= 0 or before <= outside:
        return 2 * q
    rate = math.log(outside / before) / (q - q // 2)  # log of the energy's decay per rank (< 0)
    return int(min(max(q + 1.25 * math.log(target / outside) / rate, 1.25 * q), 2 * q)) + 1


def randomized_budget_factors(delta: torch.Tensor, max_error: float, *, start: int = 32,
                              niter: int = POWER_ITERS, seed: int = 0) -> LowRank | None:
    """Fast path: the rank of :func:`full_budget_factors`, proven minimal (module docstring), or None (use the
    reference). ``torch.svd_lowrank`` (``niter`` power iterations, seeded; float32 unless ``max_error`` <
    ``FLOAT32_MIN_ERROR``) on q = 3·``start`` + oversample columns, then a float64 projection of ΔW onto them; q
    grown up to ``RANDOMIZED_MAX_FRACTION`` of min(out, in) until the proof holds. None as soon as the ranks left up
    to that limit look too few to close it, or when the measured error at the proven rank misses ``max_error``
    (float32 rounding of the factors: the reference's retries decide). ``start``: the rank expected (a like
    layer's), so most layers take one pass. ``delta`` (out, in), any float dtype; returns float32 up (out, k) and
    down (k, in) with their error measured in float64."""
    W = delta.double()
    total = float((W * W).sum())
    if total == 0.0:
        return zero_rank(tuple(W.shape))
    wide = W.shape[0] < W.shape[1]
    A = W.T if wide else W  # (M, N), M ≥ N: svd_lowrank's V (N, q) is then its refined side
    # the range finder in float32 (ΔW's own precision, ~2x faster) unless the budget is below what float32's
    # singular values resolve; the float64 projection and the proof come after either way
    single = A.float() if max_error >= FLOAT32_MIN_ERROR else A
    budget = max_error**2 * total  # the energy a rank may leave out
    limit = int(RANDOMIZED_MAX_FRACTION * min(W.shape))
    q = min(3 * max(start, 1) + OVERSAMPLE, limit)  # the proof needs q well past the ranks kept (docstring)
    while q >= 1:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            X = torch.svd_lowrank(single, q=q, niter=niter)[2]
        U, s, Vh = _project(A, X)
        s2 = s * s
        outside = max(total - float(s2.sum()), 0.0)  # ≥ Σ_{i>q} σᵢ²
        k = smallest_rank(s, total, max_error)
        if k is None:  # rank q is not enough: what the ranks past q would have to take out
            short, grown = outside - budget, 2 * q
        elif k == 0:  # max_error ≥ 1
            short = -1.0
        else:  # k − 1 is ruled out once Σ_{k≤i≤q} sᵢ² exceeds the budget by more than rounding
            short = budget + CERT_ROUNDING * q * sum(W.shape) * total - float(s2[k - 1:].sum())
            grown = _next_q(q, s2, outside, outside - short)  # ranks past q add what leaves `outside`
        if short < 0:
            up, down = _factors(U, s, Vh, k)
            if wide:  # the factors of ΔWᵀ
                up, down = down.T.contiguous(), up.T.contiguous()
            err = measured_error(W, up, down, math.sqrt(total))
            if err > max_error:  # by float32 rounding alone (the float64 factors meet E): as the reference decides
                return None
            return LowRank(up=up, down=down, kept_energy=min(float(s2[:k].sum()) / total, 1.0), rel_error=err,
                           method="rsvd")
        # each rank past q adds at most σ_{q+1}² ≤ σ_q² to these sums (about s_q², an underestimate: twice that
        # here); when even all ranks up to the limit could not close the gap, the full SVD is the cheaper way
        if q == limit or short > 2 * (limit - q) * float(s2[-1]):
            return None
        q = min(grown, limit)
    return None


def gram_budget_factors(delta: torch.Tensor, max_error: float) -> LowRank | None:
    """Middle path, for layers whose spectrum falls too slowly for :func:`randomized_budget_factors` to prove a
    rank: the rank of :func:`full_budget_factors`, proven minimal, from the float64 eigendecomposition of the smaller
    Gram matrix G (ΔW·ΔWᵀ or ΔWᵀ·ΔW, n × n), or None (use the reference). ``delta`` (out, in), any float dtype.

    G's eigenvalues are σᵢ²: computing G and ``eigh`` in float64 move each by at most ~(n + d)·u·‖ΔW‖_F² (u = 2⁻⁵³,
    d the larger side), so Σ over any n of them by at most n·(n + d)·u·‖ΔW‖², taken 8 times over
    (``CERT_ROUNDING``). Rank k − 1 is ruled out when the computed tail Σ_{i≥k} σ̃ᵢ² exceeds E²‖ΔW‖² by more than
    that; rank k is shown enough by measuring the error of the factors written (the top-k eigenvectors V_k and
    V_kᵀ·ΔW, the best rank-k approximation within G's rounding), and handed to the reference when it misses E."""
    W = delta.double()
    total = float((W * W).sum())
    if total == 0.0:
        return zero_rank(tuple(W.shape))
    tall = W.shape[0] > W.shape[1]  # G on the smaller side: ΔWᵀΔW (in × in) for a tall ΔW
    A = W.T if tall else W  # (n, d), n ≤ d
    evals, evecs = torch.linalg.eigh(A @ A.T)  # ascending
    lam, V = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    s = lam.sqrt()
    k = smallest_rank(s, total, max_error)
    if k is None or k == 0:
        return None  # no rank within the float32 bound, or max_error ≥ 1: the reference says which
    margin = CERT_ROUNDING * A.shape[0] * sum(A.shape) * total
    if float(lam[k - 1:].sum()) <= max_error**2 * total + margin:
        return None  # k − 1 not ruled out beyond rounding
    Vk = V[:, :k]
    proj = Vk.T @ A  # (k, d): the rows of A in that subspace, Σ_k·Vh_k of A's SVD to G's rounding
    root = s[:k].sqrt()
    if not bool((root > 0).all()):
        return None
    up, down = (Vk * root).float(), (proj / root[:, None]).float()
    if tall:  # the factors of ΔWᵀ
        up, down = down.T.contiguous(), up.T.contiguous()
    err = measured_error(W, up, down, math.sqrt(total))
    if err > max_error:
        return None
    return LowRank(up=up, down=down, kept_energy=min(float(lam[:k].sum()) / total, 1.0), rel_error=err,
                   method="gram")


def budget_factors(delta: torch.Tensor, max_error: float, method: str = "auto", *, niter: int = POWER_ITERS,
                   seed: int = 0, start: int = 32) -> LowRank | None:
    """The smallest-rank factors of ``delta`` (out, in) meeting ``max_error`` (relative Frobenius, measured).
    ``method``: ``full`` (float64 SVD), ``randomized`` (svd_lowrank, then the Gram eigendecomposition, then the full
    SVD, each where the one before cannot prove its rank minimal), ``auto`` (randomized when min(out, in) ≥
    ``RANDOMIZED_MIN_DIM``); either way the rank is the reference's. ``start``: the rank expected (see :func:`randomized_budget_factors`). None: float32 factors cannot
    meet the bound."""
    if method not in ("auto", "full", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}")
    if method == "randomized" or (method == "auto" and min(delta.shape) >= RANDOMIZED_MIN_DIM):
        result = randomized_budget_factors(delta, max_error, niter=niter, seed=seed, start=start)
        if result is None:
            result = gram_budget_factors(delta, max_error)
        if result is not None:
            return result
    return full_budget_factors(delta, max_error)
