"""The torch reference ΔW (SPEC §3): the oracle every fast path (CPU merge, Triton kernel) is tested against.

For a layer with D = min(out, in), M = max(out, in), n = ceil(D / r), scales λ (r, n) and γ (n, D)::

    S[k, j]   = λ[k // n, k % n] · A[k // n, j] · γ[k % n, j]      k < r·n, j < D       (r·n, D)
    ΔW_MD     = scaling · B[:M, :r·n] @ S                                                (M, D)
    ΔW_outin  = ΔW_MD if in_features == D else ΔW_MDᵀ                                     (out, in)
    ΔW_stored = ΔW_outinᵀ if fan_in_fan_out else ΔW_outin                                 stored shape

All arithmetic is float32. This is PEFT 0.21.2's (permuted) pairing of bases and scales.
"""

from __future__ import annotations

import torch

from .spec import LayerSpec


def scaled_A(lam: torch.Tensor, A: torch.Tensor, gam: torch.Tensor, dtype: torch.dtype = torch.float32,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """S = λ ⊗ A ⊗ γ flattened: λ (r, n), A (r, D), γ (n, D) → (r·n, D) in ``dtype``, row k = i·n + b.
    ``out``: an (r, n, D) tensor of ``dtype`` to compute into (no allocation); the result is its (r·n, D) view."""
    r, n = lam.shape
    lam, A, gam = lam.to(dtype), A.to(dtype), gam.to(dtype)
    if out is None:
        S = (lam[:, :, None] * A[:, None, :]).mul_(gam[None, :, :])     # (λ·A)·γ, one temporary
    else:
        S = torch.mul(lam[:, :, None], A[:, None, :], out=out).mul_(gam[None, :, :])
    return S.reshape(r * n, A.shape[1])


def delta_md(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW in (M, D) orientation, float32. A is the layer's (r, D) slice, B its (M, r·n) slice."""
    return (B.float() @ scaled_A(lam, A, gam)) * scaling


def to_stored_orientation(update_md: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """(M, D) → the weight's stored orientation (out, in), or (in, out) when ``fan_in_fan_out``."""
    out = update_md if layer.in_features == layer.min_dim else update_md.T
    return out.T if layer.fan_in_fan_out else out


def reference_delta(layer: LayerSpec, lam: torch.Tensor, gam: torch.Tensor, A_full: torch.Tensor,
                    B_full: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW for one layer in its stored shape, float32, from the model-wide bases A (r, ≥D) and B (≥M, ≥r·n)."""
    r = lam.shape[0]
    A = A_full[:, : layer.min_dim]
    B = B_full[: layer.max_dim, : r * layer.num_bases]
    return to_stored_orientation(delta_md(lam, gam, A, B, scaling), layer).contiguous()
