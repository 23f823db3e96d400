"""Adapter keys → the base checkpoint's keys, the way transformers loads that checkpoint.

PEFT adapters (and ``handle.save``) name weights by the in-memory module path (``vit.layers.0.attention.q_proj``);
with transformers ≥ 5 some architectures load checkpoints through a conversion mapping, so the keys on disk differ
(``vit.encoder.layer.0.attention.attention.query.weight``). :func:`for_checkpoint` wraps a :class:`DeltaSource` in a
:class:`CheckpointView` whose keys are the checkpoint's: each adapter key not in the checkpoint is mapped by running
transformers' own loading renames (``conversion_mapping.get_model_conversion_mapping`` and
``core_model_loading.rename_source_key``, on a model built from BASE's ``config.json`` on the meta device) over the
checkpoint's keys and inverting the result. transformers is needed for that path only: without it, or when every key
is already in the checkpoint, the names are kept as they are.

Before renaming, :func:`for_checkpoint` also carries over what renaming alone gets wrong: ``target_parameters``
layers on fused parameters (:mod:`~randlora_io.sources.fused_params`), layers transformers stores rearranged —
transposed, fused on disk, permuted (:mod:`~randlora_io.sources.conversion`) — and tied weights the checkpoint
stores once (:mod:`~randlora_io.sources.ties`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from ..checkpoint.meta_model import meta_model as _meta_model
from ..errors import BaseModelMismatchError, SourceFormatError
from .conversion import ConversionGroup, ConversionRefused, ConvertedSource, ModelConversions
from .fused_params import resolve_param_layers
from .interface import DeltaSource
from .ties import fold_tied_deltas, resolve_tied_replacements, tied_pairs

B = TypeVar("B")


class CheckpointView(DeltaSource):
    """``inner`` seen in the base checkpoint's key names. Its ``keys()`` are the weights with a ΔW plus the tensors
    the adapter replaces (``replacements``: PEFT's modules_to_save and trained biases), so a merge plans both; a
    replaced key has no ΔW (:func:`randlora_io.merge.terms.apply_term_` writes it)."""

    def __init__(self, inner: DeltaSource, rename: Mapping[str, str],
                 replacements: Mapping[str, torch.Tensor] | None = None):
        """``rename``: inner key → checkpoint key, for the keys whose names differ (others are kept);
        ``replacements``: inner's, less those a tied weight already writes (default: all of inner's)."""
        self.inner, self.kind, self.path = inner, inner.kind, inner.path
        self._rename = dict(rename)
        self._to_inner = {ck: ik for ik, ck in self._rename.items()}
        replacements = inner.replacements if replacements is None else replacements
        self.replacements = {self._name(k): v for k, v in replacements.items()}
        self.base_copies = {self._name(k): v for k, v in inner.base_copies.items()}
        self._delta_keys = [self._name(k) for k in inner.keys()]

    @property
    def adapter(self):
        """The wrapped randlora adapter, if any (its fingerprint and bases are checked before a merge)."""
        return getattr(self.inner, "adapter", None)

    def _name(self, inner_key: str) -> str:
        return self._rename.get(inner_key, inner_key)

    def inner_key(self, key: str) -> str:
        """The wrapped source's name for checkpoint key ``key``."""
        return self._to_inner.get(key, key)

    def keys(self) -> list[str]:
        return self._delta_keys + [k for k in self.replacements if k not in set(self._delta_keys)]

    def stored_shape(self, key: str) -> tuple[int, ...]:
        if key in self.replacements:
            return tuple(self.replacements[key].shape)
        return self.inner.stored_shape(self.inner_key(key))

    def fan_in_fan_out(self, key: str) -> bool:
        return self.inner.fan_in_fan_out(self.inner_key(key))

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.inner.delta(self.inner_key(key), device)

    def dora_magnitude(self, key: str) -> torch.Tensor | None:
        return self.inner.dora_magnitude(self.inner_key(key))

    def dora_delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.inner.dora_delta(self.inner_key(key), device)


