"""PEFT RandLoRA directory ⇄ randlora file (lossless).

PEFT saves ``base_model.model.<module>.randlora_lambda`` (r, n) and ``.randlora_gamma`` (n, D) per layer, and with
``save_projection=True`` the shared ``base_model.randlora_A`` (r, 1, min_dim) / ``base_model.randlora_B``
(max_dim, N, r) plus an unsliced copy of each per layer. The per-layer weight shape (hence M and orientation)
is not in the PEFT dir: it comes from the base checkpoint's headers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
import torch

from ..adapter import RandloraAdapter, build_adapter, peft_shared_dims
from ..basis import Bases, peft_bases_raw, peft_bases_to_spec, spec_bases_to_peft
from ..checkpoint import absent_weight_hint
from ..errors import AdapterShapeError, BaseModelMismatchError, BasisMismatchError, NonFiniteError, SourceFormatError
from ..spec import GeneratorSpec, num_bases, normalisation
from .peft_dir import PEFT_PREFIX, PeftDir, module_of, read_peft_dir, weight_key, write_peft_dir

PEFT_TYPE = "RANDLORA"
SHARED_A = "base_model.randlora_A"
SHARED_B = "base_model.randlora_B"
_SUFFIXES = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")


def peft_kind(config: dict) -> str:
    """PEFT's basis kind from its config flags (very_sparse wins over sparse, as in ``_pre_injection_hook``)."""
    if config.get("very_sparse"):
        return "very_sparse"
    return "sparse" if config.get("sparse") else "dense"


def _scales_by_module(peft: PeftDir) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft.tensors.items():
        if key in (SHARED_A, SHARED_B):
            continue
        suffix = key.rsplit(".", 1)[-1]
        if suffix not in _SUFFIXES or not key.startswith(PEFT_PREFIX):
            raise SourceFormatError(f"{peft.path}: unexpected tensor {key!r} in a RandLoRA adapter")
        modules.setdefault(module_of(key, suffix), {})[suffix] = tensor
    if not modules:
        raise SourceFormatError(f"{peft.path}: the adapter holds no randlora_lambda / randlora_gamma tensors")
    return modules


