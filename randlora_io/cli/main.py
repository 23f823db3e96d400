"""Entry point: the click group, global ``--debug``, and the one-line error contract.

Errors: one line on stderr naming the file and what is wrong, exit 1 (2 for usage), no traceback unless --debug.
"""

from __future__ import annotations

import sys
import warnings

import click

from .errors import _STATE, install_signal_handlers

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="randlora-io")
def cli(debug: bool) -> None:
    """Read, write, convert, merge, train and share RandLoRA adapters."""
    _STATE["debug"] = debug
    if not debug:  # library warnings (torch, transformers) would be extra stderr lines around our one-line contract
        warnings.simplefilter("ignore")


def _register() -> None:
    from . import convert_cmd, hub_cmd, inspect_cmd, merge_cmd, train_cmd

    for module in (inspect_cmd, convert_cmd, merge_cmd, train_cmd, hub_cmd):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    cli.main(prog_name="randlora-io")


if __name__ == "__main__":
    sys.exit(main())
