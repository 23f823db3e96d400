"""PEFT LoRA ``target_parameters`` layers (``ParamWrapper``) on parameters transformers fuses on load, mapped back
onto the base checkpoint's tensors.

A ParamWrapper adapts a raw parameter, e.g. the fused 3-D MoE experts transformers builds from per-expert
checkpoint tensors (Mixtral ``mlp.experts.gate_up_proj`` (E, 2I, h) from ``block_sparse_moe.experts.N.w1`` /
``w3``). Which parameter each saved wrapper adapts and its in-memory shape are read off the model built from BASE's
``config.json`` on the meta device; its fused ΔW is split onto the checkpoint's keys by transformers' own save path
(``core_model_loading.revert_weight_conversion``), so gate/up order and transposes are transformers'.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..checkpoint.meta_model import meta_model as _meta_model
from ..errors import BaseModelMismatchError, SourceFormatError
from .interface import DeltaSource
from .split_parts import SplitPartsSource
from .peft_params import ParamLoraLayer, matches_target, param_delta, param_scaling


@dataclasses.dataclass(frozen=True)
class _FusedParam:
    """A target_parameters layer resolved on the base model: in-memory parameter ``name`` of ``shape``
    (``transposed``: stored (E, in, out)), its rank and scaling, and the checkpoint keys it is saved as."""

    name: str
    layer: ParamLoraLayer
    shape: tuple[int, ...]
    transposed: bool
    r: int
    scaling: float
    keys: tuple[str, ...]


class ParamSplitSource(SplitPartsSource):
    """A PEFT LoRA source (``LoraSource``) whose target_parameters layers are mapped onto the base checkpoint's
    tensors: ``keys()`` are its module layers' keys plus the checkpoint keys of each adapted parameter (e.g. every
    ``block_sparse_moe.experts.N.w1/w3.weight`` for ``mlp.experts.gate_up_proj``). A parameter's ΔW is computed
    once (float32, fused in-memory shape) and split by transformers' save path when the first of its keys is asked
    for; the parts are kept until each has been asked for once (memory: about one fused ΔW per parameter in use)."""

    def __init__(self, inner: DeltaSource, fused: list[_FusedParam], model):
        shapes: dict[str, tuple[int, ...]] = {}
        for f in fused:
            shapes.update(_split_shapes(model, f.name, f.shape))
        super().__init__(inner, {key: f for f in fused for key in f.keys}, shapes, list(inner.layers))
        self._model = model

    def compute_parts(self, f: _FusedParam) -> dict[str, torch.Tensor]:
        where = f"{self.path}: target_parameters layer {f.layer.module!r} ({f.name})"
        fused = param_delta(f.layer, f.shape, f.transposed, f.r, f.scaling, where, "cpu")
        return revert_to_checkpoint(self._model, f.name, fused)


def revert_to_checkpoint(model, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{checkpoint key: tensor}`` that transformers' ``save_pretrained`` writes for the in-memory parameter
    ``name`` holding ``tensor`` (its reverse weight conversion: split per expert, un-concatenated, transposed…);
    ``{name: tensor}`` when transformers saves it unchanged."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, {name: tensor}))


def _split_shapes(model, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in revert_to_checkpoint(model, name, torch.empty(shape, device="meta")).items()}


def resolve_param_layers(source: DeltaSource, base_keys: set[str], root: str | Path | None) -> ParamSplitSource:
    """Which parameter each saved ParamWrapper of ``source`` adapts (PEFT wraps a module's targeted parameters in
    ``named_parameters`` order, the first innermost: saved with the most ``.base_layer`` links), and the checkpoint
    keys transformers saves it as. Refuses in one line when any of it cannot be decided exactly."""
    layers: dict[str, ParamLoraLayer] = dict(source.param_layers)
    config = dict(source.param_config)
    first = next(iter(layers))
    model = _meta_model(Path(root)) if root is not None else None
    if model is None:
        raise BaseModelMismatchError(
            f"{source.path}: adapts raw parameters (target_parameters, layer {first!r}); mapping them onto the "
            f"base's tensors needs transformers and the base's config.json{f' (in {root})' if root else ''} naming a "
            "model class transformers builds: merge into a base saved by save_pretrained")
    by_owner: dict[str, list[ParamLoraLayer]] = {}
    for layer in layers.values():
        by_owner.setdefault(layer.owner, []).append(layer)
    fused = []
    for owner, group in by_owner.items():
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise BaseModelMismatchError(f"{source.path}: target_parameters layer {group[0].module!r}: the base "
                                         f"model at {root} has no module {owner!r}") from None
        targeted = [p for p, _ in module.named_parameters(recurse=False) if matches_target(f"{owner}.{p}", config)]
        if sorted(layer.depth for layer in group) != list(range(len(targeted))):
            raise SourceFormatError(
                f"{source.path}: saves {len(group)} target_parameters wrapper(s) on {owner!r}, but target_parameters "
                f"{config.get('target_parameters')} matches {len(targeted)} parameter(s) of it in the base at "
                f"{root} ({targeted}): config and weights disagree (or another model class)")
        for layer in group:
            param = targeted[len(targeted) - 1 - layer.depth]
            name = f"{owner}.{param}"
            shape = tuple(getattr(module, param).shape)
            try:
                r, scaling = param_scaling(config, name)
            except SourceFormatError as exc:
                raise SourceFormatError(f"{source.path}: {exc}") from None
            keys = _checkpoint_keys(source.path, layer.module, model, name, shape, base_keys)
            fused.append(_FusedParam(name=name, layer=layer, shape=shape, r=r, scaling=scaling, keys=keys,
                                     transposed=len(shape) == 3 and bool(getattr(module, "is_transposed", False))))
    return ParamSplitSource(source, fused, model)


def _checkpoint_keys(path: str, module: str, model, name: str, shape: tuple[int, ...],
                     base_keys: set[str]) -> tuple[str, ...]:
    """The checkpoint keys of in-memory parameter ``name``: itself when the checkpoint has it, else the keys
    transformers' save path writes, all of which the checkpoint must hold, covering the parameter exactly once."""
    if name in base_keys:
        return (name,)
    try:
        shapes = _split_shapes(model, name, shape)
    except Exception as exc:  # noqa: BLE001 - an op transformers cannot reverse on this parameter: refuse, named
        raise BaseModelMismatchError(f"{path}: target_parameters layer {module!r} adapts {name!r}, which "
                                     f"transformers cannot map back to checkpoint tensors ({exc})") from None
    missing = [k for k in shapes if k not in base_keys]
    total = sum(math.prod(s) for s in shapes.values())
    if missing or total != math.prod(shape):
        raise BaseModelMismatchError(
            f"{path}: target_parameters layer {module!r} adapts {name!r}, which transformers saves as "
            f"{len(shapes)} tensor(s) (e.g. {next(iter(shapes))!r}) that the base checkpoint does not hold "
            f"{'(' + repr(missing[0]) + ' missing)' if missing else 'element for element'}: merge into a base "
            "saved by save_pretrained of the same model class")
    return tuple(shapes)