def peft_scale_tensors(peft: PeftDir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight key: (λ (r, n), γ (n, D))}`` from a PEFT RandLoRA dir, without needing the base."""
    out = {}
    for module, parts in _scales_by_module(peft).items():
        if "randlora_lambda" not in parts or "randlora_gamma" not in parts:
            raise SourceFormatError(f"{peft.path}: module {module!r} lacks randlora_lambda or randlora_gamma")
        out[weight_key(module)] = (parts["randlora_lambda"], parts["randlora_gamma"])
    return out


def _candidate_generators(kind: str, seed: int, saved_dtype: torch.dtype | None, cast_dtype: str | None):
    """Generators to try against saved projections (dtype PEFT drew in is machine-dependent, SPEC §4.3)."""
    if kind != "dense":
        draws = ["float32"]
    else:
        draws = ["bfloat16", "float16"]
    casts: list[str | None] = [cast_dtype] if saved_dtype is None else [None, "bfloat16", "float16"]
    for draw in draws:
        for cast in casts:
            yield GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype=draw, cast_dtype=cast)


def peft_randlora_to_adapter(
    src: str | os.PathLike | PeftDir,
    base_shapes: Mapping[str, tuple[int, ...]],
    *,
    keep_bases: bool = False,
    cast_dtype: str | None = None,
    base_model: dict | None = None,
) -> RandloraAdapter:
    """Convert a PEFT RandLoRA dir to an in-memory randlora adapter, losslessly.

    ``base_shapes`` maps base weight keys to their stored shapes. Saved projections, if any, must equal the
    regenerated bases bit-for-bit (else :class:`BasisMismatchError`, or they are stored with ``keep_bases``).
    ``cast_dtype`` records the dtype PEFT cast the bases to (the base model's dtype) when none are saved.
    """
    peft = read_peft_dir(src, expected_type=PEFT_TYPE)
    src, config = peft.path, peft.config
    r, alpha, seed = config.get("r"), config.get("randlora_alpha"), config.get("projection_prng_key", 0)
    if not isinstance(r, int) or r <= 0:
        raise SourceFormatError(f"{src}: adapter_config.json has invalid r {r!r}")
    if not isinstance(alpha, (int, float)) or not isinstance(seed, int) or seed < 0:
        raise SourceFormatError(f"{src}: adapter_config.json has invalid randlora_alpha or projection_prng_key")
    fan = bool(config.get("fan_in_fan_out", False))
    scales = peft_scale_tensors(peft)

    layers: dict[str, tuple[tuple[int, int], bool]] = {}
    for key, (lam, gam) in scales.items():
        if key not in base_shapes:
            raise BaseModelMismatchError(f"{src}: adapter targets {key!r}, which the base checkpoint does not "
                                         f"have{absent_weight_hint(key)}")
        shape = tuple(base_shapes[key])
        if len(shape) != 2:
            raise BaseModelMismatchError(f"{src}: base weight {key!r} has shape {list(shape)}, not a 2-D matrix")
        n = num_bases(min(shape), r)
        if tuple(lam.shape) != (r, n) or tuple(gam.shape) != (n, min(shape)):
            raise AdapterShapeError(
                f"{src}: {key!r} has λ {list(lam.shape)} and γ {list(gam.shape)}, but r={r} and base shape "
                f"{list(shape)} need λ [{r}, {n}] and γ [{n}, {min(shape)}] (config and weights disagree?)"
            )
        for name, t in (("randlora_lambda", lam), ("randlora_gamma", gam)):
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"{src}: {key!r} {name} contains NaN or Inf")
        layers[key] = ((shape[0], shape[1]), fan)

    min_dim, max_dim = peft_shared_dims(layers.values())
    kind = peft_kind(config)
    saved = (peft.tensors.get(SHARED_A), peft.tensors.get(SHARED_B))
    stored: Bases | None = None
    generator = GeneratorSpec(name="peft", kind=kind, seed=seed,
                              draw_dtype="bfloat16" if kind == "dense" else "float32", cast_dtype=cast_dtype)
    if saved[0] is not None and saved[1] is not None:
        generator, stored = _match_saved_projections(src, saved[0], saved[1], kind, seed, r, min_dim, max_dim,
                                                     keep_bases)
    lambdas = {k: lam.float() for k, (lam, _) in scales.items()}
    gammas = {k: gam.float() for k, (_, gam) in scales.items()}
    return build_adapter(generator=generator, rank=r, alpha=float(alpha), layers=layers, lambdas=lambdas,
                         gammas=gammas, min_dim=min_dim, max_dim=max_dim, base_model=base_model, stored=stored)


def _match_saved_projections(src, A_saved, B_saved, kind, seed, r, min_dim, max_dim, keep_bases):
    expected = ((r, 1, min_dim), (max_dim, num_bases(min_dim, r), r))
    if (tuple(A_saved.shape), tuple(B_saved.shape)) != expected:
        raise AdapterShapeError(f"{src}: saved projections have shapes {list(A_saved.shape)}, {list(B_saved.shape)}; "
                                f"the base implies {list(expected[0])}, {list(expected[1])}")
    saved_spec = peft_bases_to_spec(A_saved, B_saved)
    for gen in _candidate_generators(kind, seed, A_saved.dtype, None):
        A, B = peft_bases_raw(gen, r, min_dim, max_dim)
        if torch.equal(A.float(), A_saved.float()) and torch.equal(B.float(), B_saved.float()):
            return gen, None
    if not keep_bases:
        raise BasisMismatchError(
            f"{src}: the saved projections differ from the bases regenerated from projection_prng_key={seed}; "
            "pass --keep-bases to store them in the randlora file"
        )
    gen = GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype="bfloat16" if kind == "dense" else "float32")
    return gen, saved_spec


def adapter_to_peft_randlora(
    adapter: RandloraAdapter,
    dst: str | os.PathLike,
    *,
    save_projection: bool = False,
    overwrite: bool = False,
) -> None:
    """Write ``adapter`` as a PEFT RandLoRA dir that ``PeftModel.from_pretrained`` loads.

    PEFT can regenerate only ``peft``-generator bases; for a philox adapter the bases are always saved
    (``save_projection=True``) and the philox normalisation is folded into ``randlora_alpha``.
    """
    header = adapter.header
    fans = {layer.fan_in_fan_out for layer in header.layers.values()}
    if len(fans) != 1:
        raise SourceFormatError(f"{adapter.source}: PEFT needs one fan_in_fan_out for all layers; this adapter mixes them")
    must_save = header.generator.name != "peft" or header.stored_bases
    save_projection = save_projection or must_save
    modules = {key.removesuffix(".weight"): key for key in header.layers}
    if any(not k.endswith(".weight") for k in header.layers):
        raise SourceFormatError(f"{adapter.source}: layer keys must end in '.weight' to map onto PEFT modules")
    alpha = header.alpha * normalisation(header.generator)
    base = header.base_model or {}
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "r": header.rank,
        "randlora_alpha": alpha,
        "randlora_dropout": 0.0,
        "projection_prng_key": header.seed if header.generator.name == "peft" else 0,
        "save_projection": save_projection,
        "sparse": header.generator.kind == "sparse",
        "very_sparse": header.generator.kind == "very_sparse",
        "fan_in_fan_out": fans.pop(),
        "target_modules": sorted(modules),
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base.get("id"),
        "revision": base.get("revision"),
    }
    tensors: dict[str, torch.Tensor] = {}
    for module, key in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.randlora_lambda"] = adapter.lambdas[key].float()
        tensors[f"{PEFT_PREFIX}{module}.randlora_gamma"] = adapter.gammas[key].float()
    if save_projection:
        A, B = spec_bases_to_peft(adapter.bases(), header.rank)
        tensors[SHARED_A], tensors[SHARED_B] = A, B
        for module in modules:
            # PEFT stores an unsliced copy per layer; safetensors refuses shared storage, hence the clones.
            tensors[f"{PEFT_PREFIX}{module}.randlora_A"] = A.clone()
            tensors[f"{PEFT_PREFIX}{module}.randlora_B"] = B.clone()
    write_peft_dir(dst, config, tensors, overwrite=overwrite)


def is_peft_randlora_dir(path: str | os.PathLike) -> bool:
    from .peft_dir import is_peft_dir, read_peft_config

    return is_peft_dir(path) and read_peft_config(path).get("peft_type") == PEFT_TYPE