def for_checkpoint(source: DeltaSource, base_keys: Collection[str], root: str | Path | None = None,
                   on_note: Callable[[str], None] | None = None) -> DeltaSource:
    """``source`` in the key names of a base whose tensor keys are ``base_keys`` (``root``: its directory, whose
    ``config.json`` tells transformers' conversion mapping; ``on_note`` hears what PEFT's merge does that its
    unmerged model does not, e.g. one tensor shared by several adapted layers). Returns ``source`` itself when nothing needs renaming
    and it replaces no tensor, else a :class:`CheckpointView`. Raises when the adapter replaces a tensor the base lacks,
    or targets a tensor transformers fuses on load."""
    base_keys = set(base_keys)
    replacements = resolve_tied_replacements(source.path, source.replacements, base_keys,
                                             Path(root) if root is not None else None)
    if getattr(source, "param_layers", None):
        source = resolve_param_layers(source, base_keys, root)
    wanted = _absent(source, replacements, base_keys)
    _refuse_multihead_attention(source, wanted, base_keys)
    if wanted and root is not None:
        source = fold_tied_deltas(source, base_keys, Path(root), on_note)
        source = _convert_layers(source, _absent(source, replacements, base_keys), base_keys, Path(root))
    wanted = _absent(source, replacements, base_keys)
    rename: dict[str, str] = {}
    if wanted and root is not None:
        loaded = loaded_names(Path(root), base_keys)
        for key in wanted:
            on_disk = loaded.get(key)
            if on_disk is None:
                continue
            if len(on_disk) > 1:
                raise BaseModelMismatchError(
                    f"{source.path}: targets {key!r}, a tensor transformers fuses on load from {len(on_disk)} "
                    f"checkpoint tensors ({on_disk[0]!r}, …) of the base at {root}; merging an adapter on a fused "
                    "parameter (PEFT target_parameters, e.g. MoE experts) back onto per-expert tensors is not "
                    "supported: target the per-expert modules or merge with PEFT")
            rename[key] = on_disk[0]
    if not rename and not replacements and not source.replacements:
        return source
    view = CheckpointView(source, rename, replacements)
    for key, tensor in view.replacements.items():
        if key not in base_keys:
            raise BaseModelMismatchError(
                f"{source.path}: carries a trained {key!r} (PEFT modules_to_save or a trained bias) that replaces the "
                f"base's, but the base{f' at {root}' if root else ''} has no such tensor: merge into a checkpoint "
                "saved from the model class the adapter was trained on (e.g. with its classification head: "
                "AutoModelForSequenceClassification.from_pretrained(BASE).save_pretrained(DIR))")
    return view


def _absent(source: DeltaSource, replacements: Mapping[str, torch.Tensor], base_keys: set[str]) -> list[str]:
    """The keys ``source`` adapts, replaces or holds copies of that are not among the checkpoint's ``base_keys``."""
    return [k for k in [*source.keys(), *replacements, *source.base_copies] if k not in base_keys]


def _convert_layers(source: DeltaSource, wanted: list[str], base_keys: set[str], root: Path) -> DeltaSource:
    """``source`` with each layer transformers stores rearranged (a ``WeightConverter`` in the conversion mapping of
    ``root``'s model: transposed, fused, split, permuted) carried back onto the checkpoint's tensors
    (:class:`~randlora_io.sources.conversion.ConvertedSource`); ``source`` itself when there is none. Refuses in one
    line a layer whose conversion is not an exact rearrangement, a trained tensor (modules_to_save, bias) or DoRA
    layer on a converted parameter, and a group the checkpoint does not hold as transformers saves it."""
    model = _meta_model(root)
    if model is None:
        return source
    try:
        conversions = _conversions(model)
    except ImportError:
        return source
    adapted = set(source.keys())
    groups: list[ConversionGroup] = []
    for key in wanted:
        try:
            group = conversions.group(key)
        except ConversionRefused as exc:
            raise BaseModelMismatchError(f"{source.path}: layer {key!r}: {exc}; merge with PEFT and save_pretrained "
                                         "instead") from None
        if group is None:
            continue
        stored = "stores it as " + ", ".join(group.ops)
        if key not in adapted:
            raise BaseModelMismatchError(
                f"{source.path}: carries a trained {key!r} (PEFT modules_to_save or a trained bias), a parameter "
                f"transformers {stored} in the base at {root}: replacing it there is not supported; merge with "
                "PEFT and save_pretrained instead")
        if source.dora_magnitude(key) is not None:
            raise BaseModelMismatchError(f"{source.path}: DoRA layer {key!r} is a parameter transformers {stored} in "
                                         f"the base at {root}: not supported; merge with PEFT and save_pretrained")
        if tuple(source.stored_shape(key)) != group.shapes[key]:
            raise BaseModelMismatchError(f"{source.path}: {key!r} has shape {list(source.stored_shape(key))} but the "
                                         f"model of {root}/config.json has {list(group.shapes[key])}")
        if group not in groups:
            groups.append(group)
    if not groups:
        return source
    view = ConvertedSource(source, conversions, groups)
    for key, group in view.converted().items():
        if key not in base_keys:
            raise BaseModelMismatchError(
                f"{source.path}: layer {group.names[0]!r} is saved by transformers as {key!r}, which the base at "
                f"{root} does not hold: merge into a base saved by save_pretrained of the same model class")
    return view


@functools.lru_cache(maxsize=2)
def _conversions(model) -> ModelConversions:
    return ModelConversions(model)


