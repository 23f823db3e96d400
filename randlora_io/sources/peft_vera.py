"""Input kind ``peft-vera``: a PEFT VeRA directory → ΔW per layer, as PEFT 0.21.2's ``merge_and_unload`` gives it.

PEFT saves ``base_model.model.<module>.vera_lambda_b`` (out,) and ``.vera_lambda_d`` (r,) per layer and, with
``save_projection=True`` (its default), the shared ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B``
(max_out, r). Without them, PEFT regenerates the bases from ``projection_prng_key`` when it loads the dir
(:func:`randlora_io.format.vera.peft_vera_bases`), rounded to a half base's dtype; saved ones are loaded as they
are (no rounding, tested). The per-layer weight shape and orientation come from the base checkpoint; the update is
:func:`randlora_io.format.vera.vera_delta`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..checkpoint.base_model import BaseModelInfo, half_cast_dtype, layer_orientations
from ..errors import AdapterShapeError, NonFiniteError, SourceFormatError
from ..format.basis import Bases
from ..format.spec import GeneratorSpec, max_out_in
from ..format.vera import VeraLayer, peft_vera_bases, vera_seed
from ..format.vera_file import VeraAdapter, build_vera_adapter
from .interface import OpenOptions, Probe, layer_row
from .peft_dir import PeftDir, local_base_info, read_peft_dir, tensors_by_module, weight_key
from .peft_randlora import as_base_info, base_weight_shape
from .peft_targets import targeted_layers, weight_module
from .randlora_file import VeraSource

PEFT_TYPE = "VERA"
KIND = "peft-vera"
SHARED_A = "base_model.vera_A"
SHARED_B = "base_model.vera_B"
_SUFFIXES = ("vera_lambda_b", "vera_lambda_d")


def peft_vera_vectors(peft: PeftDir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight key: (λ_b (out,), λ_d (r,))}`` as saved in a PEFT VeRA dir (no base needed); any other tensor but
    the shared projections is refused by name."""
    modules = tensors_by_module(peft, (SHARED_A, SHARED_B), _SUFFIXES, "VeRA", "vera_lambda_b / vera_lambda_d")
    out = {}
    for module, parts in modules.items():
        if set(parts) != set(_SUFFIXES):
            raise SourceFormatError(f"{peft.path}: module {module!r} lacks vera_lambda_b or vera_lambda_d")
        out[weight_key(module)] = (parts["vera_lambda_b"], parts["vera_lambda_d"])
    return out


def _config_values(peft: PeftDir) -> tuple[int, int]:
    """(r, seed in [0, 2^64)) of the dir's config."""
    r = peft.config.get("r", 256)  # VeraConfig's default
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise SourceFormatError(f"{peft.path}: adapter_config.json has invalid r {r!r}")
    try:
        seed = vera_seed(peft.config.get("projection_prng_key", 0))
    except ValueError as exc:
        raise SourceFormatError(f"{peft.path}: adapter_config.json: {exc}") from None
    return r, seed


def _saved_projections(peft: PeftDir, r: int, max_out: int, max_in: int) -> Bases | None:
    """The saved ``base_model.vera_A`` / ``vera_B`` as float32 :class:`Bases` (PEFT loads them as they are, over
    the regenerated ones), checked for shape and finiteness; None with ``save_projection`` false (PEFT then ignores
    saved ones and regenerates). Saved ones missing where the config says they are saved: refused, as PEFT does."""
    A, B = peft.tensors.get(SHARED_A), peft.tensors.get(SHARED_B)
    if peft.config.get("save_projection", True) is False:
        return None  # PEFT keeps the projections out of its state dict then: any saved ones are ignored, redrawn
    if A is None and B is None:
        raise SourceFormatError(f"{peft.path}: adapter_config.json says save_projection true but the weights hold no "
                                f"{SHARED_A} / {SHARED_B}; PEFT refuses to load it: set save_projection false to "
                                "regenerate them from projection_prng_key, or re-save the adapter with PEFT")
    if A is None or B is None:
        raise SourceFormatError(f"{peft.path}: saves {SHARED_A if B is None else SHARED_B} but not "
                                f"{SHARED_B if B is None else SHARED_A}; re-save the adapter with PEFT")
    if tuple(A.shape) != (r, max_in) or tuple(B.shape) != (max_out, r):
        raise AdapterShapeError(f"{peft.path}: saved vera_A {list(A.shape)} and vera_B {list(B.shape)}, but r={r} "
                                f"and the targeted layers of the base need [{r}, {max_in}] and [{max_out}, {r}] "
                                "(an adapter for another base, or a hand-edited config?)")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise NonFiniteError(f"{peft.path}: the saved vera_A / vera_B contain NaN or Inf")
    return Bases(A=A.float().contiguous(), B=B.float().contiguous())


