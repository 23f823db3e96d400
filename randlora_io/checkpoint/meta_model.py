"""The model of a checkpoint directory's ``config.json``, built by transformers on the meta device (no memory, no
weights): what :mod:`~randlora_io.sources.keymap`, :mod:`~randlora_io.sources.conversion` and
:mod:`~randlora_io.sources.ties` ask of a base's architecture (its in-memory names, conversion mapping, tied
weights). None when transformers, the config or its class is unavailable."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..errors import SourceFormatError


def meta_model(root: Path):
    """:func:`_build_meta_model`, cached per directory and config.json state (the model is read, never changed)."""
    try:
        stat = (root / "config.json").stat()
    except OSError:
        return None
    return _cached_meta_model(str(root), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_meta_model(root: str, _mtime_ns: int, _size: int):
    return _build_meta_model(Path(root))


def _build_meta_model(root: Path):
    """The ``architectures[0]`` model of ``root/config.json``, built on the meta device (no memory, no weights)."""
    config_path = root / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise SourceFormatError(f"{config_path}: not valid JSON") from None
    arch = (config.get("architectures") or [None])[0] if isinstance(config, dict) else None
    if not isinstance(arch, str):
        return None
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        return None
    cls = getattr(transformers, arch, None)
    if cls is None:
        return None
    try:
        hf_config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        with torch.device("meta"):
            return cls(hf_config)
    except Exception:  # noqa: BLE001 - an unbuildable config only means no renaming is known
        return None
