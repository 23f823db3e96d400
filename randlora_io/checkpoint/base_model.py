"""What a base checkpoint tells about its adapted layers: shapes, dtypes, and each layer's type (Linear or Conv1D).

PEFT decides a layer's orientation from its module type when it loads an adapter (``Conv1D`` → ``fan_in_fan_out``
True, its weight stored (in, out); ``nn.Linear`` → False, stored (out, in)) and saves only one, last-set value in
``adapter_config.json``. The module type is not in a checkpoint's tensors, but the model type in its
``config.json`` tells it: transformers builds ``Conv1D`` layers in a handful of architectures only
(:data:`CONV1D_LAYERS`, kept true by ``tests/test_orientation.py`` against the installed transformers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LayerTypeError, SourceFormatError
from .meta_model import meta_model

MODEL_CONFIG = "config.json"
STATE_DICT = "<state dict>"  # BaseModelInfo.root of weights given in memory (merge_into_state_dict)

# model_type → the leaf module names transformers builds as ``Conv1D`` in it (every other 2-D weight is Linear)
_GPT2_STYLE = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_LAYERS: dict[str, frozenset[str]] = {
    "gpt2": _GPT2_STYLE,
    "decision_transformer": _GPT2_STYLE,
    "imagegpt": _GPT2_STYLE,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),
}
# leaf names that are Conv1D in some architecture and Linear in others (GPTBigCode's c_attn is an nn.Linear)
CONV1D_NAMES = frozenset().union(*CONV1D_LAYERS.values())

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass
class BaseModelInfo:
    """A base model as the sources and converters need it.

    ``shapes``: checkpoint key → stored shape; ``dtypes``: checkpoint key → torch dtype (floating keys only);
    ``config``: the parsed ``config.json``, or None when the checkpoint has none; ``root``: for messages;
    ``conv1d``: when given, exactly the layers (module names or weight keys) that are GPT-2 style ``Conv1D`` (weight
    stored (in, out)), as the caller knows them; it decides every layer's orientation (no config needed).
    """

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    config: dict | None = None
    root: str = "<base>"
    conv1d: frozenset[str] | None = None

    @property
    def model_type(self) -> str | None:
        value = (self.config or {}).get("model_type")
        return value if isinstance(value, str) else None

    def knows_layer_types(self) -> bool:
        """True when ``config.json`` names an architecture transformers builds itself (not remote code)."""
        return self.model_type is not None and not (self.config or {}).get("auto_map")

    def mixes_conv1d(self) -> bool:
        """A composite model (nested configs) with a GPT-2 style part (``Conv1D`` layers) beside parts of other
        types, whose layers may share those leaf names as ``nn.Linear``: leaf names do not tell the type there."""
        types = _model_types(self.config or {})
        conv = {t for t in types if t in CONV1D_LAYERS}
        return bool(conv) and bool(types - conv)

    def conv1d_layers(self) -> frozenset[str]:
        """Leaf names built as ``Conv1D`` anywhere in the model: a composite model (encoder-decoder, vision-text)
        nests its parts' configs, each with its own ``model_type`` (e.g. a GPT-2 decoder under a BERT encoder)."""
        return frozenset().union(*(CONV1D_LAYERS.get(t, frozenset()) for t in _model_types(self.config or {})))


def _module_orientations(keys: list[str], base: BaseModelInfo, source: str) -> dict[str, bool]:
    """``fan_in_fan_out`` of each key from its module's own type in the model transformers builds from the base's
    ``config.json`` (on the meta device): a composite model may use one leaf name for a ``Conv1D`` in one part and
    an ``nn.Linear`` in another. Refuses in one line when the model cannot be built or lacks a module."""
    model = meta_model(Path(base.root))
    kinds = ", ".join(sorted(_model_types(base.config or {})))
    if model is None:
        raise LayerTypeError(
            f"{source}: the base at {base.root} is a composite model ({kinds}) whose parts use the same layer names "
            "for Conv1D and Linear layers; telling each layer's type needs transformers and the base's config.json "
            "naming a class it builds: install transformers (pip install transformers)")
    from transformers.pytorch_utils import Conv1D

    out = {}
    for key in keys:
        try:
            module = model.get_submodule(key.removesuffix(".weight"))
        except AttributeError:
            raise LayerTypeError(f"{source}: {key!r} names no module of the model the base's config.json builds "
                                 f"({kinds}), so its layer type cannot be told: another architecture?") from None
        out[key] = isinstance(module, Conv1D)
    return out


