"""The randlora header (SPEC.md §2): typed dataclasses, parsing with validation, and serialisation.

Validation happens here, once, at the boundary; the rest of the library trusts these objects.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterShapeError, HeaderError, UnsupportedVersionError

FORMAT_NAME = "randlora"
FORMAT_VERSION = "1.1"  # what this library writes; it reads every 1.x (SPEC §2)
SUPPORTED_MAJOR = 1
METADATA_KEY = "randlora"

GENERATORS = ("philox", "peft")
KINDS = ("dense", "sparse", "very_sparse")
SCALE_DTYPES = ("float32", "float16", "bfloat16", "float64")
PEFT_DRAW_DTYPES = ("bfloat16", "float16", "float32")
PEFT_DENSE_DRAW_DTYPES = ("bfloat16", "float16")  # SPEC §4.3: dense kinds; sparse kinds are drawn in float32
CAST_DTYPES = ("float32", "float16", "bfloat16")
SPARSE_THRESHOLD = 715827882  # floor(2^32 / 6): P(-1) = P(+1) = 1/6, PEFT's `sparse` (s = 3)

_KNOWN_TOP_KEYS = {"format", "format_version", "generator", "seed", "rank", "alpha", "bases", "layers", "base_model"}
_KNOWN_BASES_KEYS = {"min_dim", "max_dim", "sha256", "stored"}
_KNOWN_LAYER_KEYS = {"shape", "fan_in_fan_out", "num_bases", "dtype"}
_BASE_MODEL_STRINGS = ("id", "revision", "fingerprint")
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def generator_parameters(name: str, kind: str) -> tuple[frozenset[str], frozenset[str]]:
    """(required, optional) keys of a generator object (SPEC §4). Any other key is refused, whatever the minor
    version: an unknown parameter could change the bases."""
    if name == "philox":
        if kind == "dense":
            return frozenset({"name", "kind"}), frozenset()
        return frozenset({"name", "kind", "threshold"}), frozenset()
    return frozenset({"name", "kind", "draw_dtype"}), frozenset({"cast_dtype"})


def num_bases(dim: int, rank: int) -> int:
    """N = ceil(dim / rank): the number of bases that make a (dim)-wide update full rank."""
    return -(-dim // rank)


def very_sparse_threshold(min_dim: int) -> int:
    """Philox threshold for `very_sparse`: P(-1) = P(+1) = 1 / (2 sqrt(min_dim)), as PEFT's s = sqrt(min_dim)."""
    return max(1, min(2**31, int(math.floor(2**31 / math.sqrt(min_dim)))))


@dataclass(frozen=True)
class GeneratorSpec:
    """How the shared bases are drawn.

    ``name``: ``philox`` (native, SPEC §4.2) or ``peft`` (PEFT 0.21.2's torch CPU RNG, SPEC §4.3).
    ``kind``: dense, sparse or very_sparse. ``threshold``: philox ternary threshold (sparse kinds only).
    ``draw_dtype``/``cast_dtype``: peft only; the dtype PEFT drew in, and the dtype the bases were cast to before
    use (PEFT casts them to the base layer's dtype), or None for no cast.
    """

    name: str
    kind: str
    seed: int
    threshold: int | None = None
    draw_dtype: str | None = None
    cast_dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.draw_dtype is not None:
            out["draw_dtype"] = self.draw_dtype
        if self.cast_dtype is not None:
            out["cast_dtype"] = self.cast_dtype
        return out


@dataclass(frozen=True)
class LayerSpec:
    """One adapted weight. ``shape`` is the weight's stored shape in the base checkpoint: (out, in) for
    ``nn.Linear``, (in, out) when ``fan_in_fan_out`` (GPT-2 ``Conv1D``)."""

    key: str
    shape: tuple[int, int]
    fan_in_fan_out: bool
    num_bases: int
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # unknown keys, kept on rewrite (SPEC §2)

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.fan_in_fan_out else self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.fan_in_fan_out else self.shape[1]

    @property
    def min_dim(self) -> int:
        return min(self.shape)

    @property
    def max_dim(self) -> int:
        return max(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "fan_in_fan_out": self.fan_in_fan_out, "num_bases": self.num_bases,
                "dtype": self.dtype, **self.extra}


