"""Input kind ``peft-lora``: a PEFT LoRA directory (LoRA, rsLoRA, DoRA, target_parameters) → ΔW per layer.

PEFT LoRA stores ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r);
ΔW (out, in) = scaling · B @ A, scaling = alpha / r (or alpha / √r with ``use_rslora``), with per-module
``rank_pattern`` / ``alpha_pattern`` overrides; transposed when ``fan_in_fan_out``. Writing one (dense ΔW → LoRA at rank k): :mod:`randlora_io.convert.peft_lora`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..checkpoint.base_model import BaseModelInfo, layer_orientations
from ..errors import AdapterShapeError, LayerTypeError, NonFiniteError, SourceFormatError
from .peft_dir import local_base_info, PEFT_PREFIX, PeftDir, module_of, read_peft_dir, weight_key
from .interface import DeltaSource, OpenOptions, Probe, layer_row
from .peft_params import ParamLoraLayer, read_param_layers
from .peft_params import param_modules, pattern_value as _pattern_value
from .peft_targets import targeted_layers

PEFT_TYPE = "LORA"


@dataclass
class LoraLayer:
    """One LoRA layer: ``down`` (r, in), ``up`` (out, r), its scaling and orientation."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None = None  # DoRA's m (out,) when use_dora: the merge rescales W + ΔW (dora.py)

    def delta(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """ΔW in the weight's stored orientation, float32."""
        d = (self.up.to(device).float() @ self.down.to(device).float()) * self.scaling
        return d.T if self.fan_in_fan_out else d

    @property
    def stored_shape(self) -> tuple[int, int]:
        out_in = (self.up.shape[0], self.down.shape[1])
        return (out_in[1], out_in[0]) if self.fan_in_fan_out else out_in


# saved state of LoRA variants that changes training only (PEFT merges them as W + s·B·A): config key → tensor part
_TRAINING_ONLY = {"velora_config": ".lora_velora_embed", "monteclora_config": ".lora_monteclora_sampler."}


def _training_only(saved_key: str, cfg: dict) -> bool:
    """A saved tensor of a variant whose merge is plain LoRA (VeLoRA's projection, MonteCLoRA's sampler)."""
    return any(cfg.get(field) and part in saved_key for field, part in _TRAINING_ONLY.items())


def unsupported_tensor_reason(saved_key: str) -> str:
    """Why a saved tensor of a PEFT LoRA dir cannot be merged here, naming the PEFT feature it belongs to."""
    leaf = saved_key.rsplit(".", 1)[-1]
    if leaf.startswith("lora_embedding_"):
        return (f"{saved_key!r} is a LoRA on an nn.Embedding layer ({leaf}): only Linear and Conv1D layers can be "
                "merged here; merge this adapter with PEFT's merge_and_unload, or leave the embedding out of "
                "target_modules")
    if "lora_bias" in saved_key or "lora_B.bias" in saved_key:
        return (f"{saved_key!r} is a LoRA bias (lora_bias=True): not supported here; merge this adapter with PEFT's "
                "merge_and_unload, or train it with lora_bias=False")
    return (f"unsupported tensor {saved_key!r}: not a lora_A / lora_B weight of a Linear or Conv1D layer, nor a "
            "tensor PEFT's modules_to_save or bias options save; merge this adapter with PEFT's merge_and_unload")


def read_peft_lora(src: str | os.PathLike | PeftDir, base: BaseModelInfo | None = None,
                   on_note: Callable[[str], None] | None = None, *,
                   decide_orientation: bool = True) -> dict[str, LoraLayer]:
    """``{weight key: LoraLayer}`` from a PEFT LoRA dir (a path, or one already read), as PEFT loads it: only the
    layers the config targets (peft_targets), each oriented by its module type in ``base`` (base_model), not by the
    config's single ``fan_in_fan_out``. ``decide_orientation=False`` (describing a dir, never merging it): where
    the layer type cannot be told, take the config's flag instead of refusing."""
    peft = read_peft_dir(src, expected_type=PEFT_TYPE)
    src = peft.path
    cfg = peft.config
    r_default, alpha_default = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r_default, int) or r_default <= 0 or not isinstance(alpha_default, (int, float)):
        raise SourceFormatError(f"{src}: adapter_config.json has invalid r or lora_alpha")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in peft.tensors.items():
        if _training_only(key, cfg):
            continue
        if cfg.get("use_dora") and key.endswith(".lora_magnitude_vector") and key.startswith(PEFT_PREFIX):
            magnitudes[module_of(key, "lora_magnitude_vector")] = tensor
            continue
        for suffix in ("lora_A.weight", "lora_B.weight"):
            if key.endswith("." + suffix) and key.startswith(PEFT_PREFIX):
                parts.setdefault(module_of(key, suffix), {})[suffix[5]] = tensor
                break
        else:
            raise SourceFormatError(f"{src}: {unsupported_tensor_reason(key)}")
    params = param_modules(cfg, list(parts), str(src))  # target_parameters wrappers: peft_params, keymap
    parts = {m: ab for m, ab in parts.items() if m not in params}
    fans = _targeted_orientations(src, cfg, list(parts), base, on_note, decide_orientation) if parts else {}
    layers = {}
    for module, ab in parts.items():
        if weight_key(module) not in fans:
            continue  # saved but not targeted: PEFT does not load it
        if set(ab) != {"A", "B"}:
            raise SourceFormatError(f"{src}: module {module!r} lacks lora_A or lora_B")
        down, up = ab["A"], ab["B"]
        if down.ndim != 2 or up.ndim != 2:
            kind = {3: "nn.Conv1d", 4: "nn.Conv2d", 5: "nn.Conv3d"}.get(max(down.ndim, up.ndim), "non-Linear")
            raise AdapterShapeError(
                f"{src}: {module!r} is a LoRA on an {kind} layer (lora_A {list(down.shape)}, lora_B "
                f"{list(up.shape)}): only Linear and Conv1D layers can be merged here; merge this adapter with PEFT's "
                "merge_and_unload, or leave that layer out of target_modules")
        r = _pattern_value(rank_pattern, module, r_default)
        alpha = _pattern_value(alpha_pattern, module, alpha_default)
        if down.shape[0] != r or up.shape[1] != r:
            raise AdapterShapeError(f"{src}: {module!r} has lora_A {list(down.shape)} and lora_B {list(up.shape)}, "
                                    f"but adapter_config.json gives it rank r={r} (r / rank_pattern): config and "
                                    "weights disagree (a hand-edited config?)")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise NonFiniteError(f"{src}: {module!r} LoRA factors contain NaN or Inf")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layers[weight_key(module)] = LoraLayer(down=down, up=up, scaling=float(scaling),
                                               fan_in_fan_out=fans[weight_key(module)],
                                               magnitude=_dora_magnitude(src, module, magnitudes, up.shape[0], cfg))
    for module in set(magnitudes) - set(parts):
        raise SourceFormatError(f"{src}: {module!r} has a lora_magnitude_vector but no lora_A / lora_B")
    if not layers and not params:
        raise SourceFormatError(f"{src}: the adapter holds no lora_A / lora_B tensors")
    return layers


