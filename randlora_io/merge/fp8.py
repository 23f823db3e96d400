"""Merging into an FP8 block-quantized base, one shard at a time through ``stream_rewrite``
(``checkpoint/quantization.py`` reads the layout, ``checkpoint/fp8_blocks.py`` holds the block arithmetic).

``--dtype keep`` writes the same layout: each adapted fp8 weight becomes ``W' = dequant(q, s) + Σ αᵢ·ΔWᵢ`` in
float32 (``LayerMerger`` with a dequantizing ``widen`` and a re-quantizing ``finish``), stored as fresh per-block codes
and scales; its ``weight_scale_inv`` is rewritten where the base stores it. Safetensors puts a file's F32 tensors
before its F8 ones, so a scale in its weight's shard is a *late* tensor: its bytes are reserved and written after the
weight is merged (no codes held back). A scale stored in another shard than its weight merges that weight again,
read from its own shard (the same arithmetic, so the same result). Every other tensor is copied byte for byte, and
config.json unchanged.

``--dtype D`` writes a plain checkpoint instead: every fp8 weight dequantized in float32 (the adapted ones with ΔW
added) and rounded once to D; every ``weight_scale_inv`` and static input scale left out (the caller also drops
them from the index and ``quantization_config`` from config.json).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

from ..checkpoint.directory import Checkpoint
from ..checkpoint.fp8_blocks import dequantize, dequantize_into, quantize
from ..checkpoint.quantization import Fp8Layout
from ..checkpoint.safetensors_io import load_tensors

MergeKey = Callable[..., torch.Tensor]  # merge's transform: (key, tensor, widen=None, finish=None) -> tensor


@dataclass
class ShardRewrite:
    """What ``stream_rewrite`` gets for one shard: the tensors ``transform`` may change, those it leaves out
    (``drop``) and those written last (``late``)."""

    keys: Collection[str]
    transform: Callable[[str, torch.Tensor], torch.Tensor]
    drop: frozenset[str] = frozenset()
    late: frozenset[str] = frozenset()


def shard_rewrite(ckpt: Checkpoint, shard: str, plan: Mapping[str, object], merge_key: MergeKey,
                  out_dtype: torch.dtype | None, unchanged: list[str]) -> ShardRewrite:
    """How to rewrite ``shard``: as planned for a plain base; for an FP8 base, re-quantized (``out_dtype`` None)
    or dequantized to ``out_dtype``. ``unchanged`` collects adapted fp8 weights whose codes and scales did not
    change."""
    layout = ckpt.quantization
    if layout is None:
        return ShardRewrite(plan, merge_key)
    here = ckpt.shards[shard].tensors
    if out_dtype is not None:
        fp8 = {k for k in here if k in layout.scales}
        return ShardRewrite(set(plan) | fp8, _Dequantize(ckpt, layout, plan, merge_key, out_dtype),
                            drop=frozenset(k for k in here if k in dropped_keys(layout)))
    owner = layout.owners
    scales = {s for s in here if s in owner and owner[s] in plan}
    late = frozenset(s for s in scales if ckpt.weight_map[owner[s]] == shard)
    return ShardRewrite(set(plan) | (scales - late), _Requantize(ckpt, layout, plan, merge_key, unchanged),
                        late=late)


def dropped_keys(layout: Fp8Layout | None) -> frozenset[str]:
    """The tensors a plain (``--dtype``) output of this base leaves out: every scale and static input scale."""
    return frozenset(layout.scales.values()) | layout.input_scales if layout is not None else frozenset()


@dataclass
class _Fp8Step:
    ckpt: Checkpoint
    layout: Fp8Layout
    plan: Mapping[str, object]
    merge_key: MergeKey

    def read(self, key: str) -> torch.Tensor:
        """One tensor of the base, from whichever shard holds it."""
        shard = self.ckpt.weight_map[key]
        return load_tensors(self.ckpt.shard_path(shard), [key], header=self.ckpt.shards[shard])[key]

    def widen(self, key: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """``LayerMerger``'s widen for fp8 weight ``key``: its codes dequantized with the base's scales."""
        scale = self.read(self.layout.scales[key])
        return lambda w32, codes: dequantize_into(w32, codes, scale, self.layout.block)


@dataclass
class _Requantize(_Fp8Step):
    """``--dtype keep``: adapted fp8 weights re-quantized, their scales handed out when their turn comes."""

    unchanged: list[str] = field(default_factory=list)
    new_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key in self.layout.scales and key in self.plan:
            return self._merge(key, tensor, report=True)
        owner = self.layout.owners.get(key) if key.endswith("scale_inv") else None
        if owner is not None and owner in self.plan:
            if key not in self.new_scales:  # its weight is stored in another shard
                self._merge(owner, self.read(owner), report=False)
            return self.new_scales.pop(key)
        return self.merge_key(key, tensor)

    def _merge(self, key: str, codes: torch.Tensor, report: bool) -> torch.Tensor:
        scale_key = self.layout.scales[key]
        widen = self.widen(key)

        def finish(w32: torch.Tensor) -> torch.Tensor:
            q, scale = quantize(w32, self.layout.block)
            if report and torch.equal(q.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(
                    scale, self.read(scale_key)):
                self.unchanged.append(key)
            self.new_scales[scale_key] = scale
            return q

        return self.merge_key(key, codes, widen=widen, finish=finish)


@dataclass
class _Dequantize(_Fp8Step):
    """``--dtype D``: every fp8 weight dequantized (adapted ones merged first), rounded once to ``out_dtype``."""

    out_dtype: torch.dtype = torch.bfloat16

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in self.layout.scales:
            return self.merge_key(key, tensor)
        if key in self.plan:
            return self.merge_key(key, tensor, widen=self.widen(key))
        # float32 out: stream_rewrite's cast to out_dtype is the one rounding, and it refuses values it makes Inf
        return dequantize(tensor, self.read(self.layout.scales[key]), self.layout.block, torch.float32)
