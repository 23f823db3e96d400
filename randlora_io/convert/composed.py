"""``merge --to-delta``: the composed update of several inputs written as one dense-delta file.

The update is what ``merge`` would add to BASE (any composition method, task arithmetic included), ΔW per weight
key in float32 and the weight's stored orientation, computed one key at a time as it is written
(:class:`randlora_io.merge.composition.ComposedSource`); ``convert OUT --to peft-lora --rank k`` then makes one
servable LoRA of it.
"""

from __future__ import annotations

import os

from ..checkpoint.base_model import base_info_from_checkpoint, layer_orientations
from ..checkpoint.directory import open_checkpoint
from ..errors import ConversionError, LayerTypeError
from ..merge.compose import ComposeStats
from ..merge.composition import Composition
from ..merge.plan import open_composed
from ..sources.interface import DeltaSource
from .dense import write_dense


def merge_to_delta(base: str | os.PathLike, adapters: list[str | os.PathLike | DeltaSource],
                   out: str | os.PathLike, *, progress: bool = False,
                   **options) -> tuple[Composition, ComposeStats]:
    """Write the composed update of ``adapters`` on ``base`` to the dense-delta file ``out`` (atomically; nothing
    is written if a check fails). ``options``: :func:`randlora_io.merge.plan.open_composed`'s (weights, method,
    density, lambda_, normalize, seed, overwrite, ...). Returns the composition and what it kept and dropped."""
    composed = open_composed(base, adapters, out, **options)
    for key in composed.keys():
        shape = tuple(composed.stored_shape(key))
        if len(shape) != 2:
            touching = next(s for s in composed.sources if key in set(s.keys()))
            raise ConversionError(
                f"{touching.path}: changes {key!r} {list(shape)}, not a 2-D weight (a fine-tuned checkpoint's norms "
                "and biases): a dense delta holds weight deltas only and LoRA has no form for it; merge into BASE "
                "instead of --to-delta")
    write_dense(composed, out, base_model={"composed_from": [str(s.path) for s in composed.sources],
                                           "method": composed.composition.method},
                progress=progress, overwrite=bool(options.get("overwrite")), conv1d=_conv1d_keys(base, composed))
    return composed.composition, composed.stats


def _conv1d_keys(base: str | os.PathLike, composed: DeltaSource) -> list[str] | None:
    """The composed keys whose weight BASE stores (in, out) (GPT-2 ``Conv1D``), as its config.json tells; None when
    it cannot tell (the delta file then records no orientation, and converting it needs --base)."""
    info = base_info_from_checkpoint(open_checkpoint(base))
    try:
        fans = layer_orientations(composed.keys(), info, False, str(base))
    except LayerTypeError:
        return None
    return [key for key, fan in fans.items() if fan]
