"""Fitting RandLoRA scales λ, γ to a given dense update (dense / LoRA → randlora).

For one layer, with T = ΔW_MD / scaling (M, D), fixed bases B (M, K = r·n) and A (r, D), find λ (r, n), γ (n, D)
minimising ‖B·S − T‖_F where S[i·n + b, j] = λ[i, b]·A[i, j]·γ[b, j] (SPEC §3). The problem is bilinear, so we
alternate exact least-squares solves (each step cannot increase the error):

* λ-step: S = diag(Λ)·Ã with Ã[k, j] = A[i, j]·γ[b, j]; normal equations G = (BᵀB) ⊙ (ÃÃᵀ), h_k = Σ_j (BᵀT ⊙ Ã)[k, j].
* γ-step: columns j decouple; each is an n-unknown least squares with G_j = P_jᵀ (BᵀB) P_j, P_j[i, b] = λ[i, b]·A[i, j].

Initialisation: the unconstrained optimum S* = B⁺T, divided by A, is rank one per basis b when T is itself a
RandLoRA update (then the fit is exact after the first step); its leading singular pair gives λ[:, b], γ[b, :].
All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_RIDGE = 1e-12


@dataclass
class FitResult:
    """λ (r, n) and γ (n, D) as float32, and the relative Frobenius error ‖ΔW_fit − ΔW‖ / ‖ΔW‖ in float64."""

    lam: torch.Tensor
    gam: torch.Tensor
    rel_error: float
    iterations: int


def _solve_spd(G: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    scale = G.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(G.shape[-1], dtype=G.dtype)
    return torch.linalg.solve(G + _RIDGE * scale[..., None] * eye, h.unsqueeze(-1)).squeeze(-1)


def fit_scales(target_md: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, max_iters: int = 30,
               tol: float = 1e-10) -> FitResult:
    """Fit λ, γ so that ``scaling · B @ S(λ, γ)`` ≈ ``target_md``.

    target_md: (M, D); A: (r, D); B: (M, r·n). Returns float32 scales and the achieved relative error.
    """
    T = target_md.double() / scaling
    A64, B64 = A.double(), B.double()
    r, D = A64.shape
    K = B64.shape[1]
    n = K // r
    norm_T = torch.linalg.norm(T)
    if norm_T == 0:
        return FitResult(torch.zeros(r, n), torch.zeros(n, D), 0.0, 0)
    BtB = B64.T @ B64  # (K, K)
    BtT = B64.T @ T  # (K, D)
    lam, gam = _initial_guess(B64, T, A64, r, n)

    def error(lam: torch.Tensor, gam: torch.Tensor) -> float:
        S = (lam[:, :, None] * A64[:, None, :] * gam[None, :, :]).reshape(K, D)
        return float(torch.linalg.norm(B64 @ S - T) / norm_T)

    err = error(lam, gam)
    iters = 0
    for iters in range(1, max_iters + 1):
        lam = _lambda_step(BtB, BtT, A64, gam, r, n)
        gam = _gamma_step(BtB, BtT, A64, lam, r, n)
        new_err = error(lam, gam)
        done = err - new_err <= tol * max(err, 1e-30) or new_err < 1e-12
        err = min(err, new_err)
        if done:
            break
    return FitResult(lam.float(), gam.float(), err, iters)


def _initial_guess(B: torch.Tensor, T: torch.Tensor, A: torch.Tensor, r: int, n: int):
    S_star = torch.linalg.lstsq(B, T, driver="gelsd").solution  # (K, D), minimum norm
    D = A.shape[1]
    safe_A = torch.where(A.abs() > 1e-12, A, torch.ones_like(A))
    E = (S_star.reshape(r, n, D) / safe_A[:, None, :]) * (A.abs() > 1e-12)[:, None, :]
    U, s, Vh = torch.linalg.svd(E.permute(1, 0, 2), full_matrices=False)  # (n, r, D) batch over b
    lam = (U[:, :, 0] * s[:, :1]).T.contiguous()  # (r, n)
    gam = Vh[:, 0, :].contiguous()  # (n, D)
    return lam, gam


def _lambda_step(BtB, BtT, A, gam, r, n):
    K, D = BtT.shape
    A_tilde = (A[:, None, :] * gam[None, :, :]).reshape(K, D)
    G = BtB * (A_tilde @ A_tilde.T)
    h = (BtT * A_tilde).sum(1)
    return _solve_spd(G, h).reshape(r, n)


def _gamma_step(BtB, BtT, A, lam, r, n):
    D = A.shape[1]
    P = lam[None, :, :] * A.T[:, :, None]  # (D, r, n)
    K4 = BtB.reshape(r, n, r, n)
    G = torch.einsum("jib,ibkc,jkc->jbc", P, K4, P)  # (D, n, n)
    h = torch.einsum("jib,ibj->jb", P, BtT.reshape(r, n, D))  # (D, n)
    return _solve_spd(G, h).T.contiguous()  # (n, D)
