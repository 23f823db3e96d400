"""Every adapter input kind, and the two doors into them: :func:`detect` (what is this path?) and
:func:`open_source` (give me its ΔW terms as PEFT would load it onto this base).

A kind is one module of this package implementing :mod:`randlora_io.sources.interface`; adding one is a new module
plus one line in :data:`_KINDS`. Detection reads each input's header once (a file's safetensors header, a
directory's ``adapter_config.json``) and hands it on, in the :class:`Probe`, to whichever kind opens it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

from ..checkpoint.base_model import BaseModelInfo
from ..errors import SourceFormatError, UnsafeCheckpointError
from . import dense, finetuned, peft_lora, peft_randlora, peft_vera, randlora_file
from .interface import DeltaSource, OpenOptions, Probe
from .peft_dir import CONFIG_FILE

# the kinds, in the order they are tried; each module implements sources/interface.py
_KINDS: tuple[ModuleType, ...] = (randlora_file, dense, peft_randlora, peft_lora, peft_vera, finetuned)
KINDS: tuple[str, ...] = tuple(kind.KIND for kind in _KINDS)
_BY_NAME = {kind.KIND: kind for kind in _KINDS}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def detect(path: str | os.PathLike | Probe) -> Probe:
    """A :class:`Probe` of ``path`` with its ``kind`` (one of :data:`KINDS`) set, its header read once; or a
    :class:`SourceFormatError` (:class:`UnsafeCheckpointError` for pickles) saying what the path is not."""
    probe = path if isinstance(path, Probe) else Probe(path)
    if probe.kind is not None:
        return probe
    where = probe.path
    if not where.exists():
        raise SourceFormatError(f"{where}: no such file or directory")
    if where.is_dir() and not (where / CONFIG_FILE).is_file():
        if finetuned.matches(probe):
            probe.kind = finetuned.KIND
            return probe
        raise SourceFormatError(f"{where}: a directory without {CONFIG_FILE} (an adapter) or model weights (a "
                                "fine-tuned checkpoint) is not an input")
    if where.is_file() and where.suffix in _PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(f"{where}: pickle files are refused; convert it to safetensors first")
    for kind in _KINDS:
        if kind.matches(probe):
            probe.kind = kind.KIND
            return probe
    if where.is_dir():
        peft_type = probe.peft_config.get("peft_type")
        raise SourceFormatError(f"{where}: unsupported peft_type {peft_type!r} (RANDLORA, LORA and VERA are supported)")
    raise SourceFormatError(f"{where}: a safetensors file without randlora or dense-delta metadata")


def detect_kind(path: str | os.PathLike) -> str:
    """One of :data:`KINDS` for ``path``, or a :class:`SourceFormatError` saying what it is not."""
    return detect(path).kind


def open_source(
    path: str | os.PathLike | Probe,
    *,
    base: BaseModelInfo | None = None,
    keep_bases: bool = False,
    peft_draw_dtype: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> DeltaSource:
    """Open any supported adapter, as PEFT 0.21.2 would load it onto ``base``.

    ``base`` (:class:`BaseModelInfo`: shapes, dtypes, config.json) tells each layer's orientation and PEFT's cast of
    RandLoRA bases; PEFT RandLoRA dirs need it (or a local ``base_model_name_or_path``). ``keep_bases``: keep saved
    PEFT projections the seed does not reproduce. ``peft_draw_dtype``: the dtype PEFT drew dense RandLoRA bases in
    (None: decided from saved bases, else bfloat16 with a note). ``on_note`` receives one-line notes (assumptions
    made, layers PEFT would ignore). ``path`` may be a :class:`Probe` from :func:`detect` (its header is reused)."""
    probe = detect(path)
    options = OpenOptions(base=base, keep_bases=keep_bases, peft_draw_dtype=peft_draw_dtype, on_note=on_note)
    return kind_of(probe).load(probe, options)


def kind_of(probe: Probe) -> ModuleType:
    """The kind module (sources/interface.py) of a detected ``probe``: its ``describe`` / ``validate`` / ``load``."""
    return _BY_NAME[detect(probe).kind]
