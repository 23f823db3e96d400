"""A VeRA adapter in the randlora file (SPEC §2.1, format 1.2): header, in-memory adapter, read / validate / write.

Tensors in the file: ``<weight key>.lambda_b`` (out,) and ``<weight key>.lambda_d`` (r,) per layer, plus, only when
``bases.stored``, ``__bases__.A`` (r, max_in) and ``__bases__.B`` (max_out, r), F32. The generator object carries
``"method": "vera"``, a parameter every 1.1 reader refuses ("unknown generator parameter … a newer randlora-io may
read this file"), so no 1.1 reader takes a VeRA file for a RandLoRA one. :func:`read_any_adapter` reads either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.safetensors_io import SafetensorsHeader, load_tensors, read_header, save_safetensors
from ..errors import AdapterShapeError, BasisMismatchError, HeaderError, NonFiniteError
from .adapter import STORED_A, STORED_B, RandloraAdapter, dtype_name, read_adapter
from .basis import Bases
from .header_json import (bases_checksum_and_stored, bases_object, int_field, is_int, parse_base_model, parse_version,
                          require, strict_json_loads, with_optional)
from .spec import (FORMAT_NAME, METADATA_KEY, SCALE_DTYPES, VERA_FORMAT_VERSION, GeneratorSpec, header_method,
                   max_out_in, parse_generator)
from .vera import VeraLayer, check_vera_budget, vera_bases, vera_delta

LAMBDA_B = ".lambda_b"
LAMBDA_D = ".lambda_d"
_KNOWN_TOP_KEYS = {"format", "format_version", "generator", "seed", "rank", "alpha", "bases", "layers", "base_model"}
# SPEC §2.1: VeRA has no scaling, so `alpha` holds this text, not a number. A 1.1 reader (which requires a finite
# number there and checks it before the generator) then refuses the file showing it, e.g. randlora-io 1.1's
# "header: 'alpha' must be a finite number, got 'none: a VeRA adapter ...; upgrade randlora-io'"
VERA_ALPHA_MARK = ("none: a VeRA adapter (SPEC 1.2 generator method vera), a newer adapter method than a 1.1 reader "
                   "knows; upgrade randlora-io")
_KNOWN_BASES_KEYS = {"max_out", "max_in", "sha256", "stored"}
_KNOWN_LAYER_KEYS = {"shape", "fan_in_fan_out", "dtype"}


@dataclass
class VeraHeader:
    """A VeRA header (SPEC §2.1): ``generator`` has method ``vera``; (max_out, max_in) size the bases A (r, max_in)
    and B (max_out, r) and equal the layers' elementwise max of (out, in); ``extra`` / ``bases_extra`` keep unknown
    keys for a rewrite (layers keep theirs in :attr:`VeraLayer.extra`)."""

    rank: int
    generator: GeneratorSpec
    max_out: int
    max_in: int
    layers: dict[str, VeraLayer]
    bases_sha256: str | None = None
    stored_bases: bool = False
    base_model: dict[str, Any] | None = None
    format_version: str = VERA_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    bases_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.generator.seed

    def to_json(self) -> dict[str, Any]:
        bases = bases_object({"max_out": self.max_out, "max_in": self.max_in}, self.bases_sha256, self.stored_bases,
                             self.bases_extra)
        return with_optional({"format": FORMAT_NAME, "format_version": self.format_version,
                              "generator": self.generator.to_json(), "seed": self.seed, "rank": self.rank,
                              "alpha": VERA_ALPHA_MARK, "bases": bases,
                              "layers": {k: v.to_json() for k, v in self.layers.items()}},
                             self.base_model, self.extra)


def vera_header_from_json(obj: dict[str, Any]) -> VeraHeader:
    """Validate a decoded VeRA header object (SPEC §2.1) and build a :class:`VeraHeader`; :class:`HeaderError`
    (or its version subclass) on the first defect."""
    require(isinstance(obj, dict), "header must be a JSON object")
    require(obj.get("format") == FORMAT_NAME, f"'format' must be {FORMAT_NAME!r}, got {obj.get('format')!r}")
    require(header_method(obj) == "vera", "not a VeRA header (its generator has no method 'vera')")
    version = parse_version(obj)
    rank = int_field(obj, "rank", "header", minimum=1)
    seed = int_field(obj, "seed", "header", minimum=0)
    require(seed < 2**64, f"header: 'seed' must be < 2^64, got {seed}")
    require(obj.get("alpha", VERA_ALPHA_MARK) == VERA_ALPHA_MARK, "header: a VeRA header has no numeric 'alpha' "
            "(VeRA's update has no scaling; SPEC §2.1: absent, or the text 1.1 readers show when they refuse it)")
    bases = obj.get("bases")
    require(isinstance(bases, dict), "header: 'bases' must be an object with max_out and max_in")
    require(not {"min_dim", "max_dim"} & set(bases), "bases: a VeRA header sizes its bases by max_out / max_in, "
            "not RandLoRA's min_dim / max_dim (SPEC §2.1)")
    max_out, max_in = int_field(bases, "max_out", "bases", 1), int_field(bases, "max_in", "bases", 1)
    sha, stored = bases_checksum_and_stored(bases)
    generator = parse_generator(obj.get("generator"), seed)
    layers_obj = obj.get("layers")
    require(isinstance(layers_obj, dict) and layers_obj, "header: 'layers' must be a non-empty object")
    layers = {key: _parse_layer(key, entry) for key, entry in layers_obj.items()}
    implied = max_out_in((layer.shape, layer.fan_in_fan_out) for layer in layers.values())
    require((max_out, max_in) == implied, f"bases: max_out/max_in are ({max_out}, {max_in}) but the layers imply "
            f"{implied} (SPEC §2.1: the elementwise max of (out, in) over the layers, PEFT's _find_dim); the file is "
            "corrupt or hostile")
    return VeraHeader(rank=rank, generator=generator, max_out=max_out, max_in=max_in, layers=layers,
                      bases_sha256=sha, stored_bases=stored, base_model=parse_base_model(obj),
                      format_version=version, extra={k: v for k, v in obj.items() if k not in _KNOWN_TOP_KEYS},
                      bases_extra={k: v for k, v in bases.items() if k not in _KNOWN_BASES_KEYS})


def _parse_layer(key: str, entry: Any) -> VeraLayer:
    where = f"layer {key!r}"
    require(isinstance(key, str) and key, "header: layer keys must be non-empty strings")
    require(isinstance(entry, dict), f"{where}: must be an object")
    shape = entry.get("shape")
    require(isinstance(shape, list) and len(shape) == 2 and all(is_int(d) and d >= 1 for d in shape),
            f"{where}: 'shape' must be two positive integers, got {shape!r}")
    fan = entry.get("fan_in_fan_out", False)
    require(isinstance(fan, bool), f"{where}: 'fan_in_fan_out' must be a boolean")
    require("num_bases" not in entry, f"{where}: a VeRA layer has no 'num_bases' (SPEC §2.1)")
    dtype = entry.get("dtype", "float32")
    require(dtype in SCALE_DTYPES, f"{where}: 'dtype' must be one of {SCALE_DTYPES}, got {dtype!r}")
    return VeraLayer(shape=(shape[0], shape[1]), fan_in_fan_out=fan, dtype=dtype,
                     extra={k: v for k, v in entry.items() if k not in _KNOWN_LAYER_KEYS})


@dataclass
class VeraAdapter:
    """Header plus vectors, keyed by base weight key: ``lambda_b[key]`` (out,), ``lambda_d[key]`` (r,) in the
    layer's dtype; ``stored``: bases held with the adapter (a file's ``__bases__``, or PEFT's saved projections the
    seed does not give), else they are regenerated. ``metadata``: the file's other ``__metadata__`` entries."""

    header: VeraHeader
    lambda_b: dict[str, torch.Tensor]
    lambda_d: dict[str, torch.Tensor]
    stored: Bases | None = None
    source: str = "<memory>"
    metadata: dict[str, str] = field(default_factory=dict)
    max_bases_bytes: int | None = None
    _bases: dict[str, Bases] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> dict[str, VeraLayer]:
        return self.header.layers

    @property
    def rank(self) -> int:
        return self.header.rank

    def bases(self, device: str | torch.device = "cpu", verify: bool = True) -> Bases:
        """The shared bases, A (r, max_in) and B (max_out, r) float32 (stored, else regenerated within the budget),
        checked against ``bases.sha256`` when present (SPEC §4.4), cached per device."""
        key = str(torch.device(device))
        if key not in self._bases:
            h = self.header
            bases = self.stored or vera_bases(h.generator, h.rank, h.max_out, h.max_in, self.max_bases_bytes,
                                              self.source)
            if verify and h.bases_sha256 is not None and bases.sha256() != h.bases_sha256:
                why = ("the stored bases do not match the header checksum; the file is corrupt" if self.stored else
                       "the regenerated philox bases do not match the header checksum: the file is corrupt or its "
                       "writer does not follow SPEC.md" if h.generator.name == "philox" else
                       "the regenerated peft bases do not match the header checksum: this torch draws other numbers "
                       "than the writer's (or the file is corrupt); convert the PEFT dir with --keep-bases")
                raise BasisMismatchError(f"{self.source}: {why}")
            self._bases[key] = Bases(A=bases.A.to(device), B=bases.B.to(device))
        return self._bases[key]

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """ΔW of ``key`` in the weight's stored orientation, float32 (:func:`~randlora_io.format.vera.vera_delta`)."""
        bases = self.bases(device)
        return vera_delta(self.layers[key], self.lambda_b[key], self.lambda_d[key], bases.A, bases.B, device)

    def trainable_parameters(self) -> int:
        return sum(t.numel() for table in (self.lambda_b, self.lambda_d) for t in table.values())


