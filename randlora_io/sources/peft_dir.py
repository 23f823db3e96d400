"""Reading and writing a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

Shared by the PEFT RandLoRA and LoRA input kinds: one reader, so both validate the same way.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.archive_guard import check_archive_size
from ..checkpoint.base_model import BaseModelInfo, base_info_from_checkpoint
from ..checkpoint.directory import open_checkpoint
from ..errors import SourceFormatError, UnsafeCheckpointError
from .peft_config import check_peft_config
from .peft_fields import check_peft_fields
from ..checkpoint.safetensors_io import load_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer."  # PEFT saves a targeted embedding layer's own weights as <module>.base_layer.<param>


@dataclass
class PeftDir:
    """A PEFT adapter dir: its config dict and its tensors (keys as saved, e.g. ``base_model.model.x.randlora_lambda``)."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    # base checkpoint key → PEFT's saved copy of that base weight (``save_embedding_layers``: when ``lm_head`` or
    # ``embed_tokens`` is targeted PEFT stores the layer's own weight and loads it over the base's)
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)
    # base checkpoint key → a trained tensor PEFT loads over the base's and keeps at merge: the modules_to_save
    # copies (e.g. a classification head) and trained biases (``bias="lora_only"`` / ``"all"``)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    # those tensors (and PEFT's frozen ``original_module`` copies) under their saved keys, for writing a PEFT dir again
    extra_saved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))

    @property
    def extras(self) -> PeftExtras | None:
        """The tensors PEFT loads over the base (modules_to_save, trained biases) and the config keys it needs for
        that, to write into another PEFT dir; None when the dir has none."""
        if not self.extra_saved:
            return None
        config = {k: self.config[k] for k in EXTRAS_CONFIG_KEYS if k in self.config}
        return PeftExtras(config=config, tensors=dict(self.extra_saved))


EXTRAS_CONFIG_KEYS = ("modules_to_save", "bias", "task_type")
_OWN_BIAS = {"LORA": "lora_only", "RANDLORA": "randlora_only", "VERA": "vera_only"}  # bias="<method>_only" under each peft_type


