"""Writing a dense-delta file: one safetensors tensor per base weight key, shaped like that weight, holding ΔW.

The format (its ``randlora_dense_delta`` metadata marker) and the read side are :mod:`randlora_io.sources.dense`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from ..checkpoint.stream import stream_write
from ..errors import NonFiniteError
from ..progress import progress_bar
from ..sources.dense import FORMAT_VERSION, METADATA_KEY
from ..sources.interface import DeltaSource


def write_dense(deltas: Mapping[str, torch.Tensor] | DeltaSource, path: str | os.PathLike,
                base_model: dict | None = None, progress: bool = False, overwrite: bool = True) -> None:
    """Write ``{weight key: ΔW}`` (float32, stored orientation) atomically. Given a ``DeltaSource``, each ΔW is
    computed when it is written, so memory holds about two layers' deltas rather than the whole file."""
    meta = {"format_version": FORMAT_VERSION}
    if base_model:
        meta["base_model"] = base_model
    if isinstance(deltas, DeltaSource):
        keys, shapes, produce = deltas.keys(), {k: deltas.stored_shape(k) for k in deltas.keys()}, deltas.delta
    else:
        keys, shapes, produce = list(deltas), {k: tuple(v.shape) for k, v in deltas.items()}, deltas.__getitem__
    bar = progress_bar(progress, total=len(keys), desc="delta", unit="layer")

    def produce_one(key: str) -> torch.Tensor:
        delta = produce(key)
        if not bool(torch.isfinite(delta).all()):  # finite but huge scales can overflow float32: never write Inf
            raise NonFiniteError(f"{path}: ΔW of {key!r} overflows float32 (NaN or Inf from finite scales); nothing "
                                 "was written")
        bar.update(1)
        return delta

    stream_write(path, list(keys), shapes, produce_one, {METADATA_KEY: json.dumps(meta)}, overwrite=overwrite)
    bar.close()
