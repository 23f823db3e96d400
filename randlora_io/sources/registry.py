"""One view of every adapter input: a set of base weight keys, each with a float32 ΔW in stored orientation.

``open_source`` detects the kind: our randlora file, a PEFT RandLoRA dir, a PEFT LoRA dir, or a dense-delta file.
Merge and convert only talk to :class:`DeltaSource`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from ..format.adapter import RandloraAdapter, is_randlora_file, read_adapter
from ..checkpoint.base_model import BaseModelInfo, base_info_from_checkpoint, layer_orientations
from .dense import is_dense_file, read_dense
from .peft_dir import PeftExtras, is_peft_dir, read_peft_config, read_peft_dir
from .peft_lora import LoraLayer, read_peft_lora
from .peft_params import ParamLoraLayer, read_param_layers
from .peft_randlora import peft_randlora_to_adapter
from ..errors import LayerTypeError, SourceFormatError, UnsafeCheckpointError

KINDS = ("randlora", "peft-randlora", "peft-lora", "dense")


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


class RandloraSource(DeltaSource):
    def __init__(self, adapter: RandloraAdapter, kind: str = "randlora"):
        self.adapter, self.kind, self.path = adapter, kind, adapter.source

    def keys(self) -> list[str]:
        return list(self.adapter.layers)

    def stored_shape(self, key: str) -> tuple[int, int]:
        return self.adapter.layers[key].shape

    def fan_in_fan_out(self, key: str) -> bool:
        return self.adapter.layers[key].fan_in_fan_out

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.adapter.delta(key, device)


class LoraSource(DeltaSource):
    kind = "peft-lora"
    # saved module → a target_parameters layer (PEFT ParamWrapper); mapped onto checkpoint keys by keymap.py only
    param_layers: Mapping[str, ParamLoraLayer] = MappingProxyType({})
    param_config: Mapping = MappingProxyType({})

    def __init__(self, layers: dict[str, LoraLayer], path: str):
        self.layers, self.path = layers, path

    def keys(self) -> list[str]:
        if self.param_layers:
            first = next(iter(self.param_layers))
            raise SourceFormatError(
                f"{self.path}: adapts raw parameters (target_parameters, e.g. layer {first!r}), whose tensors on disk "
                "depend on the base model (MoE experts are stored per expert): merge it into its base with "
                "'randlora-io merge BASE ADAPTER', which maps them as transformers saves them")
        return list(self.layers)

    def stored_shape(self, key: str) -> tuple[int, int]:
        return self.layers[key].stored_shape

    def fan_in_fan_out(self, key: str) -> bool:
        return self.layers[key].fan_in_fan_out

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if self.layers[key].magnitude is not None:
            raise SourceFormatError(f"{self.path}: {key!r} is a DoRA layer: its update W' = m·(W + ΔW)/‖W + ΔW‖ "
                                    "depends on the base weight and is not additive; merge it into its base instead")
        return self.layers[key].delta(device)

    def dora_magnitude(self, key: str) -> torch.Tensor | None:
        return self.layers[key].magnitude

    def dora_delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.layers[key].delta(device)


class DenseSource(DeltaSource):
    kind = "dense"

    def __init__(self, deltas: dict[str, torch.Tensor], path: str, fans: Mapping[str, bool] | None = None):
        self.deltas, self.path, self.fans = deltas, path, dict(fans or {})

    def keys(self) -> list[str]:
        return list(self.deltas)

    def stored_shape(self, key: str) -> tuple[int, int]:
        shape = self.deltas[key].shape
        return (shape[0], shape[1])

    def fan_in_fan_out(self, key: str) -> bool:
        return self.fans.get(key, False)

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.deltas[key].to(device, torch.float32)


def detect_kind(path: str | os.PathLike) -> str:
    """One of :data:`KINDS` for ``path``, or a :class:`SourceFormatError` saying what it is not."""
    path = Path(path)
    if not path.exists():
        raise SourceFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        if not is_peft_dir(path):
            raise SourceFormatError(f"{path}: a directory without adapter_config.json is not an adapter")
        peft_type = read_peft_config(path).get("peft_type")
        if peft_type == "RANDLORA":
            return "peft-randlora"
        if peft_type == "LORA":
            return "peft-lora"
        raise SourceFormatError(f"{path}: unsupported peft_type {peft_type!r} (RANDLORA and LORA are supported)")
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise UnsafeCheckpointError(f"{path}: pickle files are refused; convert it to safetensors first")
    if is_randlora_file(path):
        return "randlora"
    if is_dense_file(path):
        return "dense"
    from ..checkpoint.safetensors_io import read_header

    read_header(path)  # raises a precise error when the file is malformed
    raise SourceFormatError(f"{path}: a safetensors file without randlora or dense-delta metadata")


def base_shapes_from_config(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Weight shapes of the PEFT dir's ``base_model_name_or_path`` when it names a local checkpoint dir."""
    info = base_info_from_config(path)
    return dict(info.shapes) if info is not None else None


