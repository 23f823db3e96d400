"""Truncated SVD of a dense update into LoRA factors (randlora / dense → PEFT LoRA).

Exact ``torch.linalg.svd`` for layers up to ``EXACT_LIMIT`` on their smaller side, randomised SVD
(Halko et al. 2011, with power iterations) above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_LIMIT = 2048


@dataclass
class LowRank:
    """``up`` (out, k) and ``down`` (k, in) with ``up @ down`` ≈ ΔW (out, in), float32; ``kept_energy`` is
    Σ_{i<k} σ_i² / Σ σ_i² (1.0 for a zero update); ``rel_error`` is ‖up·down − ΔW‖ / ‖ΔW‖; ``method``: how the
    factors were found (``svd``, ``rsvd`` randomised, ``zero`` for a zero ΔW at rank 0)."""

    up: torch.Tensor
    down: torch.Tensor
    kept_energy: float
    rel_error: float
    method: str = "svd"

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def truncated_svd(delta: torch.Tensor, rank: int, oversample: int = 16, power_iters: int = 4, seed: int = 0) -> LowRank:
    """Best rank-``rank`` factorisation of ``delta`` (out, in) (Eckart–Young for the exact path)."""
    W = delta.double()
    k = min(rank, *W.shape)
    total = float((W**2).sum())
    if min(W.shape) <= EXACT_LIMIT:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(W.shape[1], k + oversample, dtype=W.dtype, generator=gen)
        Q, _ = torch.linalg.qr(W @ omega)
        for _ in range(power_iters):
            Q, _ = torch.linalg.qr(W.T @ Q)
            Q, _ = torch.linalg.qr(W @ Q)
        Ub, s, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
        U = Q @ Ub
    root = s[:k].sqrt()
    up, down = U[:, :k] * root, root[:, None] * Vh[:k]
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    err = float(torch.linalg.norm(up @ down - W)) / (total**0.5) if total > 0 else 0.0
    return LowRank(up=up.float(), down=down.float(), kept_energy=kept, rel_error=err)
