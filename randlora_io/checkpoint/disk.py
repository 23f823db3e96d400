"""Sizes on disk, for reports (``convert``'s bytes in/out, ``inspect``'s file size)."""

from __future__ import annotations

import os
from pathlib import Path


def path_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory (0 if the path does not exist)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
