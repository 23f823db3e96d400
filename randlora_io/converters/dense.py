"""Dense-delta files: one safetensors tensor per base weight key, shaped like that weight, holding ΔW.

The metadata entry ``randlora_dense_delta`` (a JSON object with ``format_version``) marks the file as a delta,
so it is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import NonFiniteError, SourceFormatError
from ..safetensors_io import has_metadata_key, load_tensors, read_header, save_safetensors

METADATA_KEY = "randlora_dense_delta"
FORMAT_VERSION = "1.0"


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
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SourceFormatError(f"{path}: malformed '{METADATA_KEY}' metadata") from None
    if major != "1":
        raise SourceFormatError(f"{path}: dense-delta version {meta['format_version']} is not supported")
    tensors = load_tensors(path)
    for key, t in tensors.items():
        if t.ndim != 2 or not t.is_floating_point():
            raise SourceFormatError(f"{path}: delta {key!r} must be a 2-D floating tensor, got {t.dtype} {list(t.shape)}")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{path}: delta {key!r} contains NaN or Inf")
    return tensors


def write_dense(deltas: dict[str, torch.Tensor], path: str | os.PathLike, base_model: dict | None = None) -> None:
    """Write ``{weight key: ΔW}`` (float32, stored orientation) atomically."""
    meta = {"format_version": FORMAT_VERSION}
    if base_model:
        meta["base_model"] = base_model
    save_safetensors({k: v.float() for k, v in deltas.items()}, path, metadata={METADATA_KEY: json.dumps(meta)})
