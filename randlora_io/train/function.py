"""The RandLoRA linear layer's forward and backward, and the naive reference beside it (its test oracle).

For a frozen base weight with (out, in) view W, bias b, D = min(out, in), M = max(out, in), scales λ (r, n) and
γ (n, D), the layer's shared-basis slices A (r, D) and U_B = B[:M, :r·n] (M, K = r·n), and S = λ ⊗ A ⊗ γ (K, D)::

    y = x Wᵀ + b + s · xd ΔWᵀ,     ΔW = U_B S (out = M)   or   (U_B S)ᵀ (out = D)

with xd = dropout(x). Only xd is saved for backward (no (T, K) intermediate, no S, no ΔW, no per-base copies): S is
rebuilt from λ, γ, A in backward (an elementwise product; the scaling s is folded into λ there, so no pass over a
(T, out) or (M, D) tensor is spent on it). Forward and backward each pick, by FLOP count at this many tokens T, how
to compute (:class:`Plan`):

- forward: ``merged`` forms W + s·ΔW transiently (one addmm, M·K·D) and runs one GEMM over the tokens; ``factored``
  adds two skinny GEMMs over the tokens (T·K·(M + D)), ΔW never formed.
- backward, the input gradient: ``merged`` rebuilds W + s·ΔW (M·K·D) and multiplies once; ``factored`` adds two
  skinny GEMMs to the base's gradient (T·K·(M + D)).
- backward, dL/dS (K, D): ``gram`` U_Bᵀ (gᵀ x) (T·M·D + M·K·D); ``projected`` (g U_B)ᵀ x or (x U_B)ᵀ g (T·K·(M + D),
  g U_B shared with the factored input gradient when in ≤ out).

``merged`` is possible only without dropout (xd is x) and with the weight in the compute dtype (so the base product
is unchanged). The adapter path runs in float32 (float64 when λ is float64, for gradcheck) whatever the base dtype,
as PEFT's ``autocast_adapter_dtype`` does; the sum is rounded once to x's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..format.delta import scaled_A


class Plan(NamedTuple):
    """How one call computes: ``forward`` 'merged' | 'factored'; ``grad_x`` 'merged' | 'factored' | None (no input
    gradient wanted); ``dS`` 'gram' | 'projected' | None (no λ/γ gradient wanted). See the module docstring."""
    forward: str
    grad_x: str | None
    dS: str | None


def _compute_dtype(lam: torch.Tensor) -> torch.dtype:
    return torch.float64 if lam.dtype == torch.float64 else torch.float32


def _scaled_S(lam: torch.Tensor, A: torch.Tensor, gam: torch.Tensor, scaling: float, dt: torch.dtype
              ) -> torch.Tensor:
    """s · S: (r·n, D) in ``dt``, the scaling folded into λ (r, n) before the (r, n, D) product."""
    return scaled_A(lam.to(dt) * scaling, A, gam, dt)


def _scale_grads(dS: torch.Tensor, lam: torch.Tensor, A: torch.Tensor, gam: torch.Tensor, scaling: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """From dL/d(s·S) (K, D), a temporary this overwrites, to dL/dλ (r, n) and dL/dγ (n, D), with
    s·S[i·n + b, j] = s·λ[i, b]·A[i, j]·γ[b, j]; one (r, n, D) temporary besides dS."""
    r, n = lam.shape
    P = dS.reshape(r, n, -1).mul_(A[:, None, :])                  # (r, n, D): dS[i·n + b, j]·A[i, j]
    d_lam = (P * gam[None, :, :]).sum(-1).mul_(scaling)            # (r, n)
    d_gam = P.mul_(lam[:, :, None]).sum(0).mul_(scaling)           # (n, D)
    return d_lam, d_gam


def forward_merged(T: int, out_f: int, in_f: int) -> bool:
    """Forming W + s·ΔW (M·K·D) costs less than the factored path over T tokens (T·K·(M + D))."""
    return out_f * in_f < T * (out_f + in_f)


def backward_cost(plan_grad_x: str | None, plan_dS: str | None, T: int, out_f: int, in_f: int, K: int) -> int:
    """Multiply-adds of the backward beyond the base gradient g W (T·M·D, paid by every plan or by none)."""
    M, D = max(out_f, in_f), min(out_f, in_f)
    cost = M * K * D if plan_grad_x == "merged" else T * K * (M + D) if plan_grad_x == "factored" else 0
    if plan_dS == "gram":
        cost += T * M * D + M * K * D
    elif plan_dS == "projected":  # g U_B (T·M·K) is the factored input gradient's first product when in ≤ out
        cost += T * K * D + (0 if plan_grad_x == "factored" and in_f <= out_f else T * M * K)
    return cost


def choose_backward(mode: str | Plan, can_merge: bool, need_x: bool, need_scales: bool, T: int, out_f: int,
                    in_f: int, K: int) -> tuple[str | None, str | None]:
    """The backward's (grad_x, dS) plan: forced by ``mode`` where possible, else the fewest multiply-adds."""
    xs = ((["merged"] if can_merge else []) + ["factored"]) if need_x else [None]
    ds = ["gram", "projected"] if need_scales else [None]
    if isinstance(mode, Plan):
        xs = [mode.grad_x] if mode.grad_x in xs else xs
        ds = [mode.dS] if mode.dS in ds else ds
    elif mode == "merged" and can_merge:      # W + s·ΔW for the input gradient, dS = U_Bᵀ (gᵀ x)
        xs, ds = xs[:1], ds[:1]
    elif mode in ("merged", "factored"):      # ΔW never formed; dS the cheaper way
        xs = xs[-1:]
    best, best_cost = (xs[0], ds[0]), backward_cost(xs[0], ds[0], T, out_f, in_f, K)
    for x in xs:  # a plain loop (torch.compile traces it; min(key=...) would break its graph)
        for d in ds:
            cost = backward_cost(x, d, T, out_f, in_f, K)
            if cost < best_cost:
                best, best_cost = (x, d), cost
    return best