@dataclass
class AdapterHeader:
    """The whole header. ``min_dim``/``max_dim`` size the shared bases; ``bases_sha256`` is the checksum of the
    regenerated bases (SPEC §4.4); ``extra`` keeps unknown optional top-level keys and ``bases_extra`` unknown keys
    of ``bases`` so they survive a rewrite (layers keep theirs in ``LayerSpec.extra``; ``base_model`` is kept whole).
    ``format_version`` is the label read (a rewrite keeps it) or, for a new adapter, the version this library writes."""

    rank: int
    alpha: float
    generator: GeneratorSpec
    min_dim: int
    max_dim: int
    layers: dict[str, LayerSpec]
    bases_sha256: str | None = None
    stored_bases: bool = False
    base_model: dict[str, Any] | None = None
    format_version: str = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    bases_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.generator.seed

    @property
    def total_bases(self) -> int:
        """Columns of B are ``total_bases * rank``: enough bases for the model-wide ``min_dim``."""
        return num_bases(self.min_dim, self.rank)

    @property
    def scaling(self) -> float:
        """alpha / r times the generator's normalisation factor (SPEC §3); 1 for `peft`."""
        return self.alpha / self.rank * normalisation(self.generator)

    def to_json(self) -> dict[str, Any]:
        bases: dict[str, Any] = {"min_dim": self.min_dim, "max_dim": self.max_dim}
        if self.bases_sha256 is not None:
            bases["sha256"] = self.bases_sha256
        if self.stored_bases:
            bases["stored"] = True
        bases.update(self.bases_extra)
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "generator": self.generator.to_json(),
            "seed": self.generator.seed,
            "rank": self.rank,
            "alpha": self.alpha,
            "bases": bases,
            "layers": {k: v.to_json() for k, v in self.layers.items()},
        }
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out.update(self.extra)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=False)


def normalisation(generator: GeneratorSpec) -> float:
    """Factor folded into the scaling so philox bases act like unit-variance ones (SPEC §3).

    dense philox values are uniform on (-1, 1) (variance 1/3 per factor): 3. Ternary philox values have variance
    2T/2^32 per factor: 2^31 / T. PEFT normalises its bases by their std itself: 1.
    """
    if generator.name == "peft":
        return 1.0
    if generator.kind == "dense":
        return 3.0
    assert generator.threshold is not None
    return 2.0**31 / generator.threshold


# --------------------------------------------------------------------------------------------------------------------
# Shared dimensions (SPEC §2 `bases`, §4.3: PEFT's _find_dim)
# --------------------------------------------------------------------------------------------------------------------


def max_out_in(layers: Iterable[tuple[Sequence[int], bool]]) -> tuple[int, int]:
    """``(max_out, max_in)``: the elementwise max of (out, in) over ``layers`` (stored shape, fan_in_fan_out; a
    stored shape is (out, in), or (in, out) when fan_in_fan_out), as PEFT 0.21.2's ``_find_dim`` (RandLoRA and
    VeRA). Raises :class:`AdapterShapeError` for no layers or a zero-size / non-2-D one."""
    max_out = max_in = 0
    for shape, fan in layers:
        if len(shape) != 2 or min(shape) < 1:
            raise AdapterShapeError(f"a layer of shape {list(shape)}: RandLoRA and VeRA adapt 2-D weights, and a "
                                    "zero-size dimension has nothing to adapt; drop that layer")
        out_f, in_f = (shape[1], shape[0]) if fan else (shape[0], shape[1])
        max_out, max_in = max(max_out, int(out_f)), max(max_in, int(in_f))
    if max_out == 0:
        raise AdapterShapeError("no layers to adapt")
    return max_out, max_in


