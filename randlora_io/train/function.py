"""The RandLoRA linear layer's forward and backward, and the naive reference beside it (its test oracle).

For a frozen base weight with (out, in) view W, bias b, D = min(out, in), M = max(out, in), scales λ (r, n) and
γ (n, D), the layer's shared-basis slices A (r, D) and U_B = B[:M, :r·n] (M, K = r·n), and S = λ ⊗ A ⊗ γ (K, D)::

    y = x Wᵀ + b + s · xd ΔWᵀ,     ΔW = U_B S (out = M)   or   (U_B S)ᵀ (out = D)

with xd = dropout(x). The fast path never forms ΔW (M×D) and saves only xd for backward (no (T, K) intermediate, no
S, no per-base copies): S is rebuilt from λ, γ, A in backward (an elementwise product) and the one (T, K) product
the gradient needs is recomputed. The adapter path runs in float32 (float64 when λ is float64, for gradcheck)
whatever the base dtype, as PEFT's ``autocast_adapter_dtype`` does; the sum is rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..delta import scaled_A


def _compute_dtype(lam: torch.Tensor) -> torch.dtype:
    return torch.float64 if lam.dtype == torch.float64 else torch.float32


def _scale_grads(dS: torch.Tensor, lam: torch.Tensor, A: torch.Tensor, gam: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """From dL/dS (K, D) to dL/dλ (r, n) and dL/dγ (n, D), with S[i·n + b, j] = λ[i, b]·A[i, j]·γ[b, j]."""
    r, n = lam.shape
    dS = dS.reshape(r, n, -1)
    dS_A = dS * A[:, None, :]                        # (r, n, D)
    d_lam = (dS_A * gam[None, :, :]).sum(-1)          # (r, n)
    d_gam = (dS_A * lam[:, :, None]).sum(0)           # (n, D)
    return d_lam, d_gam


class RandloraLinearFunction(torch.autograd.Function):
    """``apply(x, xd, weight_outin, bias, lam, gam, A, U_B, scaling)``; x and xd (..., in), returns (..., out).

    ``weight_outin`` is the frozen base weight viewed as (out, in); A (r, D) and U_B (M, K) are the layer's slices of
    the shared bases (no gradient). The base weight and bias get no gradient (they are frozen)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lam, gam, A, U_B, scaling: float):
        out_f, in_f = weight.shape
        dt = _compute_dtype(lam)
        base = F.linear(x, weight, bias)
        xf = xd.reshape(-1, in_f).to(dt)
        S = scaled_A(lam, A, gam, dt)
        U = U_B.to(dt)
        if in_f <= out_f:   # D = in: y = (xd Sᵀ) U_Bᵀ
            y = (xf @ S.T) @ U.T
        else:               # D = out: y = (xd U_B) S
            y = (xf @ U) @ S
        y = y.reshape(*x.shape[:-1], out_f).mul_(scaling)
        ctx.save_for_backward(xd, weight, lam, gam, A, U_B)
        ctx.scaling = scaling
        return (base.to(dt) + y).to(x.dtype) if base.dtype != dt else base + y

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, lam, gam, A, U_B = ctx.saved_tensors
        s = ctx.scaling
        out_f, in_f = weight.shape
        dt = _compute_dtype(lam)
        g = grad_out.reshape(-1, out_f)
        grad_x = (grad_out @ weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        gf = g.to(dt)
        xf = xd.reshape(-1, in_f).to(dt)
        S = scaled_A(lam, A, gam, dt)
        U = U_B.to(dt)
        if in_f <= out_f:
            gU = gf @ U                                  # (T, K)
            grad_xd = (gU @ S).mul_(s)                   # (T, in)
            dS = (gU.T @ xf).mul_(s)                     # (K, D)
        else:
            gS = gf @ S.T                                # (T, K)
            grad_xd = (gS @ U.T).mul_(s)                 # (T, in)
            T, M, K, D = xf.shape[0], U.shape[0], U.shape[1], S.shape[1]
            if T * K * (M + D) <= M * D * (T + K):       # pick the cheaper order for dS = s · U_Bᵀ xdᵀ g
                dS = ((xf @ U).T @ gf).mul_(s)
            else:
                dS = (U.T @ (xf.T @ gf)).mul_(s)
        d_lam, d_gam = _scale_grads(dS, lam.to(dt), A.to(dt), gam.to(dt))
        grad_xd = grad_xd.reshape(xd.shape).to(xd.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_xd, None, None, d_lam.to(lam.dtype), d_gam.to(gam.dtype), None, None, None


def randlora_linear(x: torch.Tensor, xd: torch.Tensor, weight_outin: torch.Tensor, bias: torch.Tensor | None,
                    lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, U_B: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """The memory-efficient RandLoRA linear: (..., in) → (..., out). See the module docstring for shapes."""
    return RandloraLinearFunction.apply(x, xd, weight_outin, bias, lam, gam, A, U_B, scaling)


def randlora_linear_reference(x: torch.Tensor, xd: torch.Tensor, weight_outin: torch.Tensor,
                              bias: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor,
                              U_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The naive formula with plain autograd (forms ΔW): the oracle for :func:`randlora_linear`."""
    out_f, in_f = weight_outin.shape
    dt = _compute_dtype(lam)
    delta_md = U_B.to(dt) @ scaled_A(lam, A, gam, dt) * scaling          # (M, D)
    delta = delta_md if in_f <= out_f else delta_md.T                     # (out, in)
    base = F.linear(x, weight_outin, bias)
    return (base.to(dt) + F.linear(xd.to(dt), delta)).to(x.dtype)
