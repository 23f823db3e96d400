"""``randlora-io convert``."""

from __future__ import annotations

from pathlib import Path

import click

from ..convert.run import TARGETS, convert
from .errors import handle_errors


def peft_draw_dtype_option(func):
    """``--peft-draw-dtype``, shared by convert and merge."""
    return click.option(
        "--peft-draw-dtype", type=click.Choice(["auto", "bfloat16", "float16"]), default="auto", show_default=True,
        help="The dtype PEFT drew dense RandLoRA bases in: bfloat16 on CPUs, Ampere+ GPUs and TPUs, float16 on "
             "V100, T4 and older Apple GPUs. auto: read it from saved bases, else assume bfloat16 and say so.")(func)


def draw_dtype_arg(value: str) -> str | None:
    return None if value == "auto" else value


def print_notes(notes: list[str]) -> None:
    """Notes from a successful run (assumptions made), one line each on stderr."""
    for note in dict.fromkeys(notes):
        click.echo(f"randlora-io: note: {' '.join(note.split())}", err=True)


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="Output format.")
@click.option("--rank", type=click.IntRange(min=1), help="r for a fit to RandLoRA, or k for --to peft-lora.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Seed of fitted bases.")
@click.option("--generator", type=click.Choice(["philox", "peft"]), default="philox", show_default=True)
@click.option("--max-error", type=click.FloatRange(min=0),
              help="Fail if the relative error exceeds this; with --to peft-lora and no --rank, each layer gets the "
                   "smallest rank whose relative Frobenius error is at most this.")
@click.option("--for", "serve_for", type=click.Choice(["vllm", "sglang"]),
              help="With --to peft-lora: one rank that engine accepts (--max-lora-rank), only config fields it "
                   "reads; refuses what it cannot serve.")
@click.option("--svd", type=click.Choice(["auto", "full", "randomized"]), default="auto", show_default=True,
              help="With --max-error: full float64 SVD per layer, or randomised SVD (error still measured exactly).")
@click.option("--keep-bases", is_flag=True, help="Store PEFT's saved bases if they cannot be regenerated.")
@click.option("--save-projection", is_flag=True, help="With --to peft-randlora / peft-vera: save the bases in the PEFT dir.")
@click.option("--shared-projection-only", is_flag=True,
              help="With saved bases in a PEFT dir: write only base_model.randlora_A/B, without PEFT 0.21.2's copy "
                   "per layer (the layout of later PEFT versions; PEFT 0.21.2 loads it too).")
@click.option("--base", type=click.Path(path_type=Path),
              help="Base model dir (needed for PEFT RandLoRA sources; tells each layer's type and dtype).")
@peft_draw_dtype_option
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
@handle_errors
def convert_command(src, dst, to, rank, seed, generator, max_error, serve_for, svd, keep_bases, save_projection,
                    shared_projection_only, base, peft_draw_dtype, overwrite):
    """Convert SRC (randlora file, PEFT RandLoRA/LoRA/VeRA dir, dense delta) to DST in another format."""
    notes: list[str] = []
    report = convert(src, dst, to, rank=rank, seed=seed, generator=generator, max_error=max_error,
                     keep_bases=keep_bases, save_projection=save_projection, base=base, overwrite=overwrite,
                     progress=True, peft_draw_dtype=draw_dtype_arg(peft_draw_dtype),
                     shared_projection_only=shared_projection_only, on_note=notes.append, serve_for=serve_for,
                     svd=svd)
    click.echo(f"{dst}: {report.summary()}")
    if report.lora is not None:
        for line in report.lora.table():
            click.echo(line)
        if report.lora.flags:
            click.echo(f"{report.lora.engine} flags: {report.lora.flags[0]}")
            click.echo(f"  e.g. {report.lora.flags[1]}")
    print_notes(notes)


COMMANDS = [convert_command]