@dataclass(frozen=True)
class PeftExtras:
    """What a PEFT dir carries besides its adapter tensors, kept when it is rewritten as another PEFT dir:
    ``config`` (``modules_to_save``, ``bias``, ``task_type``) and ``tensors`` under their saved keys."""

    config: dict
    tensors: dict[str, torch.Tensor]


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft_config(path: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` of a PEFT dir."""
    cfg_path = Path(path) / CONFIG_FILE
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceFormatError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SourceFormatError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SourceFormatError(f"{cfg_path}: must be a JSON object")
    check_peft_config(config, cfg_path)
    check_peft_fields(config, cfg_path)  # options PEFT's own merge would not give W + ΔW for: refused by name
    return config


def read_peft_dir(path: str | os.PathLike | PeftDir, expected_type: str | None = None, *,
                  config: dict | None = None) -> PeftDir:
    """Read a PEFT dir (an already-read ``PeftDir`` is only type-checked, not read again; ``config``: its
    ``adapter_config.json`` when already read and validated by :func:`read_peft_config`). A pickle
    ``adapter_model.bin`` is only loaded with ``torch.load(weights_only=True)``."""
    if isinstance(path, PeftDir):
        if expected_type is not None and path.peft_type != expected_type:
            raise SourceFormatError(f"{path.path}: peft_type is {path.peft_type!r}, expected {expected_type!r}")
        return path
    path = Path(path)
    config = read_peft_config(path) if config is None else config
    if expected_type is not None and config.get("peft_type") != expected_type:
        raise SourceFormatError(f"{path}: peft_type is {config.get('peft_type')!r}, expected {expected_type!r}")
    if (path / WEIGHTS_FILE).is_file():
        tensors = load_tensors(path / WEIGHTS_FILE)
    elif (path / PICKLE_WEIGHTS_FILE).is_file():
        tensors = _load_weights_only(path / PICKLE_WEIGHTS_FILE)
    else:
        raise SourceFormatError(f"{path}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    if config.get("peft_type") != "LORA":  # LoRA's target_parameters: sources/peft_params.py + keymap.py
        _refuse_target_parameters(path, config, tensors)
    copies = [k for k in tensors if _is_base_copy(k) and not (_trains_bias(config) and k.endswith(BASE_LAYER + "bias"))]
    base_copies = {base_key_of(k): tensors.pop(k) for k in copies}
    replacements, extra_saved = _split_extras(path, config, tensors)
    return PeftDir(path=path, config=config, tensors=tensors, base_copies=base_copies, replacements=replacements,
                   extra_saved=extra_saved)


def _refuse_target_parameters(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT's ``target_parameters`` adapt raw parameters (``ParamWrapper``), e.g. the fused 3-D MoE expert tensors
    transformers ≥ 5 builds in memory from per-expert checkpoint tensors: refused, naming the layer, because
    splitting that ΔW back onto the per-expert tensors is not implemented (merging the rest alone would be wrong)."""
    params = config.get("target_parameters")
    if not params:
        return
    params = [params] if isinstance(params, str) else [p for p in params if isinstance(p, str)]
    layer = next((key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for key in tensors
                  if any(key.removeprefix(PEFT_PREFIX).startswith(p.rsplit(".", 1)[0])
                         or f".{p.rsplit('.', 1)[0]}." in key for p in params)), None)
    where = f"layer {layer!r}, " if layer else ""
    raise SourceFormatError(
        f"{path}: adapts raw parameters ({where}target_parameters {params}: PEFT ParamWrapper, e.g. fused MoE "
        "experts), which is not supported: transformers stores those tensors per expert on disk and splitting the "
        "update onto them is not implemented; merge this adapter with PEFT's merge_and_unload")


def _split_extras(path: Path, config: dict, tensors: dict[str, torch.Tensor]):
    """Move the tensors PEFT loads over the base model out of ``tensors`` (which keeps only adapter tensors).

    PEFT 0.21.2 saves a ``modules_to_save`` module ``m`` as ``m.<param>`` (its trained copy; with ``bias="all"`` also
    ``m.modules_to_save.<param>``, the same tensor, and ``m.original_module.<param>``, the frozen original that
    ``merge_and_unload`` discards), a trained bias of a targeted layer as ``<layer>.base_layer.bias`` and any other
    trained bias as ``<module>.bias``; with ``ensure_weight_tying`` also the tied partner's weight (the same trained
    tensor, e.g. ``lm_head.weight`` beside ``model.embed_tokens.weight``). Returns ``({base key: tensor}, {saved key: tensor})``."""
    saved_modules = config.get("modules_to_save") or []
    if isinstance(saved_modules, str):
        saved_modules = [saved_modules]
    trains_bias = _trains_bias(config)
    replacements: dict[str, torch.Tensor] = {}
    extra_saved: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        if not key.startswith(PEFT_PREFIX) or _is_adapter_tensor(key):
            continue
        name = key.removeprefix(PEFT_PREFIX)
        module, _, param = name.rpartition(".")
        in_saved = [m for m in saved_modules if isinstance(m, str) and m and _under(module, m)]
        if not in_saved and config.get("ensure_weight_tying") is True and param == "weight":
            in_saved = [module]  # the tied partner of a modules_to_save module, saved with it (sources/ties.py)
        if ".original_module." in f".{module}." and (in_saved or trains_bias):
            extra_saved[key] = tensors.pop(key)  # PEFT's frozen copy: discarded by merge_and_unload
            continue
        base_key = name.replace(".modules_to_save.", ".", 1).replace(BASE_LAYER, ".", 1)
        if not (in_saved or (trains_bias and param == "bias")):
            continue  # left for the converter, which refuses what it does not know
        tensor = tensors.pop(key)
        extra_saved[key] = tensor
        if base_key in replacements and not torch.equal(replacements[base_key], tensor):
            raise SourceFormatError(f"{path}: holds two different trained copies of {base_key!r}")
        replacements[base_key] = tensor
    return replacements, extra_saved


def _trains_bias(config: dict) -> bool:
    """PEFT's ``bias`` option other than "none": trained biases are saved with the adapter."""
    return config.get("bias", "none") not in (None, "none")


def _is_adapter_tensor(saved_key: str) -> bool:
    """A tensor of the adapter method itself (``lora_A``, ``lora_magnitude_vector``, ``randlora_gamma``,
    ``vera_lambda_b``, …)."""
    return any(part.startswith(("lora_", "randlora_", "vera_")) for part in saved_key.split("."))


def _under(module: str, saved_module: str) -> bool:
    """Whether ``module`` is (inside) a module PEFT's ``modules_to_save`` entry ``saved_module`` names: PEFT wraps
    every module whose name ends with the entry (``key.endswith(target_key)``)."""
    parts = module.split(".")
    return any(".".join(parts[:i]).endswith(saved_module) for i in range(1, len(parts) + 1))


def _is_base_copy(saved_key: str) -> bool:
    """A base layer's own tensor (``<module>.base_layer.<param>``), not an adapter tensor of a nested wrapper
    (``<mha>.base_layer.out_proj.lora_A.weight``: PEFT's LoRA on an nn.MultiheadAttention)."""
    return saved_key.startswith(PEFT_PREFIX) and BASE_LAYER in saved_key and not _is_adapter_tensor(saved_key)


def base_key_of(saved_key: str) -> str:
    """``base_model.model.<module>.base_layer.<param>`` → ``<module>.<param>`` (the base checkpoint's key)."""
    return saved_key.removeprefix(PEFT_PREFIX).replace(BASE_LAYER, ".", 1)


def _load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    check_archive_size(path)  # weights_only stops code, not memory: refuse an archive that inflates past its size
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused: not a plain tensor checkpoint under torch.load(weights_only=True) ({first[:120]}); "
            "re-save the adapter with safetensors"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UnsafeCheckpointError(f"{path}: expected a dict of tensors")
    return obj


def tensors_by_module(peft: PeftDir, shared: tuple[str, ...], suffixes: tuple[str, ...], method: str,
                      needed: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {suffix: tensor}}`` of a PEFT dir's per-layer adapter tensors (``base_model.model.<module>.<suffix>``),
    the ``shared`` keys (model-wide projections) left out; any other tensor is refused naming the ``method``, and a
    dir with none (``needed`` names them) is refused too."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft.tensors.items():
        if key in shared:
            continue
        suffix = key.rsplit(".", 1)[-1]
        if suffix not in suffixes or not key.startswith(PEFT_PREFIX):
            raise SourceFormatError(f"{peft.path}: unexpected tensor {key!r} in a {method} adapter")
        modules.setdefault(module_of(key, suffix), {})[suffix] = tensor
    if not modules:
        raise SourceFormatError(f"{peft.path}: the adapter holds no {needed} tensors")
    return modules


def module_of(saved_key: str, suffix: str) -> str:
    """``base_model.model.<module>.<suffix>`` → ``<module>`` (PEFT's saved-key convention)."""
    return saved_key.removeprefix(PEFT_PREFIX)[: -len(suffix) - 1]


def weight_key(module: str) -> str:
    """The base checkpoint key of a module's weight."""
    return module + ".weight"


def local_base_info(path: str | os.PathLike, config: dict) -> BaseModelInfo | None:
    """The base model named by a PEFT dir's ``base_model_name_or_path`` (``config``: its adapter_config.json) when
    that names a local checkpoint dir, else None."""
    name = config.get("base_model_name_or_path")
    if isinstance(name, str) and name and Path(name).is_dir():
        return base_info_from_checkpoint(open_checkpoint(name))
    return None
