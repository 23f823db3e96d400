"""``randlora-io convert``."""

from __future__ import annotations

from pathlib import Path

import click

from ..convert import TARGETS, convert
from .errors import handle_errors


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="Output format.")
@click.option("--rank", type=click.IntRange(min=1), help="r for a fit to RandLoRA, or k for --to peft-lora.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Seed of fitted bases.")
@click.option("--generator", type=click.Choice(["philox", "peft"]), default="philox", show_default=True)
@click.option("--max-error", type=click.FloatRange(min=0), help="Fail if the relative error exceeds this.")
@click.option("--keep-bases", is_flag=True, help="Store PEFT's saved bases if they cannot be regenerated.")
@click.option("--save-projection", is_flag=True, help="With --to peft-randlora: save the bases in the PEFT dir.")
@click.option("--base", type=click.Path(path_type=Path), help="Base model dir (needed for PEFT RandLoRA sources).")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
@handle_errors
def convert_command(src, dst, to, rank, seed, generator, max_error, keep_bases, save_projection, base, overwrite):
    """Convert SRC (randlora file, PEFT RandLoRA/LoRA dir, dense delta) to DST in another format."""
    report = convert(src, dst, to, rank=rank, seed=seed, generator=generator, max_error=max_error,
                     keep_bases=keep_bases, save_projection=save_projection, base=base, overwrite=overwrite,
                     progress=True)
    click.echo(f"{dst}: {report.summary()}")


COMMANDS = [convert_command]