def _model_types(config: dict, depth: int = 0) -> set[str]:
    """Every ``model_type`` in a config dict and the sub-model configs nested in it."""
    found = {config["model_type"]} if isinstance(config.get("model_type"), str) else set()
    if depth < 4:
        for value in config.values():
            if isinstance(value, dict):
                found |= _model_types(value, depth + 1)
    return found


def read_model_config(root: str | os.PathLike) -> dict | None:
    """The parsed ``config.json`` of a model dir (None if it has none); a malformed one is an error naming it."""
    path = Path(root) / MODEL_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SourceFormatError(f"{path}: must be a JSON object")
    return config


def base_info_from_checkpoint(ckpt) -> BaseModelInfo:
    """:class:`BaseModelInfo` of an opened :class:`~randlora_io.checkpoint.Checkpoint` (headers only)."""
    shapes = {k: tuple(ckpt.shape(k)) for k in ckpt.weight_map}
    dtypes = {k: _SAFETENSORS_DTYPES[ckpt.info(k).dtype] for k in ckpt.weight_map
              if ckpt.info(k).dtype in _SAFETENSORS_DTYPES}
    return BaseModelInfo(shapes=shapes, dtypes=dtypes, config=read_model_config(ckpt.root), root=str(ckpt.root))


def _leaf(weight_key: str) -> str:
    return weight_key.removesuffix(".weight").rsplit(".", 1)[-1]


def layer_orientations(keys: list[str], base: BaseModelInfo | None, config_flag: bool,
                       source: str) -> dict[str, bool]:
    """``fan_in_fan_out`` of each adapted weight (checkpoint key), as PEFT sets it when it loads the adapter.

    With the base's ``config.json``: True exactly for the layers transformers builds as ``Conv1D``. Without it, the
    adapter's single ``fan_in_fan_out`` flag (``config_flag``) is used only where it cannot be wrong: every layer
    has a GPT-2 ``Conv1D`` name and the flag is True, or none has and it is False. Otherwise
    :class:`LayerTypeError` (never a guess).
    """
    if base is not None and base.conv1d is not None:
        return {key: key in base.conv1d or key.removesuffix(".weight") in base.conv1d for key in keys}
    if base is not None and base.knows_layer_types():
        conv = base.conv1d_layers()
        if base.mixes_conv1d() and any(_leaf(key) in conv for key in keys):
            return _module_orientations(keys, base, source)
        return {key: _leaf(key) in conv for key in keys}
    conv_named = [key for key in keys if _leaf(key) in CONV1D_NAMES]
    if (config_flag and len(conv_named) == len(keys)) or (not config_flag and not conv_named):
        return {key: config_flag for key in keys}
    why = ("its config.json names no transformers architecture (remote code)" if base is not None and base.config
           else "a state dict carries no layer types" if base is not None and base.root == STATE_DICT
           else "no config.json was found beside the base weights" if base is not None
           else "no base model was given")
    example = conv_named[0] if conv_named else keys[0]
    fix = ("pass model_config=model.config.to_dict() or conv1d=[the Conv1D layers] to merge_into_state_dict"
           if base is not None and base.root == STATE_DICT else "pass --base with the model dir holding its config.json")
    raise LayerTypeError(
        f"{source}: cannot tell whether {example!r} is a GPT-2 style Conv1D layer (weight stored (in, out)) or a "
        f"Linear one: {why}, and the adapter's single fan_in_fan_out={str(config_flag).lower()} does not say it "
        f"per layer; {fix}")


def half_cast_dtype(keys: list[str], base: BaseModelInfo | None, source: str) -> str | None:
    """The half dtype PEFT cast its shared RandLoRA bases to (each targeted layer casts them to its weight dtype in
    turn, so a bf16 or fp16 layer rounds them), or None when every targeted weight is float32 (or unknown)."""
    if base is None:
        return None
    halves = {base.dtypes[k] for k in keys if base.dtypes.get(k) in (torch.bfloat16, torch.float16)}
    if len(halves) > 1:
        raise LayerTypeError(f"{source}: the targeted weights of {base.root} mix bfloat16 and float16; PEFT's "
                             "shared bases then depend on the layer order: cast the base to one dtype first")
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(halves.pop()) if halves else None
