"""``randlora-io inspect`` and ``validate``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..inspect import describe
from .errors import handle_errors


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@handle_errors
def inspect_command(path: Path, as_json: bool) -> None:
    """Show the layers, shapes, r, N, parameters, bytes, generator and seed of an adapter (ours or PEFT's)."""
    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}  [{info['kind']}]")
    for key in ("method", "generator", "kind_of_bases", "seed", "rank", "alpha", "scaling", "format_version",
                "file_bytes", "trainable_params"):
        if info.get(key) is not None:
            click.echo(f"  {key:<17} {info[key]}")
    rows = [("layer", "shape", "r", "N", "params", "bytes")]
    for layer in info["layers"]:
        rows.append((layer["key"], "x".join(map(str, layer["shape"])) if layer["shape"] else "?", str(layer["r"]),
                     str(layer.get("N", "-")), f"{layer['params']:,}", f"{layer['bytes']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


@click.command("validate")
@click.argument("path", type=click.Path(path_type=Path))
@handle_errors
def validate_command(path: Path) -> None:
    """Check an adapter against the spec (schema, shapes, finite scales, bases checksum); exit 0 if valid."""
    from ..inspect import validate

    message = validate(path)
    click.echo(f"{path}: valid ({message})")


COMMANDS = [inspect_command, validate_command]
