"""``randlora-io merge`` and ``unmerge``."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import SourceFormatError
from ..merge.compose import METHODS
from ..merge.plan import OUT_DTYPES, PRECISIONS, merge
from .convert_cmd import draw_dtype_arg, peft_draw_dtype_option, print_notes
from .errors import handle_errors


def _options(func):
    for option in reversed([
        click.argument("paths", nargs=-1, metavar="BASE ADAPTERS..."),
        click.option("-o", "--out", type=click.Path(path_type=Path), help="Output model directory."),
        click.option("--weight", "weights", type=float, multiple=True, help="One per adapter, in order (default 1.0)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(list(OUT_DTYPES)), default=None,
                     help="Output dtype (default: keep BASE's)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing OUT."),
        click.option("--kernel", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
                     help="RandLoRA merge path: the Triton kernel (CUDA) or torch addmm (CPU)."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
                     help="ΔW arithmetic: auto (the fastest float32-class path: a grouped sparse product for very "
                          "sparse bases, exact int8 limbs for ternary bases on CPUs with AMX or AVX-512 VNNI, else "
                          "fp32), fp32 (the "
                          "float32 GEMM the others are tested against), int8 (ternary bases, CPU), or bf16 (opt-in: "
                          "a bf16 GEMM, ΔW rounded to bf16 as PEFT does)."),
        click.option("--ignore-base-fingerprint", is_flag=True,
                     help="Merge even when the adapter records a base fingerprint that BASE does not match."),
        peft_draw_dtype_option,
    ]):
        func = option(func)
    return func


def _compose_options(func):
    for option in reversed([
        click.option("--method", type=click.Choice(list(METHODS)), default=None,
                     help="Compose the adapters' task vectors as mergekit 0.1.5 does (default: task_arithmetic, "
                          "Σ wᵢ·ΔWᵢ)."),
        click.option("--density", "densities", type=float, multiple=True,
                     help="Fraction of each task vector kept, in (0, 1]: once for all, or once per adapter."),
        click.option("--lambda", "lambda_", type=float, default=None, help="Scale of the composed delta (default 1)."),
        click.option("--normalize/--no-normalize", default=None,
                     help="Divide by the sum of the kept weights (default per method: on for ties only)."),
        click.option("--seed", type=click.IntRange(0, 2 ** 64 - 1), default=None,
                     help="DARE's random masks (default 0): the same bytes on any machine and process count."),
        click.option("--config", "config", type=click.Path(path_type=Path), default=None,
                     help="A mergekit-style YAML (merge_method, base_model, models, parameters, dtype) instead of "
                          "BASE, ADAPTERS and the method options."),
        click.option("--to-delta", "to_delta", type=click.Path(path_type=Path), default=None,
                     help="Write the composed update as a dense-delta file instead of a merged model."),
    ]):
        func = option(func)
    return func


def _inputs(paths, out, weights, dtype, config, to_delta, compose):
    """BASE, the adapters, their weights, the output dtype and the method options, from the arguments or from
    ``--config`` (which then replaces BASE, ADAPTERS, --weight, --dtype and the method options)."""
    if config is None and len(paths) < 2:
        raise SourceFormatError("give BASE and at least one ADAPTER (or --config merge.yml); see 'randlora-io merge "
                                "--help'")
    if (out is None) == (to_delta is None):
        raise SourceFormatError("give exactly one output: -o OUT (a merged model) or --to-delta FILE (the update)")
    if config is not None:
        from ..merge.config import read_merge_config

        flags = {"method": "--method", "densities": "--density", "lambda_": "--lambda", "normalize": "--normalize"}
        given = [name for name, value in (("BASE/ADAPTERS", paths), ("--weight", weights), ("--dtype", dtype),
                                          *((flags[k], v) for k, v in compose.items() if k in flags))
                 if value not in (None, (), [])]
        if given:
            raise SourceFormatError(f"--config {config} gives the merge; drop {', '.join(given)} (or the --config)")
        cfg = read_merge_config(config)
        options = {"method": cfg.method, "density": list(cfg.densities) if cfg.densities else None,
                   "lambda_": cfg.lambda_, "normalize": cfg.normalize, "rescale": cfg.rescale,
                   "seed": compose.get("seed")}
        return cfg.base, list(cfg.inputs), list(cfg.weights), cfg.dtype or "keep", options
    density = compose.pop("densities")
    compose["density"] = None if not density else density[0] if len(density) == 1 else list(density)
    return paths[0], list(paths[1:]), list(weights) or None, dtype or "keep", compose


def _run(paths, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
         peft_draw_dtype, subtract, config=None, to_delta=None, **compose):
    notes: list[str] = []
    base, adapters, weights, dtype, options = _inputs(paths, out, weights, dtype, config, to_delta, compose)
    common = dict(weights=weights, device=device, overwrite=overwrite, kernel=kernel, precision=precision,
                  check_base_fingerprint=not ignore_base_fingerprint, peft_draw_dtype=draw_dtype_arg(peft_draw_dtype),
                  on_note=notes.append, **options)
    if to_delta is not None:
        if subtract:
            raise SourceFormatError("--to-delta writes the float32 update of a merge: it cannot unmerge (--subtract)")
        if dtype != "keep":
            where = f"the dtype: {dtype} in {config}" if config is not None else "--dtype"
            raise SourceFormatError(f"--to-delta writes the float32 update: drop {where}")
        from ..convert.composed import merge_to_delta
        from ..merge.composition import summary_lines

        composition, stats = merge_to_delta(base, adapters, to_delta, progress=True, **common)
        click.echo(f"{to_delta}: the {composition.method} update of {len(adapters)} adapter(s), "
                   f"{stats.elements} elements")
        for line in summary_lines(stats, composition, adapters):
            click.echo(line)
        print_notes(notes)
        return
    report = merge(base, adapters, out, dtype=dtype, subtract=subtract, progress=True, **common)
    if report.rank != 0:
        return  # under torchrun, rank 0 reports for every process
    verb = "unmerged" if subtract else "merged"
    shared = f", {report.processes} processes" if report.processes > 1 else ""
    click.echo(f"{out}: {verb} {len(adapters)} adapter(s) into {report.layers} weights across {report.shards} "
               f"shard(s){shared}")
    if report.composition is not None:
        from ..merge.composition import summary_lines

        for line in summary_lines(report.compose_stats, report.composition, adapters):
            click.echo(line)
    if report.unchanged:
        click.echo(f"warning: {len(report.unchanged)} targeted weight(s) did not change (e.g. {report.unchanged[0]}): "
                   "the update is below the weight dtype's precision or zero", err=True)
    print_notes(notes)


@click.command("merge")
@_options
@_compose_options
@click.option("--subtract", is_flag=True, help="Subtract the adapters instead (unmerge).")
@handle_errors
def merge_command(paths, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
                  peft_draw_dtype, subtract, **compose):
    """Merge ADAPTERs into BASE: randlora files, PEFT RandLoRA/LoRA/DoRA dirs, dense deltas, hub:REPO[@rev], or
    fine-tuned checkpoints of BASE's architecture (their task vectors W_ft − W_base). --method composes them by
    TIES, DARE or breadcrumbs as mergekit does; --config reads a mergekit-style YAML."""
    _run(paths, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
         peft_draw_dtype, subtract, **compose)


@click.command("unmerge")
@_options
@handle_errors
def unmerge_command(paths, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
                    peft_draw_dtype):
    """Subtract ADAPTERs from BASE (the inverse of merge)."""
    _run(paths, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
         peft_draw_dtype, True, densities=())


COMMANDS = [merge_command, unmerge_command]
