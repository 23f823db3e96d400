"""One adapter's contribution to one base weight during a merge: replace it, rescale it (DoRA), or add ΔW.

``LayerMerger`` (and ``merge_into_state_dict``) call :func:`apply_term_` once per (adapter, weight); the additive
case is handed back to the caller's ``add`` (``merge.layer.add_delta_``, with its fast paths) on the unwrapped
source and its own key, so a :class:`~randlora_io.keymap.CheckpointView` costs nothing on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dora import dora_merge_
from ..errors import SourceFormatError
from ..sources.keymap import CheckpointView
from ..sources.interface import DeltaSource


def apply_term_(weight32: torch.Tensor, source: DeltaSource, key: str, alpha: float,
                add: Callable[[DeltaSource, str], None]) -> None:
    """``weight32`` (float32, stored orientation, the base weight ``key`` with any earlier adapters merged) ← what
    merging ``alpha``·``source`` into it gives, as PEFT's ``merge_and_unload`` would:

    - a tensor the adapter replaces (PEFT's modules_to_save, trained biases): that tensor;
    - a DoRA layer: ``m · (W + ΔW) / ‖W + ΔW‖`` (:mod:`randlora_io.dora`);
    - otherwise ``add(inner source, inner key)``, which adds ``alpha · ΔW`` in place.

    The first two are not linear in the adapter: only ``alpha == 1`` (no ``--weight``, no unmerge) is accepted."""
    new = source.replacements.get(key)
    inner, inner_key = (source.inner, source.inner_key(key)) if isinstance(source, CheckpointView) else (source, key)
    if new is not None:
        _require_unit_weight(source, key, alpha, "replaces this tensor with its trained copy")
        if tuple(new.shape) != tuple(weight32.shape):
            raise SourceFormatError(f"{source.path}: its trained {key!r} is {list(new.shape)} but the base tensor is "
                                    f"{list(weight32.shape)}")
        weight32.copy_(new)
        return
    magnitude = inner.dora_magnitude(inner_key)
    if magnitude is not None:
        _require_unit_weight(source, key, alpha, "is a DoRA layer (W' = m·(W + ΔW)/‖W + ΔW‖)")
        dora_merge_(weight32, inner.dora_delta(inner_key, weight32.device), magnitude,
                    inner.fan_in_fan_out(inner_key))
        return
    add(inner, inner_key)


def _require_unit_weight(source: DeltaSource, key: str, alpha: float, what: str) -> None:
    if alpha != 1.0:
        raise SourceFormatError(f"{source.path}: {key!r} {what}, which cannot be scaled by a weight or unmerged "
                                f"(weight {alpha:g}); merge this adapter with weight 1")
