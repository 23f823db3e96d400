"""The randlora header (SPEC.md §2): typed dataclasses, parsing with validation, and serialisation.

Validation happens here, once, at the boundary; the rest of the library trusts these objects.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterShapeError
from .header_json import (bases_checksum_and_stored, bases_object, int_field, is_int, parse_base_model, parse_version,
                          require, strict_json_loads, with_optional)

FORMAT_NAME = "randlora"
FORMAT_VERSION = "1.1"  # what this library writes for RandLoRA; it reads every 1.x (SPEC §2)
VERA_FORMAT_VERSION = "1.2"  # VeRA files (generator method "vera", SPEC §2.1) need a 1.2 reader
METADATA_KEY = "randlora"

GENERATORS = ("philox", "peft")
METHODS = ("randlora", "vera")  # generator `method` (SPEC §2.1, 1.2); absent means randlora
KINDS = ("dense", "sparse", "very_sparse")
SCALE_DTYPES = ("float32", "float16", "bfloat16", "float64")
PEFT_DRAW_DTYPES = ("bfloat16", "float16", "float32")
PEFT_DENSE_DRAW_DTYPES = ("bfloat16", "float16")  # SPEC §4.3: dense kinds; sparse kinds are drawn in float32
CAST_DTYPES = ("float32", "float16", "bfloat16")
SPARSE_THRESHOLD = 715827882  # floor(2^32 / 6): P(-1) = P(+1) = 1/6, PEFT's `sparse` (s = 3)

_KNOWN_TOP_KEYS = {"format", "format_version", "generator", "seed", "rank", "alpha", "bases", "layers", "base_model"}
_KNOWN_BASES_KEYS = {"min_dim", "max_dim", "sha256", "stored"}
_KNOWN_LAYER_KEYS = {"shape", "fan_in_fan_out", "num_bases", "dtype"}


def generator_parameters(name: str, kind: str, method: str = "randlora") -> tuple[frozenset[str], frozenset[str]]:
    """(required, optional) keys of a generator object (SPEC §4). Any other key is refused, whatever the minor
    version: an unknown parameter could change the bases. ``method`` ``vera`` (SPEC §2.1) is required where it is
    used; ``randlora`` may be written (writers omit it, so 1.1 readers read the file)."""
    if method == "vera":
        if name == "philox":
            return frozenset({"name", "kind", "method"}), frozenset()
        return frozenset({"name", "kind", "method", "draw_dtype"}), frozenset({"cast_dtype"})
    if name == "philox":
        if kind == "dense":
            return frozenset({"name", "kind"}), frozenset({"method"})
        return frozenset({"name", "kind", "threshold"}), frozenset({"method"})
    return frozenset({"name", "kind", "draw_dtype"}), frozenset({"cast_dtype", "method"})


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
    use (PEFT casts them to the base layer's dtype), or None for no cast. ``method``: ``randlora`` or ``vera``
    (SPEC §2.1: VeRA's bases and update; written only when ``vera``).
    """

    name: str
    kind: str
    seed: int
    threshold: int | None = None
    draw_dtype: str | None = None
    cast_dtype: str | None = None
    method: str = "randlora"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.method != "randlora":
            out["method"] = self.method
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
        bases = bases_object({"min_dim": self.min_dim, "max_dim": self.max_dim}, self.bases_sha256, self.stored_bases,
                             self.bases_extra)
        return with_optional({"format": FORMAT_NAME, "format_version": self.format_version,
                              "generator": self.generator.to_json(), "seed": self.generator.seed, "rank": self.rank,
                              "alpha": self.alpha, "bases": bases,
                              "layers": {k: v.to_json() for k, v in self.layers.items()}}, self.base_model, self.extra)

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


def parse_header(text: str) -> AdapterHeader:
    """Parse and validate the JSON header string. Raises :class:`HeaderError` (or its version subclass)."""
    obj = strict_json_loads(text)
    require(isinstance(obj, dict), "header must be a JSON object")
    return header_from_json(obj)


def _alpha(obj: dict[str, Any]) -> float:
    alpha = obj.get("alpha")
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if ok and isinstance(alpha, int):
        ok = abs(alpha) <= sys.float_info.max
    require(ok and math.isfinite(alpha), f"header: 'alpha' must be a finite number, got {alpha!r}")
    return float(alpha)


def header_method(obj: Any) -> str:
    """The method of a decoded header (SPEC §2.1): its generator's ``method``, ``randlora`` when absent. A method
    this reader does not know is a newer one: refused with a :class:`HeaderError` saying so, before anything else
    of the header is read as if it were RandLoRA."""
    gen = obj.get("generator") if isinstance(obj, dict) else None
    method = gen.get("method", "randlora") if isinstance(gen, dict) else "randlora"
    require(isinstance(method, str) and method in METHODS,
             f"generator: method {method!r} is a newer adapter method than this reader knows "
             f"({', '.join(METHODS)}; SPEC §2.1): upgrade randlora-io to read this file")
    return method