def validate_vera_tensors(adapter: VeraAdapter) -> None:
    """Every layer's λ_b (out,) and λ_d (r,) present, of the header's dtype, finite; no other vectors; stored bases
    of the header's shapes."""
    h = adapter.header
    for key, layer in h.layers.items():
        for name, table, expected in (("lambda_b", adapter.lambda_b, (layer.out_in[0],)),
                                      ("lambda_d", adapter.lambda_d, (h.rank,))):
            tensor = table.get(key)
            if tensor is None:
                raise AdapterShapeError(f"{adapter.source}: missing tensor '{key}.{name}' for a layer in the header")
            if tuple(tensor.shape) != expected:
                raise AdapterShapeError(f"{adapter.source}: '{key}.{name}' has shape {list(tensor.shape)}, header "
                                        f"implies {list(expected)}")
            if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) \
                    or dtype_name(tensor.dtype) != layer.dtype:
                raise AdapterShapeError(f"{adapter.source}: '{key}.{name}' is {tensor.dtype}, header says {layer.dtype}")
            if not torch.isfinite(tensor).all():
                raise NonFiniteError(f"{adapter.source}: '{key}.{name}' contains NaN or Inf")
    extra = (set(adapter.lambda_b) | set(adapter.lambda_d)) - set(h.layers)
    if extra:
        raise AdapterShapeError(f"{adapter.source}: vectors for '{sorted(extra)[0]}' have no layer in the header")
    if h.stored_bases != (adapter.stored is not None):
        raise HeaderError(f"{adapter.source}: 'bases.stored' is {str(h.stored_bases).lower()} but the file "
                          f"{'has no' if h.stored_bases else 'has'} __bases__.A / __bases__.B (SPEC §4.5)")
    if adapter.stored is not None and (tuple(adapter.stored.A.shape), tuple(adapter.stored.B.shape)) != \
            ((h.rank, h.max_in), (h.max_out, h.rank)):
        raise AdapterShapeError(f"{adapter.source}: stored bases have shapes {list(adapter.stored.A.shape)}, "
                                f"{list(adapter.stored.B.shape)}; expected {[h.rank, h.max_in]}, {[h.max_out, h.rank]}")


