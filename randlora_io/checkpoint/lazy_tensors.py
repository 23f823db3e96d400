"""A dict of one safetensors file's tensors that reads each tensor only when asked, so a merge holds one layer's
scales at a time instead of the whole file (a 7B adapter's λ/γ are ~460 MB; a 70B one's ~4 GB).

``FileTensors`` behaves as a ``dict[str, torch.Tensor]``: indexing reads the tensor from the file once and keeps it,
so in-place edits (``adapter.lambdas[k].mul_(2)``) and assignments persist as they would in a dict. ``peek`` is the
streaming read for code that only looks (validation, the merge): the kept tensor when there is one, else a fresh copy
that is not kept. The file is read through a descriptor opened at construction, so a file replaced afterwards (an
atomic rename) does not change what is read. Copies and pickles of the mapping are plain dicts.
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import torch

from .safetensors_io import SafetensorsHeader

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn}


def can_read_lazily(header: SafetensorsHeader, names: list[str]) -> bool:
    """True when every named tensor is a float dtype this module reads byte for byte (a little-endian host with
    positional reads; elsewhere the caller loads the file whole, as before)."""
    return (sys.byteorder == "little" and hasattr(os, "preadv")
            and all(header.tensors[n].dtype in _DTYPES for n in names))


class FileTensors(MutableMapping):
    """``key → tensor`` for the tensors ``names[key]`` of the safetensors file ``path`` (header already validated),
    read on first access. CPU tensors, the file's dtype and shape."""

    def __init__(self, path: str | os.PathLike, header: SafetensorsHeader, names: dict[str, str]) -> None:
        self.path = Path(path)
        self._entries = {key: header.tensors[name] for key, name in names.items()}
        self._data_offset = header.data_offset
        self._kept: dict[str, torch.Tensor] = {}
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def _read(self, key: str) -> torch.Tensor:
        info = self._entries[key]
        nbytes = info.end - info.begin
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        while done < nbytes:  # pread may return short counts
            chunk = os.preadv(self._fd, [view[done:]], self._data_offset + info.begin + done)
            if chunk == 0:
                raise OSError(f"{self.path}: file is shorter than its header says (truncated while open?)")
            done += chunk
        dtype = _DTYPES[info.dtype]
        if nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)

    def peek(self, key: str) -> torch.Tensor:
        """The tensor for ``key`` without keeping it: the kept tensor if it was indexed before, else a fresh read."""
        if key in self._kept:
            return self._kept[key]
        if key not in self._entries:
            raise KeyError(key)
        return self._read(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._kept:
            if key not in self._entries:
                raise KeyError(key)
            self._kept[key] = self._read(key)
        return self._kept[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._kept[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self._kept and key not in self._entries:
            raise KeyError(key)
        self._kept.pop(key, None)
        self._entries.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        yield from (key for key in list(self._kept) if key not in self._entries)

    def __len__(self) -> int:
        return len(self._entries) + sum(1 for key in self._kept if key not in self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._kept

    def __repr__(self) -> str:
        return f"FileTensors({str(self.path)!r}, {len(self)} tensors, {len(self._kept)} read)"

    def __copy__(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def __deepcopy__(self, memo: dict) -> dict[str, torch.Tensor]:
        return {key: value.clone() for key, value in self.items()}

    def __reduce__(self):
        return (dict, (dict(self.items()),))


def numel(table: Mapping[str, torch.Tensor], key: str) -> int:
    """The number of elements of ``table[key]``, from the file's header when the tensor has not been read."""
    if isinstance(table, FileTensors) and key not in table._kept:
        if key not in table._entries:
            raise KeyError(key)
        return math.prod(table._entries[key].shape)
    return table[key].numel()


def peek(table: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """``table[key]``, without keeping a lazily read tensor in memory (see :meth:`FileTensors.peek`)."""
    return table.peek(key) if isinstance(table, FileTensors) else table[key]