def _refuse_multihead_attention(source: DeltaSource, missing: list[str], base_keys: set[str]) -> None:
    """PEFT's LoRA on an ``nn.MultiheadAttention`` adapts its fused ``in_proj_weight`` and, nested under
    ``base_layer.out_proj``, its ``out_proj``: not supported here; refuse naming the layer instead of a guess."""
    for key in missing:
        module = key.removesuffix(".weight")
        layer = module.split(".base_layer.", 1)[0] if ".base_layer.out_proj" in module else module
        if f"{layer}.in_proj_weight" in base_keys:
            raise BaseModelMismatchError(
                f"{source.path}: adapts {layer!r}, an nn.MultiheadAttention (its weights are in_proj_weight and "
                "out_proj.weight): PEFT's LoRA on a whole MultiheadAttention layer is not supported; merge this "
                "adapter with PEFT's merge_and_unload, or target other layers")


def open_loaded(open_fn: Callable[[B], DeltaSource], base: B, root: str | Path | None) -> DeltaSource:
    """``open_fn(base)``; if that fails because the adapter and the base's names disagree (a weight the base lacks:
    :class:`BaseModelMismatchError`; a targeted module without saved weights: :class:`SourceFormatError`), again
    with ``base`` seen as transformers loads it (:func:`with_loaded_names`), so an adapter in in-memory module names
    opens against a checkpoint that stores them under other keys or rearranged. transformers is only imported in
    that second case; when the base has no other names the first error stands."""
    try:
        return open_fn(base)
    except (BaseModelMismatchError, SourceFormatError):
        aliased = with_loaded_names(base, root)
        if aliased is base:
            raise
    return open_fn(aliased)


def with_loaded_names(base: B, root: str | Path | None) -> B:
    """``base`` (shapes dict, or a ``BaseModelInfo`` with ``shapes`` and ``dtypes``) as the model transformers loads
    from it: each tensor transformers loads under another name (1:1 renames) appears under that name instead, and
    each parameter it loads through a conversion (transposed, chunked, fused…) appears with its in-memory shape,
    and each tied parameter the checkpoint does not store appears with its partner's. ``base`` itself when nothing
    differs."""
    shapes = base.shapes if hasattr(base, "shapes") else base
    names = loaded_names(Path(root), tuple(shapes)) if root is not None else {}
    alias = {name: keys[0] for name, keys in names.items() if len(keys) == 1 and name not in shapes}
    converted = _converted_shapes(Path(root), shapes) if root is not None else {}
    tied = {t: s for t, s in (tied_pairs(Path(root)) or {}).items()
            if t not in shapes and s in shapes} if root is not None else {}
    if not alias and not converted and not tied:
        return base
    hidden = {key for keys in names.values() for key in keys} | {k for _, k in converted.values()}
    converted.update({t: (tuple(shapes[s]), s) for t, s in tied.items() if t not in converted})
    new_shapes = {k: v for k, v in shapes.items() if k not in hidden}
    new_shapes.update({name: shapes[key] for name, key in alias.items()})
    new_shapes.update({name: shape for name, (shape, _) in converted.items()})
    if not hasattr(base, "shapes"):
        return new_shapes
    dtypes = {k: v for k, v in base.dtypes.items() if k in new_shapes}
    dtypes.update({name: base.dtypes[key] for name, key in alias.items() if key in base.dtypes})
    dtypes.update({name: base.dtypes[key] for name, (_, key) in converted.items() if key in base.dtypes})
    return dataclasses.replace(base, shapes=new_shapes, dtypes=dtypes)


def _converted_shapes(root: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """In-memory parameter → (its in-memory shape, one checkpoint key it is converted from), for every parameter of
    ``root``'s model that transformers loads through a conversion from tensors this checkpoint holds with the
    shapes transformers saves (a conversion that is not a rearrangement is left out: the merge refuses it)."""
    model = _meta_model(root)
    if model is None:
        return {}
    try:
        conversions = _conversions(model)
    except ImportError:
        return {}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in model.state_dict():
        if name in shapes:
            continue
        try:
            group = conversions.group(name)
            saved = conversions.checkpoint_shapes(group) if group is not None else {}
        except ConversionRefused:
            continue
        if saved and all(tuple(shapes.get(k, ())) == s for k, s in saved.items()):
            out[name] = (group.shapes[name], next(iter(saved)))
    return out


def loaded_names(root: Path, checkpoint_keys: Collection[str]) -> dict[str, list[str]]:
    """In-memory parameter name → the checkpoint keys transformers loads it from, for the model of ``root``'s
    ``config.json`` (``architectures[0]``); ``{}`` when transformers, the config or the class is unavailable or the
    architecture loads checkpoint keys unchanged."""
    return _loaded_names(str(root), tuple(sorted(checkpoint_keys)))


@functools.lru_cache(maxsize=4)
def _loaded_names(root: str, checkpoint_keys: tuple[str, ...]) -> dict[str, list[str]]:
    model = _meta_model(Path(root))
    if model is None:
        return {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, list[str]] = {}
    for key in checkpoint_keys:
        name, _ = rename_source_key(key, renamings, converters, prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name = key
        if name != key or name in out:
            out.setdefault(name, []).append(key)
    return {name: keys for name, keys in out.items() if name not in checkpoint_keys or len(keys) > 1}
