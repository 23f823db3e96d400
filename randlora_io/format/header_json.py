"""Strict JSON and the typed field readers shared by the RandLoRA and VeRA headers (SPEC §1, §2).

Every refusal is a :class:`~randlora_io.errors.HeaderError` (an unknown MAJOR version its
:class:`~randlora_io.errors.UnsupportedVersionError` subclass) whose message names the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import HeaderError, UnsupportedVersionError

SUPPORTED_MAJOR = 1
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_BASE_MODEL_STRINGS = ("id", "revision", "fingerprint")


def require(cond: bool, msg: str) -> None:
    """Raise :class:`HeaderError` with ``msg`` unless ``cond``."""
    if not cond:
        raise HeaderError(msg)


def is_int(value: Any) -> bool:
    """A JSON integer (a Python int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_field(obj: dict, key: str, where: str, minimum: int | None = None) -> int:
    """``obj[key]`` as an integer (no fraction or exponent: ``42.0`` is refused), at least ``minimum``."""
    value = obj.get(key)
    require(is_int(value), f"{where}: '{key}' must be an integer (written without fraction or exponent), "
             f"got {value!r}")
    if minimum is not None:
        require(value >= minimum, f"{where}: '{key}' must be >= {minimum}, got {value}")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        require(key not in out, f"header JSON has the key {key!r} twice (SPEC §1: duplicate keys are refused)")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise HeaderError(f"header JSON contains {name}, which is not JSON (SPEC §1)")


def strict_json_loads(text: str) -> Any:
    """RFC 8259 JSON, strictly (SPEC §1): duplicate keys, NaN / Infinity and nesting too deep for the parser are
    refused with :class:`HeaderError`; integers are parsed exactly (Python ints)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except HeaderError:
        raise
    except json.JSONDecodeError as exc:
        raise HeaderError(f"header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise HeaderError("header JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise HeaderError(f"header JSON cannot be read ({exc})") from None


def parse_version(obj: dict[str, Any]) -> str:
    """``format_version`` checked: ``MAJOR.MINOR`` without leading zeros, MAJOR known (SPEC §2)."""
    version = obj.get("format_version")
    require(isinstance(version, str) and _VERSION_RE.fullmatch(version) is not None,
             f"'format_version' must be 'MAJOR.MINOR' (digits, no leading zeros), got {version!r}")
    major = int(version.split(".")[0])
    if major != SUPPORTED_MAJOR:
        raise UnsupportedVersionError(
            f"format version {version} is not supported (this library reads major version {SUPPORTED_MAJOR}); "
            "upgrade randlora-io"
        )
    return version


def bases_checksum_and_stored(bases: dict[str, Any]) -> tuple[str | None, bool]:
    """``bases.sha256`` (absent, or 64 lowercase hex digits: SPEC §4.4) and ``bases.stored`` (default false)."""
    sha = bases.get("sha256")
    require("sha256" not in bases or (isinstance(sha, str) and _SHA256_RE.fullmatch(sha) is not None),
            f"bases: 'sha256' must be 64 lowercase hex digits when present (SPEC §4.4), got {sha!r}")
    stored = bases.get("stored", False)
    require(isinstance(stored, bool), "bases: 'stored' must be a boolean")
    return sha, stored


def parse_base_model(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The optional ``base_model`` object; its ``id`` / ``revision`` / ``fingerprint`` are strings or null."""
    base_model = obj.get("base_model")
    require(base_model is None or isinstance(base_model, dict), "header: 'base_model' must be an object")
    for key in _BASE_MODEL_STRINGS if base_model is not None else ():
        value = base_model.get(key)
        require(value is None or isinstance(value, str), f"base_model: '{key}' must be a string or null, got {value!r}")
    return base_model


def bases_object(dims: dict[str, int], sha256: str | None, stored: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """A header's ``bases`` object: the sizes (``min_dim``/``max_dim``, or VeRA's ``max_out``/``max_in``), then
    ``sha256`` and ``stored: true`` when set, then the unknown keys read (kept on rewrite, SPEC §2)."""
    bases: dict[str, Any] = dict(dims)
    if sha256 is not None:
        bases["sha256"] = sha256
    if stored:
        bases["stored"] = True
    bases.update(extra)
    return bases


def with_optional(out: dict[str, Any], base_model: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """``out`` plus ``base_model`` when present and the unknown top-level keys read (kept on rewrite)."""
    if base_model is not None:
        out["base_model"] = base_model
    out.update(extra)
    return out
