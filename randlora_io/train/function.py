"""The RandLoRA linear layer's forward and backward, and the naive reference beside it (its test oracle).

For a frozen base weight with (out, in) view W, bias b, D = min(out, in), M = max(out, in), scales λ (r, n) and
γ (n, D), the layer's shared-basis slices A (r, D) and U_B = B[:M, :r·n] (M, K = r·n), and S = λ ⊗ A ⊗ γ (K, D)::

    y = x Wᵀ + b + s · xd ΔWᵀ,     ΔW = U_B S (out = M)   or   (U_B S)ᵀ (out = D)

with xd = dropout(x). Only xd is saved for backward (no (T, K) intermediate, no S, no ΔW, no per-base copies): S is
rebuilt from λ, γ, A in backward (an elementwise product). Two ways to compute, chosen by FLOPs: the factored path
(two skinny GEMMs over the tokens, ΔW never formed), or, when the batch has more tokens than the layer is wide and
there is no dropout, W + s·ΔW formed transiently in forward and again in backward (freed at once, never stored). The adapter path runs in float32 (float64 when λ is float64, for gradcheck)
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
    """``apply(x, xd, weight_outin, bias, lam, gam, A, U_B, scaling, mode)``; x and xd (..., in), returns (..., out).
    ``xd`` None means xd is x (no dropout): one tensor is never passed twice, which torch.compile cannot trace.

    ``weight_outin`` is the frozen base weight viewed as (out, in); A (r, D) and U_B (M, K) are the layer's slices of
    the shared bases (no gradient). The base weight and bias get no gradient (they are frozen)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lam, gam, A, U_B, scaling: float, mode: str = "auto",
                shape: tuple[int, int] | None = None):
        out_f, in_f = weight.shape if weight is not None else shape
        dt = _compute_dtype(lam)
        same = xd is None
        xd = x if same else xd
        S = scaled_A(lam, A, gam, dt)
        U = U_B.to(dt)
        xf = xd.reshape(-1, in_f).to(dt)
        merged = weight is not None and _use_merged(mode, same, weight, dt, xf.shape[0], U.shape[1])
        ctx.merged, ctx.scaling, ctx.same, ctx.shape = merged, scaling, same, (out_f, in_f)
        ctx.save_for_backward(xd, weight, lam, gam, A, U_B)
        if merged:  # W + s·ΔW formed transiently: one GEMM over the tokens instead of three
            return F.linear(x, weight + _delta_outin(U, S, scaling, in_f <= out_f), bias)
        if in_f <= out_f:   # D = in: y = (xd Sᵀ) U_Bᵀ
            y = (xf @ S.T) @ U.T
        else:               # D = out: y = (xd U_B) S
            y = (xf @ U) @ S
        y = y.reshape(*x.shape[:-1], out_f).mul_(scaling)
        if weight is None:  # the adapter path alone, float32
            return y
        base = F.linear(x, weight, bias)
        return (base.to(dt) + y).to(x.dtype) if base.dtype != dt else base + y

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, lam, gam, A, U_B = ctx.saved_tensors
        s = ctx.scaling
        out_f, in_f = ctx.shape
        dt = _compute_dtype(lam)
        g = grad_out.reshape(-1, out_f)
        gf = g.to(dt)
        xf = xd.reshape(-1, in_f).to(dt)
        S = scaled_A(lam, A, gam, dt)
        U = U_B.to(dt)
        in_is_min = in_f <= out_f
        grad_x = grad_xd = None
        if ctx.merged:
            # x and xd are the same tensor here: one gradient through W + s·ΔW
            if ctx.needs_input_grad[0]:
                grad_x = grad_out @ (weight + _delta_outin(U, S, s, in_is_min))
            G = gf.T @ xf if in_is_min else xf.T @ gf    # (M, D)
            dS = (U.T @ G).mul_(s)
        else:
            needs_base_grad = ctx.needs_input_grad[0] and weight is not None
            grad_x = (grad_out @ weight.to(grad_out.dtype)) if needs_base_grad else None
            if in_is_min:
                gU = gf @ U                                  # (T, K)
                grad_xd = (gU @ S).mul_(s)                   # (T, in)
                dS = (gU.T @ xf).mul_(s)                     # (K, D)
            else:
                gS = gf @ S.T                                # (T, K)
                grad_xd = (gS @ U.T).mul_(s)                 # (T, in)
                T, M, K, D = xf.shape[0], U.shape[0], U.shape[1], S.shape[1]
                if T * K * (M + D) <= M * D * (T + K):       # the cheaper order for dS = s · U_Bᵀ xdᵀ g
                    dS = ((xf @ U).T @ gf).mul_(s)
                else:
                    dS = (U.T @ (xf.T @ gf)).mul_(s)
            grad_xd = grad_xd.reshape(xd.shape).to(xd.dtype)
            if ctx.same:  # one input: both paths' gradients go to x
                if ctx.needs_input_grad[0]:
                    grad_x = grad_xd if grad_x is None else grad_x + grad_xd.to(grad_x.dtype)
                grad_xd = None
            elif not ctx.needs_input_grad[1]:
                grad_xd = None
        d_lam, d_gam = _scale_grads(dS, lam.to(dt), A.to(dt), gam.to(dt))
        return grad_x, grad_xd, None, None, d_lam.to(lam.dtype), d_gam.to(gam.dtype), None, None, None, None, None


