"""``randlora-io merge`` and ``unmerge``."""

from __future__ import annotations

from pathlib import Path

import click

from ..merge.plan import OUT_DTYPES, PRECISIONS, merge
from .convert_cmd import draw_dtype_arg, peft_draw_dtype_option, print_notes
from .errors import handle_errors


def _options(func):
    for option in reversed([
        click.argument("base", type=click.Path(path_type=Path)),
        click.argument("adapters", nargs=-1, required=True),
        click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output model directory."),
        click.option("--weight", "weights", type=float, multiple=True, help="One per adapter, in order (default 1.0)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(list(OUT_DTYPES)), default="keep", show_default=True),
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


def _run(base, adapters, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
         peft_draw_dtype, subtract):
    notes: list[str] = []
    report = merge(base, list(adapters), out, weights=list(weights) or None, device=device, dtype=dtype,
                   overwrite=overwrite, subtract=subtract, progress=True, kernel=kernel, precision=precision,
                   check_base_fingerprint=not ignore_base_fingerprint, peft_draw_dtype=draw_dtype_arg(peft_draw_dtype),
                   on_note=notes.append)
    if report.rank != 0:
        return  # under torchrun, rank 0 reports for every process
    verb = "unmerged" if subtract else "merged"
    shared = f", {report.processes} processes" if report.processes > 1 else ""
    click.echo(f"{out}: {verb} {len(adapters)} adapter(s) into {report.layers} weights across {report.shards} "
               f"shard(s){shared}")
    if report.unchanged:
        click.echo(f"warning: {len(report.unchanged)} targeted weight(s) did not change (e.g. {report.unchanged[0]}): "
                   "the update is below the weight dtype's precision or zero", err=True)
    print_notes(notes)


@click.command("merge")
@_options
@click.option("--subtract", is_flag=True, help="Subtract the adapters instead (unmerge).")
@handle_errors
def merge_command(base, adapters, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
                  peft_draw_dtype, subtract):
    """Merge ADAPTERs (randlora files, PEFT RandLoRA/LoRA dirs, dense deltas, hub:REPO[@rev]) into BASE."""
    _run(base, adapters, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
         peft_draw_dtype, subtract)


@click.command("unmerge")
@_options
@handle_errors
def unmerge_command(base, adapters, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
                    peft_draw_dtype):
    """Subtract ADAPTERs from BASE (the inverse of merge)."""
    _run(base, adapters, out, weights, device, dtype, overwrite, kernel, precision, ignore_base_fingerprint,
         peft_draw_dtype, True)


COMMANDS = [merge_command, unmerge_command]
