"""A local Hugging Face checkpoint directory: one ``model.safetensors`` or shards with an index.

Holds only headers in memory; tensors are read one shard at a time (mmap via ``safe_open``). The index is
validated at the boundary: no ``../`` or absolute shard paths, no ``.bin`` shards, no key in two shards, no key
pointing at a missing shard, every shard's header consistent with the index.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import BaseModelMismatchError, SourceFormatError, UnsafeCheckpointError
from .safetensors_io import SafetensorsHeader, TensorInfo, load_tensors, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
# The files beside the weights that make a checkpoint loadable (config, generation config, tokenizer, processor,
# chat template, remote code, card): the only ones a merge copies into OUT. Never directories, never other weights.
SIDE_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*tokenizer*.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken", "tokenizer.*", "spiece.model",
    "preprocessor_config.json", "processor_config.json", "feature_extractor_config.json", "image_processor*.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja", "configuration_*.py",
    "modeling_*.py", "tokenization_*.py", "processing_*.py", "image_processing_*.py", "README.md", "LICENSE*",
    "NOTICE*", "USE_POLICY*",
)


@dataclass
class Checkpoint:
    """A validated checkpoint: ``shards`` (file name → header) and ``weight_map`` (tensor key → shard file name)."""

    root: Path
    shards: dict[str, SafetensorsHeader]
    weight_map: dict[str, str]
    index: dict | None  # the parsed index JSON when sharded

    def info(self, key: str) -> TensorInfo:
        return self.shards[self.weight_map[key]].tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def shard_path(self, shard: str) -> Path:
        return self.root / shard

    def keys_by_shard(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {s: [] for s in self.shards}
        for key, shard in self.weight_map.items():
            out[shard].append(key)
        return out

    def total_bytes(self) -> int:
        return sum(self.shard_path(s).stat().st_size for s in self.shards)

    @functools.cached_property
    def quantization(self):
        """None, or the :class:`~randlora_io.checkpoint.quantization.Fp8Layout` of an FP8 block-quantized base; any
        other ``quantization_config`` is refused by name (read from config.json once, on first use)."""
        from .quantization import read_quantization

        return read_quantization(self)

    def side_files(self) -> list[Path]:
        """BASE's non-weight files that belong to the checkpoint (:data:`SIDE_FILE_PATTERNS`), for OUT."""
        skip = set(self.shards) | {INDEX_FILE}
        return sorted(p for p in self.root.iterdir()
                      if p.name not in skip and not p.name.startswith(".") and p.is_file()
                      and any(fnmatch.fnmatchcase(p.name, pat) for pat in SIDE_FILE_PATTERNS))


def absent_weight_hint(key: str, known: Collection[str] = ()) -> str:
    """Why a base may lack the weight ``key``, for the error that says so; ``known``: the keys the base does have
    (a key there with the same layer name shows the adapter names layers another way)."""
    if key.endswith("lm_head.weight"):
        return (" (a tied lm_head has no weight of its own: it shares the input embeddings, which a merge into it "
                "would change too; untie the base, saving it with tie_word_embeddings=false, or leave lm_head out "
                "of the adapter)")
    leaf = ".".join(key.split(".")[-2:])
    like = sorted(k for k in known if k.endswith("." + leaf) or k == leaf)
    if like:
        return (f" (its layers are named like {like[0]!r} there: the adapter was trained on a model that names its "
                "modules differently, e.g. another class of the same architecture; merge into the checkpoint of the "
                "model class it was trained on)")
    if known:
        return (f" (nor any {leaf!r} layer at all: the adapter was trained on another architecture; merge it into "
                "the base model it was trained on)")
    return " (merge it into the base model it was trained on)"


