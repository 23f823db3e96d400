"""PEFT RandLoRA directory ⇄ randlora file (lossless).

PEFT saves ``base_model.model.<module>.randlora_lambda`` (r, n) and ``.randlora_gamma`` (n, D) per layer, and with
``save_projection=True`` the shared ``base_model.randlora_A`` (r, 1, min_dim) / ``base_model.randlora_B``
(max_dim, N, r) plus an unsliced copy of each per layer. The per-layer weight shape (hence M and orientation)
is not in the PEFT dir: it comes from the base checkpoint's headers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from ..format.adapter import RandloraAdapter, build_adapter, peft_shared_dims
from ..checkpoint.base_model import BaseModelInfo, half_cast_dtype, layer_orientations
from ..format.basis import Bases, peft_bases_raw, peft_bases_to_spec, spec_bases_to_peft
from ..checkpoint.directory import absent_weight_hint
from ..errors import AdapterShapeError, BaseModelMismatchError, BasisMismatchError, NonFiniteError, SourceFormatError
from ..checkpoint.lazy_tensors import peek
from ..format.spec import GeneratorSpec, num_bases, normalisation
from .peft_dir import PEFT_PREFIX, PeftDir, PeftExtras, module_of, read_peft_dir, weight_key, write_peft_dir
from .peft_targets import targeted_layers, weight_module

PEFT_TYPE = "RANDLORA"
SHARED_A = "base_model.randlora_A"
SHARED_B = "base_model.randlora_B"
_SUFFIXES = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
PEFT_DENSE_DRAW_DTYPES = ("bfloat16", "float16")  # PEFT's dense draw: accelerate.is_bf16_available() true / false


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


def _candidate_generators(kind: str, seed: int, draw_dtype: str | None):
    """Generators to try against saved projections: the dtype PEFT drew dense bases in is machine-dependent
    (SPEC §4.3), and the saved buffers may have been cast to the base dtype before saving."""
    draws = ["float32"] if kind != "dense" else [draw_dtype] if draw_dtype else list(PEFT_DENSE_DRAW_DTYPES)
    for draw in draws:
        for cast in (None, "bfloat16", "float16"):
            yield GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype=draw, cast_dtype=cast)


def _base_info(base: BaseModelInfo | Mapping[str, tuple[int, ...]]) -> BaseModelInfo:
    return base if isinstance(base, BaseModelInfo) else BaseModelInfo(shapes=dict(base))


def _base_shape(src, base: BaseModelInfo, key: str) -> tuple[int, int]:
    if key not in base.shapes:
        raise BaseModelMismatchError(f"{src}: adapter targets {key!r}, which the base checkpoint does not "
                                     f"have{absent_weight_hint(key)}")
    shape = tuple(base.shapes[key])
    if len(shape) != 2:
        raise BaseModelMismatchError(f"{src}: base weight {key!r} has shape {list(shape)}, not a 2-D matrix")
    return (int(shape[0]), int(shape[1]))


def peft_randlora_to_adapter(
    src: str | os.PathLike | PeftDir,
    base: BaseModelInfo | Mapping[str, tuple[int, ...]],
    *,
    keep_bases: bool = False,
    cast_dtype: str | None = None,
    base_model: dict | None = None,
    draw_dtype: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> RandloraAdapter:
    """Convert a PEFT RandLoRA dir to an in-memory randlora adapter, losslessly, as PEFT 0.21.2 loads it.

    ``base``: the base model (:class:`BaseModelInfo`: shapes, dtypes, config.json), or only its weight shapes.
    Layers are those the config targets (peft_targets); each layer's orientation comes from its module type
    (base_model.layer_orientations), never from the config's single ``fan_in_fan_out``; the shared bases are sized
    from every targeted layer (PEFT's ``_find_dim``) and rounded to the targeted weights' half dtype as PEFT casts
    them (``cast_dtype`` overrides when the base dtypes are unknown). Saved projections, if any, must equal the
    regenerated bases bit-for-bit (else :class:`BasisMismatchError`, or they are stored with ``keep_bases``).
    ``draw_dtype``: the dtype PEFT drew dense bases in (``bfloat16`` or ``float16``); None decides it from saved
    projections, else assumes ``bfloat16`` and says so through ``on_note``.
    """
    peft = read_peft_dir(src, expected_type=PEFT_TYPE)
    src, config = peft.path, peft.config
    r, alpha, seed = config.get("r"), config.get("randlora_alpha"), config.get("projection_prng_key", 0)
    if not isinstance(r, int) or r <= 0:
        raise SourceFormatError(f"{src}: adapter_config.json has invalid r {r!r}")
    if not isinstance(alpha, (int, float)) or not isinstance(seed, int) or seed < 0:
        raise SourceFormatError(f"{src}: adapter_config.json has invalid randlora_alpha or projection_prng_key")
    if draw_dtype not in (None, *PEFT_DENSE_DRAW_DTYPES):
        raise SourceFormatError(f"PEFT draw dtype must be one of {', '.join(PEFT_DENSE_DRAW_DTYPES)}, got {draw_dtype!r}")
    info = _base_info(base)
    scales = peft_scale_tensors(peft)
    # RandLoraConfig (0.21.2) has no exclude_modules field: PEFT drops that key when it loads the config
    targeting_config = {k: v for k, v in config.items() if k != "exclude_modules"}
    keys, unsaved = targeted_layers(targeting_config, list(scales), info, str(src), on_note)
    fans = layer_orientations(keys + unsaved, info, bool(config.get("fan_in_fan_out", False)), str(src))

    layers: dict[str, tuple[tuple[int, int], bool]] = {}
    for key in keys:
        lam, gam = scales[key]
        shape = _base_shape(src, info, key)
        n = num_bases(min(shape), r)
        if tuple(lam.shape) != (r, n) or tuple(gam.shape) != (n, min(shape)):
            raise AdapterShapeError(
                f"{src}: {key!r} has λ {list(lam.shape)} and γ {list(gam.shape)}, but r={r} and base shape "
                f"{list(shape)} need λ [{r}, {n}] and γ [{n}, {min(shape)}] (config and weights disagree?)"
            )
        for name, t in (("randlora_lambda", lam), ("randlora_gamma", gam)):
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"{src}: {key!r} {name} contains NaN or Inf")
        layers[key] = (shape, fans[key])

    min_dim, max_dim = peft_shared_dims(layers.values())
    _check_unsaved(src, config, unsaved, info, fans, list(layers.values()))
    kind = peft_kind(config)
    cast = half_cast_dtype(keys + unsaved, info, str(src)) if info.dtypes else cast_dtype
    saved = _saved_projections(peft)
    stored: Bases | None = None
    if saved is not None:
        generator, stored = _match_saved_projections(src, saved[0], saved[1], kind, seed, r, min_dim, max_dim,
                                                     keep_bases, draw_dtype)
    else:
        draw = "float32" if kind != "dense" else draw_dtype or PEFT_DENSE_DRAW_DTYPES[0]
        if kind == "dense" and draw_dtype is None and on_note is not None:
            on_note(f"{src}: PEFT's dense bases are not saved in this dir (save_projection=False); assumed drawn in "
                    "bfloat16, as PEFT does on CPUs, Ampere+ GPUs and TPUs; if the adapter was made on a V100, T4 or "
                    "older Apple GPU (no bf16), pass --peft-draw-dtype float16")
        generator = GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype=draw, cast_dtype=cast)
    lambdas = {k: scales[k][0].float() for k in keys}
    gammas = {k: scales[k][1].float() for k in keys}
    return build_adapter(generator=generator, rank=r, alpha=float(alpha), layers=layers, lambdas=lambdas,
                         gammas=gammas, min_dim=min_dim, max_dim=max_dim, base_model=base_model, stored=stored)


def _check_unsaved(src, config: dict, unsaved: list[str], info: BaseModelInfo, fans: dict[str, bool],
                   loaded: list[tuple[tuple[int, int], bool]]) -> None:
    """Targeted base layers without saved scales: PEFT adapts them from its init (λ = 0 with ``init_weights``, a
    zero ΔW) and sizes the shared bases with them too. Exact only when they change neither; else refuse."""
    if not unsaved:
        return
    grown = peft_shared_dims(loaded + [(_base_shape(src, info, k), fans[k]) for k in unsaved])
    if config.get("init_weights", True) is not True or grown != peft_shared_dims(loaded):
        raise SourceFormatError(
            f"{src}: adapter_config.json targets {weight_module(unsaved[0])!r} ({len(unsaved)} layer(s) in all), "
            "but the adapter's weights have none for it: config and weights disagree (PEFT would adapt it from a "
            "fresh init and size its shared bases with it); fix target_modules / layers_to_transform")


def _saved_projections(peft: PeftDir) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT's saved bases as PEFT 0.21.2 loads them: the shared ``base_model.randlora_A/B`` when present (PEFT loads
    them after the per-layer copies into the same buffer, so they win), else the per-layer copies, which must agree.
    PEFT after 0.21.2 saves only the shared pair; 0.21.2 saves both."""
    found = []
    for name, shared in (("randlora_A", SHARED_A), ("randlora_B", SHARED_B)):
        tensor = peft.tensors.get(shared)
        if tensor is None:
            copies = [t for k, t in peft.tensors.items() if k.endswith("." + name) and k != shared]
            if any(c.shape != copies[0].shape or not torch.equal(c, copies[0]) for c in copies[1:]):
                raise BasisMismatchError(f"{peft.path}: the per-layer copies of {name} differ; PEFT loads them into "
                                         "one buffer, so the result would depend on the load order")
            tensor = copies[0] if copies else None
        found.append(tensor)
    A, B = found
    if A is None and B is None:
        return None
    if A is None or B is None:
        raise SourceFormatError(f"{peft.path}: saves randlora_{'B' if A is None else 'A'} but not "
                                f"randlora_{'A' if A is None else 'B'}; re-save the adapter with PEFT")
    return A, B


def _match_saved_projections(src, A_saved, B_saved, kind, seed, r, min_dim, max_dim, keep_bases, draw_dtype=None):
    expected = ((r, 1, min_dim), (max_dim, num_bases(min_dim, r), r))
    if (tuple(A_saved.shape), tuple(B_saved.shape)) != expected:
        raise AdapterShapeError(f"{src}: saved projections have shapes {list(A_saved.shape)}, {list(B_saved.shape)}; "
                                f"the base implies {list(expected[0])}, {list(expected[1])}")
    saved_spec = peft_bases_to_spec(A_saved, B_saved)
    for gen in _candidate_generators(kind, seed, draw_dtype):
        A, B = peft_bases_raw(gen, r, min_dim, max_dim)
        if torch.equal(A.float(), A_saved.float()) and torch.equal(B.float(), B_saved.float()):
            return gen, None
    if not keep_bases:
        drawn = f" drawn in {draw_dtype}" if draw_dtype and kind == "dense" else ""
        raise BasisMismatchError(
            f"{src}: the saved projections differ from the bases regenerated from projection_prng_key={seed}{drawn}; "
            "pass --keep-bases to store them in the randlora file"
        )
    gen = GeneratorSpec(name="peft", kind=kind, seed=seed,
                        draw_dtype=(draw_dtype or "bfloat16") if kind == "dense" else "float32")
    return gen, saved_spec


def adapter_to_peft_randlora(
    adapter: RandloraAdapter,
    dst: str | os.PathLike,
    *,
    save_projection: bool = False,
    shared_projection_only: bool = False,
    overwrite: bool = False,
    extras: PeftExtras | None = None,
) -> None:
    """Write ``adapter`` as a PEFT RandLoRA dir that ``PeftModel.from_pretrained`` loads (with a source PEFT dir's
    ``extras``: trained head / biases).

    PEFT can regenerate only ``peft``-generator bases; for a philox adapter the bases are always saved
    (``save_projection=True``) and the philox normalisation is folded into ``randlora_alpha``. Saved bases are
    written as PEFT 0.21.2 does (``base_model.randlora_A/B`` plus a copy per layer) or, with
    ``shared_projection_only``, as later PEFT versions do (the shared pair only; PEFT 0.21.2 loads both layouts).
    ``fan_in_fan_out`` in the config is the last layer's, as PEFT saves it: PEFT sets it per layer type on load.
    """
    header = adapter.header
    # PEFT regenerates only `peft` bases, and dense ones only in the dtype of the loading machine (bf16 nearly always)
    must_save = (header.generator.name != "peft" or header.stored_bases
                 or (header.generator.kind == "dense" and header.generator.draw_dtype == "float16"))
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
        "fan_in_fan_out": list(header.layers.values())[-1].fan_in_fan_out,
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
        tensors[f"{PEFT_PREFIX}{module}.randlora_lambda"] = peek(adapter.lambdas, key).float()
        tensors[f"{PEFT_PREFIX}{module}.randlora_gamma"] = peek(adapter.gammas, key).float()
    if save_projection:
        A, B = spec_bases_to_peft(adapter.bases(), header.rank)
        tensors[SHARED_A], tensors[SHARED_B] = A, B
        for module in modules if not shared_projection_only else ():
            # PEFT stores an unsliced copy per layer; safetensors refuses shared storage, hence the clones.
            tensors[f"{PEFT_PREFIX}{module}.randlora_A"] = A.clone()
            tensors[f"{PEFT_PREFIX}{module}.randlora_B"] = B.clone()
    write_peft_dir(dst, config, tensors, overwrite=overwrite, extras=extras)


def is_peft_randlora_dir(path: str | os.PathLike) -> bool:
    from .peft_dir import is_peft_dir, read_peft_config

    return is_peft_dir(path) and read_peft_config(path).get("peft_type") == PEFT_TYPE


