"""``merge --config merge.yml``: the subset of mergekit's YAML merge configuration that randlora-io runs.

Accepted (anything else is refused, naming the key)::

    merge_method: ties            # task_arithmetic | ties | dare_linear | dare_ties | breadcrumbs | breadcrumbs_ties
    base_model: path/to/base      # required: every method here composes task vectors against it
    models:
      - model: path/to/adapter_or_finetuned_checkpoint
        parameters: {weight: 1.0, density: 0.5}   # weight required (as in mergekit), density default 1
      - model: path/to/base       # the base listed among the models (mergekit allows it) is skipped
    parameters: {lambda: 1.0, normalize: true, rescale: true}   # each optional, defaults per method
    dtype: bfloat16               # the output dtype (float32 | bfloat16 | float16); arithmetic is float32 always

Paths are used as written (relative to the working directory, as mergekit does); ``hub:REPO`` names work as on the
command line. The file is read with ``yaml.safe_load`` (no tags, no objects) and is at most 1 MiB.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceFormatError
from .compose import METHODS

MAX_CONFIG_BYTES = 1 << 20
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype")
_MODEL_KEYS = ("model", "parameters")
_MODEL_PARAMETERS = ("weight", "density")
_SHARED_PARAMETERS = ("lambda", "normalize", "rescale")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
           "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class MergeConfig:
    """One merge as a config file gives it: BASE, the inputs in order with their weight and density, and the
    method's shared parameters (None: the method's default)."""

    method: str
    base: str
    inputs: tuple[str, ...]
    weights: tuple[float, ...]
    densities: tuple[float, ...] | None
    lambda_: float | None
    normalize: bool | None
    rescale: bool | None
    dtype: str | None


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SourceFormatError(f"{path}: {where} is {value!r}; it must be a finite number (a list of values, a "
                                "gradient or a filter, which mergekit also takes, is not supported here)")
    return float(value)


def _flag(path: Path, where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SourceFormatError(f"{path}: {where} is {value!r}; it must be true or false")
    return value


def _mapping(path: Path, where: str, value: Any, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SourceFormatError(f"{path}: {where} must be a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise SourceFormatError(f"{path}: unknown key {key!r} in {where}; randlora-io reads only "
                                    f"{', '.join(allowed)} there")
    return value


def _model_path(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SourceFormatError(f"{path}: {where} must be a path (a string), got {value!r}")
    return value


def read_merge_config(path: str | os.PathLike) -> MergeConfig:
    """The merge ``path`` (a mergekit-style YAML file) describes, every key checked; one-line errors name the key."""
    import yaml  # PyYAML: a declared dependency, imported only for --config

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise SourceFormatError(f"{path}: {size} bytes; a merge config is at most {MAX_CONFIG_BYTES} bytes")
        data = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as exc:
        raise SourceFormatError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise SourceFormatError(f"{path}: nested too deeply to be a merge config") from None
    top = _mapping(path, "the config", data, _TOP_KEYS)
    if not top:
        raise SourceFormatError(f"{path}: empty; a merge config needs merge_method, base_model and models")
    method = top.get("merge_method")
    if method not in METHODS:
        raise SourceFormatError(f"{path}: merge_method {method!r} is not supported; use one of {', '.join(METHODS)}")
    if top.get("base_model") is None:
        raise SourceFormatError(f"{path}: base_model is missing; {method} composes task vectors against a base "
                                "model: give its path")
    base = _model_path(path, "base_model", top["base_model"])
    models = top.get("models")
    if not isinstance(models, list) or not models:
        raise SourceFormatError(f"{path}: models must be a non-empty list of {{model: PATH, parameters: ...}}")
    inputs, weights, densities, density_given = [], [], [], False
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        entry = _mapping(path, where, entry, _MODEL_KEYS)
        model = _model_path(path, f"{where}.model", entry.get("model"))
        params = _mapping(path, f"{where}.parameters", entry.get("parameters"), _MODEL_PARAMETERS)
        if model == base or (Path(model).exists() and Path(model).resolve() == Path(base).resolve()):
            continue  # mergekit lists the base among the models (its parameters unused): it contributes nothing
        if "weight" not in params:
            raise SourceFormatError(f"{path}: {where} ({model}) has no parameters.weight; mergekit requires one per "
                                    "model: add e.g. `parameters: {weight: 1.0}`")
        inputs.append(model)
        weights.append(_number(path, f"{where}.parameters.weight", params["weight"]))
        densities.append(_number(path, f"{where}.parameters.density", params.get("density", 1.0)))
        density_given = density_given or "density" in params
    if not inputs:
        raise SourceFormatError(f"{path}: models lists only the base model; give the inputs to merge")
    shared = _mapping(path, "parameters", top.get("parameters"), _SHARED_PARAMETERS)
    dtype = top.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise SourceFormatError(f"{path}: dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    sparsifies = method != "task_arithmetic"
    if not sparsifies and density_given:
        raise SourceFormatError(f"{path}: parameters.density has no effect with merge_method task_arithmetic; "
                                "drop it or choose ties, dare_* or breadcrumbs*")
    return MergeConfig(
        method=method, base=base, inputs=tuple(inputs), weights=tuple(weights),
        densities=tuple(densities) if sparsifies else None,
        lambda_=_number(path, "parameters.lambda", shared["lambda"]) if "lambda" in shared else None,
        normalize=_flag(path, "parameters.normalize", shared["normalize"]) if "normalize" in shared else None,
        rescale=_flag(path, "parameters.rescale", shared["rescale"]) if "rescale" in shared else None,
        dtype=_DTYPES[dtype] if dtype is not None else None)
