"""The VeRA linear layer's forward and backward, and the naive reference beside it (its test oracle).

For a frozen base weight with (out, in) view W, bias b, trained vectors λ_b (out,) and λ_d (r,), and the layer's
slices of the shared bases A_s = A[:, :in] (r, in) and B_s = B[:out, :] (out, r) (PEFT 0.21.2's ``VeraLayer``)::

    y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (xd A_sᵀ)) B_sᵀ)  =  x Wᵀ + b + xd (λ_d ⊙ A_s)ᵀ (λ_b ⊙ B_s)ᵀ

with xd = dropout(x). The vectors are folded into the bases ((r, in) and (out, r) products), so the adapter path is
two skinny GEMMs over the tokens (T·r·(in + out)) and no (T, out) temporary is formed. Only xd is saved for
backward; xd A_sᵀ (T, r) is recomputed there:

    dL/dλ_b[o] = Σ_k B_s[o, k] λ_d[k] (gᵀ h)[o, k]      h = xd A_sᵀ (T, r), g = dL/dy (T, out)
    dL/dλ_d[k] = Σ_t h[t, k] (g (λ_b ⊙ B_s))[t, k]
    dL/dxd     = (g (λ_b ⊙ B_s)) (λ_d ⊙ A_s)

The adapter path runs in float32 (float64 when λ_b is float64, for gradcheck) whatever the base dtype, as PEFT's
``autocast_adapter_dtype`` does; the sum with the base output is rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .function import apply_adapter_linear, apply_adapter_only, input_grads


def _dtype(lambda_b: torch.Tensor) -> torch.dtype:
    return torch.float64 if lambda_b.dtype == torch.float64 else torch.float32


class VeraLinearFunction(torch.autograd.Function):
    """``apply(x, xd, weight_outin, bias, lambda_b, lambda_d, A_s, B_s, shape)``: x, xd (..., in) → (..., out).
    ``xd`` None means xd is x (no dropout). ``weight_outin`` (out, in) and ``bias`` are frozen (no gradient);
    A_s (r, in) and B_s (out, r) are constants. ``weight`` None: the adapter path alone (float32, ``shape`` gives
    (out, in))."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lambda_b, lambda_d, A_s, B_s, shape=None):
        out_f, in_f = weight.shape if weight is not None else shape
        dt = _dtype(lambda_b)
        same = xd is None
        xd = x if same else xd
        Ad = A_s.to(dt) * lambda_d.to(dt)[:, None]                   # (r, in)
        Bb = B_s.to(dt) * lambda_b.to(dt)[:, None]                   # (out, r)
        xf = xd.reshape(-1, in_f).to(dt)
        T = xf.shape[0]
        ctx.same, ctx.shape = same, (out_f, in_f)
        ctx.save_for_backward(xd, weight, lambda_b, lambda_d, A_s, B_s)
        left = xf @ Ad.T                                             # (T, r)
        if weight is None:
            return (left @ Bb.T).reshape(*x.shape[:-1], out_f)
        y = F.linear(x, weight, bias).reshape(T, out_f).to(dt).addmm_(left, Bb.T)
        return y.reshape(*x.shape[:-1], out_f).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, lambda_b, lambda_d, A_s, B_s = ctx.saved_tensors
        out_f, in_f = ctx.shape
        dt = _dtype(lambda_b)
        need = ctx.needs_input_grad
        need_x = need[0] if ctx.same else need[1]
        g = grad_out.reshape(-1, out_f).to(dt)
        A, B = A_s.to(dt), B_s.to(dt)
        lb, ld = lambda_b.to(dt), lambda_d.to(dt)
        gB = g @ (B * lb[:, None])                                   # (T, r)
        d_lb = d_ld = None
        if need[4] or need[5]:
            h = xd.reshape(-1, in_f).to(dt) @ A.T                    # (T, r), recomputed
            if need[4]:
                d_lb = ((g.T @ h) * B).mv(ld).to(lambda_b.dtype)     # (out,)
            if need[5]:
                d_ld = (h * gB).sum(0).to(lambda_d.dtype)           # (r,)
        grad_x = grad_xd = None
        base_grad = (grad_out @ weight.to(grad_out.dtype)) if need[0] and weight is not None else None
        if need_x:   # (T, r) @ (r, in), onto the base gradient when xd is x
            grad_x, grad_xd = input_grads(base_grad, gB, A * ld[:, None], xd, ctx.same, dt)
        else:
            grad_x = base_grad
        if not need[0]:
            grad_x = None
        return grad_x, grad_xd, None, None, d_lb, d_ld, None, None, None


def vera_linear(x: torch.Tensor, xd: torch.Tensor, weight_outin: torch.Tensor, bias: torch.Tensor | None,
                lambda_b: torch.Tensor, lambda_d: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor
                ) -> torch.Tensor:
    """The memory-efficient VeRA linear: (..., in) → (..., out); shapes in the module docstring. Under
    ``torch.autocast`` (dtype d) the base product runs in d, the adapter path in float32, the output is d."""
    return apply_adapter_linear(VeraLinearFunction, x, xd, weight_outin, bias, lambda_b, lambda_d, A_s, B_s)


def vera_update(xd: torch.Tensor, lambda_b: torch.Tensor, lambda_d: torch.Tensor, A_s: torch.Tensor,
                B_s: torch.Tensor, shape_outin: tuple[int, int]) -> torch.Tensor:
    """The adapter path alone, xd ΔWᵀ: (..., in) → (..., out) float32, for a base layer that must be called as a
    module (FSDP-wrapped); ``shape_outin`` is the base's (out, in)."""
    return apply_adapter_only(VeraLinearFunction, xd, lambda_b, lambda_d, A_s, B_s, tuple(shape_outin))


def vera_linear_reference(x: torch.Tensor, xd: torch.Tensor, weight_outin: torch.Tensor, bias: torch.Tensor | None,
                          lambda_b: torch.Tensor, lambda_d: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor
                          ) -> torch.Tensor:
    """PEFT 0.21.2's VeRA forward written plainly (``lambda_b * linear(lambda_d * linear(xd, A_s), B_s)``, plain
    autograd, float32 adapter path): the oracle for :func:`vera_linear`."""
    dt = _dtype(lambda_b)
    base = F.linear(x, weight_outin, bias)
    update = lambda_b.to(dt) * F.linear(lambda_d.to(dt) * F.linear(xd.to(dt), A_s.to(dt)), B_s.to(dt))
    return (base.to(dt) + update).to(x.dtype)
