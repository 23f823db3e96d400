"""What :func:`~randlora_io.train.attach` returns: the attached layers and their state (attached / merged /
disabled), and the operations on it — save (also from sharded or wrapped models), merge, unmerge, detach,
``disable_adapter()``.

States and what each operation does there (PEFT's semantics, with the double merge made impossible):

==================  ===================================  ==========================================================
state               ``merge()``                          ``unmerge()`` / ``detach()`` / ``save()``
==================  ===================================  ==========================================================
attached            adds ΔW once; detaches by default    no-op / original modules back / writes the file
merged (attached)   no-op (never ΔW twice)               W restored / merged modules back / refused
merged + detached   no-op                                W restored and the layers re-attached / no-op / refused
detached            refused (nothing attached)           no-op / no-op / writes the file (the trained λ, γ)
==================  ===================================  ==========================================================
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..format.adapter import RandloraAdapter, build_adapter, write_adapter
from ..format.vera import VeraLayer
from ..format.vera_file import VeraAdapter, build_vera_adapter, read_any_adapter, write_vera_adapter
from ..errors import AdapterShapeError, AdapterStateError, BasisMismatchError
from ..format.fingerprint import base_fingerprint
from ..format.spec import GeneratorSpec
from . import hf_save
from .config import RandloraConfig
from .layer import SharedBases, WrappedLayer

# wrapper prefixes that torch inserts in parameter names (DDP, FSDP1, torch.compile, activation checkpointing)
_WRAPPER_PARTS = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 ``fully_shard``, tensor parallel) gathered to the full tensor — a collective, so every rank
    must call it; any other tensor as it is."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def _plain_name(key: str) -> str:
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key


class _StateDictView:
    """Look-ups of ``<module path>.<leaf>`` in a full state dict whose keys may carry wrapper prefixes."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.by_name = {_plain_name(k): v for k, v in state_dict.items()}

    def get(self, name: str) -> torch.Tensor:
        plain = _plain_name(name)
        if plain in self.by_name:
            return self.by_name[plain]
        matches = [k for k in self.by_name if k.endswith("." + plain)]
        if len(matches) != 1:
            raise AdapterShapeError(f"state_dict has no {plain!r}; pass the full state dict of the model the "
                                    "adapter is attached to (e.g. get_model_state_dict(model, options="
                                    "StateDictOptions(full_state_dict=True)))")
        return self.by_name[matches[0]]