def base_info_from_config(path: Path) -> BaseModelInfo | None:
    """The base model of the PEFT dir's ``base_model_name_or_path`` when it names a local checkpoint dir."""
    from ..checkpoint.directory import open_checkpoint

    name = read_peft_config(path).get("base_model_name_or_path")
    if isinstance(name, str) and name and Path(name).is_dir():
        return base_info_from_checkpoint(open_checkpoint(name))
    return None


def _check_orientations(source: RandloraSource, base: BaseModelInfo) -> None:
    """A randlora file of the ``peft`` generator records each layer's orientation as PEFT sets it; where the base's
    config.json tells the layer type, the two must agree on square layers, the only ones where a wrong orientation
    changes ΔW (a transpose): files converted from PEFT dirs before orientation came from the base may hold one.
    (A philox file's orientation is its own convention, consistent with its scales, so it is not checked.)"""
    if not base.knows_layer_types() or source.adapter.header.generator.name != "peft":
        return
    keys = [k for k in source.keys() if k in base.shapes and len(set(source.stored_shape(k))) == 1]
    for key, fan in layer_orientations(keys, base, False, source.path).items():
        if source.fan_in_fan_out(key) != fan:
            kind = "a GPT-2 style Conv1D (weight stored (in, out))" if fan else "a Linear layer (weight (out, in))"
            raise LayerTypeError(
                f"{source.path}: records fan_in_fan_out={str(not fan).lower()} for the square layer {key!r}, but in "
                f"the base ({base.model_type}) it is {kind}, so its ΔW would be merged transposed: convert the file "
                "again from its PEFT dir (or dense delta) with --base")


def open_source(
    path: str | os.PathLike,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
    base_dtype: torch.dtype | None = None,
    keep_bases: bool = False,
    *,
    base: BaseModelInfo | None = None,
    peft_draw_dtype: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> DeltaSource:
    """Open any supported adapter, as PEFT 0.21.2 would load it onto ``base``.

    ``base`` (:class:`BaseModelInfo`: shapes, dtypes, config.json) tells each layer's orientation and PEFT's cast of
    RandLoRA bases; ``base_shapes`` / ``base_dtype`` are the older, shapes-only form. PEFT RandLoRA dirs need the
    base (or a local ``base_model_name_or_path``). ``peft_draw_dtype``: the dtype PEFT drew dense RandLoRA bases in
    (None: decided from saved bases, else bfloat16 with a note). ``on_note`` receives one-line notes (assumptions
    made, layers PEFT would ignore)."""
    path = Path(path)
    kind = detect_kind(path)
    if base is None and base_shapes is not None:
        base = BaseModelInfo(shapes=dict(base_shapes))
    if kind == "randlora":
        source = RandloraSource(read_adapter(path))
        if base is not None:
            _check_orientations(source, base)
        return source
    if kind == "dense":
        return DenseSource(read_dense(path), str(path))
    peft = read_peft_dir(path)  # read once: the converter takes the scales, the merge checks the base copies
    if kind == "peft-lora":
        lora_base = base if base is not None else base_info_from_config(path)
        source: DeltaSource = LoraSource(read_peft_lora(peft, lora_base, on_note), str(path))
        source.param_layers, source.param_config = read_param_layers(peft.tensors, peft.config, str(path)), peft.config
        source.base_copies, source.replacements, source.peft_extras = peft.base_copies, peft.replacements, peft.extras
        return source
    base = base if base is not None else base_info_from_config(path)
    if base is None:
        raise SourceFormatError(
            f"{path}: converting a PEFT RandLoRA dir needs the base model's weight shapes; pass --base MODEL_DIR"
        )
    cast = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(base_dtype) if base_dtype is not None else None
    adapter = peft_randlora_to_adapter(peft, base, keep_bases=keep_bases, cast_dtype=cast, draw_dtype=peft_draw_dtype,
                                       on_note=on_note)
    adapter.source = str(path)
    source = RandloraSource(adapter, kind="peft-randlora")
    source.base_copies, source.replacements, source.peft_extras = peft.base_copies, peft.replacements, peft.extras
    return source
