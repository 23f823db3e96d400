"""``merge --to-delta``: the composed update of several inputs written as one dense-delta file.

The update is what ``merge`` would add to BASE (any composition method, task arithmetic included), ΔW per weight
key in float32 and the weight's stored orientation, computed one key at a time as it is written
(:class:`randlora_io.merge.composition.ComposedSource`); ``convert OUT --to peft-lora --rank k`` then makes one
servable LoRA of it.
"""

from __future__ import annotations

import os

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
    write_dense(composed, out, base_model={"composed_from": [str(s.path) for s in composed.sources],
                                           "method": composed.composition.method},
                progress=progress, overwrite=bool(options.get("overwrite")))
    return composed.composition, composed.stats
