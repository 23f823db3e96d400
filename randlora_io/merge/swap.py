"""Live adapter swap on a loaded model: :func:`apply_adapter` merges an adapter into the model's weights in place, on
their device; :func:`remove_adapter` puts the exact original weights back (bit for bit, any dtype).

This is how a served model switches between RandLoRA adapters without reloading: apply, serve, remove, apply the next.
Unlike :func:`randlora_io.merge_into_state_dict` no state dict is copied. To make the removal exact (subtracting
ΔW again would not give the bf16 weights back: each apply rounds) each adapted weight keeps a compact backup, on its
device or on ``backup_device``: for bf16/fp16, when smaller than a copy, the int8 difference of the bit patterns (a
small update moves most elements by a few ulps) plus the original values where that does not fit (under 1.5 bytes an
element for an update of ≈ 2 % of W in the tests); otherwise (fp32, large updates) a copy of the original.
``weight`` scales the update (−1 subtracts it: an inexact removal).

Numerics: each adapted weight becomes ``round(W + weight·ΔW)`` computed in float32 — on CPU (and with
``kernel="torch"``) bit for bit what ``merge_into_state_dict`` returns; with the Triton kernel (default on CUDA for
RandLoRA adapters) ΔW is added in place into the bf16/fp16/fp32 weight with no float32 copy, and the result may differ
from it by one rounding step (≤ 1 ulp of W) where the two summation orders straddle a rounding boundary.

Safety: everything is checked before any weight changes (keys, shapes, dtypes, weights shared with an untargeted
tensor); a failure part-way (NaN/Inf in a merged weight) restores what was already changed. ``remove_adapter``
refuses when a weight was replaced or changed in place since it was applied (that change would be lost) or when a
later adapter on the same weights is still applied (remove that one first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..format.adapter import RandloraAdapter
from ..checkpoint.directory import absent_weight_hint
from ..errors import AdapterStateError, BaseModelMismatchError, NonFiniteError
from ..checkpoint.lazy_tensors import peek
from .state_dict import source_for_state_dict
from .layer import add_delta_, all_finite
from .terms import apply_term_
from ..sources.interface import DeltaSource
from ..sources.randlora_file import RandloraSource

_APPLIED = "_randlora_io_applied"  # attribute on the model: the list of applied adapters, oldest first

AdapterArg = RandloraAdapter | DeltaSource | str | os.PathLike


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # float32 moves by far more than 127 ulps
_CHUNK = 1 << 22          # elements per step when comparing bit patterns (bounded temporaries)


@dataclass
class _Backup:
    """What restores one weight bit for bit from its merged values. For a bf16/fp16 weight, when smaller than a copy:
    per element ``orig_bits = new_bits − diff`` (``diff`` int8: a small update moves most elements by a few ulps),
    except at ``index`` where the original ``values`` are kept (moves beyond ±127 ulps, sign changes). Otherwise the
    ``full`` original."""

    diff: torch.Tensor | None = None
    index: torch.Tensor | None = None
    values: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.diff, self.index, self.values, self.full)
                   if t is not None)


def _backup(original: torch.Tensor, merged: torch.Tensor, device: torch.device) -> _Backup:
    """The smaller exact backup of ``original`` given the ``merged`` values now in the weight (same shape, dtype)."""
    bits = _BITS.get(original.dtype)
    if bits is None or not merged.is_contiguous():
        return _Backup(full=original.to(device, copy=True))
    old, new = original.reshape(-1).view(bits), merged.reshape(-1).view(bits)
    numel = old.numel()
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    budget = (numel * original.element_size() - numel) // (index_dtype.itemsize + original.element_size())
    diff = torch.empty(numel, dtype=torch.int8, device=old.device)
    outliers, count = [], 0
    for start in range(0, numel, _CHUNK):
        d = new[start: start + _CHUNK].to(torch.int32) - old[start: start + _CHUNK].to(torch.int32)
        far = (d < -128) | (d > 127)
        outliers.append(far.nonzero().reshape(-1).to(index_dtype) + start)
        count += outliers[-1].numel()
        if count >= budget:               # the compact form would not be smaller than a copy
            return _Backup(full=original.to(device, copy=True))
        diff[start: start + _CHUNK] = d.masked_fill_(far, 0).to(torch.int8)
    index = torch.cat(outliers)
    return _Backup(diff=diff.to(device), index=index.to(device),
                   values=original.reshape(-1)[index.long()].to(device))


def _restore_(tensor: torch.Tensor, backup: _Backup) -> None:
    """Put the original values back into ``tensor`` (which holds the merged values), in place."""
    if backup.full is not None:
        tensor.copy_(backup.full)
        return
    flat = tensor.view(-1)
    bits = flat.view(_BITS[tensor.dtype])
    diff = backup.diff.to(tensor.device)
    for start in range(0, bits.numel(), _CHUNK):
        bits[start: start + _CHUNK] -= diff[start: start + _CHUNK].to(bits.dtype)
    flat[backup.index.to(tensor.device, torch.int64)] = backup.values.to(tensor.device)


@dataclass
class _Applied:
    """One applied adapter: the argument it was applied with, and per weight key the tensor changed, what restores
    its original values and its version counter right after the change."""

    adapter: AdapterArg
    name: str
    weight: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    backups: dict[str, _Backup] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)


def _name(adapter: AdapterArg) -> str:
    if isinstance(adapter, RandloraAdapter):
        return adapter.source
    if isinstance(adapter, DeltaSource):
        return str(adapter.path)
    return str(adapter)


def _same(a: AdapterArg, b: AdapterArg) -> bool:
    if a is b:
        return True
    if isinstance(b, (str, os.PathLike)):   # a path names what was applied from that file
        return Path(_name(a)).resolve() == Path(b).resolve()
    return False


def _source(adapter: AdapterArg, state: dict[str, torch.Tensor]) -> DeltaSource:
    """The adapter as a DeltaSource in the model's state-dict key names, opened as ``merge_into_state_dict`` does."""
    return source_for_state_dict(adapter, state)


