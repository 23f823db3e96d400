"""PEFT LoRA ``target_parameters`` layers (``lora.ParamWrapper``, PEFT 0.21.2): LoRA on a raw ``nn.Parameter``,
e.g. the fused 3-D MoE expert tensors of transformers ≥ 5 (Mixtral ``mlp.experts.gate_up_proj`` (E, 2I, h)).

On disk a wrapper is saved under its module path, not the parameter's: ``<module>.lora_A.weight`` (r·E, in) and
``<module>.lora_B.weight`` (out, r·E). Several parameters of one module nest wrappers, the first wrapped innermost:
the parameter wrapped j-th from the outside is saved under ``<module>`` + ``.base_layer`` × j. Which parameter that is
needs the model (its ``named_parameters`` order, see :func:`targeted_params`), so this module only reads the tensors
and computes ΔW once the parameter is known; :mod:`randlora_io.keymap` resolves names and checkpoint keys.

ΔW, as PEFT's ``ParamWrapper.get_delta_weight``: A (r·E, in) viewed (E, r, in), B (out, r·E) viewed (out, r, E);
ΔW_e = scaling · B[:, :, e] @ A_e (out, in), stacked (E, out, in), or (E, in, out) for a module with
``is_transposed``; a 2-D parameter (E = 1) is the plain Linear ΔW (out, in). float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import AdapterShapeError, NonFiniteError, SourceFormatError
from .peft_dir import PEFT_PREFIX, module_of
from .peft_targets import target_rule

BASE_LAYER_SUFFIX = ".base_layer"


@dataclass(frozen=True)
class ParamLoraLayer:
    """One saved ParamWrapper: ``module`` as saved (with its ``.base_layer`` chain), ``down`` = lora_A (r·E, in),
    ``up`` = lora_B (out, r·E)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor

    @property
    def owner(self) -> str:
        """The module path holding the parameter (``.base_layer`` links removed)."""
        return strip_base_layers(self.module)

    @property
    def depth(self) -> int:
        """How many wrappers sit outside this one (its ``.base_layer`` links)."""
        return (len(self.module) - len(self.owner)) // len(BASE_LAYER_SUFFIX)


def strip_base_layers(module: str) -> str:
    """``module`` without its trailing ``.base_layer`` links."""
    while module.endswith(BASE_LAYER_SUFFIX):
        module = module[: -len(BASE_LAYER_SUFFIX)]
    return module


def target_parameters(config: dict) -> list[str]:
    """The config's ``target_parameters`` as a list (empty when none)."""
    raw = config.get("target_parameters") or []
    return [raw] if isinstance(raw, str) else [p for p in raw if isinstance(p, str)]


def param_modules(config: dict, modules: list[str], source: str) -> set[str]:
    """The saved LoRA modules (``<path>`` of ``<path>.lora_A.weight``) that are ParamWrappers of ``config``'s
    ``target_parameters``: a module whose owner is the module part of an entry (``mlp.experts`` of
    ``mlp.experts.gate_up_proj``), a nested wrapper (``….base_layer``), or, for an entry without a module part, a
    module ``target_modules`` does not claim."""
    entries = target_parameters(config)
    if not entries:
        return set()
    rule = target_rule(config, source) if config.get("target_modules") is not None else None
    out = set()
    for module in modules:
        owner = strip_base_layers(module)
        for entry in entries:
            prefix = entry.rpartition(".")[0]
            if (owner == prefix or owner.endswith("." + prefix)) if prefix else \
                    (owner != module or rule is None or not rule.matches(module)):
                out.add(module)
    return out


def read_param_layers(tensors: dict[str, torch.Tensor], config: dict, source: str) -> dict[str, ParamLoraLayer]:
    """``{saved module: ParamLoraLayer}`` of a PEFT LoRA dir's tensors (keys as saved) for its target_parameters."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix in ("lora_A.weight", "lora_B.weight"):
            if key.startswith(PEFT_PREFIX) and key.endswith("." + suffix):
                parts.setdefault(module_of(key, suffix), {})[suffix[5]] = tensor
    layers = {}
    for module in sorted(param_modules(config, list(parts), source)):
        ab = parts[module]
        if set(ab) != {"A", "B"}:
            raise SourceFormatError(f"{source}: module {module!r} lacks lora_A or lora_B")
        if ab["A"].ndim != 2 or ab["B"].ndim != 2:
            raise AdapterShapeError(f"{source}: {module!r} lora_A / lora_B must be 2-D")
        layers[module] = ParamLoraLayer(module=module, down=ab["A"], up=ab["B"])
    return layers


def matches_target(name: str, config: dict) -> bool:
    """PEFT's match of a parameter ``name`` (``<module>.<param>``) against ``target_parameters``."""
    return any(name == t or name.endswith("." + t) for t in target_parameters(config))


def param_scaling(config: dict, name: str) -> tuple[int, float]:
    """``(r, scaling)`` of parameter ``name`` (PEFT matches rank / alpha patterns on ``<module>.<param>``)."""
    r = pattern_value(config.get("rank_pattern") or {}, name, config.get("r"))
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha"))
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise SourceFormatError(f"invalid r or lora_alpha for {name!r}")
    return r, float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key``: the value of the first pattern p with ``(.*\\.)?(p)$`` matching ``name`` (a
    module path, or ``<module>.<param>`` for a target_parameters layer); ``default`` when none does."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def param_delta(layer: ParamLoraLayer, shape: tuple[int, ...], transposed: bool, r: int, scaling: float,
                where: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """ΔW of ``layer`` for a parameter of in-memory ``shape`` (2-D (out, in), or 3-D (E, out, in) / (E, in, out)
    when ``transposed``), float32, in that shape. Shapes are checked against PEFT's (``where`` names the layer)."""
    down, up = layer.down.to(device, torch.float32), layer.up.to(device, torch.float32)
    if len(shape) == 2:
        experts, (out_f, in_f) = 1, shape
    elif len(shape) == 3:
        experts = shape[0]
        in_f, out_f = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
    else:
        raise AdapterShapeError(f"{where}: target_parameters on a {len(shape)}-D parameter (PEFT adapts 2-D and 3-D)")
    if tuple(down.shape) != (r * experts, in_f) or tuple(up.shape) != (out_f, r * experts):
        raise AdapterShapeError(f"{where}: lora_A {list(down.shape)} and lora_B {list(up.shape)} do not fit the "
                                f"parameter {list(shape)} with r={r} (expected [{r * experts}, {in_f}] and "
                                f"[{out_f}, {r * experts}])")
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise NonFiniteError(f"{where}: LoRA factors contain NaN or Inf")
    if len(shape) == 2:
        return (up @ down) * scaling
    a = down.reshape(experts, r, in_f)
    b = up.reshape(out_f, r, experts).permute(2, 0, 1)  # (E, out, r)
    delta = torch.bmm(b, a) * scaling  # (E, out, in)
    return delta.transpose(1, 2).contiguous() if transposed else delta