class RandloraLinearFunction(torch.autograd.Function):
    """``apply(x, xd, weight_outin, bias, lam, gam, A, U_B, scaling, mode, shape)``; x and xd (..., in), returns
    (..., out). ``xd`` None means xd is x (no dropout): one tensor is never passed twice, which torch.compile cannot
    trace. ``mode``: 'auto', 'merged', 'factored' or a :class:`Plan` (see :func:`randlora_linear`).

    ``weight_outin`` is the frozen base weight viewed as (out, in); A (r, D) and U_B (M, K) are the layer's slices of
    the shared bases (no gradient). The base weight and bias get no gradient (they are frozen). ``weight`` None: the
    adapter path alone (float32, ``shape`` gives (out, in))."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lam, gam, A, U_B, scaling: float, mode: str | Plan = "auto",
                shape: tuple[int, int] | None = None):
        out_f, in_f = weight.shape if weight is not None else shape
        dt = _compute_dtype(lam)
        same = xd is None
        xd = x if same else xd
        S = _scaled_S(lam, A, gam, scaling, dt)                     # (K, D), s folded in
        U = U_B.to(dt)
        xf = xd.reshape(-1, in_f).to(dt)
        T = xf.shape[0]
        can_merge = same and weight is not None and weight.dtype == dt
        if isinstance(mode, Plan):
            merged = can_merge and mode.forward == "merged"
        else:
            merged = can_merge and mode != "factored" and (mode == "merged" or forward_merged(T, out_f, in_f))
        ctx.mode, ctx.can_merge, ctx.scaling, ctx.same, ctx.shape = mode, can_merge, scaling, same, (out_f, in_f)
        ctx.save_for_backward(xd, weight, lam, gam, A, U_B)
        in_is_min = in_f <= out_f
        if merged:  # W + s·ΔW formed transiently: one GEMM over the tokens instead of three
            return F.linear(x, _merged_weight(weight, U, S, in_is_min), bias)
        # D = in: (xd (sS)ᵀ) U_Bᵀ;  D = out: (xd U_B) (sS). The last product accumulates onto the base output (one
        # pass over (T, out), no temporary)
        left, right = (xf @ S.T, U.T) if in_is_min else (xf @ U, S)
        if weight is None:  # the adapter path alone, float32
            return (left @ right).reshape(*x.shape[:-1], out_f)
        y = F.linear(x, weight, bias).reshape(T, out_f).to(dt).addmm_(left, right)
        return y.reshape(*x.shape[:-1], out_f).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, lam, gam, A, U_B = ctx.saved_tensors
        out_f, in_f = ctx.shape
        dt = _compute_dtype(lam)
        g = grad_out.reshape(-1, out_f)
        gf = g.to(dt)
        xf = xd.reshape(-1, in_f).to(dt)
        U = U_B.to(dt)
        in_is_min = in_f <= out_f
        T, K = xf.shape[0], U.shape[1]
        need = ctx.needs_input_grad
        need_x = need[0] if ctx.same else need[1]   # the gradient the adapter path contributes to
        need_scales = need[4] or need[5]
        how_x, how_dS = choose_backward(ctx.mode, ctx.can_merge, need_x, need_scales, T, out_f, in_f, K)
        S = _scaled_S(lam, A, gam, ctx.scaling, dt) if how_x is not None else None
        grad_x = grad_xd = gU = None
        if how_x == "merged":       # x and xd are the same tensor here: one gradient through W + s·ΔW
            grad_x = grad_out @ _merged_weight(weight, U, S, in_is_min)
        else:
            base_grad = (grad_out @ weight.to(grad_out.dtype)) if need[0] and weight is not None else None
            if how_x == "factored":
                if in_is_min:
                    gU = gf @ U                                           # (T, K)
                    left, right = gU, S                                   # (T, K) @ (K, in)
                else:
                    left, right = gf @ S.T, U.T                           # (T, K) @ (K, in)
                grad_x, grad_xd = input_grads(base_grad, left, right, xd, ctx.same, dt)
            else:
                grad_x = base_grad
        d_lam = d_gam = None
        if how_dS is not None:
            if how_dS == "gram":
                G = gf.T @ xf if in_is_min else xf.T @ gf                 # (M, D)
                dS = U.T @ G                                              # (K, D)
            elif in_is_min:
                dS = (gf @ U if gU is None else gU).T @ xf
            else:
                dS = (xf @ U).T @ gf
            d_lam, d_gam = _scale_grads(dS, lam.to(dt), A.to(dt), gam.to(dt), ctx.scaling)
            d_lam, d_gam = d_lam.to(lam.dtype), d_gam.to(gam.dtype)
        if not need[0]:
            grad_x = None
        return grad_x, grad_xd, None, None, d_lam, d_gam, None, None, None, None, None


def input_grads(base_grad: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor, xd: torch.Tensor,
                same: bool, dt: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_xd) when the adapter path's input gradient is ``left @ right`` ((T, k) @ (k, in), in ``dt``):
    with xd the same tensor as x it is accumulated onto the base gradient (T, in) and rounded once (one gradient,
    for x); else the base's goes to x and the adapter's to xd (dropout's input)."""
    if same and base_grad is not None:
        acc = base_grad.reshape(-1, right.shape[1]).to(dt).addmm_(left, right)
    else:
        acc = left @ right
    adapter_grad = acc.reshape(xd.shape).to(xd.dtype)
    return (adapter_grad, None) if same else (base_grad, adapter_grad)


