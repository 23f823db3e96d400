"""``convert``: move an adapter between formats, losslessly where the math allows, with measured error elsewhere.

Targets: ``randlora`` (our file), ``peft-randlora`` (PEFT dir), ``dense`` (dense-delta file), ``peft-lora`` (PEFT
dir at rank k), ``peft-vera`` (PEFT dir; VeRA sources only). A VeRA source converts to ``randlora`` losslessly (a
method-``vera`` file, SPEC §2.1). Lossy steps (fit to RandLoRA scales, truncated SVD) report per-layer relative Frobenius errors,
measured on the written result against the source ΔW.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..format.adapter import RandloraAdapter, build_adapter, peft_shared_dims, write_adapter
from ..checkpoint.atomic import check_output_path
from ..checkpoint.base_model import BaseModelInfo, base_info_from_checkpoint, layer_orientations
from ..format.basis import generate_bases
from ..sources.budget import check_layer_budget
from ..checkpoint.directory import check_base_copies, open_checkpoint
from .dense import write_dense
from .peft_lora import LoraExport, export_peft_lora
from .serving import check_servable, engine_named
from .peft_randlora import adapter_to_peft_randlora
from .peft_vera import adapter_to_peft_vera
from ..checkpoint.disk import path_bytes
from ..errors import BasisMismatchError, ConversionError, LayerTypeError, OutputExistsError
from .fit import fit_scales
from ..sources.keymap import open_loaded
from ..progress import progress_bar
from ..sources.interface import DeltaSource
from ..sources.dense import DenseSource
from ..sources.randlora_file import RandloraSource, VeraSource
from ..format.vera_file import write_vera_adapter
from ..sources.registry import detect, open_source
from ..format.spec import SPARSE_THRESHOLD, GeneratorSpec, normalisation, num_bases

TARGETS = ("randlora", "peft-randlora", "peft-lora", "dense", "peft-vera")
PEFT_TARGETS = ("peft-randlora", "peft-lora", "peft-vera")  # targets that keep an adapter's modules_to_save / trained biases


@dataclass
class ConvertReport:
    """What a conversion did: layer count, parameters and bytes in/out, per-layer errors (relative Frobenius)
    or kept energies (SVD), and the overall error."""

    layers: int = 0
    params_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: dict[str, float] = field(default_factory=dict)
    kept_energy: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    lora: LoraExport | None = None  # --to peft-lora: per-layer ranks, engine flags

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def summary(self) -> str:
        text = (f"{self.layers} layers, {self.params_out:,} params, {self.bytes_in:,} B in → {self.bytes_out:,} B out, "
                f"max error {self.max_error:.3g}, overall error {self.overall_error:.3g}")
        if self.kept_energy:
            text += f", min kept energy {min(self.kept_energy.values()):.4f}"
        return text


def md_orientation(stored: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Stored ΔW → (M, D): inverse of :func:`randlora_io.format.delta.to_stored_orientation`."""
    out_in = stored.T if fan_in_fan_out else stored
    return out_in if out_in.shape[1] == min(out_in.shape) else out_in.T


def orient_dense(source: DenseSource, base: BaseModelInfo | None, to: str) -> None:
    """Set which of a dense delta's weights are stored (in, out) (GPT-2 ``Conv1D``): a fit and a LoRA export factor
    ΔW as (out, in), so a transposed one would be exported transposed. From the file when it records it (checked
    against the base's config.json when both tell), else from the base; a target other than ``dense`` with neither
    is refused where a weight could be a Conv1D (:func:`layer_orientations`), never guessed."""
    told = None
    if base is not None:
        try:
            told = layer_orientations(source.keys(), base, False, source.path)
        except LayerTypeError:
            told = None
    if told is not None:
        if source.recorded:
            for key, fan in told.items():
                if source.fans.get(key, False) != fan:
                    raise ConversionError(
                        f"{source.path}: records {key!r} as stored {'(out, in)' if fan else '(in, out)'} but the "
                        f"base's config.json makes it a {'Conv1D' if fan else 'Linear'} layer: a delta of another "
                        "model? pass the base it was made from")
        source.fans, source.told = told, True
    elif to != "dense" and not source.recorded:
        layer_orientations(source.keys(), base, False, source.path)  # raises where a Conv1D cannot be ruled out


