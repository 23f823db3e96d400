"""Input kind ``finetuned``: a fine-tuned full checkpoint of the base's architecture, seen as its task vector
τ = W_ft − W_base, one tensor at a time (never stored).

A Hugging Face model directory (``model.safetensors`` or a sharded index, no ``adapter_config.json``) is a
fine-tuned checkpoint. Its task vector needs the base: every weight of one must be in the other with the same shape
(else another architecture or size, refused in one line); ``delta(key)`` reads the two tensors and returns their
float32 difference (computed in float64 when either side is float64, so one rounding). The composition methods
(:mod:`randlora_io.merge.compose`) take it as any other input; merged alone with weight 1 it gives back the
fine-tuned weights (to float32 rounding of the sum).

A weight is a floating tensor (F64, F32, BF16, F16) or, in a checkpoint with transformers' ``"fp8"`` block
quantization (either side, DeepSeek-V3 → R1 style), a float8_e4m3fn tensor paired with its ``weight_scale_inv``:
it is dequantized in float32 (:func:`randlora_io.checkpoint.fp8_blocks.dequantize`) and its scales are not weights
(nor are static input scales, which the merge copies from the base). Integer and boolean tensors (buffers) are left
out; any other dtype (fp8 without pairing scales, another quantization) is refused naming the tensor: never
silently left as the base's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint.base_model import STATE_DICT
from ..checkpoint.directory import INDEX_FILE, SINGLE_FILE, Checkpoint, open_checkpoint
from ..checkpoint.fp8_blocks import dequantize
from ..checkpoint.lazy_tensors import FileTensors, peek
from ..errors import BaseModelMismatchError, QuantizedBaseError, SourceFormatError
from .interface import DeltaSource, OpenOptions, Probe
from .peft_dir import CONFIG_FILE

KIND = "finetuned"
_FLOATS = ("F64", "F32", "BF16", "F16")
_NOT_WEIGHTS = ("BOOL", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")  # buffers (position ids, masks)


def _tensors(ckpt: Checkpoint) -> dict[str, FileTensors]:
    """One lazy reader per shard of ``ckpt`` (key → tensor read on demand)."""
    return {shard: FileTensors(ckpt.shard_path(shard), header, {k: k for k in header.tensors})
            for shard, header in ckpt.shards.items()}


def _quantization(ckpt: Checkpoint, path: str, side: str):
    """``ckpt``'s :class:`~randlora_io.checkpoint.quantization.Fp8Layout` (None: plain), the refusal of any other
    quantization re-worded for the ``side`` it is on (the fine-tuned checkpoint or the base)."""
    try:
        return ckpt.quantization
    except QuantizedBaseError as exc:
        if side == "base":
            raise
        raise QuantizedBaseError(f"{path}: the fine-tuned checkpoint is quantized ({exc}); its task vector needs "
                                 "weights this tool can read: give its unquantized (or fp8 block) weights") from None


def weight_keys(ckpt: Checkpoint, path: str, side: str) -> list[str]:
    """The weights of ``ckpt`` in its key order: floating tensors and fp8 codes paired with their block scales,
    without the scales and static input scales themselves; buffers (integer, bool) left out. Raises naming the first
    tensor of another dtype (e.g. fp8 without a quantization_config or scales)."""
    layout = _quantization(ckpt, path, side)
    state = set(layout.scales.values()) | set(layout.input_scales) if layout is not None else set()
    keys = []
    for key in ckpt.weight_map:
        dtype = ckpt.info(key).dtype
        if key in state or dtype in _NOT_WEIGHTS:
            continue
        if dtype in _FLOATS or (layout is not None and key in layout.scales):
            keys.append(key)
            continue
        why = layout.unpaired.get(key, "") if layout is not None else ""
        raise QuantizedBaseError(
            f"{path}: {key!r} in the {side} is {dtype}{f' and {why}' if why else ''}, which this tool cannot read as "
            "a weight (fp8 needs a quantization_config with per-block weight_scale_inv); its task vector would "
            "silently skip it: give a checkpoint with plain or fp8 block weights")
    return keys


class _Weights:
    """One checkpoint's weights read as float32 (float64 when stored so), fp8 pairs dequantized."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.layout, self.readers = ckpt, ckpt.quantization, _tensors(ckpt)

    def _raw(self, key: str) -> torch.Tensor:
        return peek(self.readers[self.ckpt.weight_map[key]], key)

    def read(self, key: str, device: str | torch.device) -> torch.Tensor:
        """``key`` as float32, or float64 when stored as float64 (stored layout)."""
        tensor = self._raw(key)
        if self.layout is not None and key in self.layout.scales:
            scale = self._raw(self.layout.scales[key])
            return dequantize(tensor.to(device), scale.to(device), self.layout.block, torch.float32)
        return tensor.to(device, torch.float64 if tensor.dtype == torch.float64 else torch.float32)