def _matches_seed(saved: Bases, seed: int, r: int, max_out: int, max_in: int) -> tuple[bool, str | None]:
    """(whether the float32 draw from ``seed`` equals ``saved`` bit for bit, possibly after the cast to a half
    dtype that a dir saved from a half model holds; that cast, or None)."""
    for cast in (None, "bfloat16", "float16"):
        drawn = peft_vera_bases(seed, r, max_out, max_in, cast)
        if torch.equal(drawn.A, saved.A) and torch.equal(drawn.B, saved.B):
            return True, cast
    return False, None


def peft_vera_to_adapter(src: str | os.PathLike | PeftDir, base: BaseModelInfo | Mapping[str, tuple[int, ...]],
                         on_note: Callable[[str], None] | None = None) -> VeraAdapter:
    """A PEFT VeRA dir as PEFT 0.21.2 loads it onto ``base`` (:class:`BaseModelInfo`, or only its weight shapes).

    Layers are those the config targets (peft_targets); each one's orientation comes from its module type
    (``Conv1D`` → fan_in_fan_out), never from the config's single flag; the bases are sized by every targeted layer
    (``_find_dim``). Saved projections are used as saved: when they are the seed's draw (possibly rounded to a half
    dtype) the adapter records the seed only, else it keeps them (``stored``); regenerated ones are rounded to the
    targeted weights' half dtype as PEFT casts them (``cast_dtype``)."""
    peft = read_peft_dir(src, expected_type=PEFT_TYPE)
    src, config = peft.path, peft.config
    r, seed = _config_values(peft)
    info = as_base_info(base)
    vectors = peft_vera_vectors(peft)
    # VeraConfig (0.21.2) has no exclude_modules field: PEFT drops that key when it loads the config
    targeting = {k: v for k, v in config.items() if k != "exclude_modules"}
    keys, unsaved = targeted_layers(targeting, list(vectors), info, str(src), on_note)
    if unsaved and config.get("init_weights", True) is not True:
        raise SourceFormatError(
            f"{src}: adapter_config.json targets {weight_module(unsaved[0])!r} ({len(unsaved)} layer(s) in all), but "
            "the adapter's weights have none for it and init_weights is false (PEFT would give it random λ_d and "
            "λ_b = 1): config and weights disagree; fix target_modules / layers_to_transform")
    fans = layer_orientations(keys + unsaved, info, bool(config.get("fan_in_fan_out", False)), str(src))
    layers = {k: VeraLayer(base_weight_shape(src, info, k), fans[k]) for k in keys + unsaved}
    for key in keys:
        lam_b, lam_d = vectors[key]
        out_f = layers[key].out_in[0]
        if tuple(lam_b.shape) != (out_f,) or tuple(lam_d.shape) != (r,):
            raise AdapterShapeError(
                f"{src}: {key!r} has vera_lambda_b {list(lam_b.shape)} and vera_lambda_d {list(lam_d.shape)}, but "
                f"r={r} and the base layer's {out_f} outputs need [{out_f}] and [{r}] (config and weights disagree?)")
        if not (torch.isfinite(lam_b).all() and torch.isfinite(lam_d).all()):
            raise NonFiniteError(f"{src}: {key!r} vera_lambda_b / vera_lambda_d contain NaN or Inf")
    # unsaved targets: λ_b = 0 at PEFT's init (a zero ΔW), but they size the shared bases (_find_dim)
    max_out, max_in = max_out_in((layer.shape, layer.fan_in_fan_out) for layer in layers.values())
    cast = half_cast_dtype(keys + unsaved, info, str(src))
    saved = _saved_projections(peft, r, max_out, max_in)
    stored = None
    if saved is not None:
        half = cast
        from_seed, cast = _matches_seed(saved, seed, r, max_out, max_in)
        if from_seed and cast is None and half is not None:
            cast = "float32"  # PEFT uses the saved float32 draw unrounded on this half base: recorded, so a PEFT
            # dir written from the adapter keeps them (regenerated, PEFT would round them to the half dtype)
        if not from_seed:
            stored = saved  # PEFT loads them over its own draw: the adapter keeps them
            if on_note is not None:
                on_note(f"{src}: the saved vera_A / vera_B are not the float32 draw from projection_prng_key="
                        f"{config.get('projection_prng_key', 0)}; used as saved, as PEFT uses them")
    generator = GeneratorSpec(name="peft", kind="dense", seed=seed, draw_dtype="float32", cast_dtype=cast,
                              method="vera")
    vectors = {k: vectors[k] if vectors[k][0].dtype == vectors[k][1].dtype else (vectors[k][0].float(),
                                                                                 vectors[k][1].float())
               for k in keys}  # a file's layer has one dtype for both vectors: mixed ones are widened (exact)
    if unsaved and max_out_in((layers[k].shape, layers[k].fan_in_fan_out) for k in keys) != (max_out, max_in):
        # they size the bases: kept as layers with PEFT's λ_b = 0 (ΔW = 0), so the bases keep PEFT's size
        vectors.update({k: (torch.zeros(layers[k].out_in[0]), torch.zeros(r)) for k in unsaved})
        keys = keys + unsaved
    return build_vera_adapter(generator=generator, rank=r, layers={k: layers[k] for k in keys},
                              lambda_b={k: v[0] for k, v in vectors.items()},
                              lambda_d={k: v[1] for k, v in vectors.items()}, stored=stored, source=str(src))