def _storage(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _check(source: DeltaSource, state: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Every targeted key exists with the adapter's shape and a float dtype, and shares no memory with a tensor the
    adapter does not target (tied embeddings): raises before anything is modified."""
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault(_storage(tensor), []).append(name)
    for key in keys:
        if key not in state:
            raise BaseModelMismatchError(f"{source.path}: targets {key!r}, which the model does not have"
                                         f"{absent_weight_hint(key, state)}")
        tensor = state[key]
        if tuple(tensor.shape) != tuple(source.stored_shape(key)) and key not in source.replacements:
            raise BaseModelMismatchError(f"{source.path}: {key!r} has shape {list(source.stored_shape(key))}, "
                                         f"the model has {list(tensor.shape)}")
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # transformers' FP8Linear (on a GPU)
            raise BaseModelMismatchError(f"{source.path}: {key!r} is {tensor.dtype} in the model (an FP8 layer with "
                                         "block scales); it cannot be merged in place: merge the checkpoint on disk "
                                         "(randlora-io merge), or load the model dequantized")
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise BaseModelMismatchError(f"{source.path}: {key!r} is {tensor.dtype} in the model; only float32, "
                                         "bfloat16 and float16 weights can be swapped in place")
        shared = [n for n in by_storage[_storage(tensor)] if n != key and n not in keys]
        if shared:
            raise BaseModelMismatchError(
                f"{source.path}: {key!r} shares its memory with {shared[0]!r} (tied weights), which the adapter does "
                "not target; changing it in place would change both: untie them first")


def _kernel_path(source: DeltaSource, key: str, tensor: torch.Tensor, kernel: str) -> bool:
    if kernel == "torch" or not isinstance(source, RandloraSource) or key in source.replacements:
        return False
    return kernel == "triton" or tensor.is_cuda


def _merge_one_(tensor: torch.Tensor, source: DeltaSource, key: str, weight: float, kernel: str) -> None:
    """``tensor ← round(tensor + weight·ΔW[key])`` in place (see the module docstring for the two paths)."""
    if _kernel_path(source, key, tensor, kernel):
        from ..kernels.merge_triton import merge_layer_triton_

        adapter = source.adapter
        bases = adapter.bases(tensor.device)
        merge_layer_triton_(tensor, adapter.layers[key], peek(adapter.lambdas, key), peek(adapter.gammas, key),
                            bases.A, bases.B, weight * adapter.header.scaling)
        torch.autograd.graph.increment_version(tensor)
        return
    w32 = tensor.to(torch.float32, copy=True)
    apply_term_(w32, source, key, weight, lambda inner, inner_key: add_delta_(w32, inner, inner_key, weight,
                                                                              kernel="torch"))
    tensor.copy_(w32)


def apply_adapter(model: nn.Module, adapter: AdapterArg, weight: float = 1.0, *, kernel: str = "auto",
                  backup_device: str | torch.device | None = None) -> list[str]:
    """Merge ``weight``·``adapter`` into ``model``'s weights in place, on their device; returns the changed keys.

    ``adapter``: a :class:`RandloraAdapter`, a DeltaSource, or a path :func:`open_source` reads (randlora file,
    PEFT dir, dense delta), keyed like ``model.state_dict()``. ``kernel``: ``auto`` (Triton on CUDA for RandLoRA,
    else torch), ``triton`` or ``torch``. ``backup_device``: where the original weights are kept for
    :func:`remove_adapter` (default: each weight's own device; ``"cpu"`` frees accelerator memory). Extra memory
    while applying: one weight's copy and its merge temporaries; after: the backups (at most a copy)."""
    if kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel must be auto, triton or torch, not {kernel!r}")
    state = model.state_dict(keep_vars=True)
    source = _source(adapter, state)
    keys = list(dict.fromkeys([*source.keys(), *source.replacements]))
    _check(source, state, keys)
    record = _Applied(adapter, _name(adapter), weight)
    with torch.no_grad():
        key, original = None, None
        try:
            for key in keys:
                tensor = state[key].detach()
                original = tensor.clone()        # one layer at a time; the backup kept is compact
                _merge_one_(tensor, source, key, weight, kernel)
                if not all_finite(tensor):
                    raise NonFiniteError(f"{record.name}: merging it into {key!r} gives NaN or Inf; the model's "
                                         "weights are unchanged")
                record.backups[key] = _backup(original, tensor, torch.device(backup_device or tensor.device))
                record.tensors[key] = state[key]
                record.versions[key] = state[key]._version
                original = None
        except BaseException:
            if original is not None:             # the weight being merged when it failed
                state[key].detach().copy_(original)
            for done, backup in record.backups.items():
                _restore_(state[done].detach(), backup)
            raise
    applied = getattr(model, _APPLIED, None)
    if applied is None:
        applied = []
        object.__setattr__(model, _APPLIED, applied)  # a plain attribute: not a submodule, buffer or state entry
    applied.append(record)
    return keys


def applied_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters applied to ``model`` and not removed, oldest first."""
    return [r.name for r in getattr(model, _APPLIED, [])]


def remove_adapter(model: nn.Module, adapter: AdapterArg) -> list[str]:
    """Undo :func:`apply_adapter` of ``adapter`` (the same object, or the same path): every weight it changed gets
    its exact original values back. Returns the restored keys. Refuses, changing nothing, when the adapter is not
    applied, when a later adapter on the same weights is still applied, or when one of its weights was replaced or
    modified in place since (restoring would silently discard that change)."""
    applied: list[_Applied] = getattr(model, _APPLIED, [])
    matches = [i for i, r in enumerate(applied) if _same(r.adapter, adapter)]
    if not matches:
        raise AdapterStateError(f"{_name(adapter)}: this adapter is not applied to the model (applied: "
                                f"{', '.join(applied_adapters(model)) or 'none'})")
    index = matches[-1]
    record = applied[index]
    for later in applied[index + 1:]:
        overlap = sorted(set(later.tensors) & set(record.tensors))
        if overlap:
            raise AdapterStateError(f"{record.name}: {later.name} was applied after it on the same weights "
                                    f"({overlap[0]!r}, …); remove that one first")
    state = model.state_dict(keep_vars=True)
    for key, tensor in record.tensors.items():
        current = state.get(key)
        if current is not tensor:
            raise AdapterStateError(f"{record.name}: the model's {key!r} was replaced after the adapter was applied; "
                                    "its original weights were not restored")
        if tensor._version != record.versions[key]:
            raise AdapterStateError(f"{record.name}: the model's {key!r} was modified in place after the adapter was "
                                    "applied; restoring it would discard that change, so nothing was restored")
    with torch.no_grad():
        for key, tensor in record.tensors.items():
            _restore_(tensor.detach(), record.backups[key])
    del applied[index]
    # the weights of adapters applied earlier now hold what they held right after those were applied again
    for earlier in applied[:index]:
        for key, tensor in earlier.tensors.items():
            if key in record.tensors:
                earlier.versions[key] = tensor._version
    return list(record.tensors)


__all__ = ["apply_adapter", "applied_adapters", "remove_adapter"]
