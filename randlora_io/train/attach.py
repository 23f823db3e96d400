"""Attach RandLoRA to a torch model, save what was trained in the randlora format, merge, detach, resume."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import RandloraAdapter, build_adapter, peft_shared_dims, read_adapter, write_adapter
from ..basis import Bases
from ..errors import AdapterShapeError, BaseModelMismatchError, HeaderError
from ..spec import GeneratorSpec, normalisation
from .config import ALL_LINEAR, RandloraConfig
from .layer import RandloraLayer, SharedBases, is_conv1d

FINGERPRINT_PREFIX = "sha256-weights:"


def _targets(model: nn.Module, config: RandloraConfig) -> dict[str, nn.Module]:
    """``{module name: module}`` of the Linear / Conv1D modules ``config`` targets (never the output layer for
    ``all-linear``); an error when nothing matches."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, RandloraLayer):
            raise HeaderError(f"{name}: the model already has RandLoRA attached; detach it first")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or not config.matches(name):
            continue
        if config.target_modules == ALL_LINEAR and module is output:
            continue
        found[name] = module
    if not found:
        raise HeaderError(f"target_modules {config.target_modules!r} matched no Linear or Conv1D module of "
                          f"{type(model).__name__}; check the module names (model.named_modules())")
    return found


def base_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """``sha256-weights:<hex>`` over the targeted base weights: each key (sorted), shape, dtype and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        w = weights[key].detach().contiguous().cpu()
        digest.update(f"{key}|{list(w.shape)}|{w.dtype}\n".encode())
        digest.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return FINGERPRINT_PREFIX + digest.hexdigest()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class AttachHandle:
    """What :func:`attach` did to ``model``: the wrapped layers (by base weight key) and the shared bases."""

    model: nn.Module
    config: RandloraConfig
    generator: GeneratorSpec
    shared: SharedBases
    layers: dict[str, RandloraLayer]          # base weight key ("<module path>.weight") → layer
    module_names: dict[str, str]              # base weight key → module path
    base_model_id: str | None = None
    attached: bool = True

    def parameters(self) -> list[nn.Parameter]:
        """The trainable λ and γ, in layer order."""
        return [p for layer in self.layers.values() for p in (layer.randlora_lambda, layer.randlora_gamma)]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_adapter(self) -> RandloraAdapter:
        """The trained state as an in-memory randlora adapter (float32 scales, a base fingerprint)."""
        lambdas = {k: l.randlora_lambda.detach().float().cpu().clone() for k, l in self.layers.items()}
        gammas = {k: l.randlora_gamma.detach().float().cpu().clone() for k, l in self.layers.items()}
        shapes = {k: (l.spec.shape, l.spec.fan_in_fan_out) for k, l in self.layers.items()}
        fingerprint = base_fingerprint({k: l.base_layer.weight for k, l in self.layers.items()})
        adapter = build_adapter(generator=self.generator, rank=self.shared.rank, alpha=float(self.config.alpha),
                                layers=shapes, lambdas=lambdas, gammas=gammas, min_dim=self.shared.min_dim,
                                max_dim=self.shared.max_dim, checksum=False,
                                base_model={"id": self.base_model_id, "revision": None, "fingerprint": fingerprint})
        # the bases the layers trained with are the ones the header describes: checksum them, do not redraw them
        device = next(iter(self.layers.values())).randlora_lambda.device
        adapter.header.bases_sha256 = self.shared.on(device).sha256()
        return adapter

    def save(self, path: str | os.PathLike) -> RandloraAdapter:
        """Write the randlora file (atomically) and return the adapter written."""
        adapter = self.to_adapter()
        write_adapter(adapter, path)
        return adapter

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Add every ΔW into its base weight (float32 add, one rounding to the weight's dtype) and detach."""
        for layer in self.layers.values():
            w = layer.base_layer.weight
            w.copy_((w.float() + layer.delta()).to(w.dtype))
        return self.detach()

    def detach(self) -> nn.Module:
        """Put the original modules back (unmerged) and return the model."""
        if self.attached:
            for key, layer in self.layers.items():
                _set_module(self.model, self.module_names[key], layer.base_layer)
            self.attached = False
        return self.model