def fit_adapter(source: DeltaSource, rank: int, seed: int, generator: str = "philox", kind: str = "dense",
                alpha: float | None = None, progress: bool = False) -> tuple[RandloraAdapter, ConvertReport]:
    """Fit RandLoRA scales to every layer of ``source`` (SPEC §3 parametrisation, ``fit.fit_scales``)."""
    keys = source.keys()
    layers = {k: (source.stored_shape(k), source.fan_in_fan_out(k)) for k in keys}
    min_dim, max_dim = peft_shared_dims(layers.values())
    if not 1 <= rank <= min_dim:
        raise ConversionError(f"--rank {rank} must be between 1 and the smallest shared dimension {min_dim}")
    if generator == "philox":
        threshold = None if kind == "dense" else SPARSE_THRESHOLD
        gen = GeneratorSpec(name="philox", kind=kind, seed=seed, threshold=threshold)
    else:
        gen = GeneratorSpec(name="peft", kind=kind, seed=seed, draw_dtype="bfloat16" if kind == "dense" else "float32")
    alpha = float(alpha if alpha is not None else 2 * rank)
    bases = generate_bases(gen, rank, min_dim, max_dim, source=source.path)  # a budget refusal names the file
    scaling = alpha / rank * normalisation(gen)
    lambdas, gammas = {}, {}
    for key in progress_bar(progress, iterable=keys, desc="fit", unit="layer"):
        shape, fan = layers[key]
        n = num_bases(min(shape), rank)
        A, B = bases.for_layer(min(shape), max(shape), n)
        result = fit_scales(md_orientation(source.delta(key), fan), A, B, scaling)
        lambdas[key], gammas[key] = result.lam, result.gam
    adapter = build_adapter(generator=gen, rank=rank, alpha=alpha, layers=layers, lambdas=lambdas, gammas=gammas,
                            min_dim=min_dim, max_dim=max_dim)
    return adapter, measure_errors(source, RandloraSource(adapter))


def measure_errors(reference: DeltaSource, approx: DeltaSource) -> ConvertReport:
    """Per-layer ‖ΔW_approx − ΔW_ref‖ / ‖ΔW_ref‖ and the overall ratio over all layers."""
    report = ConvertReport()
    num = den = 0.0
    for key in reference.keys():
        ref, got = reference.delta(key).double(), approx.delta(key).double()
        diff, norm = float(torch.linalg.norm(got - ref)), float(torch.linalg.norm(ref))
        report.errors[key] = diff / norm if norm > 0 else diff
        num, den = num + diff**2, den + norm**2
    report.overall_error = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    return report


