"""Dense-delta files: one safetensors tensor per base weight key, shaped like that weight, holding ΔW.

The metadata entry ``randlora_dense_delta`` (a JSON object with ``format_version``) marks the file as a delta,
so it is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from ..errors import NonFiniteError, SourceFormatError
from ..progress import progress_bar
from ..checkpoint.safetensors_io import has_metadata_key, load_tensors, read_header
from ..checkpoint.stream import stream_write

METADATA_KEY = "randlora_dense_delta"
FORMAT_VERSION = "1.0"


@runtime_checkable
class DeltaProvider(Protocol):
    """What :func:`write_dense` needs of an adapter (``sources.DeltaSource`` is one): its keys, each weight's stored
    shape, and ΔW on demand. A protocol, so this module does not import ``sources`` (which imports it)."""

    def keys(self) -> list[str]: ...

    def stored_shape(self, key: str) -> tuple[int, int]: ...

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor: ...


def is_dense_file(path: str | os.PathLike) -> bool:
    return has_metadata_key(path, METADATA_KEY)


def read_dense(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{weight key: ΔW}`` in each weight's stored shape; refuses files without the delta marker or with NaN/Inf."""
    header = read_header(path)
    if METADATA_KEY not in header.metadata:
        raise SourceFormatError(f"{path}: not a dense-delta file (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(header.metadata[METADATA_KEY])
        major = str(meta["format_version"]).split(".")[0]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise SourceFormatError(f"{path}: malformed '{METADATA_KEY}' metadata") from None
    if major != "1":
        raise SourceFormatError(f"{path}: dense-delta version {meta['format_version']} is not supported")
    tensors = load_tensors(path)
    for key, t in tensors.items():
        if t.ndim != 2 or t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise SourceFormatError(f"{path}: delta {key!r} must be a 2-D float32/bfloat16/float16/float64 tensor, got "
                                    f"{t.dtype} {list(t.shape)}")
        if t.numel() == 0:
            raise SourceFormatError(f"{path}: delta {key!r} has an empty shape {list(t.shape)}; a layer has at least "
                                    "one row and one column")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{path}: delta {key!r} contains NaN or Inf")
    return tensors


def write_dense(deltas: Mapping[str, torch.Tensor] | DeltaProvider, path: str | os.PathLike,
                base_model: dict | None = None, progress: bool = False, overwrite: bool = True) -> None:
    """Write ``{weight key: ΔW}`` (float32, stored orientation) atomically. Given a ``DeltaSource``, each ΔW is
    computed when it is written, so memory holds about two layers' deltas rather than the whole file."""
    meta = {"format_version": FORMAT_VERSION}
    if base_model:
        meta["base_model"] = base_model
    if not isinstance(deltas, Mapping) and isinstance(deltas, DeltaProvider):
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