def _targeted_orientations(src, cfg: dict, modules: list[str], base: BaseModelInfo | None,
                           on_note: Callable[[str], None] | None, decide: bool = True) -> dict[str, bool]:
    """``{weight key: fan_in_fan_out}`` of the saved modules PEFT loads. Targeted base layers without saved weights
    get PEFT's init, a zero ΔW only with ``init_lora_weights`` true or "gaussian": otherwise refuse."""
    keys, unsaved = targeted_layers(cfg, [weight_key(m) for m in modules], base, str(src), on_note)
    if unsaved and cfg.get("init_lora_weights", True) not in (True, "gaussian"):
        raise SourceFormatError(
            f"{src}: adapter_config.json targets {unsaved[0].removesuffix('.weight')!r} ({len(unsaved)} layer(s) in "
            "all), but the adapter's weights have none for it and init_lora_weights is not a zero init: config and "
            "weights disagree; fix target_modules / layers_to_transform")
    flag = bool(cfg.get("fan_in_fan_out", False))
    try:
        return layer_orientations(keys, base, flag, str(src))
    except LayerTypeError:
        if decide:
            raise
        return dict.fromkeys(keys, flag)


def _dora_magnitude(src, module: str, magnitudes: dict[str, torch.Tensor], out_features: int,
                    cfg: dict) -> torch.Tensor | None:
    """The DoRA magnitude m (out,) of ``module``, checked; None for a plain LoRA adapter."""
    if not cfg.get("use_dora"):
        return None
    m = magnitudes.get(module)
    if m is None:
        raise SourceFormatError(f"{src}: use_dora is set but {module!r} has no lora_magnitude_vector")
    if m.ndim != 1 or m.shape[0] != out_features:
        raise AdapterShapeError(f"{src}: {module!r} lora_magnitude_vector is {list(m.shape)}, expected "
                                f"[{out_features}] (one per output feature; DoRA on Linear / Conv1D only)")
    if not torch.isfinite(m).all():
        raise NonFiniteError(f"{src}: {module!r} lora_magnitude_vector contains NaN or Inf")
    return m