def attach(model: nn.Module, config: RandloraConfig | None = None, *, min_dim: int | None = None,
           max_dim: int | None = None, generator: GeneratorSpec | None = None,
           bases: Bases | None = None) -> AttachHandle:
    """Wrap the targeted Linear / Conv1D modules of ``model`` with :class:`RandloraLayer` and freeze every other
    parameter. Bases are shared by all layers, sized by PEFT's rule from the targets (or ``min_dim``/``max_dim``),
    drawn by ``config``'s generator (or ``generator``, when resuming a file; ``bases`` reuses ones already drawn),
    one copy per device."""
    config = config or RandloraConfig()
    targets = _targets(model, config)
    shapes = {name: (tuple(m.weight.shape), is_conv1d(m)) for name, m in targets.items()}
    if min_dim is None or max_dim is None:
        min_dim, max_dim = peft_shared_dims(shapes.values())
    if config.r > min_dim:
        raise HeaderError(f"r={config.r} exceeds the smallest shared dimension {min_dim}; choose r ≤ {min_dim}")
    generator = generator or config.generator_spec(min_dim)
    shared = SharedBases(generator, config.r, min_dim, max_dim, bases)
    scaling = float(config.alpha) / config.r * normalisation(generator)
    for p in model.parameters():
        p.requires_grad_(False)
    layers, names = {}, {}
    for name, module in targets.items():
        key = f"{name}.weight"
        layer = RandloraLayer(module, key, shared, scaling, config.dropout)
        _set_module(model, name, layer)
        layers[key], names[key] = layer, name
    model_id = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    model_id = model_id if isinstance(model_id, str) and not os.path.isabs(model_id) else None
    return AttachHandle(model=model, config=config, generator=generator, shared=shared, layers=layers,
                        module_names=names, base_model_id=model_id)


def load_into(model: nn.Module, path: str | os.PathLike, *, check_fingerprint: bool = False) -> AttachHandle:
    """Attach the adapter in ``path`` (a randlora file) to ``model`` and load its λ, γ, to resume training or to
    run it unmerged. Every adapter layer must exist in ``model`` with the recorded shape."""
    adapter = read_adapter(path)
    h = adapter.header
    names = [key.removesuffix(".weight") for key in h.layers]
    modules = dict(model.named_modules())
    for key, name in zip(h.layers, names):
        module = modules.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise AdapterShapeError(f"{path}: layer {key!r} has no matching module in {type(model).__name__}")
        if tuple(module.weight.shape) != h.layers[key].shape:
            raise AdapterShapeError(f"{path}: {key!r} is {list(h.layers[key].shape)} in the adapter but "
                                    f"{list(module.weight.shape)} in the model")
    config = RandloraConfig(r=h.rank, alpha=h.alpha, target_modules="|".join(map(re.escape, names)),
                            generator=h.generator.name, kind=h.generator.kind, seed=h.seed)
    bases = adapter.bases(verify=True)  # a file whose bases this machine cannot regenerate is refused here
    handle = attach(model, config, min_dim=h.min_dim, max_dim=h.max_dim, generator=h.generator, bases=bases)
    with torch.no_grad():
        for key, layer in handle.layers.items():
            layer.randlora_lambda.copy_(adapter.lambdas[key].float())
            layer.randlora_gamma.copy_(adapter.gammas[key].float())
    fingerprint = (h.base_model or {}).get("fingerprint")
    if check_fingerprint and isinstance(fingerprint, str) and fingerprint.startswith(FINGERPRINT_PREFIX):
        actual = base_fingerprint({k: l.base_layer.weight for k, l in handle.layers.items()})
        if actual != fingerprint:
            handle.detach()
            raise BaseModelMismatchError(f"{path}: the model's targeted weights differ from the base this adapter "
                                         "was trained on (fingerprint mismatch)")
    return handle

