"""Input kind ``dense``: dense-delta files, one safetensors tensor per base weight key, shaped like that weight,
holding ΔW (stored orientation).

The metadata entry ``randlora_dense_delta`` (a JSON object with ``format_version``) marks the file as a delta,
so it is never mistaken for a checkpoint. Writing one: :mod:`randlora_io.convert.dense`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..checkpoint.safetensors_io import SafetensorsHeader, load_tensors, read_header
from ..errors import NonFiniteError, SourceFormatError
from .interface import DeltaSource, OpenOptions, Probe, layer_row

KIND = "dense"

METADATA_KEY = "randlora_dense_delta"
FORMAT_VERSION = "1.0"


ORIENTATION_KEY = "fan_in_fan_out"  # in the metadata object: the keys whose weight is stored (in, out) (Conv1D)


def _metadata(path: str | os.PathLike, header: SafetensorsHeader) -> dict:
    """The file's ``randlora_dense_delta`` object, checked (version 1, a well-formed orientation list if any)."""
    if METADATA_KEY not in header.metadata:
        raise SourceFormatError(f"{path}: not a dense-delta file (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(header.metadata[METADATA_KEY])
        major = str(meta["format_version"]).split(".")[0]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise SourceFormatError(f"{path}: malformed '{METADATA_KEY}' metadata") from None
    if major != "1":
        raise SourceFormatError(f"{path}: dense-delta version {meta['format_version']} is not supported")
    conv = meta.get(ORIENTATION_KEY)
    if conv is not None and (not isinstance(conv, list) or not all(isinstance(k, str) and k in header.tensors
                                                                    for k in conv)):
        raise SourceFormatError(f"{path}: '{METADATA_KEY}.{ORIENTATION_KEY}' must list tensor keys of the file")
    return meta


def recorded_orientation(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> frozenset[str] | None:
    """The keys the file records as stored (in, out) (GPT-2 ``Conv1D``), or None when it records no orientation
    (files written before it was recorded, or without a base to tell it)."""
    header = read_header(path) if header is None else header
    conv = _metadata(path, header).get(ORIENTATION_KEY)
    return frozenset(conv) if conv is not None else None


def read_dense(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """``{weight key: ΔW}`` in each weight's stored shape; refuses files without the delta marker or with NaN/Inf.
    ``header``: the file's safetensors header when already read (detection), so it is not parsed again."""
    header = read_header(path) if header is None else header
    _metadata(path, header)
    tensors = load_tensors(path, header=header)
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


class DenseSource(DeltaSource):
    """A dense-delta file's ``{weight key: ΔW}`` (any float dtype on disk, float32 out); ``fans``: which keys are
    stored (in, out) (GPT-2 Conv1D), as the file records it or the base tells, False where unknown; ``recorded``:
    whether the file records it (``fan_in_fan_out`` in its metadata)."""

    kind = KIND

    def __init__(self, deltas: dict[str, torch.Tensor], path: str, fans: Mapping[str, bool] | None = None,
                 recorded: bool = False):
        self.deltas, self.path, self.fans, self.recorded = deltas, path, dict(fans or {}), recorded
        self.told = False  # set when the base told the orientation (convert --base)

    @property
    def orientation_known(self) -> bool:
        return self.recorded or self.told

    def keys(self) -> list[str]:
        return list(self.deltas)

    def stored_shape(self, key: str) -> tuple[int, int]:
        shape = self.deltas[key].shape
        return (shape[0], shape[1])

    def fan_in_fan_out(self, key: str) -> bool:
        return self.fans.get(key, False)

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.deltas[key].to(device, torch.float32)


def matches(probe: Probe) -> bool:
    """A safetensors file whose metadata marks it as a dense delta."""
    return probe.path.is_file() and METADATA_KEY in probe.header.metadata


def load(probe: Probe, options: OpenOptions) -> DenseSource:
    """The file's deltas, checked (2-D float, non-empty, finite), with the orientation it records (else the caller
    tells it: convert, keymap)."""
    deltas = read_dense(probe.path, probe.header)
    conv = recorded_orientation(probe.path, probe.header)
    return DenseSource(deltas, str(probe.path), {k: k in conv for k in deltas} if conv is not None else None,
                       recorded=conv is not None)


def describe(probe: Probe) -> dict[str, Any]:
    deltas = read_dense(probe.path, probe.header)
    return {"layers": [layer_row(k, d.shape, min(d.shape), None, [d]) for k, d in deltas.items()]}


def validate(probe: Probe) -> str:
    return f"{KIND}, {len(read_dense(probe.path, probe.header))} layers"
