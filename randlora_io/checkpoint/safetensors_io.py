"""Strict reading of ``.safetensors`` files and atomic writing of files and directories.

The safetensors layout: 8 bytes little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON (the header), then
the data buffer. We validate the header ourselves before handing the file to ``safetensors`` (which mmaps it),
so that hostile files (huge declared lengths, overlapping or gapped offsets, trailing bytes, duplicate JSON keys,
non-string metadata) are refused with one clear line instead of a crash or a silent misread.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_file
from ..errors import SafetensorsFormatError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (SPEC §1): safe_open refuses one byte more
MAX_METADATA_BYTES = 16 * 1024 * 1024

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header: dtype string (e.g. ``"F32"``), shape, byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors by name, the string metadata, and the data buffer's offset."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise SafetensorsFormatError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file at ``path`` without reading tensor data.

    Raises :class:`SafetensorsFormatError` naming the file and the defect.
    """
    path = Path(path)
    try:
        return _read_header(path)
    except SafetensorsFormatError as exc:
        raise SafetensorsFormatError(f"{path}: not a valid safetensors file: {exc}") from None
    except OSError as exc:
        raise SafetensorsFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_header(path: Path) -> SafetensorsHeader:
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"truncated: {file_size} bytes, less than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"declared header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > file_size:
            raise SafetensorsFormatError(
                f"truncated: header declares {header_len} bytes but the file has only {file_size - 8} after the prefix"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise SafetensorsFormatError("header is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SafetensorsFormatError(f"header is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except RecursionError:
        raise SafetensorsFormatError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
        raise SafetensorsFormatError(f"__metadata__ exceeds {MAX_METADATA_BYTES} bytes")

    data_offset = 8 + header_len
    data_len = file_size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry)
    spans = sorted((t.begin, t.end, n) for n, t in tensors.items())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise SafetensorsFormatError(f"tensor {name!r} {what} (offsets must tile the data buffer)")
        cursor = end
    if cursor > data_len:
        raise SafetensorsFormatError(f"truncated: tensors need {cursor} data bytes but the file holds {data_len}")
    if cursor < data_len:
        raise SafetensorsFormatError(f"{data_len - cursor} trailing bytes after the last tensor")
    return SafetensorsHeader(tensors=tensors, metadata=dict(metadata), data_offset=data_offset)


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SafetensorsFormatError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsFormatError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} "
            f"(expected {numel * DTYPE_SIZES[dtype]})"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def load_tensors(path: str | os.PathLike, names: list[str] | None = None, *,
                 header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """Validate ``path`` and load the named tensors (all when ``names`` is None) as CPU torch tensors. ``header``:
    the file's header when already read by :func:`read_header` (not parsed again)."""
    header = read_header(path) if header is None else header
    wanted = list(header.tensors) if names is None else names
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in wanted}


def save_safetensors(tensors: dict[str, torch.Tensor], dst: str | os.PathLike, metadata: dict[str, str],
                     overwrite: bool = True) -> None:
    """Write ``tensors`` (contiguous CPU tensors) with string ``metadata`` to ``dst`` atomically; without
    ``overwrite`` an existing ``dst`` (even one that appeared while writing) is never replaced."""
    with atomic_file(dst, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