def _delta_outin(U: torch.Tensor, S: torch.Tensor, scaling: float, in_is_min: bool) -> torch.Tensor:
    delta = (U @ S).mul_(scaling)                            # (M, D)
    return delta if in_is_min else delta.T


def _use_merged(mode: str, same: bool, weight, dt, tokens: int, K: int) -> bool:
    """Form W + s·ΔW when there is no dropout (xd is x), the weight is already in the compute dtype (so the base
    product is unchanged), and forming ΔW (M·K·D) costs less than the factored path over the tokens (T·K·(M + D))."""
    if mode == "factored" or not same or weight.dtype != dt:
        return False
    if mode == "merged":
        return True
    out_f, in_f = weight.shape
    return out_f * in_f < tokens * (out_f + in_f)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` would run a linear layer on ``x`` in, or None outside autocast."""
    device = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def randlora_linear(x: torch.Tensor, xd: torch.Tensor, weight_outin: torch.Tensor, bias: torch.Tensor | None,
                    lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, U_B: torch.Tensor,
                    scaling: float, mode: str = "auto") -> torch.Tensor:
    """The memory-efficient RandLoRA linear: (..., in) → (..., out). See the module docstring for shapes.

    ``mode``: ``factored`` never forms ΔW; ``merged`` forms W + s·ΔW transiently (only without dropout and when the
    weight is in the compute dtype); ``auto`` picks the one with fewer FLOPs for this many tokens.

    Under ``torch.autocast`` (dtype d): the base product runs in d, as autocast runs ``nn.Linear``; the adapter
    path stays float32 (λ, γ are float32 parameters); the output is d. The casts are done here, before the autograd
    Function, which runs with autocast off, so its backward sees the dtypes its forward saw."""
    amp = autocast_dtype(x)
    same = xd is x
    if amp is None:
        return RandloraLinearFunction.apply(x, None if same else xd, weight_outin, bias, lam, gam, A, U_B, scaling,
                                            mode)
    x = x.to(amp)
    xd = None if same else xd.to(amp)
    weight_outin = weight_outin.to(amp)
    bias = None if bias is None else bias.to(amp)
    with torch.autocast(x.device.type, enabled=False):
        return RandloraLinearFunction.apply(x, xd, weight_outin, bias, lam, gam, A, U_B, scaling, mode)


def randlora_update(xd: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, U_B: torch.Tensor,
                    scaling: float, shape_outin: tuple[int, int]) -> torch.Tensor:
    """The adapter path alone, s · xd ΔWᵀ: (..., in) → (..., out) float32 (the factored path, ΔW never formed), for
    a base layer that must be called as a module (FSDP-wrapped, quantized) rather than read as a weight;
    ``shape_outin`` is the base's (out, in). Its oracle: :func:`randlora_linear_reference` with a zero weight."""
    args = (xd, None, None, None, lam, gam, A, U_B, scaling, "factored", tuple(shape_outin))
    if autocast_dtype(xd) is None:
        return RandloraLinearFunction.apply(*args)
    with torch.autocast(xd.device.type, enabled=False):
        return RandloraLinearFunction.apply(*args)


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
