"""transformers' weight conversions (``conversion_mapping``) as seen by a merge: which in-memory parameters a
checkpoint stores rearranged, and ΔW carried back onto the checkpoint's tensors exactly.

Some transformers ≥ 5 models load a checkpoint tensor through a ``WeightConverter``: transposed (a shared expert
stored (in, out)), chunked (a fused ``gate_up_proj`` on disk, ``gate_proj`` and ``up_proj`` in memory), concatenated,
permuted for RoPE, stacked per expert… A PEFT adapter names the in-memory parameters, so its ΔW must be carried
back through the inverse of the same operations before it is added to the checkpoint's tensor. Renaming the key
alone adds ΔW in the wrong layout; on a square matrix nothing notices.

:meth:`ModelConversions.group` finds the in-memory parameters one checkpoint tensor group is converted with (the
reverse converter's grouping, as ``revert_weight_conversion`` builds it); :meth:`ModelConversions.revert` runs transformers' own save
path (``revert_weight_conversion``, what ``save_pretrained`` of PEFT's merged model writes) on the group's ΔW (zeros
for parameters the adapter leaves alone) and then checks the result by loading it back through the forward
operations: ``forward(revert(ΔW)) == ΔW`` bit for bit, or the layer is refused. Only operations that rearrange
elements (so are linear: converting W + ΔW is converting W plus converting ΔW) are accepted; any other operation
(dequantisation, vocabulary padding, one this module has not read) is a refusal naming it.
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy

import torch

from ..errors import BaseModelMismatchError
from .interface import DeltaSource
from .split_parts import SplitPartsSource

# transformers.core_model_loading operations that only move, split or join elements (so are linear and exactly
# invertible): a ΔW converted through them is the difference of the converted weights
REARRANGING_OPS = frozenset({
    "Transpose", "PermuteForRope", "Chunk", "Split", "Concatenate", "Interleave", "MergeModulelist",
    "SplitModulelist", "Conv3dToLinear", "LinearToConv3d",
})


class ConversionRefused(Exception):
    """An in-memory parameter whose conversion cannot be inverted exactly; ``str`` says why (no path)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ConversionGroup:
    """In-memory parameters ``names`` (shapes ``shapes``) that transformers loads together from one group of
    checkpoint tensors through the operations ``ops`` (class names, load direction)."""

    names: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    ops: tuple[str, ...]


