"""Input kind ``peft-randlora``: a PEFT RandLoRA directory → an in-memory randlora adapter (lossless).

PEFT saves ``base_model.model.<module>.randlora_lambda`` (r, n) and ``.randlora_gamma`` (n, D) per layer, and with
``save_projection=True`` the shared ``base_model.randlora_A`` (r, 1, min_dim) / ``base_model.randlora_B``
(max_dim, N, r) plus an unsliced copy of each per layer. The per-layer weight shape (hence M and orientation)
is not in the PEFT dir: it comes from the base checkpoint's headers. The other direction (adapter → PEFT dir):
:mod:`randlora_io.convert.peft_randlora`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..format.adapter import RandloraAdapter, build_adapter, peft_shared_dims
from ..checkpoint.base_model import BaseModelInfo, half_cast_dtype, layer_orientations
from ..format.basis import Bases, peft_bases_raw, peft_bases_to_spec
from ..checkpoint.directory import absent_weight_hint
from ..errors import AdapterShapeError, BaseModelMismatchError, BasisMismatchError, NonFiniteError, SourceFormatError
from ..format.spec import GeneratorSpec, num_bases
from .interface import OpenOptions, Probe, layer_row
from .peft_dir import local_base_info, PeftDir, read_peft_dir, tensors_by_module, weight_key
from .peft_targets import targeted_layers, weight_module
from .randlora_file import RandloraSource

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
    return tensors_by_module(peft, (SHARED_A, SHARED_B), _SUFFIXES, "RandLoRA", "randlora_lambda / randlora_gamma")


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


def as_base_info(base: BaseModelInfo | Mapping[str, tuple[int, ...]]) -> BaseModelInfo:
    return base if isinstance(base, BaseModelInfo) else BaseModelInfo(shapes=dict(base))


def base_weight_shape(src, base: BaseModelInfo, key: str) -> tuple[int, int]:
    if key not in base.shapes:
        raise BaseModelMismatchError(f"{src}: adapter targets {key!r}, which the base checkpoint does not "
                                     f"have{absent_weight_hint(key, base.shapes)}")
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
    info = as_base_info(base)
    scales = peft_scale_tensors(peft)
    # RandLoraConfig (0.21.2) has no exclude_modules field: PEFT drops that key when it loads the config
    targeting_config = {k: v for k, v in config.items() if k != "exclude_modules"}
    keys, unsaved = targeted_layers(targeting_config, list(scales), info, str(src), on_note)
    fans = layer_orientations(keys + unsaved, info, bool(config.get("fan_in_fan_out", False)), str(src))

    layers: dict[str, tuple[tuple[int, int], bool]] = {}
    for key in keys:
        lam, gam = scales[key]
        shape = base_weight_shape(src, info, key)
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
    grown = peft_shared_dims(loaded + [(base_weight_shape(src, info, k), fans[k]) for k in unsaved])
    if config.get("init_weights", True) is not True or grown != peft_shared_dims(loaded):
        raise SourceFormatError(
            f"{src}: adapter_config.json targets {weight_module(unsaved[0])!r} ({len(unsaved)} layer(s) in all), "
            "but the adapter's weights have none for it: config and weights disagree (PEFT would adapt it from a "
            "fresh init and size its shared bases with it); fix target_modules / layers_to_transform")


def _saved_projections(peft: PeftDir) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT's saved bases as PEFT 0.21.2 loads them: the shared ``base_model.randlora_A/B`` when present (PEFT loads
    them after the per-layer copies into the same buffer, so they win), else the per-layer copies, which must agree.
    PEFT after 0.21.2 saves only the shared pair; 0.21.2 saves both. None with ``save_projection`` false: PEFT's
    buffers are then not persistent, so it ignores saved bases and regenerates them."""
    if peft.config.get("save_projection", True) is False:
        return None
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


KIND = "peft-randlora"


def matches(probe: Probe) -> bool:
    return probe.path.is_dir() and probe.peft_config.get("peft_type") == PEFT_TYPE


def load(probe: Probe, options: OpenOptions) -> RandloraSource:
    """The dir as PEFT loads it onto ``options.base`` (else onto a local ``base_model_name_or_path``): the layers'
    shapes, types and dtype decide the bases' size, each layer's orientation and PEFT's cast of the bases."""
    peft = read_peft_dir(probe.path, config=probe.peft_config)  # read once: the scales, the base copies, the extras
    base = options.base if options.base is not None else local_base_info(probe.path, peft.config)
    if base is None:
        raise SourceFormatError(
            f"{probe.path}: converting a PEFT RandLoRA dir needs the base model's weight shapes; pass --base MODEL_DIR")
    adapter = peft_randlora_to_adapter(peft, base, keep_bases=options.keep_bases, draw_dtype=options.peft_draw_dtype,
                                       on_note=options.on_note)
    adapter.source = str(probe.path)
    source = RandloraSource(adapter, kind=KIND)
    source.base_copies, source.replacements, source.peft_extras = peft.base_copies, peft.replacements, peft.extras
    return source


def describe(probe: Probe) -> dict[str, Any]:
    peft = read_peft_dir(probe.path, config=probe.peft_config)
    cfg = peft.config
    return {"generator": "peft (torch CPU RNG)", "kind_of_bases": peft_kind(cfg), "seed": cfg.get("projection_prng_key"),
            "rank": cfg.get("r"), "alpha": cfg.get("randlora_alpha"), "save_projection": cfg.get("save_projection"),
            "layers": [layer_row(k, None, lam.shape[0], lam.shape[1], [lam, gam])
                       for k, (lam, gam) in peft_scale_tensors(peft).items()]}


def validate(probe: Probe) -> str:
    base = local_base_info(probe.path, probe.peft_config)
    if base is not None:
        load(probe, OpenOptions(base=base))  # the local base's shapes, dtypes and layer types (config.json)
        return "PEFT RandLoRA dir, checked against its local base model"
    peft = read_peft_dir(probe.path, config=probe.peft_config)
    r = peft.config.get("r")
    for key, (lam, gam) in peft_scale_tensors(peft).items():
        if lam.ndim != 2 or gam.ndim != 2 or lam.shape[0] != r or lam.shape[1] != gam.shape[0]:
            raise AdapterShapeError(f"{probe.path}: {key!r} has λ {list(lam.shape)} and γ {list(gam.shape)}, which "
                                    f"do not fit r={r} (λ must be (r, N), γ (N, min_dim)): config and weights "
                                    "disagree (a damaged or hand-edited adapter)")
        if not (torch.isfinite(lam).all() and torch.isfinite(gam).all()):
            raise NonFiniteError(f"{probe.path}: {key!r} scales contain NaN or Inf")
    return "PEFT RandLoRA dir (shapes vs base not checked: base model not available locally)"
