"""Tied weights (``tie_word_embeddings``) and the tensors an adapter replaces: what PEFT's merged model computes.

A tied checkpoint stores one tensor for two parameters (``lm_head.weight`` is ``model.embed_tokens.weight``;
Whisper's ``proj_out`` is the decoder's ``embed_tokens``); transformers ties them again on load. PEFT's
``modules_to_save`` copies one module, so after ``merge_and_unload`` the two differ: the trained copy on one side, the
original weight on the other. Writing only the trained tensor into a checkpoint whose config still says tied would
give both sides the trained tensor on load (a wrong model, exit 0). With ``ensure_weight_tying=True`` PEFT trains one
copy for both sides and saves it twice: the tie holds.

:func:`fold_tied_deltas` adds the ΔW of a tied parameter the checkpoint does not store to its partner, as PEFT's
in-place merge does (both wrappers add into the one shared tensor). :func:`resolve_tied_replacements` keeps what is exact (the tie holds: one trained tensor for both sides) and refuses
the rest in one line: the base must be untied first (``save_pretrained`` with ``tie_word_embeddings=False`` writes
both tensors), and then the merge is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch

from ..checkpoint.base_model import read_model_config
from ..errors import BaseModelMismatchError
from .interface import DeltaSource
from ..checkpoint.meta_model import meta_model

# leaf module names that are tied to another in some architecture (used only when transformers cannot tell)
_TIE_PRONE = ("embed", "lm_head", "proj_out", "wte", "word_embeddings", "embed_out", "output", "shared")


def tied_pairs(root: Path | None) -> dict[str, str] | None:
    """``{tied parameter: the parameter whose tensor it shares}`` (in-memory names) of ``root``'s model as
    transformers ties it on load; ``{}`` when nothing is tied, None when it cannot be told (no transformers, no
    config.json naming a class it builds)."""
    model = meta_model(root) if root is not None else None
    if model is None:
        return None
    try:
        return dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    except Exception:  # noqa: BLE001 - a model whose tie patterns transformers cannot expand: unknown
        return None


def _config_ties(config: Mapping | None, depth: int = 0) -> bool:
    """Whether ``config.json`` (or a sub-model config in it) sets ``tie_word_embeddings`` true."""
    if not isinstance(config, Mapping):
        return False
    if config.get("tie_word_embeddings") is True:
        return True
    return depth < 4 and any(_config_ties(v, depth + 1) for v in config.values() if isinstance(v, Mapping))


def resolve_tied_replacements(path: str, replacements: Mapping[str, torch.Tensor], base_keys: Collection[str],
                              root: Path | None) -> dict[str, torch.Tensor]:
    """``replacements`` (in-memory names → trained tensor) without the ones a tie already writes: a tied parameter
    absent from the checkpoint whose partner gets the same trained tensor (PEFT's ``ensure_weight_tying``). Raises
    in one line where PEFT's merged model has the two sides of a tie differ (one side replaced), or where the ties
    cannot be told and a replaced tensor may be tied."""
    if not replacements:
        return dict(replacements)
    pairs = tied_pairs(root)
    if pairs is None:
        if root is not None and _config_ties(read_model_config(root)):
            suspect = [k for k in replacements if any(t in k.rsplit(".", 2)[-2] for t in _TIE_PRONE)]
            if suspect:
                raise BaseModelMismatchError(
                    f"{path}: replaces {suspect[0]!r} with its trained copy, and the base's config.json ties word "
                    "embeddings, but which weights are tied cannot be told here (it needs transformers and a "
                    "config.json naming a class it builds): install transformers, or untie the base first "
                    "(save_pretrained with tie_word_embeddings=False)")
        return dict(replacements)
    base_keys = set(base_keys)
    out = dict(replacements)
    for target, source in pairs.items():
        if target in base_keys:
            continue  # stored on its own: transformers loads it as saved (no tie on disk)
        mine, theirs = replacements.get(target), replacements.get(source)
        if mine is None and theirs is None:
            continue
        if mine is not None and theirs is not None and torch.equal(mine, theirs):
            out.pop(target)  # one trained tensor for both sides: the tie writes it
            continue
        replaced, other = (source, target) if mine is None else (target, source)
        raise BaseModelMismatchError(
            f"{path}: replaces {replaced!r} with its trained copy (modules_to_save) but not {other!r}, which the base "
            f"ties to it (tie_word_embeddings): PEFT's merged model has the two differ, and a tied checkpoint cannot "
            "hold that; untie the base first (load it, set config.tie_word_embeddings=False, save_pretrained) and "
            "merge into that, or train with ensure_weight_tying=True")
    return out


class TiedSumSource(DeltaSource):
    """``inner`` with the ΔW of each tied parameter the checkpoint does not store folded into the parameter it
    shares its tensor with, as PEFT's ``merge_and_unload`` does: each wrapper adds its ΔW into the one shared weight
    in place (Zamba2's shared transformer block adapted in every hybrid layer; a LoRA on a tied ``lm_head`` changes
    the embeddings too). ``folded``: stored key → the absent tied keys whose ΔW is added to it."""

    def __init__(self, inner: DeltaSource, folded: Mapping[str, list[str]], stored_as: Mapping[str, str]):
        """``stored_as``: each absent tied key → the stored key holding its tensor (a saved copy of the one is a
        copy of the other)."""
        self.inner, self.kind, self.path = inner, inner.kind, inner.path
        self.replacements = inner.replacements
        self.base_copies = {stored_as.get(k, k): v for k, v in inner.base_copies.items()}
        self.peft_extras = getattr(inner, "peft_extras", None)
        self._folded = {k: list(v) for k, v in folded.items()}
        gone = {t for targets in self._folded.values() for t in targets}
        self._keys = [k for k in inner.keys() if k not in gone]
        self._keys += [k for k in self._folded if k not in self._keys]

    @property
    def adapter(self):
        """The wrapped randlora adapter, if any (its fingerprint and bases are checked before a merge)."""
        return getattr(self.inner, "adapter", None)

    def keys(self) -> list[str]:
        return list(self._keys)

    def _parts(self, key: str) -> list[str]:
        own = [key] if key in set(self.inner.keys()) else []
        return own + self._folded.get(key, [])

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return self.inner.stored_shape(self._parts(key)[0])

    def fan_in_fan_out(self, key: str) -> bool:
        return self.inner.fan_in_fan_out(self._parts(key)[0])

    def dora_magnitude(self, key: str) -> torch.Tensor | None:
        return self.inner.dora_magnitude(key) if key not in self._folded else None

    def dora_delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.inner.dora_delta(key, device)

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        parts = self._parts(key)
        total = self.inner.delta(parts[0], device).to(torch.float32).clone()
        for part in parts[1:]:
            other = self.inner.delta(part, device)
            if self.inner.fan_in_fan_out(part) != self.inner.fan_in_fan_out(parts[0]):
                other = other.T
            total += other
        return total


def fold_tied_deltas(source: DeltaSource, base_keys: Collection[str], root: Path | None,
                     on_note: Callable[[str], None] | None = None) -> DeltaSource:
    """``source`` with ΔW on tied parameters the checkpoint does not store summed into their stored partner
    (:class:`TiedSumSource`); ``source`` itself when there is none. Refuses DoRA on such a layer (not additive) and
    a ΔW on a tied parameter whose partner the adapter replaces (modules_to_save)."""
    base_keys = set(base_keys)
    absent = [k for k in source.keys() if k not in base_keys]
    if not absent and all(k in base_keys for k in source.base_copies):
        return source
    pairs = tied_pairs(root) or {}
    stored_as = {t: s for t, s in pairs.items() if t not in base_keys and s in base_keys}
    adapted = set(source.keys())
    folded: dict[str, list[str]] = {}
    for key in absent:
        partner = pairs.get(key)
        if partner is None or partner not in base_keys:
            continue
        for k in (key, partner):
            if k in adapted and source.dora_magnitude(k) is not None:
                raise BaseModelMismatchError(
                    f"{source.path}: DoRA layer {k!r} shares its weight with {partner if k == key else key!r} (tied "
                    "in the base): PEFT merges each into the one shared tensor in turn, which this merge does not "
                    "reproduce; merge with PEFT instead")
        if partner in source.replacements:
            raise BaseModelMismatchError(
                f"{source.path}: adapts {key!r}, tied in the base to {partner!r}, which the adapter also replaces "
                "(modules_to_save): no single tensor holds both; drop one of them from the adapter")
        folded.setdefault(partner, []).append(key)
    if not folded and not any(k in stored_as for k in source.base_copies):
        return source
    if on_note is not None:
        for partner, keys in folded.items():
            on_note(f"{source.path}: {keys[0]!r} shares its weight with {partner!r} in the base (tied): both ΔW "
                    "are added to that one tensor, as PEFT's merge_and_unload does (the merged model then differs "
                    "from the unmerged adapter, where each layer saw only its own ΔW)" if partner in adapted
                    else f"{source.path}: {keys[0]!r} shares its weight with {partner!r} in the base (tied): its ΔW "
                    "changes both, as PEFT's merge_and_unload does")
    return TiedSumSource(source, folded, stored_as)