@dataclass
class AttachHandle:
    """What :func:`attach` did to ``model``: the wrapped layers (by base weight key) and the shared bases. The
    layers are RandLoRA's (λ, γ) or VeRA's (λ_b, λ_d), as ``config.method`` says; each names its two trained
    tensors in ``SCALE_NAMES``."""

    model: nn.Module
    config: RandloraConfig
    generator: GeneratorSpec
    shared: SharedBases
    layers: dict[str, WrappedLayer]           # base weight key ("<module path>.weight") → layer
    module_names: dict[str, str]              # base weight key → module path
    base_model_id: str | None = None
    attached: bool = True
    merged: bool = False
    # what unmerge() needs: the trained tensors as merged (fp32 CPU copies), and the exact pre-merge weights when kept
    _merged_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _hooks: list = field(default_factory=list, repr=False)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (λ and γ, or λ_b and λ_d), in layer order."""
        return [p for layer in self.layers.values() for p in layer.scales()]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------------------------- saving

    def to_adapter(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> RandloraAdapter | VeraAdapter:
        """The trained state as an in-memory randlora adapter (float32 scales, a base fingerprint): a
        :class:`RandloraAdapter`, or a :class:`VeraAdapter` for ``method="vera"``.

        ``state_dict``: a full state dict of the model (keys may carry DDP / FSDP / compile prefixes) to read the
        trained tensors and the base weights from instead of the live modules — the way to save from FSDP1
        (``FULL_STATE_DICT``) or FSDP2 (``get_model_state_dict(..., full_state_dict=True)``) without gathering here.
        Without it, DTensor parameters (FSDP2) are gathered, which is a collective: call on every rank."""
        if self.merged:
            raise AdapterStateError("the adapter is merged into the base weights, so the base fingerprint cannot be "
                                    "computed; save before merge() or after unmerge()")
        view = _StateDictView(state_dict) if state_dict is not None else None
        firsts, seconds, weights = {}, {}, {}
        for key, layer in self.layers.items():
            name = self.module_names[key]
            if view is not None:
                trained = [view.get(f"{name}.{n}") for n in layer.SCALE_NAMES]
                weight = view.get(f"{name}.base_layer.weight")
            else:
                trained = [full_tensor(p) for p in layer.scales()]
                weight = full_tensor(layer.base_layer.weight)
            checks = (*zip(layer.SCALE_NAMES, trained, layer.scale_shapes()),
                      ("base weight", weight, layer.stored_shape))
            for what, t, shape in checks:
                if tuple(t.shape) != tuple(shape):
                    raise AdapterShapeError(
                        f"{name}: {what} has shape {list(t.shape)} here but {list(shape)} when attached: the model "
                        "looks sharded (FSDP with use_orig_params=True); save inside FSDP.summon_full_params(model), "
                        "or pass state_dict= a full state dict of the model")
            firsts[key] = trained[0].detach().to("cpu", torch.float32, copy=True)
            seconds[key] = trained[1].detach().to("cpu", torch.float32, copy=True)
            weights[key] = weight
        base_model = {"id": self.base_model_id, "revision": None, "fingerprint": base_fingerprint(weights)}
        if self.config.method == "vera":
            layers = {k: VeraLayer(shape=l.stored_shape, fan_in_fan_out=l.fan_in_fan_out)
                      for k, l in self.layers.items()}
            adapter = build_vera_adapter(generator=self.generator, rank=self.shared.rank, layers=layers,
                                         lambda_b=firsts, lambda_d=seconds, base_model=base_model, checksum=False)
        else:
            shapes = {k: (l.spec.shape, l.spec.fan_in_fan_out) for k, l in self.layers.items()}
            adapter = build_adapter(generator=self.generator, rank=self.shared.rank, alpha=float(self.config.alpha),
                                    layers=shapes, lambdas=firsts, gammas=seconds, min_dim=self.shared.min_dim,
                                    max_dim=self.shared.max_dim, checksum=False, base_model=base_model)
        # the bases the layers trained with are the ones the header describes: checksum them, do not redraw them
        adapter.header.bases_sha256 = self.shared.any().sha256()
        return adapter

    def save(self, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None
             ) -> RandloraAdapter | VeraAdapter:
        """Write the randlora file (atomically) and return the adapter written. See :meth:`to_adapter` for
        ``state_dict``. Under ``torch.distributed`` without ``state_dict``, every rank must call (DTensors are
        gathered) and rank 0 writes."""
        adapter = self.to_adapter(state_dict)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if state_dict is not None or not distributed or torch.distributed.get_rank() == 0:
            (write_vera_adapter if isinstance(adapter, VeraAdapter) else write_adapter)(adapter, path)
        return adapter

    # ---------------------------------------------------------------------------------------------- merge state

    @torch.no_grad()
    def merge(self, detach: bool = True, keep_original: bool | None = None) -> nn.Module:
        """Add every ΔW into its base weight once (float32 add, one rounding to the weight's dtype) and, by default,
        put the original modules back (PEFT's ``merge_and_unload``); returns the model. Merging a merged adapter is
        a no-op, merging a detached one is refused.

        ``keep_original``: keep the exact pre-merge weight of non-float32 bases so :meth:`unmerge` restores it bit
        for bit (default: only when ``detach`` is False, as it costs a copy of the targeted weights). Without it,
        unmerge subtracts ΔW: exact to ~1e-6 relative for float32, one rounding of the weight's dtype otherwise."""
        if self.merged:
            return self.detach() if detach else self.model
        if not self.attached:
            raise AdapterStateError("the adapter was detached, so it is no longer part of the model; attach it again "
                                    "(load_into) before merging")
        keep = (not detach) if keep_original is None else keep_original
        for key, layer in self.layers.items():
            w = layer.base_layer.weight
            self._merged_scales[key] = tuple(p.detach().to("cpu", torch.float32, copy=True) for p in layer.scales())
            if keep and w.dtype != torch.float32:
                self._originals[key] = w.detach().clone()
            w.copy_((w.float() + layer.delta()).to(w.dtype))
            layer.merged = True
        self.merged = True
        return self.detach() if detach else self.model

    @torch.no_grad()
    def unmerge(self) -> nn.Module:
        """Take ΔW (as it was merged) out of the base weights again and re-attach the layers if merge detached them;
        a no-op when not merged. Returns the model."""
        if not self.merged:
            return self.model
        if not self.attached:
            self._reattach()
        for key, layer in self.layers.items():
            w = layer.base_layer.weight
            if key in self._originals:
                w.copy_(self._originals.pop(key))
            else:
                first, second = self._merged_scales[key]
                bases = self.shared.on(w.device)
                delta = layer.spec_delta(first.to(w.device), second.to(w.device), bases)
                w.copy_((w.float() - delta).to(w.dtype))
            layer.merged = False
        self._merged_scales.clear()
        self.merged = False
        return self.model

    def detach(self) -> nn.Module:
        """Put the original modules back (holding ΔW if merged, else unchanged) and return the model."""
        if self.attached:
            for key, layer in self.layers.items():
                set_module(self.model, self.module_names[key], layer.base_layer)
            hf_save.uninstall(self)
            self.attached = False
        return self.model

    def _reattach(self) -> None:
        for key, layer in self.layers.items():
            name = self.module_names[key]
            if self.model.get_submodule(name) is not layer.base_layer:
                raise AdapterStateError(f"{name}: the model's module there is no longer the one this adapter merged "
                                        "into; cannot unmerge")
        for key, layer in self.layers.items():
            set_module(self.model, self.module_names[key], layer)
        hf_save.install(self)
        self.attached = True

    @torch.no_grad()
    def load_scales(self, path: str | os.PathLike) -> RandloraAdapter | VeraAdapter:
        """Load the trained tensors from the randlora file ``path`` into the attached layers (resuming a checkpoint
        of this same setup): the file must have this method, these layers and shapes, this rank (and alpha) and
        these bases."""
        adapter = read_any_adapter(path)
        h = adapter.header
        vera = isinstance(adapter, VeraAdapter)
        same_alpha = vera or self.config.method == "vera" or float(h.alpha) == float(self.config.alpha)
        if (vera != (self.config.method == "vera") or set(h.layers) != set(self.layers)
                or h.rank != self.shared.rank or not same_alpha):
            raise AdapterShapeError(f"{path}: its method, layers, rank or alpha differ from the attached adapter's; "
                                    "load it into a fresh base with load_into instead")
        if h.bases_sha256 and h.bases_sha256 != self.shared.any().sha256():
            raise BasisMismatchError(f"{path}: was trained with other shared bases (generator, seed or sizes differ)")
        tables = (adapter.lambda_b, adapter.lambda_d) if vera else (adapter.lambdas, adapter.gammas)
        for key, layer in self.layers.items():
            if tuple(h.layers[key].shape) != tuple(layer.stored_shape):
                raise AdapterShapeError(f"{path}: {key} is {list(h.layers[key].shape)} in the file but "
                                        f"{list(layer.stored_shape)} in the model")
            for param, table in zip(layer.scales(), tables):
                param.copy_(table[key])
        return adapter

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[nn.Module]:
        """``with handle.disable_adapter(): ...`` runs the model as the base (ΔW off), as PEFT's context does."""
        if not self.attached:
            raise AdapterStateError("the adapter is detached; there is nothing to disable")
        if self.merged:
            raise AdapterStateError("the adapter is merged into the base weights; unmerge() before disabling it")
        previous = {key: layer.disabled for key, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.disabled = True
        try:
            yield self.model
        finally:
            for key, layer in self.layers.items():
                layer.disabled = previous[key]