KIND = "peft-lora"


class LoraSource(DeltaSource):
    """A PEFT LoRA dir's layers (``layers``: weight key → :class:`LoraLayer`) as a source; DoRA layers answer
    ``dora_magnitude`` / ``dora_delta`` instead of ``delta``."""

    kind = KIND
    # saved module → a target_parameters layer (PEFT ParamWrapper); mapped onto checkpoint keys by keymap.py only
    param_layers: Mapping[str, ParamLoraLayer] = MappingProxyType({})
    param_config: Mapping = MappingProxyType({})

    def __init__(self, layers: dict[str, LoraLayer], path: str):
        self.layers, self.path = layers, path

    def keys(self) -> list[str]:
        if self.param_layers:
            first = next(iter(self.param_layers))
            raise SourceFormatError(
                f"{self.path}: adapts raw parameters (target_parameters, e.g. layer {first!r}), whose tensors on disk "
                "depend on the base model (MoE experts are stored per expert): merge it into its base with "
                "'randlora-io merge BASE ADAPTER', which maps them as transformers saves them")
        return list(self.layers)

    def stored_shape(self, key: str) -> tuple[int, int]:
        return self.layers[key].stored_shape

    def fan_in_fan_out(self, key: str) -> bool:
        return self.layers[key].fan_in_fan_out

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if self.layers[key].magnitude is not None:
            raise SourceFormatError(f"{self.path}: {key!r} is a DoRA layer: its update W' = m·(W + ΔW)/‖W + ΔW‖ "
                                    "depends on the base weight and is not additive; merge it into its base instead")
        return self.layers[key].delta(device)

    def dora_magnitude(self, key: str) -> torch.Tensor | None:
        return self.layers[key].magnitude

    def dora_delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.layers[key].delta(device)


def matches(probe: Probe) -> bool:
    return probe.path.is_dir() and probe.peft_config.get("peft_type") == PEFT_TYPE


def load(probe: Probe, options: OpenOptions) -> LoraSource:
    """The dir as PEFT loads it onto ``options.base`` (else onto a local ``base_model_name_or_path``, else with the
    config's orientation where the layer type cannot be told)."""
    peft = read_peft_dir(probe.path, config=probe.peft_config)  # read once: the layers, the base copies, the extras
    base = options.base if options.base is not None else local_base_info(probe.path, peft.config)
    source = LoraSource(read_peft_lora(peft, base, options.on_note), str(probe.path))
    source.param_layers = read_param_layers(peft.tensors, peft.config, str(probe.path))
    source.param_config = peft.config
    source.base_copies, source.replacements, source.peft_extras = peft.base_copies, peft.replacements, peft.extras
    return source


def describe(probe: Probe) -> dict[str, Any]:
    peft = read_peft_dir(probe.path, config=probe.peft_config)  # read once, for both kinds of layer
    layers = read_peft_lora(peft, local_base_info(probe.path, peft.config), decide_orientation=False)
    rows = [layer_row(k, layer.stored_shape, layer.down.shape[0], None, [layer.down, layer.up])
            for k, layer in layers.items()]
    for module, p in read_param_layers(peft.tensors, peft.config, str(probe.path)).items():  # target_parameters
        rows.append(layer_row(module, None, p.down.shape[0], None, [p.down, p.up]))
    return {"layers": rows}


def validate(probe: Probe) -> str:
    source = load(probe, OpenOptions())
    if source.param_layers:  # target_parameters wrappers: their checkpoint tensors depend on the base (merge maps them)
        return (f"{KIND}, {len(source.layers)} layers and {len(source.param_layers)} target_parameters wrappers "
                "(mapped onto a base's tensors by merge)")
    return f"{KIND}, {len(source.keys())} layers"
