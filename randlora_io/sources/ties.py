"""Tied weights (``tie_word_embeddings``) and the tensors an adapter replaces: what PEFT's merged model computes.

A tied checkpoint stores one tensor for two parameters (``lm_head.weight`` is ``model.embed_tokens.weight``;
Whisper's ``proj_out`` is the decoder's ``embed_tokens``); transformers ties them again on load. PEFT's
``modules_to_save`` copies one module, so after ``merge_and_unload`` the two differ: the trained copy on one side, the
original weight on the other. Writing only the trained tensor into a checkpoint whose config still says tied would
give both sides the trained tensor on load (a wrong model, exit 0). With ``ensure_weight_tying=True`` PEFT trains one
copy for both sides and saves it twice: the tie holds.

:func:`resolve_tied_replacements` keeps what is exact (the tie holds: one trained tensor for both sides) and refuses
the rest in one line: the base must be untied first (``save_pretrained`` with ``tie_word_embeddings=False`` writes
both tensors), and then the merge is exact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from ..errors import BaseModelMismatchError
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
                              root: Path | None, config: Mapping | None) -> dict[str, torch.Tensor]:
    """``replacements`` (in-memory names → trained tensor) without the ones a tie already writes: a tied parameter
    absent from the checkpoint whose partner gets the same trained tensor (PEFT's ``ensure_weight_tying``). Raises
    in one line where PEFT's merged model has the two sides of a tie differ (one side replaced), or where the ties
    cannot be told and a replaced tensor may be tied."""
    if not replacements:
        return dict(replacements)
    pairs = tied_pairs(root)
    if pairs is None:
        if _config_ties(config):
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
