"""A source whose some keys are parts of a larger ΔW computed once: the base of the wrappers that carry an in-memory
ΔW back onto several checkpoint tensors (:mod:`~randlora_io.sources.fused_params`,
:mod:`~randlora_io.sources.conversion`)."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from .interface import DeltaSource


class SplitPartsSource(DeltaSource):
    """``inner`` with the checkpoint keys in ``owner`` (key → the group it is a part of) added. A group's parts
    (``{checkpoint key: ΔW}``, float32, the checkpoint's layout) are computed by :meth:`compute_parts` when the first
    of its keys is asked for and each kept until asked for once (memory: about one group's ΔW per group in use).
    ``kept``: inner's keys still served by inner; those parts are plain ΔW (no DoRA, ``fan_in_fan_out`` False)."""

    def __init__(self, inner: DeltaSource, owner: dict[str, Hashable], shapes: dict[str, tuple[int, ...]],
                 kept: list[str]):
        self.inner, self.kind, self.path = inner, inner.kind, inner.path
        self.base_copies, self.replacements = inner.base_copies, inner.replacements
        self.peft_extras = getattr(inner, "peft_extras", None)
        self._owner, self._shapes, self._kept = owner, shapes, kept
        self._pending: dict[Hashable, dict[str, torch.Tensor]] = {}

    @property
    def adapter(self):
        """The wrapped randlora adapter, if any (its fingerprint and bases are checked before a merge)."""
        return getattr(self.inner, "adapter", None)

    def compute_parts(self, group: Hashable) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return self._kept + list(self._owner)

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key] if key in self._owner else self.inner.stored_shape(key)

    def fan_in_fan_out(self, key: str) -> bool:
        return False if key in self._owner else self.inner.fan_in_fan_out(key)

    def dora_magnitude(self, key: str) -> torch.Tensor | None:
        return None if key in self._owner else self.inner.dora_magnitude(key)

    def dora_delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.inner.dora_delta(key, device)

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        group = self._owner.get(key)
        if group is None:
            return self.inner.delta(key, device)
        parts = self._pending.get(group)
        if parts is None or key not in parts:
            parts = self._pending[group] = self.compute_parts(group)
        out = parts.pop(key)
        if not parts:
            del self._pending[group]
        return out.to(device, torch.float32)