def read_vera_adapter(path: str | os.PathLike, *, verify_bases: bool = True, max_bases_bytes: int | None = None,
                      header: SafetensorsHeader | None = None) -> VeraAdapter:
    """Read and validate a VeRA randlora file (every SPEC §8 check, the checksum with ``verify_bases``)."""
    path = Path(path)
    st = read_header(path) if header is None else header
    try:
        h = vera_header_from_json(strict_json_loads(st.metadata.get(METADATA_KEY, "")))
    except HeaderError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    suffixes = (LAMBDA_B, LAMBDA_D)
    unknown = [n for n in st.tensors if not (n.endswith(suffixes) or n in (STORED_A, STORED_B))]
    if unknown:
        raise AdapterShapeError(f"{path}: unexpected tensor {unknown[0]!r} in a VeRA file (expected "
                                "'<key>.lambda_b' / '<key>.lambda_d')")
    for name in (STORED_A, STORED_B):
        if name in st.tensors and st.tensors[name].dtype != "F32":
            raise AdapterShapeError(f"{path}: stored basis {name!r} is {st.tensors[name].dtype}; SPEC §4.5 stores "
                                    "the bases as F32 (float32)")
    if not h.stored_bases:
        check_vera_budget(h.rank, h.max_out, h.max_in, max_bases_bytes, source=str(path))
    tensors = load_tensors(path, header=st)
    stored = None
    if STORED_A in tensors or STORED_B in tensors:
        if STORED_A not in tensors or STORED_B not in tensors:
            raise HeaderError(f"{path}: only one of __bases__.A / __bases__.B is stored (SPEC §4.5)")
        stored = Bases(A=tensors[STORED_A].float(), B=tensors[STORED_B].float())
    adapter = VeraAdapter(header=h, source=str(path), stored=stored, max_bases_bytes=max_bases_bytes,
                          lambda_b={n[: -len(LAMBDA_B)]: t for n, t in tensors.items() if n.endswith(LAMBDA_B)},
                          lambda_d={n[: -len(LAMBDA_D)]: t for n, t in tensors.items() if n.endswith(LAMBDA_D)},
                          metadata={k: v for k, v in st.metadata.items() if k != METADATA_KEY})
    validate_vera_tensors(adapter)
    if verify_bases and h.bases_sha256 is not None:
        adapter.bases("cpu")
    return adapter