class FinetunedSource(DeltaSource):
    """τ = W_ft − W_base (float32, stored layout) for every weight the two checkpoints share."""

    kind = KIND
    orientation_known = False  # τ is in the checkpoint's layout; which layers are Conv1D only the base's config says

    def __init__(self, finetuned: Checkpoint, base: Checkpoint, path: str, keys: list[str]):
        self.path, self._ft, self._base, self._keys = path, finetuned, base, list(keys)
        self._ft_weights, self._base_weights = _Weights(finetuned), _Weights(base)

    def keys(self) -> list[str]:
        return list(self._keys)

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._ft.shape(key))

    def fan_in_fan_out(self, key: str) -> bool:
        return False  # both tensors are in the checkpoint's own layout: τ needs no transpose

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        ft, base = self._ft_weights.read(key, device), self._base_weights.read(key, device)
        if ft.dtype == torch.float64 or base.dtype == torch.float64:
            return (ft.double() - base.double()).float()
        return ft - base


def matches(probe: Probe) -> bool:
    """A model directory (weights, no adapter config)."""
    where = probe.path
    return (where.is_dir() and not (where / CONFIG_FILE).is_file()
            and ((where / SINGLE_FILE).is_file() or (where / INDEX_FILE).is_file()))


def load(probe: Probe, options: OpenOptions) -> FinetunedSource:
    """The task vector of the checkpoint at ``probe`` against ``options.base`` (its root); refuses a checkpoint of
    another architecture or size (a weight missing on either side, or shaped differently) and tensors it cannot
    read as weights (:func:`weight_keys`)."""
    base = options.base
    if base is not None and base.root == STATE_DICT:
        raise SourceFormatError(f"{probe.path}: a fine-tuned checkpoint is merged as its task vector W_ft − W_base "
                                "against a base model directory, and merge_into_state_dict has only a state dict: "
                                f"use randlora-io merge BASE_DIR {probe.path}")
    if base is None or base.root in (None, "", "<base>"):
        raise SourceFormatError(f"{probe.path}: a fine-tuned checkpoint is merged as its task vector W_ft − W_base, "
                                "which needs the base model directory: pass BASE")
    ft, base_ckpt = open_checkpoint(probe.path), open_checkpoint(base.root)
    if Path(ft.root).resolve() == Path(base_ckpt.root).resolve():
        raise SourceFormatError(f"{probe.path}: is the base itself (its task vector is zero); give a fine-tuned "
                                "checkpoint")
    path = str(probe.path)
    ft_keys, base_keys = weight_keys(ft, path, "fine-tuned checkpoint"), weight_keys(base_ckpt, path, "base")
    base_set = set(base_keys)
    for key in ft_keys:
        if key not in base_set:
            raise BaseModelMismatchError(f"{probe.path}: holds {key!r}, which the base at {base_ckpt.root} does not: "
                                         "a fine-tuned checkpoint of another architecture; give one fine-tuned from "
                                         "this base")
        if tuple(ft.shape(key)) != tuple(base_ckpt.shape(key)):
            raise BaseModelMismatchError(f"{probe.path}: {key!r} is {list(ft.shape(key))} but the base's is "
                                         f"{list(base_ckpt.shape(key))}: another model size or a resized vocabulary")
    ft_set = set(ft_keys)
    missing = [k for k in base_keys if k not in ft_set]
    if missing:
        raise BaseModelMismatchError(f"{probe.path}: lacks the base's {missing[0]!r} ({len(missing)} weight(s) in "
                                     "all): a checkpoint of another architecture, or saved without some weights")
    return FinetunedSource(ft, base_ckpt, path, ft_keys)


def describe(probe: Probe) -> dict[str, Any]:
    ft = open_checkpoint(probe.path)
    return {"tensors": len(ft.weight_map), "shards": len(ft.shards),
            "note": "a fine-tuned checkpoint: merged as its task vector against BASE"}


def validate(probe: Probe) -> str:
    ft = open_checkpoint(probe.path)
    return f"{KIND} checkpoint, {len(ft.weight_map)} tensors in {len(ft.shards)} shard(s) (task vector needs BASE)"
