"""The one interface every adapter input kind implements, and what detection learns of an input path.

A kind is a module of this package (``randlora_file``, ``dense``, ``peft_randlora``, ``peft_lora``, ``peft_vera``)
listed in :mod:`randlora_io.sources.registry`, with five names:

- ``KIND``: its name (``"randlora"``, ``"dense"``, ``"peft-randlora"``, ``"peft-lora"``, ``"peft-vera"``);
- ``matches(probe) -> bool``: whether ``probe`` (a :class:`Probe`, whose header is read once and shared) is this kind;
- ``load(probe, options) -> DeltaSource``: the input as PEFT 0.21.2 would load it onto ``options.base``;
- ``describe(probe) -> dict``: the JSON-able facts ``randlora-io inspect`` prints (its ``layers`` rows from
  :func:`layer_row`);
- ``validate(probe) -> str``: every check the kind has, raising on the first defect; returns what was checked.

Merge, convert, inspect, hub and swap see inputs only as a :class:`DeltaSource`: ``{weight key: ΔW}`` with ΔW float32
in the weight's stored orientation (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ..checkpoint.base_model import BaseModelInfo
from ..checkpoint.safetensors_io import SafetensorsHeader, read_header
from .peft_dir import PeftExtras, read_peft_config


class DeltaSource:
    """An adapter seen as ``{weight key: ΔW}``; ``delta`` is computed on demand, float32, stored orientation."""

    kind: str
    path: str
    # base checkpoint key → a copy of that base weight saved with the adapter (PEFT dirs targeting an embedding
    # layer); a merge is only right when BASE holds the same weight
    base_copies: Mapping[str, torch.Tensor] = MappingProxyType({})
    # base checkpoint key → a trained tensor that replaces the base's (PEFT's modules_to_save and trained biases);
    # not in ``keys()``: it has no ΔW
    replacements: Mapping[str, torch.Tensor] = MappingProxyType({})
    # a PEFT dir's trained head / biases and their config keys, for converting it to another PEFT dir
    peft_extras: PeftExtras | None = None

    # whether ``fan_in_fan_out`` is known (told by the adapter or the base) rather than assumed False
    orientation_known: bool = True

    def keys(self) -> list[str]:
        raise NotImplementedError

    def stored_shape(self, key: str) -> tuple[int, int]:
        raise NotImplementedError

    def fan_in_fan_out(self, key: str) -> bool:
        raise NotImplementedError

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def dora_magnitude(self, key: str) -> torch.Tensor | None:
        """DoRA's magnitude vector m (out,) when ``key`` is a DoRA layer (its ΔW is then not additive), else None."""
        return None

    def dora_delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """A DoRA layer's B·A·scaling (float32, stored orientation): the ΔW inside ``m·(W + ΔW)/‖W + ΔW‖``."""
        raise NotImplementedError


class Probe:
    """One input path as detection sees it: each of its headers is read at most once and shared by ``detect``,
    ``load``, ``describe`` and ``validate`` (``header``: a file's safetensors header, validated; ``peft_config``: a
    directory's ``adapter_config.json``, validated). ``kind`` is set by the registry once a kind matches."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.kind: str | None = None
        self._header: SafetensorsHeader | None = None
        self._peft_config: dict | None = None

    @property
    def header(self) -> SafetensorsHeader:
        if self._header is None:
            self._header = read_header(self.path)
        return self._header

    @property
    def peft_config(self) -> dict:
        if self._peft_config is None:
            self._peft_config = read_peft_config(self.path)
        return self._peft_config

    def __repr__(self) -> str:
        return f"Probe({str(self.path)!r}, kind={self.kind!r})"


@dataclass(frozen=True)
class OpenOptions:
    """How to open an input. ``base``: the model it is merged into (shapes, dtypes, config.json: layer types and
    orientation, PEFT's cast of RandLoRA bases), or None when unknown; ``keep_bases``: keep saved PEFT projections
    the seed does not reproduce; ``peft_draw_dtype``: the dtype PEFT drew dense RandLoRA bases in (None: decided
    from saved bases, else bfloat16 with a note); ``on_note``: receives one-line notes (assumptions made, layers
    PEFT would ignore)."""

    base: BaseModelInfo | None = None
    keep_bases: bool = False
    peft_draw_dtype: str | None = None
    on_note: Callable[[str], None] | None = None


def layer_row(key: str, shape, r: int, n: int | None, tensors: list[torch.Tensor]) -> dict[str, Any]:
    """One row of ``describe``'s ``layers``: key, weight shape (or None), rank, N (RandLoRA), params and bytes."""
    row = {"key": key, "shape": list(shape) if shape else None, "r": r,
           "params": sum(t.numel() for t in tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors)}
    if n is not None:
        row["N"] = n
    return row


def knows_orientation(source: DeltaSource) -> bool:
    """Whether ``source`` (and every source it wraps, through ``inner``) knows which weights are stored (in, out)."""
    while source is not None:
        if not source.orientation_known:
            return False
        source = getattr(source, "inner", None)
    return True
