"""Merging into an in-memory state dict (training code, live models): the same arithmetic as the streaming merge.

``source_for_state_dict`` opens an adapter in a state dict's key names as PEFT loads it onto those weights;
``merge_into_state_dict`` adds one or several adapters' ΔW (float32, one rounding), or composes them by one of
the methods of :mod:`randlora_io.merge.composition`; tied tensors (one storage, two names) are merged once.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence

import torch

from ..checkpoint.base_model import STATE_DICT, BaseModelInfo
from ..checkpoint.directory import absent_weight_hint
from ..errors import BaseModelMismatchError
from ..format.adapter import RandloraAdapter
from ..sources.interface import DeltaSource
from ..sources.keymap import for_checkpoint
from ..sources.randlora_file import RandloraSource
from ..sources.registry import open_source
from ..sources.ties import TiedSumSource
from .composition import ComposedSource, composition_for, refuse_non_additive
from .layer import add_delta_
from .terms import apply_term_

Adapter = RandloraAdapter | DeltaSource | str | os.PathLike


def source_for_state_dict(adapter: Adapter,
                          state_dict: Mapping[str, torch.Tensor], *, model_config: Mapping | None = None,
                          conv1d: Collection[str] | None = None) -> DeltaSource:
    """``adapter`` (an adapter object, a source, or a path) as a source in ``state_dict``'s key names, opened as PEFT
    loads it onto those weights (their shapes and dtypes: PEFT casts RandLoRA bases to the weights' dtype); it also
    lists the tensors the adapter replaces (modules_to_save, trained biases). A PEFT dir's layer orientation comes
    from ``model_config`` (the model's config as a dict, e.g. ``model.config.to_dict()``) or ``conv1d`` (exactly the
    GPT-2 style ``Conv1D`` layers, module names or weight keys; ``()`` for none), as a base's config.json gives it."""
    if isinstance(adapter, RandloraAdapter):
        source: DeltaSource = RandloraSource(adapter)
    elif isinstance(adapter, DeltaSource):
        source = adapter
    else:
        source = open_source(adapter, base=BaseModelInfo(
            shapes={k: tuple(v.shape) for k, v in state_dict.items()},
            dtypes={k: v.dtype for k, v in state_dict.items() if v.is_floating_point()},
            config=dict(model_config) if model_config is not None else None, root=STATE_DICT,
            conv1d=frozenset(conv1d) if conv1d is not None else None))
    return for_checkpoint(source, state_dict.keys())


def merge_into_state_dict(
    state_dict: Mapping[str, torch.Tensor] | dict[str, torch.Tensor],
    adapter: Adapter | Sequence[Adapter],
    weight: float | Sequence[float] = 1.0,
    *,
    model_config: Mapping | None = None,
    conv1d: Collection[str] | None = None,
    method: str | None = None,
    density: float | Sequence[float] | None = None,
    lambda_: float | None = None,
    normalize: bool | None = None,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """In-memory merge for training code: returns a new dict with ``W + weight·ΔW`` (float32 add, one rounding)
    for every adapter key; other tensors are passed through. Raises if a key is missing or a shape differs.
    ``model_config`` / ``conv1d``: how a PEFT dir's layers are oriented without a config.json beside the weights
    (see :func:`source_for_state_dict`); a GPT-2 state dict needs one of them when the adapter's single
    ``fan_in_fan_out`` flag cannot say it for every layer.

    Several adapters (a list, with one ``weight`` each) are merged in order; ``method`` and its options compose
    them instead, as :func:`randlora_io.merge.plan.merge` does (DARE's masks keyed by the state dict's names)."""
    adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(adapters)
    if len(weights) != len(adapters):
        raise BaseModelMismatchError(f"got {len(weights)} weights for {len(adapters)} adapters")
    sources = [source_for_state_dict(a, state_dict, model_config=model_config, conv1d=conv1d) for a in adapters]
    composition = composition_for(method, weights, [s.path for s in sources], density=density, lambda_=lambda_,
                                  normalize=normalize, seed=seed)
    tied = _tied_keys(state_dict)
    if composition is not None:
        for source in sources:
            _check_keys(source, state_dict)
            refuse_non_additive(source, composition.method)  # before folding, which hides a tied DoRA layer
        sources, weights = [ComposedSource([_fold_tied(s, tied) for s in sources], composition)], [1.0]
    out = dict(state_dict)
    merged: dict[str, torch.Tensor] = {}  # key → float32 result, shared by keys that share one tensor
    for source, weight in zip(sources, weights):
        _merge_one(source, weight, state_dict, tied, merged)
    for name, w32 in merged.items():
        out[name] = w32.to(state_dict[name].dtype)
    return out


def _check_keys(source: DeltaSource, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Every key ``source`` targets is in ``state_dict`` with the same shape."""
    for key in source.keys():
        if key not in state_dict:
            raise BaseModelMismatchError(f"{source.path}: targets {key!r}, which the state dict does not have"
                                         f"{absent_weight_hint(key, state_dict)}")
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(source.stored_shape(key)):
            raise BaseModelMismatchError(f"{source.path}: {key!r} has shape {list(source.stored_shape(key))}, "
                                         f"the state dict has {list(tensor.shape)}")


def _merge_one(source: DeltaSource, weight: float, state_dict: Mapping[str, torch.Tensor],
               tied: Mapping[str, tuple[str, ...]], merged: dict[str, torch.Tensor]) -> None:
    """``merged[key]`` (float32, started from the state dict's tensor) += weight·ΔW of ``source`` for its keys."""
    _check_keys(source, state_dict)
    for key in source.keys():
        tensor = state_dict[key]
        partners = [n for n in tied.get(key, ()) if n != key]
        if key in source.replacements and any(
                n not in source.replacements or not torch.equal(source.replacements[n], source.replacements[key])
                for n in partners):
            raise BaseModelMismatchError(
                f"{source.path}: replaces {key!r} with its trained copy (modules_to_save) but not {partners[0]!r}, "
                "which is the same tensor in this state dict (tied): PEFT's merged model has the two differ; untie "
                "them in the model first, or train with ensure_weight_tying=True")
        w32 = merged.get(key)
        if w32 is None:
            w32 = tensor.detach().to(torch.float32, copy=True)
        apply_term_(w32, source, key, weight, lambda inner, inner_key: add_delta_(w32, inner, inner_key, weight))
        for name in tied.get(key, (key,)):  # tied weights (one tensor, two names): PEFT merges into the one tensor
            merged[name] = w32


def _fold_tied(source: DeltaSource, tied: Mapping[str, tuple[str, ...]]) -> DeltaSource:
    """``source`` (additive: no DoRA layer, no replaced tensor) with the ΔW of every name of a tied tensor summed
    under its first name (state dict order), as the streaming merge sees it (the checkpoint stores the tensor
    once): a composition then trims, elects signs and normalises over the one tensor, not over each name alone."""
    folded: dict[str, list[str]] = {}
    for key in source.keys():
        first = tied.get(key, (key,))[0]
        if first != key:
            folded.setdefault(first, []).append(key)
    return TiedSumSource(source, folded, {}) if folded else source


def _tied_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Key → every key of ``state_dict`` holding the very same tensor (same storage, offset, shape and strides), for
    keys that share one (a tied lm_head and embedding)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.device.type != "meta":
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                     tensor.stride())
            groups.setdefault(ident, []).append(name)
    return {name: tuple(names) for names in groups.values() if len(names) > 1 for name in names}