def shared_dims(layers: Iterable[tuple[Sequence[int], bool]]) -> tuple[int, int]:
    """``(min_dim, max_dim)`` a set of layers implies: the elementwise max of (out, in) over the layers
    (:func:`max_out_in`), then its (min, max), as PEFT 0.21.2's RandLoRA ``_find_dim``. With (96, 64) and (64, 96)
    layers that is (96, 96), not the max of the per-layer minima."""
    max_out, max_in = max_out_in(layers)
    return min(max_out, max_in), max(max_out, max_in)


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise HeaderError(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(obj: dict, key: str, where: str, minimum: int | None = None) -> int:
    value = obj.get(key)
    _require(_is_int(value), f"{where}: '{key}' must be an integer (written without fraction or exponent), "
             f"got {value!r}")
    if minimum is not None:
        _require(value >= minimum, f"{where}: '{key}' must be >= {minimum}, got {value}")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        _require(key not in out, f"header JSON has the key {key!r} twice (SPEC §1: duplicate keys are refused)")
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


def parse_header(text: str) -> AdapterHeader:
    """Parse and validate the JSON header string. Raises :class:`HeaderError` (or its version subclass)."""
    obj = strict_json_loads(text)
    _require(isinstance(obj, dict), "header must be a JSON object")
    return header_from_json(obj)


def _version(obj: dict[str, Any]) -> str:
    version = obj.get("format_version")
    _require(isinstance(version, str) and _VERSION_RE.fullmatch(version) is not None,
             f"'format_version' must be 'MAJOR.MINOR' (digits, no leading zeros), got {version!r}")
    major = int(version.split(".")[0])
    if major != SUPPORTED_MAJOR:
        raise UnsupportedVersionError(
            f"format version {version} is not supported (this library reads major version {SUPPORTED_MAJOR}); "
            "upgrade randlora-io"
        )
    return version


def _alpha(obj: dict[str, Any]) -> float:
    alpha = obj.get("alpha")
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if ok and isinstance(alpha, int):
        ok = abs(alpha) <= sys.float_info.max
    _require(ok and math.isfinite(alpha), f"header: 'alpha' must be a finite number, got {alpha!r}")
    return float(alpha)


def header_from_json(obj: dict[str, Any]) -> AdapterHeader:
    """Validate a decoded header object (SPEC §2, §4, §8) and build an :class:`AdapterHeader`."""
    _require(isinstance(obj, dict), "header must be a JSON object")
    _require(obj.get("format") == FORMAT_NAME, f"'format' must be {FORMAT_NAME!r}, got {obj.get('format')!r}")
    version = _version(obj)
    rank = _int(obj, "rank", "header", minimum=1)
    alpha = _alpha(obj)
    seed = _int(obj, "seed", "header", minimum=0)
    _require(seed < 2**64, f"header: 'seed' must be < 2^64, got {seed}")

    bases = obj.get("bases")
    _require(isinstance(bases, dict), "header: 'bases' must be an object with min_dim and max_dim")
    min_dim = _int(bases, "min_dim", "bases", minimum=1)
    max_dim = _int(bases, "max_dim", "bases", minimum=1)
    _require(min_dim <= max_dim, f"bases: min_dim {min_dim} exceeds max_dim {max_dim}")
    _require(rank <= min_dim, f"header: rank {rank} exceeds the bases' min_dim {min_dim}")
    sha = bases.get("sha256")
    _require("sha256" not in bases or (isinstance(sha, str) and _SHA256_RE.fullmatch(sha) is not None),
             f"bases: 'sha256' must be 64 lowercase hex digits when present (SPEC §4.4), got {sha!r}")
    stored = bases.get("stored", False)
    _require(isinstance(stored, bool), "bases: 'stored' must be a boolean")

    generator = _parse_generator(obj.get("generator"), seed)

    layers_obj = obj.get("layers")
    _require(isinstance(layers_obj, dict) and layers_obj, "header: 'layers' must be a non-empty object")
    layers = {key: _parse_layer(key, entry, rank) for key, entry in layers_obj.items()}
    implied = shared_dims((layer.shape, layer.fan_in_fan_out) for layer in layers.values())
    _require((min_dim, max_dim) == implied,
             f"bases: min_dim/max_dim are ({min_dim}, {max_dim}) but the layers imply {implied} (SPEC §2: the "
             "elementwise max of (out, in) over the layers, PEFT's _find_dim); the file is corrupt or hostile")

    base_model = obj.get("base_model")
    _require(base_model is None or isinstance(base_model, dict), "header: 'base_model' must be an object")
    for key in _BASE_MODEL_STRINGS if base_model is not None else ():
        value = base_model.get(key)
        _require(value is None or isinstance(value, str),
                 f"base_model: '{key}' must be a string or null, got {value!r}")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_TOP_KEYS}
    bases_extra = {k: v for k, v in bases.items() if k not in _KNOWN_BASES_KEYS}
    return AdapterHeader(rank=rank, alpha=alpha, generator=generator, min_dim=min_dim, max_dim=max_dim,
                         layers=layers, bases_sha256=sha, stored_bases=stored, base_model=base_model,
                         format_version=version, extra=extra, bases_extra=bases_extra)