def header_from_json(obj: dict[str, Any]) -> AdapterHeader:
    """Validate a decoded RandLoRA header object (SPEC §2, §4, §8) and build an :class:`AdapterHeader` (a VeRA
    header is :func:`randlora_io.format.vera_file.vera_header_from_json`'s)."""
    require(isinstance(obj, dict), "header must be a JSON object")
    require(obj.get("format") == FORMAT_NAME, f"'format' must be {FORMAT_NAME!r}, got {obj.get('format')!r}")
    require(header_method(obj) == "randlora", "a VeRA header (generator method 'vera', SPEC §2.1), not a RandLoRA "
             "one: read it with randlora_io.format.vera_file.read_any_adapter")
    version = parse_version(obj)
    rank = int_field(obj, "rank", "header", minimum=1)
    alpha = _alpha(obj)
    seed = int_field(obj, "seed", "header", minimum=0)
    require(seed < 2**64, f"header: 'seed' must be < 2^64, got {seed}")

    bases = obj.get("bases")
    require(isinstance(bases, dict), "header: 'bases' must be an object with min_dim and max_dim")
    min_dim = int_field(bases, "min_dim", "bases", minimum=1)
    max_dim = int_field(bases, "max_dim", "bases", minimum=1)
    require(min_dim <= max_dim, f"bases: min_dim {min_dim} exceeds max_dim {max_dim}")
    require(rank <= min_dim, f"header: rank {rank} exceeds the bases' min_dim {min_dim}")
    sha, stored = bases_checksum_and_stored(bases)

    generator = parse_generator(obj.get("generator"), seed)

    layers_obj = obj.get("layers")
    require(isinstance(layers_obj, dict) and layers_obj, "header: 'layers' must be a non-empty object")
    layers = {key: _parse_layer(key, entry, rank) for key, entry in layers_obj.items()}
    implied = shared_dims((layer.shape, layer.fan_in_fan_out) for layer in layers.values())
    require((min_dim, max_dim) == implied,
             f"bases: min_dim/max_dim are ({min_dim}, {max_dim}) but the layers imply {implied} (SPEC §2: the "
             "elementwise max of (out, in) over the layers, PEFT's _find_dim); the file is corrupt or hostile")

    base_model = parse_base_model(obj)
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_TOP_KEYS}
    bases_extra = {k: v for k, v in bases.items() if k not in _KNOWN_BASES_KEYS}
    return AdapterHeader(rank=rank, alpha=alpha, generator=generator, min_dim=min_dim, max_dim=max_dim,
                         layers=layers, bases_sha256=sha, stored_bases=stored, base_model=base_model,
                         format_version=version, extra=extra, bases_extra=bases_extra)


def parse_generator(gen: Any, seed: int) -> GeneratorSpec:
    """A validated :class:`GeneratorSpec` from a header's ``generator`` object and ``seed`` (SPEC §4, §2.1)."""
    require(isinstance(gen, dict), "header: 'generator' must be an object with name and kind")
    name, kind, method = gen.get("name"), gen.get("kind"), header_method({"generator": gen})
    require(name in GENERATORS, f"generator: unknown name {name!r} (expected one of {', '.join(GENERATORS)})")
    require(kind in KINDS, f"generator: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    require(method != "vera" or kind == "dense", f"generator: VeRA's bases are dense, got kind {kind!r} (SPEC §2.1)")
    required, optional = generator_parameters(name, kind, method)
    for key in gen:
        require(key in required or key in optional,
                 f"generator: {name} {kind} takes no parameter {key!r} (SPEC §4: unknown generator parameters "
                 "are refused; a newer randlora-io may read this file)")
    for key in required:
        require(key in gen, f"generator: {name} {kind} needs {key!r}")
    if name == "philox":
        threshold = None
        if kind != "dense":
            threshold = int_field(gen, "threshold", "generator", minimum=1)
            require(threshold <= 2**31, f"generator: 'threshold' must be <= 2^31, got {threshold}")
        return GeneratorSpec(name=name, kind=kind, seed=seed, threshold=threshold, method=method)
    draw = gen.get("draw_dtype")
    allowed = PEFT_DENSE_DRAW_DTYPES if kind == "dense" and method == "randlora" else ("float32",)
    require(draw in allowed, f"generator: peft {kind} needs 'draw_dtype' in {allowed} (SPEC §4.3), got {draw!r}")
    cast = gen.get("cast_dtype")
    require("cast_dtype" not in gen or cast in CAST_DTYPES,
             f"generator: 'cast_dtype' must be one of {CAST_DTYPES} when present, got {cast!r}")
    return GeneratorSpec(name=name, kind=kind, seed=seed, draw_dtype=draw, cast_dtype=cast, method=method)


def _parse_layer(key: str, entry: Any, rank: int) -> LayerSpec:
    where = f"layer {key!r}"
    require(isinstance(key, str) and key, "header: layer keys must be non-empty strings")
    require(isinstance(entry, dict), f"{where}: must be an object")
    shape = entry.get("shape")
    require(isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d >= 1 for d in shape),
             f"{where}: 'shape' must be two positive integers, got {shape!r}")
    fan = entry.get("fan_in_fan_out", False)
    require(isinstance(fan, bool), f"{where}: 'fan_in_fan_out' must be a boolean")
    layer_min = min(shape)
    n = int_field(entry, "num_bases", where, minimum=1)
    require(n == num_bases(layer_min, rank),
             f"{where}: num_bases {n} disagrees with ceil({layer_min} / {rank}) = {num_bases(layer_min, rank)}")
    dtype = entry.get("dtype", "float32")
    require(dtype in SCALE_DTYPES, f"{where}: 'dtype' must be one of {SCALE_DTYPES}, got {dtype!r}")
    extra = {k: v for k, v in entry.items() if k not in _KNOWN_LAYER_KEYS}
    return LayerSpec(key=key, shape=(shape[0], shape[1]), fan_in_fan_out=fan, num_bases=n, dtype=dtype, extra=extra)