class ModelConversions:
    """The weight conversions of one ``model`` (built on the meta device from a ``config.json``), with the reverse
    converters ``revert_weight_conversion`` builds (from the config: legacy renames and PrefixChange dropped, as it
    does for a model not loaded by ``from_pretrained``)."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

        self.model = model
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
        reverse = [c.reverse_transform() for c in conversions[::-1]]
        self._converters = [c for c in reverse if isinstance(c, WeightConverter)]
        # the load direction, for the round-trip check
        self._load_renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self._load_converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self._targets: dict[str, tuple[str, str]] | None = None
        self._groups: dict[str, ConversionGroup] = {}
        self._saved_shapes: dict[ConversionGroup, dict[str, tuple[int, ...]]] = {}

    def _target_of(self) -> dict[str, tuple[str, str]]:
        """In-memory name → (first checkpoint name of its group, the reverse converter's pattern), for every
        parameter a converter matches."""
        if self._targets is None:
            from transformers.core_model_loading import apply_converters

            self._targets = {}
            if self._converters:
                for name in self.model.state_dict():
                    target, pattern = apply_converters(name, self._converters)
                    if pattern is not None:
                        self._targets[name] = (target, pattern)
        return self._targets

    def group(self, name: str) -> ConversionGroup | None:
        """The group in-memory parameter ``name`` is converted with, or None when transformers saves it by renaming
        alone. Raises :class:`ConversionRefused` for an operation that is not a pure rearrangement."""
        targets = self._target_of()
        if name not in targets:
            return None
        target, pattern = targets[name]
        if target in self._groups:
            return self._groups[target]
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        forward_ops = [type(op).__name__ for op in converter.reverse_transform().operations]
        unknown = [op for op in forward_ops if op not in REARRANGING_OPS]
        if unknown or getattr(converter, "quantization_operation", None) is not None:
            raise ConversionRefused(f"transformers loads it through {unknown[0] if unknown else 'a quantization'} "
                                    "operation, which is not a rearrangement of the weight's elements")
        state = self.model.state_dict()
        names = tuple(n for n, (t, _) in targets.items() if t == target)
        group = ConversionGroup(names=names, shapes={n: tuple(state[n].shape) for n in names}, ops=tuple(forward_ops))
        self._groups[target] = group
        return group

    def revert(self, group: ConversionGroup, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{checkpoint key: ΔW}`` (float32, the checkpoint's layout) for ``deltas`` (in-memory name → ΔW in the
        in-memory layout, a subset of ``group.names``; the others count as zero), by transformers' save path; checked
        by converting the result back (load path) to exactly ``deltas``. Raises :class:`ConversionRefused`
        otherwise."""
        from transformers.core_model_loading import revert_weight_conversion

        full = {n: deltas[n].float() if n in deltas else torch.zeros(group.shapes[n]) for n in group.names}
        try:
            on_disk = dict(revert_weight_conversion(self.model, dict(full)))
            back = self._convert_on_load(on_disk)
        except Exception as exc:  # noqa: BLE001 - transformers' ops raise anything; refused, named
            raise ConversionRefused(f"transformers cannot carry it back to the checkpoint's layout "
                                    f"({type(exc).__name__}: {exc})") from None
        if set(back) != set(full) or any(not torch.equal(back[n], full[n]) for n in full):
            raise ConversionRefused(f"converting its ΔW to the checkpoint's layout ({', '.join(group.ops)}) and "
                                    "back does not give the same ΔW")
        return {k: v.float().contiguous() for k, v in on_disk.items()}

    def _convert_on_load(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (checkpoint keys) converted as ``from_pretrained`` loads them: renamings, then at most one
        converter per key, the converters' groups run once all their tensors are in (the mirror of
        ``revert_weight_conversion``'s loop)."""
        from transformers.core_model_loading import apply_converters, apply_renamings

        by_pattern = {p: c for c in self._load_converters for p in c.source_patterns}
        pending: dict = {}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            renamed, pattern = apply_converters(apply_renamings(key, self._load_renamings), self._load_converters)
            if pattern is None:
                out[renamed] = tensor
                continue
            pending.setdefault(renamed, deepcopy(by_pattern[pattern])).add_tensor(renamed, key, pattern, tensor)
        for first_name, converter in pending.items():
            for name, value in converter.convert(first_name, model=self.model, config=self.model.config).items():
                out[name] = value[0] if isinstance(value, list) else value
        return out

    def checkpoint_shapes(self, group: ConversionGroup) -> dict[str, tuple[int, ...]]:
        """The checkpoint keys and shapes transformers saves ``group`` as (computed on the meta device)."""
        from transformers.core_model_loading import revert_weight_conversion

        if group in self._saved_shapes:
            return self._saved_shapes[group]
        meta = {n: torch.empty(group.shapes[n], device="meta") for n in group.names}
        try:
            saved = {k: tuple(v.shape) for k, v in revert_weight_conversion(self.model, meta).items()}
        except Exception as exc:  # noqa: BLE001
            raise ConversionRefused(f"transformers cannot carry it back to the checkpoint's layout "
                                    f"({type(exc).__name__}: {exc})") from None
        self._saved_shapes[group] = saved
        return saved


class ConvertedSource(SplitPartsSource):
    """``inner`` with the in-memory parameters of ``groups`` replaced by the checkpoint tensors transformers stores
    them as: ``keys()`` are inner's other keys plus each group's checkpoint keys. A group's ΔW is computed once
    (float32, from inner's ΔW of the parameters it adapts, zeros for the others) and carried back by
    :meth:`ModelConversions.revert` when the first of its keys is asked for."""

    def __init__(self, inner: DeltaSource, conversions: ModelConversions, groups: list[ConversionGroup]):
        adapted = set(inner.keys())
        owner: dict[str, ConversionGroup] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for group in groups:
            saved = conversions.checkpoint_shapes(group)
            shapes.update(saved)
            owner.update({key: group for key in saved})
        converted = {n for g in groups for n in g.names}
        super().__init__(inner, owner, shapes, [k for k in inner.keys() if k not in converted])
        self._conversions = conversions
        self._adapted = {group: [n for n in group.names if n in adapted] for group in groups}

    def converted(self) -> dict[str, ConversionGroup]:
        """Checkpoint key → the group of in-memory parameters it is converted from."""
        return dict(self._owner)

    def compute_parts(self, group: ConversionGroup) -> dict[str, torch.Tensor]:
        deltas = {n: self.inner.delta(n, "cpu") for n in self._adapted[group]}
        try:
            return self._conversions.revert(group, deltas)
        except ConversionRefused as exc:
            raise BaseModelMismatchError(f"{self.path}: layer {self._adapted[group][0]!r}: {exc}; merge with "
                                         "PEFT and save_pretrained instead") from None