def check_extras_fit(source: DeltaSource, to: str) -> None:
    """Refuse a target that cannot hold what the adapter changes besides ΔW: the tensors PEFT loads over the base
    (modules_to_save, trained biases; only the PEFT formats keep them) and DoRA layers (not additive)."""
    if source.replacements and to not in PEFT_TARGETS:
        key = next(iter(source.replacements))
        raise ConversionError(
            f"{source.path}: carries trained tensors that replace the base's ({key!r}…: PEFT modules_to_save or "
            f"trained biases), which a {to} file cannot hold; merge the adapter, or convert --to peft-lora / "
            "--to peft-randlora, which keep them")
    dora = [k for k in source.keys() if source.dora_magnitude(k) is not None]
    if dora:
        raise ConversionError(
            f"{source.path}: {dora[0]!r} is a DoRA layer (use_dora): its update W' = m·(W + ΔW)/‖W + ΔW‖ depends on "
            f"the base weight and is not a ΔW, so it cannot be converted to {to}; merge it into its base instead")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    rank: int | None = None,
    seed: int = 0,
    generator: str = "philox",
    max_error: float | None = None,
    keep_bases: bool = False,
    save_projection: bool = False,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    peft_draw_dtype: str | None = None,
    shared_projection_only: bool = False,
    on_note: Callable[[str], None] | None = None,
    serve_for: str | None = None,
    svd: str = "auto",
) -> ConvertReport:
    """Convert ``src`` (any supported adapter) to ``dst`` in format ``to``. Nothing is written on error.

    ``base``: the base model dir; PEFT dirs are read as PEFT loads them onto it (layer types and orientation from
    its config.json, the targeted weights' dtype for PEFT's cast of RandLoRA bases). ``peft_draw_dtype``: the dtype
    PEFT drew dense RandLoRA bases in (None: decided from saved bases, else bfloat16 with a note to ``on_note``).
    ``shared_projection_only``: with ``--to peft-randlora`` and saved bases, write only PEFT's shared pair."""
    if to not in TARGETS:
        raise ConversionError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    if max_error is not None and not (0 <= max_error < math.inf):
        raise ConversionError(f"--max-error {max_error} must be a finite relative error ≥ 0 (e.g. 0.05)")
    from ..hub import resolve_adapter_arg

    src = resolve_adapter_arg(src)
    src_p, dst_p = Path(src), Path(dst)
    check_output_path(dst_p, [src_p, base])
    if dst_p.exists() and not overwrite:
        raise OutputExistsError(f"{dst}: output exists; pass --overwrite to replace it")
    base_info = None
    if base is not None:
        ckpt = open_checkpoint(base)
        base_info = base_info_from_checkpoint(ckpt)
    probe = detect(src_p)  # its header read once, whether open_loaded opens it once or twice
    if probe.kind == "finetuned":
        raise ConversionError(f"{src}: a fine-tuned full checkpoint is not an adapter; merge it (as its task vector "
                              "W_ft − W_base: randlora-io merge BASE FT) or extract an adapter from it first")
    source = open_loaded(lambda base_: open_source(probe, keep_bases=keep_bases, base=base_,
                                                   peft_draw_dtype=peft_draw_dtype, on_note=on_note),
                         base_info, base)  # keymap.py: retried under transformers' loaded names
    if base is not None:  # no output format carries PEFT's copies of base weights: they must equal BASE's
        check_base_copies(ckpt, str(src_p), source.base_copies)
    if serve_for is not None:
        if to != "peft-lora":
            raise ConversionError(f"--for {serve_for} needs --to peft-lora (engines serve PEFT LoRA only)")
        check_servable(source, engine_named(serve_for), rank)
    check_extras_fit(source, to)
    check_layer_budget(str(src_p), ((k, source.stored_shape(k)) for k in source.keys()))  # before any ΔW exists

    dense = source.inner if isinstance(getattr(source, "inner", None), DenseSource) else source
    if isinstance(dense, DenseSource):
        orient_dense(dense, base_info, to)
    report = ConvertReport()
    if to == "peft-vera" or (to == "randlora" and isinstance(source, VeraSource)):
        _write_vera(source, dst_p, to, keep_bases, save_projection, overwrite, base_info, on_note)
        report.errors = {k: 0.0 for k in source.keys()}
        report.params_out = source.adapter.trainable_parameters()
    elif to in ("randlora", "peft-randlora"):
        if isinstance(source, RandloraSource):
            adapter = source.adapter
            report.errors = {k: 0.0 for k in source.keys()}
        else:
            if rank is None:
                vera = isinstance(source, VeraSource)
                hint = " (a VeRA adapter converts exactly --to randlora or --to peft-vera)" if vera else ""
                raise ConversionError(f"{src}: fitting a {'VeRA' if vera else source.kind} adapter to RandLoRA needs "
                                      f"--rank{hint}")
            adapter, report = fit_adapter(source, rank, seed, generator, progress=progress)
        if max_error is not None and report.overall_error > max_error:
            raise ConversionError(f"{src}: fit error {report.overall_error:.4g} exceeds --max-error {max_error}; "
                                  "raise --rank or the bound")
        if to == "randlora":
            write_adapter(adapter, dst_p, overwrite=overwrite)
        else:
            adapter_to_peft_randlora(adapter, dst_p, save_projection=save_projection,
                                     shared_projection_only=shared_projection_only, overwrite=overwrite,
                                     extras=source.peft_extras)
        report.params_out = adapter.trainable_parameters()
    elif to == "dense":
        write_dense(source, dst_p, progress=progress, overwrite=overwrite)
        report.errors = {k: 0.0 for k in source.keys()}
        report.params_out = sum(math.prod(source.stored_shape(k)) for k in source.keys())
    else:
        lora = export_peft_lora(source, dst_p, rank=rank, max_error=max_error, svd=svd, overwrite=overwrite,
                                engine=engine_named(serve_for) if serve_for else None, progress=progress)
        report.errors, report.kept_energy, report.lora = lora.errors, lora.kept_energy, lora
        report.overall_error, report.params_out = lora.overall_error, lora.params_out
    report.layers = len(source.keys())
    report.bytes_in = path_bytes(src_p)
    report.bytes_out = path_bytes(dst_p)
    return report


def _write_vera(source: DeltaSource, dst: Path, to: str, keep_bases: bool, save_projection: bool,
                overwrite: bool, base: BaseModelInfo | None = None,
                on_note: Callable[[str], None] | None = None) -> None:
    """A VeRA source, losslessly: our file (seed + vectors; saved projections the seed does not give only with
    ``keep_bases``) or a PEFT VeRA dir (its bases saved where PEFT's regeneration on ``base``'s dtype would differ).
    Anything else has no VeRA form: refused."""
    if not isinstance(source, VeraSource):
        raise ConversionError(f"{source.path}: a {source.kind} adapter is not VeRA and has no exact VeRA form; "
                              "--to peft-vera takes a PEFT VeRA dir or a VeRA randlora file")
    adapter = source.adapter
    if to == "peft-vera":
        dtypes = None
        if base is not None:
            dtypes = {base.dtypes[k] for k in adapter.header.layers if k in base.dtypes} or set(base.dtypes.values())
        adapter_to_peft_vera(adapter, dst, save_projection=save_projection, overwrite=overwrite,
                             extras=source.peft_extras, model_dtypes=dtypes, on_note=on_note)
        return
    if adapter.stored is not None and not keep_bases and source.kind == "peft-vera":
        raise BasisMismatchError(
            f"{source.path}: the saved vera_A / vera_B are not the float32 draw from projection_prng_key="
            f"{adapter.header.seed} (nor its bfloat16 / float16 rounding); pass --keep-bases to store them in the "
            "randlora file")
    write_vera_adapter(adapter, dst, overwrite=overwrite)


__all__ = ["ConvertReport", "ConversionError", "convert", "fit_adapter", "measure_errors"]
