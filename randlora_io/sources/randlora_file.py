"""Input kind ``randlora``: this project's own file (SPEC.md), read and validated by :mod:`randlora_io.format.adapter`
(method ``randlora``) or :mod:`randlora_io.format.vera_file` (method ``vera``, SPEC §2.1).

A RandLoRA file holds λ/γ per layer and a generator spec; ΔW comes from the regenerated shared bases
(:meth:`randlora_io.format.adapter.RandloraAdapter.delta`). A VeRA file holds λ_b/λ_d per layer
(:meth:`randlora_io.format.vera_file.VeraAdapter.delta`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint.base_model import BaseModelInfo, layer_orientations
from ..checkpoint.lazy_tensors import peek
from ..errors import LayerTypeError
from ..format.adapter import RandloraAdapter
from ..format.spec import METADATA_KEY
from ..format.vera_file import VeraAdapter, read_any_adapter
from .interface import DeltaSource, OpenOptions, Probe, layer_row

KIND = "randlora"


class AdapterSource(DeltaSource):
    """An in-memory adapter of our format (``adapter.layers``: key → a layer with ``shape`` and ``fan_in_fan_out``,
    ``adapter.delta(key, device)``) as a source: ΔW float32, stored orientation. Subclassed per method, so the merge
    picks RandLoRA's fast paths by type."""

    def __init__(self, adapter, kind: str = KIND):
        self.adapter, self.kind, self.path = adapter, kind, adapter.source

    def keys(self) -> list[str]:
        return list(self.adapter.layers)

    def stored_shape(self, key: str) -> tuple[int, int]:
        return self.adapter.layers[key].shape

    def fan_in_fan_out(self, key: str) -> bool:
        return self.adapter.layers[key].fan_in_fan_out

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.adapter.delta(key, device)


class RandloraSource(AdapterSource):
    """A :class:`RandloraAdapter` as a source (our file, or a PEFT RandLoRA dir converted on the fly, ``kind``
    ``"peft-randlora"``): ΔW of each layer from its λ/γ and the shared bases, float32, stored orientation."""

    adapter: RandloraAdapter


class VeraSource(AdapterSource):
    """A :class:`VeraAdapter` as a source (our VeRA file, or a PEFT VeRA dir converted on the fly, ``kind``
    ``"peft-vera"``): ΔW of each layer from λ_b, λ_d and the shared bases, float32, stored orientation."""

    adapter: VeraAdapter


def _check_orientations(source: RandloraSource | VeraSource, base: BaseModelInfo) -> None:
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


def matches(probe: Probe) -> bool:
    """A safetensors file whose metadata carries a randlora header (validated by :func:`load`)."""
    return probe.path.is_file() and METADATA_KEY in probe.header.metadata


def load(probe: Probe, options: OpenOptions) -> RandloraSource | VeraSource:
    """The file, every SPEC §8 check made (bases checksum included); with a base that tells layer types, a ``peft``
    file's orientation of square layers is checked against it."""
    adapter = read_any_adapter(probe.path, header=probe.header)
    source = VeraSource(adapter) if isinstance(adapter, VeraAdapter) else RandloraSource(adapter)
    if options.base is not None:
        _check_orientations(source, options.base)
    return source


def describe(probe: Probe) -> dict[str, Any]:
    adapter = read_any_adapter(probe.path, verify_bases=False, header=probe.header)  # `validate` checks the bases
    h = adapter.header
    if isinstance(adapter, VeraAdapter):
        return {"method": "vera", "generator": h.generator.name, "seed": h.seed, "rank": h.rank,
                "cast_dtype": h.generator.cast_dtype, "format_version": h.format_version,
                "bases": {"max_out": h.max_out, "max_in": h.max_in, "sha256": h.bases_sha256,
                          "stored": h.stored_bases}, "base_model": h.base_model,
                "layers": [layer_row(k, layer.shape, h.rank, None, [adapter.lambda_b[k], adapter.lambda_d[k]])
                           for k, layer in h.layers.items()]}
    return {"method": "randlora", "generator": h.generator.name, "kind_of_bases": h.generator.kind, "seed": h.seed, "rank": h.rank,
            "alpha": h.alpha, "scaling": h.scaling, "format_version": h.format_version,
            "bases": {"min_dim": h.min_dim, "max_dim": h.max_dim, "sha256": h.bases_sha256, "stored": h.stored_bases},
            "base_model": h.base_model,
            "layers": [layer_row(k, layer.shape, h.rank, layer.num_bases,
                                 [peek(adapter.lambdas, k), peek(adapter.gammas, k)])
                       for k, layer in h.layers.items()]}


def validate(probe: Probe) -> str:
    adapter = read_any_adapter(probe.path, header=probe.header)
    adapter.bases(verify=True)
    checked = "bases checksum verified" if adapter.header.bases_sha256 else "no bases checksum recorded"
    method = "VeRA, " if isinstance(adapter, VeraAdapter) else ""
    return f"randlora v{adapter.header.format_version}, {method}{len(adapter.layers)} layers, {checked}"
