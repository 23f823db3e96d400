"""Input kind ``finetuned``: a fine-tuned full checkpoint of the base's architecture, seen as its task vector
τ = W_ft − W_base, one tensor at a time (never stored).

A Hugging Face model directory (``model.safetensors`` or a sharded index, no ``adapter_config.json``) is a
fine-tuned checkpoint. Its task vector needs the base: every floating tensor of one must be in the other with the
same shape (else another architecture or size, refused in one line); ``delta(key)`` reads the two tensors and
returns their float32 difference. The composition methods (:mod:`randlora_io.merge.compose`) take it as any other
input; merged alone with weight 1 it gives back the fine-tuned weights (to float32 rounding of the sum).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint.directory import INDEX_FILE, SINGLE_FILE, Checkpoint, open_checkpoint
from ..checkpoint.lazy_tensors import FileTensors, peek
from ..errors import BaseModelMismatchError, SourceFormatError
from .interface import DeltaSource, OpenOptions, Probe
from .peft_dir import CONFIG_FILE

KIND = "finetuned"
_FLOATS = ("F32", "BF16", "F16")


def _tensors(ckpt: Checkpoint) -> dict[str, FileTensors]:
    """One lazy reader per shard of ``ckpt`` (key → tensor read on demand)."""
    return {shard: FileTensors(ckpt.shard_path(shard), header, {k: k for k in header.tensors})
            for shard, header in ckpt.shards.items()}


class FinetunedSource(DeltaSource):
    """τ = W_ft − W_base (float32, stored layout) for every floating tensor the two checkpoints share."""

    kind = KIND

    def __init__(self, finetuned: Checkpoint, base: Checkpoint, path: str):
        self.path, self._ft, self._base = path, finetuned, base
        self._keys = [k for k in finetuned.weight_map if finetuned.info(k).dtype in _FLOATS]
        self._ft_tensors, self._base_tensors = _tensors(finetuned), _tensors(base)

    def keys(self) -> list[str]:
        return list(self._keys)

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._ft.shape(key))

    def fan_in_fan_out(self, key: str) -> bool:
        return False  # both tensors are in the checkpoint's own layout: τ needs no transpose

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        ft = peek(self._ft_tensors[self._ft.weight_map[key]], key)
        base = peek(self._base_tensors[self._base.weight_map[key]], key)
        return (ft.to(device, torch.float32) - base.to(device, torch.float32))


def matches(probe: Probe) -> bool:
    """A model directory (weights, no adapter config)."""
    where = probe.path
    return (where.is_dir() and not (where / CONFIG_FILE).is_file()
            and ((where / SINGLE_FILE).is_file() or (where / INDEX_FILE).is_file()))


def load(probe: Probe, options: OpenOptions) -> FinetunedSource:
    """The task vector of the checkpoint at ``probe`` against ``options.base`` (its root); refuses a checkpoint of
    another architecture or size (a floating tensor missing on either side, or shaped differently)."""
    base = options.base
    if base is None or base.root in (None, "", "<base>"):
        raise SourceFormatError(f"{probe.path}: a fine-tuned checkpoint is merged as its task vector W_ft − W_base, "
                                "which needs the base model directory: pass BASE")
    ft, base_ckpt = open_checkpoint(probe.path), open_checkpoint(base.root)
    if Path(ft.root).resolve() == Path(base_ckpt.root).resolve():
        raise SourceFormatError(f"{probe.path}: is the base itself (its task vector is zero); give a fine-tuned "
                                "checkpoint")
    for key in ft.weight_map:
        if ft.info(key).dtype not in _FLOATS:
            continue
        if key not in base_ckpt.weight_map:
            raise BaseModelMismatchError(f"{probe.path}: holds {key!r}, which the base at {base_ckpt.root} does not: "
                                         "a fine-tuned checkpoint of another architecture; give one fine-tuned from "
                                         "this base")
        if tuple(ft.shape(key)) != tuple(base_ckpt.shape(key)):
            raise BaseModelMismatchError(f"{probe.path}: {key!r} is {list(ft.shape(key))} but the base's is "
                                         f"{list(base_ckpt.shape(key))}: another model size or a resized vocabulary")
    missing = [k for k in base_ckpt.weight_map if base_ckpt.info(k).dtype in _FLOATS and k not in ft.weight_map]
    if missing:
        raise BaseModelMismatchError(f"{probe.path}: lacks the base's {missing[0]!r} ({len(missing)} tensor(s) in "
                                     "all): a checkpoint of another architecture, or saved without some weights")
    return FinetunedSource(ft, base_ckpt, str(probe.path))


def describe(probe: Probe) -> dict[str, Any]:
    ft = open_checkpoint(probe.path)
    return {"tensors": len(ft.weight_map), "shards": len(ft.shards),
            "note": "a fine-tuned checkpoint: merged as its task vector against BASE"}


def validate(probe: Probe) -> str:
    ft = open_checkpoint(probe.path)
    return f"{KIND} checkpoint, {len(ft.weight_map)} tensors in {len(ft.shards)} shard(s) (task vector needs BASE)"
