"""Type checks of a PEFT ``adapter_config.json`` at the boundary, before any converter reads a value from it.

Only the keys randlora-io reads are checked; PEFT's other keys pass through untouched. Each violation is one
:class:`SourceFormatError` naming the file, the key and what is expected.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import SourceFormatError

_BOOLS = ("sparse", "very_sparse", "fan_in_fan_out", "use_rslora", "use_dora", "save_projection", "inference_mode")
_POSITIVE_INTS = ("r",)
_NUMBERS = ("lora_alpha", "randlora_alpha", "randlora_dropout", "lora_dropout", "vera_dropout", "d_initial")
_NAME_LISTS = ("target_modules", "modules_to_save", "exclude_modules", "layers_pattern", "target_parameters")
_PATTERNS = ("rank_pattern", "alpha_pattern")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_peft_config(config: dict, path: str | Path) -> None:
    """Raise :class:`SourceFormatError` on the first key of ``config`` (parsed from ``path``) whose value has a type
    or range PEFT itself would not have written."""
    def bad(key: str, expected: str) -> SourceFormatError:
        return SourceFormatError(f"{path}: {key!r} is {config[key]!r}; expected {expected} (is the file damaged "
                                 "or hand-edited?)")

    if not isinstance(config.get("peft_type", ""), str):
        raise bad("peft_type", "a string such as \"LORA\" or \"RANDLORA\"")
    for key in _BOOLS:
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    for key in _POSITIVE_INTS:
        if key in config and not (_is_int(config[key]) and config[key] > 0):
            raise bad(key, "a positive integer")
    for key in _NUMBERS:
        if key in config and config[key] is not None and not _is_number(config[key]):
            raise bad(key, "a finite number")
    # VeRA takes any key torch.Generator.manual_seed takes (a negative one is 2^64 + key); RandLoRA's [0, 2^64)
    low = -(2**63) if config.get("peft_type") == "VERA" else 0
    if "projection_prng_key" in config and not (_is_int(config["projection_prng_key"])
                                                 and low <= config["projection_prng_key"] < 2**64):
        raise bad("projection_prng_key", f"an integer seed in [{'-2^63' if low else '0'}, 2^64)")
    for key in _NAME_LISTS:
        value = config.get(key)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, "a string or a list of strings")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str) and config[key] != "all-linear":
            _check_regex(config[key], key, path)
    if "layers_to_transform" in config and config["layers_to_transform"] is not None:
        value = config["layers_to_transform"]
        if not (_is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))):
            raise bad("layers_to_transform", "an integer or a list of integers")
    # PEFT 0.21.2 (tuners_utils) treats every "<x>_only" alike: the biases of the adapted layers are trained
    bias = config.get("bias")
    if "bias" in config and not (bias in ("none", "all", None) or (isinstance(bias, str) and bias.endswith("_only"))):
        raise bad("bias", '"none", "all", "lora_only", "randlora_only" or "vera_only"')
    for key in _PATTERNS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise bad(key, "an object mapping module-name patterns to numbers")
        for pattern, number in value.items():
            _check_regex(pattern, key, path)
            ok = _is_int(number) and number > 0 if key == "rank_pattern" else _is_number(number)
            if not ok:
                kind = "a positive integer rank" if key == "rank_pattern" else "a finite number"
                raise SourceFormatError(f"{path}: {key}[{pattern!r}] is {number!r}; expected {kind}")


def _check_regex(pattern: str, key: str, path: str | Path) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise SourceFormatError(f"{path}: {key} pattern {pattern!r} is not a valid regular expression ({exc})") \
            from None
