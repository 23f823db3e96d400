"""Attach RandLoRA to a torch model, save what was trained in the randlora format, merge, detach, resume."""

from __future__ import annotations

import dataclasses
import os
import re

import torch
from torch import nn

from ..format.adapter import peft_shared_dims
from ..format.basis import Bases
from ..errors import AdapterShapeError, BaseModelMismatchError, HeaderError
from ..format.fingerprint import base_fingerprint, recorded_fingerprint
from ..format.spec import GeneratorSpec, max_out_in, normalisation
from ..format.vera_file import VeraAdapter, read_any_adapter
from . import hf_save
from .config import ALL_LINEAR, RandloraConfig
from .handle import AttachHandle, set_module
from .layer import RandloraLayer, SharedBases, WrappedLayer, is_conv1d
from .vera_layer import SharedVeraBases, VeraTrainLayer

__all__ = ["AttachHandle", "attach", "base_fingerprint", "load_into"]


def _refuse_tied(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """A targeted weight that is also registered elsewhere (a tied ``lm_head`` shares the input embeddings): merging
    ΔW into it would change the other module too, so it is refused by name."""
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    for name, module in targets.items():
        others = [n for n in names.get(id(module.weight), []) if n != f"{name}.weight"]
        if others:
            raise HeaderError(f"{name}: its weight is tied to {others[0]} (e.g. tie_word_embeddings), so training "
                              f"RandLoRA on it would change {others[0].rsplit('.', 1)[0]} too when merged; leave "
                              f"{name} out of target_modules, or untie the weights first")


def _targets(model: nn.Module, config: RandloraConfig) -> dict[str, nn.Module]:
    """``{module name: module}`` of the Linear / Conv1D modules ``config`` targets (never the output layer for
    ``all-linear``); an error when nothing matches."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, WrappedLayer):
            raise HeaderError(f"{name}: the model already has an adapter attached; detach it first")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or not config.matches(name):
            continue
        if config.target_modules == ALL_LINEAR and module is output:
            continue
        found[name] = module
    if not found:
        raise HeaderError(f"target_modules {config.target_modules!r} matched no Linear or Conv1D module of "
                          f"{type(model).__name__}; check the module names (model.named_modules())")
    _refuse_tied(model, found)
    return found


def _peft_cast(config: RandloraConfig, generator: GeneratorSpec, targets: dict[str, nn.Module]) -> GeneratorSpec:
    """PEFT casts its shared bases to each targeted layer's dtype in turn, so one bf16 / fp16 target rounds them for
    every layer: a ``peft`` generator on such a model records (and its bases get) that ``cast_dtype``, so the file,
    the merge and PEFT's own model of it agree. Targets that mix bfloat16 and float16 are refused (PEFT's bases
    would then depend on the layer order)."""
    halves = {m.weight.dtype for m in targets.values()} & {torch.bfloat16, torch.float16}
    if config.generator != "peft" or not halves:
        return generator
    if len(halves) > 1:
        raise HeaderError("the targeted weights mix bfloat16 and float16; PEFT's shared bases would then depend on "
                          "the layer order: cast the model to one dtype first")
    return dataclasses.replace(generator, cast_dtype="bfloat16" if halves == {torch.bfloat16} else "float16")


def attach(model: nn.Module, config: RandloraConfig | None = None, *, min_dim: int | None = None,
           max_dim: int | None = None, generator: GeneratorSpec | None = None,
           bases: Bases | None = None) -> AttachHandle:
    """Wrap the targeted Linear / Conv1D modules of ``model`` with :class:`RandloraLayer` (or, for
    ``config.method == "vera"``, :class:`VeraTrainLayer`) and freeze every other parameter. Bases are shared by all
    layers, sized by PEFT's rule from the targets (RandLoRA: ``min_dim``/``max_dim``; VeRA: max_out/max_in, passed
    the same way), drawn by ``config``'s generator (or ``generator``, when resuming a file; ``bases`` reuses ones
    already drawn), one copy per device."""
    config = config or RandloraConfig()
    targets = _targets(model, config)
    shapes = {name: (tuple(m.weight.shape), is_conv1d(m)) for name, m in targets.items()}
    if config.method == "vera":
        if min_dim is None or max_dim is None:
            min_dim, max_dim = max_out_in(shapes.values())   # (max_out, max_in)
        generator = generator or _peft_cast(config, config.generator_spec(min(min_dim, max_dim)), targets)
        shared = SharedVeraBases(generator, config.r, min_dim, max_dim, bases)

        def make(module: nn.Module, key: str) -> WrappedLayer:
            return VeraTrainLayer(module, key, shared, config.d_initial, config.dropout)
    else:
        if min_dim is None or max_dim is None:
            min_dim, max_dim = peft_shared_dims(shapes.values())
        if config.r > min_dim:
            raise HeaderError(f"r={config.r} exceeds the smallest shared dimension {min_dim}; choose r ≤ {min_dim}")
        generator = generator or _peft_cast(config, config.generator_spec(min_dim), targets)
        shared = SharedBases(generator, config.r, min_dim, max_dim, bases)
        scaling = float(config.alpha) / config.r * normalisation(generator)

        def make(module: nn.Module, key: str) -> WrappedLayer:
            return RandloraLayer(module, key, shared, scaling, config.dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    layers, names = {}, {}
    for name, module in targets.items():
        key = f"{name}.weight"
        layer = make(module, key)
        set_module(model, name, layer)
        layers[key], names[key] = layer, name
    model_id = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    model_id = model_id if isinstance(model_id, str) and not os.path.isabs(model_id) else None
    handle = AttachHandle(model=model, config=config, generator=generator, shared=shared, layers=layers,
                          module_names=names, base_model_id=model_id)
    hf_save.install(handle)
    return handle


def load_into(model: nn.Module, path: str | os.PathLike, *, check_fingerprint: bool = False) -> AttachHandle:
    """Attach the adapter in ``path`` (a randlora file, RandLoRA or VeRA) to ``model`` and load its trained
    tensors, to resume training or to run it unmerged. Every adapter layer must exist in ``model`` with the recorded
    shape."""
    adapter = read_any_adapter(path)
    h = adapter.header
    names = [key.removesuffix(".weight") for key in h.layers]
    modules = dict(model.named_modules())
    for key, name in zip(h.layers, names):
        module = modules.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise AdapterShapeError(f"{path}: layer {key!r} has no matching module in {type(model).__name__}")
        if tuple(module.weight.shape) != tuple(h.layers[key].shape):
            raise AdapterShapeError(f"{path}: {key!r} is {list(h.layers[key].shape)} in the adapter but "
                                    f"{list(module.weight.shape)} in the model")
    targets = "|".join(map(re.escape, names))
    bases = adapter.bases(verify=True)  # a file whose bases this machine cannot regenerate is refused here
    if isinstance(adapter, VeraAdapter):
        config = RandloraConfig(method="vera", r=h.rank, target_modules=targets, generator=h.generator.name,
                                seed=h.seed)
        handle = attach(model, config, min_dim=h.max_out, max_dim=h.max_in, generator=h.generator, bases=bases)
        tables = (adapter.lambda_b, adapter.lambda_d)
    else:
        config = RandloraConfig(r=h.rank, alpha=h.alpha, target_modules=targets, generator=h.generator.name,
                                kind=h.generator.kind, seed=h.seed)
        handle = attach(model, config, min_dim=h.min_dim, max_dim=h.max_dim, generator=h.generator, bases=bases)
        tables = (adapter.lambdas, adapter.gammas)
    with torch.no_grad():
        for key, layer in handle.layers.items():
            for param, table in zip(layer.scales(), tables):
                param.copy_(table[key].float())
    fingerprint = recorded_fingerprint(h.base_model)
    if check_fingerprint and fingerprint is not None:
        actual = base_fingerprint({k: l.base_layer.weight for k, l in handle.layers.items()})
        if actual != fingerprint:
            handle.detach()
            raise BaseModelMismatchError(f"{path}: the model's targeted weights differ from the base this adapter "
                                         "was trained on (fingerprint mismatch)")
    return handle