def matches(probe: Probe) -> bool:
    return probe.path.is_dir() and probe.peft_config.get("peft_type") == PEFT_TYPE


def load(probe: Probe, options: OpenOptions) -> VeraSource:
    """The dir as PEFT loads it onto ``options.base`` (else onto a local ``base_model_name_or_path``)."""
    peft = read_peft_dir(probe.path, config=probe.peft_config)  # read once: vectors, base copies, extras
    base = options.base if options.base is not None else local_base_info(probe.path, peft.config)
    if base is None:
        raise SourceFormatError(f"{probe.path}: a PEFT VeRA dir needs the base model's weight shapes and layer types; "
                                "pass --base MODEL_DIR")
    source = VeraSource(peft_vera_to_adapter(peft, base, options.on_note), kind=KIND)
    source.base_copies, source.replacements, source.peft_extras = peft.base_copies, peft.replacements, peft.extras
    return source


def describe(probe: Probe) -> dict[str, Any]:
    peft = read_peft_dir(probe.path, config=probe.peft_config)
    cfg = peft.config
    saved = [peft.tensors[k] for k in (SHARED_A, SHARED_B) if k in peft.tensors]
    return {"method": "vera", "generator": "peft (torch CPU RNG, float32 draw)",
            "seed": cfg.get("projection_prng_key", 0), "rank": cfg.get("r"),
            "save_projection": cfg.get("save_projection", True),
            "projections": {"saved": bool(saved), "shapes": [list(t.shape) for t in saved]},
            "layers": [layer_row(k, None, lam_d.shape[0], None, [lam_b, lam_d])
                       for k, (lam_b, lam_d) in peft_vera_vectors(peft).items()]}


def validate(probe: Probe) -> str:
    base = local_base_info(probe.path, probe.peft_config)
    if base is not None:
        source = load(probe, OpenOptions(base=base))
        seeded = "the seed's draw" if source.adapter.stored is None else "not the seed's draw (used as saved)"
        return f"PEFT VeRA dir, {len(source.keys())} layers, checked against its local base model; bases: {seeded}"
    peft = read_peft_dir(probe.path, config=probe.peft_config)
    r, _ = _config_values(peft)
    for key, (lam_b, lam_d) in peft_vera_vectors(peft).items():
        if lam_b.ndim != 1 or tuple(lam_d.shape) != (r,):
            raise AdapterShapeError(f"{probe.path}: {key!r} has vera_lambda_b {list(lam_b.shape)} and vera_lambda_d "
                                    f"{list(lam_d.shape)}, which do not fit r={r} (λ_b must be (out,), λ_d (r,)): "
                                    "config and weights disagree (a damaged or hand-edited adapter)")
        if not (torch.isfinite(lam_b).all() and torch.isfinite(lam_d).all()):
            raise NonFiniteError(f"{probe.path}: {key!r} vectors contain NaN or Inf")
    return "PEFT VeRA dir (shapes vs base not checked: base model not available locally)"
