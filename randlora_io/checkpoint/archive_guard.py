"""Bounds on what a pickle checkpoint may inflate to, checked before ``torch.load`` reads it.

``torch.load(weights_only=True)`` stops code, not memory: a zip archive of a few MB can declare gigabytes of
deflated tensor data. ``torch.save`` writes its entries uncompressed, so a real checkpoint's declared sizes add up to
about its file size; anything that declares much more is refused before a byte is inflated.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ..errors import UnsafeCheckpointError

SLACK_BYTES = 16 * 1024 * 1024  # room for small compressed entries (pickle data, version records)


def check_archive_size(path: str | os.PathLike, factor: float = 2.0) -> None:
    """Refuse a zip-format torch checkpoint whose entries declare more than ``factor`` × its size + 16 MiB
    uncompressed, or that cannot be listed. Non-zip (legacy) files are left to the loader."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnsafeCheckpointError(f"{path}: not a readable torch checkpoint archive ({exc})") from None
    if declared > factor * size + SLACK_BYTES:
        raise UnsafeCheckpointError(
            f"{path}: refused: its entries declare {declared} bytes uncompressed from a {size}-byte file (a zip "
            "bomb? torch.save does not compress); re-save the adapter with safetensors")
