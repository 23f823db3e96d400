"""A randlora adapter in memory, and its file (SPEC §2): read, validate, write atomically.

Tensors in the file: ``<weight key>.lambda`` (r, n) and ``<weight key>.gamma`` (n, D) for each layer, plus, only
when the header says ``bases.stored``, ``__bases__.A`` (r, min_dim) and ``__bases__.B`` (max_dim, N_total·r).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .basis import Bases, bases_for_header, check_bases_budget
from .delta import reference_delta
from ..errors import AdapterShapeError, BasisMismatchError, HeaderError, NonFiniteError
from ..checkpoint.lazy_tensors import FileTensors, can_read_lazily, numel, peek
from ..checkpoint.safetensors_io import SafetensorsHeader, load_tensors, read_header, save_safetensors
from .spec import (METADATA_KEY, AdapterHeader, GeneratorSpec, LayerSpec, header_from_json, num_bases, parse_header, shared_dims)

LAMBDA_SUFFIX = ".lambda"
GAMMA_SUFFIX = ".gamma"
STORED_A = "__bases__.A"
STORED_B = "__bases__.B"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    """The spec's name for a torch floating dtype (``torch.float32`` → ``"float32"``)."""
    return _DTYPE_NAMES[dtype]


@dataclass
class RandloraAdapter:
    """Header plus scales: ``lambdas[key]`` (r, n) and ``gammas[key]`` (n, D), keyed by base weight key. Read from a
    file, they are :class:`~randlora_io.lazy_tensors.FileTensors`: dicts whose tensors are read when first indexed
    (in-place edits persist); code that only looks uses ``lazy_tensors.peek`` and holds one layer at a time.

    ``metadata``: the file's other ``__metadata__`` entries, written back unchanged (SPEC §2). ``max_bases_bytes``:
    the bases budget (SPEC §4.6) for this adapter; None means ``$RANDLORA_IO_MAX_BASES_BYTES`` or 4 GiB."""

    header: AdapterHeader
    lambdas: MutableMapping[str, torch.Tensor]
    gammas: MutableMapping[str, torch.Tensor]
    stored: Bases | None = None
    source: str = "<memory>"
    metadata: dict[str, str] = field(default_factory=dict)
    max_bases_bytes: int | None = None
    _bases: dict[str, Bases] = field(default_factory=dict, repr=False)
    _layer_bases: dict[str, Bases] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> dict[str, LayerSpec]:
        return self.header.layers

    def bases(self, device: str | torch.device = "cpu", verify: bool = True) -> Bases:
        """The shared bases (stored ones if present, else regenerated), cached per device.

        When the header has a checksum, the bases are verified against it (SPEC §4.4), so a change in torch's RNG,
        a corrupt file or a buggy writer can never silently yield other bases. Regeneration is refused over the
        bases budget (SPEC §4.6) before anything is allocated.
        """
        key = str(torch.device(device))
        if key not in self._bases:
            cached = self._bases.get("cpu")
            if cached is not None:  # verified already: move, do not regenerate
                self._bases[key] = Bases(A=cached.A.to(device), B=cached.B.to(device))
                return self._bases[key]
            if self.stored is not None:
                bases = self.stored
            else:
                check_bases_budget(self.header.rank, self.header.min_dim, self.header.max_dim, self.max_bases_bytes,
                                   source=self.source)
                bases = bases_for_header(self.header, max_bytes=self.max_bases_bytes)
            if verify and self.header.bases_sha256 is not None:
                self._verify(bases)
            self._bases[key] = Bases(A=bases.A.to(device), B=bases.B.to(device))
        return self._bases[key]

    def layer_bases(self, device: str | torch.device = "cpu") -> Bases:
        """The verified bases cut to the prefix the layers read, ``A[:, :max D]`` and ``B[:max M, :max n·r]``
        (contiguous copies), cached per device; the full bases are then dropped from the cache (``bases()``
        regenerates them if asked again). PEFT sizes its bases from the elementwise max of every targeted shape, so a
        7B model's B is 11008 × 11008 while its layers read 11008 × 4096 of it: 305 MB less held during a merge."""
        key = str(torch.device(device))
        if key not in self._layer_bases:
            full = self.bases(device)
            specs = list(self.layers.values())
            D = max((s.min_dim for s in specs), default=full.A.shape[1])
            M = max((s.max_dim for s in specs), default=full.B.shape[0])
            K = max((s.num_bases * self.header.rank for s in specs), default=full.B.shape[1])
            if (D, M, K) == (full.A.shape[1], full.B.shape[0], full.B.shape[1]):
                self._layer_bases[key] = full
            else:
                self._layer_bases[key] = Bases(A=full.A[:, :D].contiguous(), B=full.B[:M, :K].contiguous())
                self._bases.pop(key, None)
        return self._layer_bases[key]

    def _verify(self, bases: Bases) -> None:
        actual, expected = bases.sha256(), self.header.bases_sha256
        if actual == expected:
            return
        found = f"({actual[:12]}… != {expected[:12]}…)"
        if self.stored is not None:
            why = "the stored bases do not match the header checksum; the file is corrupt"
        elif self.header.generator.name == "philox":
            why = ("the regenerated philox bases do not match the header checksum; philox is exact on every "
                   "machine, so the header or the checksum is corrupt, or the writer does not follow SPEC.md")
        else:
            why = ("the regenerated peft bases do not match the header checksum: this torch build draws different "
                   "random numbers than the writer's (or the file is corrupt); convert the PEFT dir with "
                   "--keep-bases on the machine that made the adapter")
        raise BasisMismatchError(f"{self.source}: {why} {found}")

    def delta(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The reference ΔW of weight ``key`` in its stored shape, float32."""
        layer = self.layers[key]
        bases = self.layer_bases(device)
        return reference_delta(layer, peek(self.lambdas, key).to(device), peek(self.gammas, key).to(device), bases.A,
                               bases.B, self.header.scaling)

    def trainable_parameters(self) -> int:
        return sum(numel(table, key) for table in (self.lambdas, self.gammas) for key in table)


def validate_tensors(adapter: RandloraAdapter) -> None:
    """Check every layer's scales against the header: present, shapes (r, n)/(n, D), dtype, finite."""
    header = adapter.header
    for key, layer in header.layers.items():
        for name, table, expected in (("lambda", adapter.lambdas, (header.rank, layer.num_bases)),
                                      ("gamma", adapter.gammas, (layer.num_bases, layer.min_dim))):
            if key not in table:
                raise AdapterShapeError(f"{adapter.source}: missing tensor '{key}.{name}' for a layer in the header")
            tensor = peek(table, key)  # a lazily read file's tensors are checked one at a time, not kept
            if tuple(tensor.shape) != expected:
                raise AdapterShapeError(
                    f"{adapter.source}: '{key}.{name}' has shape {list(tensor.shape)}, header implies {list(expected)}"
                )
            if tensor.dtype not in _DTYPE_NAMES or dtype_name(tensor.dtype) != layer.dtype:
                raise AdapterShapeError(f"{adapter.source}: '{key}.{name}' is {tensor.dtype}, header says {layer.dtype}")
            if not torch.isfinite(tensor).all():
                raise NonFiniteError(f"{adapter.source}: '{key}.{name}' contains NaN or Inf")
    extra = (set(adapter.lambdas) | set(adapter.gammas)) - set(header.layers)
    if extra:
        raise AdapterShapeError(f"{adapter.source}: scales for '{sorted(extra)[0]}' have no layer in the header")
    if header.stored_bases:
        if adapter.stored is None:
            raise HeaderError(f"{adapter.source}: header says bases are stored but the file has none")
        expected_A = (header.rank, header.min_dim)
        expected_B = (header.max_dim, header.total_bases * header.rank)
        if tuple(adapter.stored.A.shape) != expected_A or tuple(adapter.stored.B.shape) != expected_B:
            raise AdapterShapeError(f"{adapter.source}: stored bases have shapes {list(adapter.stored.A.shape)}, "
                                    f"{list(adapter.stored.B.shape)}; expected {list(expected_A)}, {list(expected_B)}")


def read_adapter(path: str | os.PathLike, *, verify_bases: bool = True, max_bases_bytes: int | None = None,
                 header: SafetensorsHeader | None = None) -> RandloraAdapter:
    """Read and validate a randlora file. Raises a :class:`~randlora_io.errors.RandloraError` naming the file.

    Every check of SPEC §8 happens here, before the adapter is returned: header, tensors, the bases budget (§4.6,
    ``max_bases_bytes`` overrides ``$RANDLORA_IO_MAX_BASES_BYTES``) and, with ``verify_bases`` (the default), the
    checksum of the bases (§4.4; the verified CPU bases are then cached on the adapter). ``header``: the file's
    safetensors header when already read (input detection), so it is not parsed again."""
    path = Path(path)
    st = read_header(path) if header is None else header
    text = st.metadata.get(METADATA_KEY)
    if text is None:
        raise HeaderError(f"{path}: not a randlora file (no '{METADATA_KEY}' entry in the safetensors metadata)")
    try:
        header = parse_header(text)
    except HeaderError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    names = list(st.tensors)
    unknown = [n for n in names if not (n.endswith(LAMBDA_SUFFIX) or n.endswith(GAMMA_SUFFIX) or n in (STORED_A, STORED_B))]
    if unknown:
        raise AdapterShapeError(f"{path}: unexpected tensor {unknown[0]!r} (expected '<key>.lambda' / '<key>.gamma')")
    for name in (STORED_A, STORED_B):
        if name in st.tensors and st.tensors[name].dtype != "F32":
            raise AdapterShapeError(f"{path}: stored basis {name!r} is {st.tensors[name].dtype}; SPEC §4.5 stores "
                                    "the bases as F32 (float32)")
    if not header.stored_bases:
        check_bases_budget(header.rank, header.min_dim, header.max_dim, max_bases_bytes, source=str(path))
    scale_names = [n for n in names if n.endswith(LAMBDA_SUFFIX) or n.endswith(GAMMA_SUFFIX)]
    if can_read_lazily(st, scale_names):  # the scales are read layer by layer when merged, never all at once
        tensors = load_tensors(path, [n for n in names if n in (STORED_A, STORED_B)], header=st)
        lambdas = FileTensors(path, st, {n[: -len(LAMBDA_SUFFIX)]: n for n in names if n.endswith(LAMBDA_SUFFIX)})
        gammas = FileTensors(path, st, {n[: -len(GAMMA_SUFFIX)]: n for n in names if n.endswith(GAMMA_SUFFIX)})
    else:
        tensors = load_tensors(path, header=st)
        lambdas = {n[: -len(LAMBDA_SUFFIX)]: t for n, t in tensors.items() if n.endswith(LAMBDA_SUFFIX)}
        gammas = {n[: -len(GAMMA_SUFFIX)]: t for n, t in tensors.items() if n.endswith(GAMMA_SUFFIX)}
    stored = None
    if STORED_A in tensors or STORED_B in tensors:
        if not header.stored_bases or STORED_A not in tensors or STORED_B not in tensors:
            raise HeaderError(f"{path}: stored bases present but 'bases.stored' is not set (or one is missing)")
        stored = Bases(A=tensors[STORED_A].float(), B=tensors[STORED_B].float())
    metadata = {k: v for k, v in st.metadata.items() if k != METADATA_KEY}
    adapter = RandloraAdapter(header=header, lambdas=lambdas, gammas=gammas, stored=stored, source=str(path),
                              metadata=metadata, max_bases_bytes=max_bases_bytes)
    validate_tensors(adapter)
    if verify_bases and header.bases_sha256 is not None:
        adapter.bases("cpu")
    return adapter


def write_adapter(adapter: RandloraAdapter, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Validate and write ``adapter`` to ``path`` atomically (temp file beside it, then rename); without
    ``overwrite`` an existing file, even one that appeared meanwhile, is never replaced."""
    validate_tensors(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for key in adapter.header.layers:
        tensors[key + LAMBDA_SUFFIX] = peek(adapter.lambdas, key).detach().cpu()
        tensors[key + GAMMA_SUFFIX] = peek(adapter.gammas, key).detach().cpu()
    if adapter.header.stored_bases and adapter.stored is not None:
        tensors[STORED_A] = adapter.stored.A.detach().cpu().float()
        tensors[STORED_B] = adapter.stored.B.detach().cpu().float()
    save_safetensors(tensors, path, metadata={**adapter.metadata, METADATA_KEY: adapter.header.dumps()},
                     overwrite=overwrite)


def build_adapter(
    *,
    generator: GeneratorSpec,
    rank: int,
    alpha: float,
    layers: dict[str, tuple[tuple[int, int], bool]],
    lambdas: dict[str, torch.Tensor],
    gammas: dict[str, torch.Tensor],
    min_dim: int | None = None,
    max_dim: int | None = None,
    base_model: dict | None = None,
    stored: Bases | None = None,
    checksum: bool = True,
) -> RandloraAdapter:
    """Assemble and validate an adapter. ``layers`` maps weight key → (stored shape, fan_in_fan_out).

    ``min_dim``/``max_dim`` default to PEFT's ``_find_dim`` rule (:func:`peft_shared_dims`). With
    ``checksum`` the bases are generated once and their sha256 recorded (SPEC §4.4).
    """
    if not isinstance(rank, int) or rank < 1:
        raise HeaderError(f"rank must be a positive integer, got {rank!r}")
    if min_dim is None or max_dim is None:
        min_dim, max_dim = peft_shared_dims(layers.values())
    specs = {
        key: LayerSpec(key=key, shape=(int(shape[0]), int(shape[1])), fan_in_fan_out=bool(fan),
                       num_bases=num_bases(min(shape), rank), dtype=dtype_name(lambdas[key].dtype))
        for key, (shape, fan) in layers.items()
    }
    header = AdapterHeader(rank=rank, alpha=float(alpha), generator=generator, min_dim=min_dim, max_dim=max_dim,
                           layers=specs, stored_bases=stored is not None, base_model=base_model)
    header = header_from_json(header.to_json())  # one validation path for files and for memory
    adapter = RandloraAdapter(header=header, lambdas=dict(lambdas), gammas=dict(gammas), stored=stored)
    validate_tensors(adapter)
    if checksum:
        header.bases_sha256 = adapter.bases(verify=False).sha256()
    return adapter


def peft_shared_dims(layers) -> tuple[int, int]:
    """PEFT's ``_find_dim``: the elementwise max of (out, in) over all layers, then its (min, max).

    ``layers`` iterates (stored shape, fan_in_fan_out). Note this is not max of the per-layer minima: with
    (96, 64) and (64, 96) layers the shared ``min_dim`` is 96. Zero-size layers raise :class:`AdapterShapeError`
    (:func:`randlora_io.spec.shared_dims`, the rule a header's ``bases`` must follow).
    """
    return shared_dims(layers)
