"""Writing a dense-delta file: one safetensors tensor per base weight key, shaped like that weight, holding ΔW.

The format (its ``randlora_dense_delta`` metadata marker) and the read side are :mod:`randlora_io.sources.dense`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping

import torch

from ..checkpoint.stream import stream_write
from ..errors import NonFiniteError
from ..progress import progress_bar
from ..sources.dense import FORMAT_VERSION, METADATA_KEY, ORIENTATION_KEY
from ..sources.interface import DeltaSource, knows_orientation


def write_dense(deltas: Mapping[str, torch.Tensor] | DeltaSource, path: str | os.PathLike,
                base_model: dict | None = None, progress: bool = False, overwrite: bool = True,
                conv1d: Collection[str] | None = None) -> None:
    """Write ``{weight key: ΔW}`` (float32, stored orientation) atomically. Given a ``DeltaSource``, each ΔW is
    computed when it is written, so memory holds about two layers' deltas rather than the whole file.

    ``conv1d``: the keys whose weight is stored (in, out) (GPT-2 ``Conv1D``), recorded in the metadata so a later
    ``convert --to peft-lora`` needs no base to orient them; for a source it defaults to the keys it says are
    (``fan_in_fan_out``). None with a mapping: nothing recorded (a reader then needs the base)."""
    meta = {"format_version": FORMAT_VERSION}
    if base_model:
        meta["base_model"] = base_model
    if isinstance(deltas, DeltaSource):
        keys, shapes, produce = deltas.keys(), {k: deltas.stored_shape(k) for k in deltas.keys()}, deltas.delta
        if conv1d is None and knows_orientation(deltas):
            conv1d = [k for k in keys if deltas.fan_in_fan_out(k)]
    else:
        keys, shapes, produce = list(deltas), {k: tuple(v.shape) for k, v in deltas.items()}, deltas.__getitem__
    if conv1d is not None:
        meta[ORIENTATION_KEY] = sorted(k for k in keys if k in set(conv1d))
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