def check_base_copies(ckpt: Checkpoint, source: str, copies: Mapping[str, torch.Tensor]) -> None:
    """PEFT saves a targeted embedding layer's own weight with the adapter and loads it over the base's: merging
    into BASE is only what PEFT would do when BASE holds that very weight (not when the vocabulary was resized).
    ``copies``: base key → the adapter's copy; ``source`` names the adapter in errors."""
    for key, saved in copies.items():
        if key not in ckpt.weight_map:
            raise BaseModelMismatchError(f"{source}: carries a copy of base weight {key!r}, which the base at "
                                         f"{ckpt.root} does not have{absent_weight_hint(key, ckpt.weight_map)}")
        info = ckpt.info(key)
        if tuple(info.shape) != tuple(saved.shape):
            raise BaseModelMismatchError(
                f"{source}: its saved copy of {key!r} is {list(saved.shape)} but the base weight is "
                f"{list(info.shape)} (vocabulary resized in fine-tuning?); merge into the resized model instead")
        base = load_tensors(ckpt.shard_path(ckpt.weight_map[key]), [key])[key]
        if not torch.equal(base, saved.to(base.dtype)):
            raise BaseModelMismatchError(
                f"{source}: its saved copy of {key!r} differs from the base's (PEFT would load the adapter's "
                "copy over it): this adapter was trained on another base or changed that layer; merge into the "
                "matching base")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a HF model dir (or a single ``.safetensors`` file) and validate its layout."""
    root = Path(path)
    if root.is_file():
        if root.suffix != ".safetensors":
            _refuse_pickle(root)
            raise SourceFormatError(f"{root}: not a safetensors checkpoint")
        header = read_header(root)
        return Checkpoint(root=root.parent, shards={root.name: header}, weight_map={k: root.name for k in header.tensors},
                          index=None)
    if not root.is_dir():
        raise SourceFormatError(f"{root}: no such model directory")
    if (root / INDEX_FILE).is_file():
        ckpt = _open_sharded(root)
        if (root / SINGLE_FILE).is_file() and SINGLE_FILE not in ckpt.shards:
            raise SourceFormatError(
                f"{root}: holds both {SINGLE_FILE} and {INDEX_FILE} with other shards; transformers loads "
                f"{SINGLE_FILE} and ignores the shards, so which weights are the model is ambiguous: remove the "
                "stale file(s) or point at a directory with one checkpoint")
        return ckpt
    if (root / SINGLE_FILE).is_file():
        header = read_header(root / SINGLE_FILE)
        return Checkpoint(root=root, shards={SINGLE_FILE: header}, weight_map={k: SINGLE_FILE for k in header.tensors},
                          index=None)
    for name in PICKLE_FILES:
        if (root / name).exists():
            _refuse_pickle(root / name)
    raise SourceFormatError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face model directory?")


def _refuse_pickle(path: Path) -> None:
    raise UnsafeCheckpointError(
        f"{path}: pickle checkpoints are refused (they can run code); re-save the model with safetensors "
        "(save_pretrained(..., safe_serialization=True))"
    )


def _safe_shard_name(index_path: Path, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise SourceFormatError(f"{index_path}: shard names must be non-empty strings, got {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or len(pure.parts) != 1:
        raise SourceFormatError(f"{index_path}: shard path {name!r} must be a plain file name in the model directory")
    if not name.endswith(".safetensors"):
        raise UnsafeCheckpointError(f"{index_path}: shard {name!r} is not a .safetensors file (pickle shards are refused)")
    return name


def _open_sharded(root: Path) -> Checkpoint:
    index_path = root / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceFormatError(f"{index_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise SourceFormatError(f"{index_path}: JSON nested too deeply") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceFormatError(f"{index_path}: missing or empty 'weight_map'")
    for key, shard in weight_map.items():
        _safe_shard_name(index_path, shard)
    shards: dict[str, SafetensorsHeader] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = root / shard
        if not shard_path.is_file():
            raise SourceFormatError(f"{index_path}: shard {shard!r} listed in the index is missing")
        shards[shard] = read_header(shard_path)
    seen: dict[str, str] = {}
    for shard, header in shards.items():
        for key in header.tensors:
            if key in seen:
                raise SourceFormatError(f"{root}: tensor {key!r} is stored in both {seen[key]!r} and {shard!r}")
            seen[key] = shard
    for key, shard in weight_map.items():
        if seen.get(key) != shard:
            where = f"is in {seen[key]!r}" if key in seen else "is in no shard"
            raise SourceFormatError(f"{index_path}: index maps {key!r} to {shard!r} but it {where}")
    unindexed = set(seen) - set(weight_map)
    if unindexed:
        raise SourceFormatError(f"{index_path}: tensor {sorted(unindexed)[0]!r} is in a shard but not in the index")
    return Checkpoint(root=root, shards=shards, weight_map=dict(weight_map), index=index)