def _parse_generator(gen: Any, seed: int) -> GeneratorSpec:
    _require(isinstance(gen, dict), "header: 'generator' must be an object with name and kind")
    name, kind = gen.get("name"), gen.get("kind")
    _require(name in GENERATORS, f"generator: unknown name {name!r} (expected one of {', '.join(GENERATORS)})")
    _require(kind in KINDS, f"generator: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    required, optional = generator_parameters(name, kind)
    for key in gen:
        _require(key in required or key in optional,
                 f"generator: {name} {kind} takes no parameter {key!r} (SPEC §4: unknown generator parameters "
                 "are refused; a newer randlora-io may read this file)")
    for key in required:
        _require(key in gen, f"generator: {name} {kind} needs {key!r}")
    if name == "philox":
        threshold = None
        if kind != "dense":
            threshold = _int(gen, "threshold", "generator", minimum=1)
            _require(threshold <= 2**31, f"generator: 'threshold' must be <= 2^31, got {threshold}")
        return GeneratorSpec(name=name, kind=kind, seed=seed, threshold=threshold)
    draw = gen.get("draw_dtype")
    allowed = PEFT_DENSE_DRAW_DTYPES if kind == "dense" else ("float32",)
    _require(draw in allowed, f"generator: peft {kind} needs 'draw_dtype' in {allowed} (SPEC §4.3), got {draw!r}")
    cast = gen.get("cast_dtype")
    _require("cast_dtype" not in gen or cast in CAST_DTYPES,
             f"generator: 'cast_dtype' must be one of {CAST_DTYPES} when present, got {cast!r}")
    return GeneratorSpec(name=name, kind=kind, seed=seed, draw_dtype=draw, cast_dtype=cast)


def _parse_layer(key: str, entry: Any, rank: int) -> LayerSpec:
    where = f"layer {key!r}"
    _require(isinstance(key, str) and key, "header: layer keys must be non-empty strings")
    _require(isinstance(entry, dict), f"{where}: must be an object")
    shape = entry.get("shape")
    _require(isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d >= 1 for d in shape),
             f"{where}: 'shape' must be two positive integers, got {shape!r}")
    fan = entry.get("fan_in_fan_out", False)
    _require(isinstance(fan, bool), f"{where}: 'fan_in_fan_out' must be a boolean")
    layer_min = min(shape)
    n = _int(entry, "num_bases", where, minimum=1)
    _require(n == num_bases(layer_min, rank),
             f"{where}: num_bases {n} disagrees with ceil({layer_min} / {rank}) = {num_bases(layer_min, rank)}")
    dtype = entry.get("dtype", "float32")
    _require(dtype in SCALE_DTYPES, f"{where}: 'dtype' must be one of {SCALE_DTYPES}, got {dtype!r}")
    extra = {k: v for k, v in entry.items() if k not in _KNOWN_LAYER_KEYS}
    return LayerSpec(key=key, shape=(shape[0], shape[1]), fan_in_fan_out=fan, num_bases=n, dtype=dtype, extra=extra)
