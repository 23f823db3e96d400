"""DoRA's merge (PEFT LoRA with ``use_dora=True``): ``W' = m · (W + ΔW) / ‖W + ΔW‖``, per output feature.

PEFT 0.21.2 (``tuners/lora/dora.py`` ``DoraLinearLayer.get_weight_norm``, ``variants.py`` ``DoraLinearVariant.merge_*``):
with W and ΔW in (out, in) orientation, ``‖·‖`` is the L2 norm of each row (dim 1: over the inputs of one output
feature), m (out,) the saved ``lora_magnitude_vector``; a ``fan_in_fan_out`` layer (GPT-2 ``Conv1D``, stored (in, out))
is transposed to (out, in) for the norm and the factor is applied per column of the stored weight. The norm is
taken of the weight the adapter is merged into (the base, or the base plus adapters merged before it).

Not additive: ``W'`` depends on W, so a DoRA adapter can be merged but not converted to a ΔW.
"""

from __future__ import annotations

import torch


def dora_merge_(weight32: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> None:
    """In place, float32: ``weight32 ← m · (W + ΔW) / ‖W + ΔW‖``. ``weight32`` and ``delta`` in the weight's stored
    orientation ((out, in), or (in, out) when ``fan_in_fan_out``); ``magnitude`` (out,). Oracle:
    :func:`dora_reference`."""
    weight32.add_(delta.to(weight32.device, torch.float32))
    m = magnitude.to(weight32.device, torch.float32)
    if fan_in_fan_out:  # (in, out): one output feature per column
        weight32.mul_((m / torch.linalg.vector_norm(weight32, dim=0))[None, :])
    else:
        weight32.mul_((m / torch.linalg.vector_norm(weight32, dim=1))[:, None])


def dora_reference(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                   fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's steps literally, in float64 (the test oracle): transpose to (out, in), row norms of W + ΔW,
    factor m / norm as a column vector, transposed back, times (W + ΔW). Returns the stored orientation."""
    w, d, m = weight.double(), delta.double(), magnitude.double()
    w_oi = w.T if fan_in_fan_out else w
    d_oi = d.T if fan_in_fan_out else d
    norm = torch.linalg.norm(w_oi + d_oi, dim=1)
    factor = (m / norm).view(-1, 1)
    factor = factor.T if fan_in_fan_out else factor
    return factor * (w + d)