def _merged_weight(weight: torch.Tensor, U: torch.Tensor, S: torch.Tensor, in_is_min: bool) -> torch.Tensor:
    """W + U_B (sS) in W's (out, in) orientation, one addmm (no ΔW temporary)."""
    return torch.addmm(weight, U, S) if in_is_min else torch.addmm(weight, S.T, U.T)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` would run a linear layer on ``x`` in, or None outside autocast."""
    device = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def randlora_linear(x: torch.Tensor, xd: torch.Tensor, weight_outin: torch.Tensor, bias: torch.Tensor | None,
                    lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, U_B: torch.Tensor,
                    scaling: float, mode: str | Plan = "auto") -> torch.Tensor:
    """The memory-efficient RandLoRA linear: (..., in) → (..., out). See the module docstring for shapes.

    ``mode``: ``factored`` never forms ΔW; ``merged`` forms W + s·ΔW transiently in forward and backward (only
    without dropout and when the weight is in the compute dtype); ``auto`` picks, for the forward and the backward
    separately, the plan with the fewest multiply-adds for this many tokens; a :class:`Plan` forces one (where it is
    possible; for tests).

    Under ``torch.autocast`` (dtype d): the base product runs in d, as autocast runs ``nn.Linear``; the adapter
    path stays float32 (λ, γ are float32 parameters); the output is d. The casts are done here, before the autograd
    Function, which runs with autocast off, so its backward sees the dtypes its forward saw."""
    return apply_adapter_linear(RandloraLinearFunction, x, xd, weight_outin, bias, lam, gam, A, U_B, scaling, mode)


def apply_adapter_linear(function: type[torch.autograd.Function], x: torch.Tensor, xd: torch.Tensor,
                         weight_outin: torch.Tensor, bias: torch.Tensor | None, *rest):
    """``function.apply(x, xd or None, weight_outin, bias, *rest)`` with autocast resolved first: ``xd is x`` is
    passed as None (one tensor never passed twice); under ``torch.autocast`` (dtype d) x, xd, the weight and bias
    are cast to d and the Function runs with autocast off, so its backward sees the dtypes its forward saw."""
    amp = autocast_dtype(x)
    same = xd is x
    if amp is None:
        return function.apply(x, None if same else xd, weight_outin, bias, *rest)
    x = x.to(amp)
    xd = None if same else xd.to(amp)
    weight_outin = weight_outin.to(amp)
    bias = None if bias is None else bias.to(amp)
    with torch.autocast(x.device.type, enabled=False):
        return function.apply(x, xd, weight_outin, bias, *rest)


def randlora_update(xd: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, U_B: torch.Tensor,
                    scaling: float, shape_outin: tuple[int, int]) -> torch.Tensor:
    """The adapter path alone, s · xd ΔWᵀ: (..., in) → (..., out) float32 (the factored path, ΔW never formed), for
    a base layer that must be called as a module (FSDP-wrapped, quantized) rather than read as a weight;
    ``shape_outin`` is the base's (out, in). Its oracle: :func:`randlora_linear_reference` with a zero weight."""
    return apply_adapter_only(RandloraLinearFunction, xd, lam, gam, A, U_B, scaling, "factored", tuple(shape_outin))


def apply_adapter_only(function: type[torch.autograd.Function], xd: torch.Tensor, *rest):
    """``function.apply(xd, None, None, None, *rest)`` (no base weight: the adapter path alone, float32) with
    autocast off inside the Function."""
    if autocast_dtype(xd) is None:
        return function.apply(xd, None, None, None, *rest)
    with torch.autocast(xd.device.type, enabled=False):
        return function.apply(xd, None, None, None, *rest)


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