def write_vera_adapter(adapter: VeraAdapter, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Validate and write ``adapter`` atomically (temp file beside ``path``, then rename)."""
    validate_vera_tensors(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for key in adapter.layers:
        tensors[key + LAMBDA_B] = adapter.lambda_b[key].detach().cpu()
        tensors[key + LAMBDA_D] = adapter.lambda_d[key].detach().cpu()
    if adapter.stored is not None:
        tensors[STORED_A], tensors[STORED_B] = adapter.stored.A.detach().cpu(), adapter.stored.B.detach().cpu()
    text = json.dumps(adapter.header.to_json(), separators=(",", ":"))
    save_safetensors(tensors, path, metadata={**adapter.metadata, METADATA_KEY: text}, overwrite=overwrite)


def build_vera_adapter(*, generator: GeneratorSpec, rank: int, layers: dict[str, VeraLayer],
                       lambda_b: dict[str, torch.Tensor], lambda_d: dict[str, torch.Tensor],
                       stored: Bases | None = None, base_model: dict | None = None, source: str = "<memory>",
                       checksum: bool = True) -> VeraAdapter:
    """Assemble and validate a VeRA adapter (``generator.method`` must be ``vera``); each layer's dtype is its
    vectors'; (max_out, max_in) from the layers; with ``checksum`` the bases' sha256 is recorded (SPEC §4.4)."""
    layers = {k: VeraLayer(shape=tuple(int(d) for d in v.shape), fan_in_fan_out=bool(v.fan_in_fan_out),
                           dtype=dtype_name(lambda_b[k].dtype), extra=v.extra) for k, v in layers.items()}
    max_out, max_in = max_out_in((v.shape, v.fan_in_fan_out) for v in layers.values())
    header = VeraHeader(rank=rank, generator=generator, max_out=max_out, max_in=max_in, layers=layers,
                        stored_bases=stored is not None, base_model=base_model)
    header = vera_header_from_json(header.to_json())  # one validation path for files and for memory
    adapter = VeraAdapter(header=header, lambda_b=dict(lambda_b), lambda_d=dict(lambda_d), stored=stored,
                          source=source)
    validate_vera_tensors(adapter)
    if checksum:
        header.bases_sha256 = adapter.bases(verify=False).sha256()
    return adapter


def read_any_adapter(path: str | os.PathLike, *, verify_bases: bool = True, max_bases_bytes: int | None = None,
                     header: SafetensorsHeader | None = None) -> RandloraAdapter | VeraAdapter:
    """A randlora file of either method (SPEC §2.1): :func:`read_vera_adapter` for ``vera``, else
    :func:`~randlora_io.format.adapter.read_adapter`. An unknown (newer) method is refused by name."""
    st = read_header(path) if header is None else header
    text = st.metadata.get(METADATA_KEY)
    method = "randlora"
    if text is not None:
        try:
            method = header_method(strict_json_loads(text))
        except HeaderError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    read = read_vera_adapter if method == "vera" else read_adapter
    return read(path, verify_bases=verify_bases, max_bases_bytes=max_bases_bytes, header=st)
