"""Entry point: the click group, global ``--debug``, and the one-line error contract.

Errors: one line on stderr naming the file and what is wrong, exit 1 (2 for usage), no traceback unless --debug.
"""

from __future__ import annotations

import sys
import warnings

import click

from .errors import _STATE, fail, install_signal_handlers

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
    """Console-script entry point. click's usage errors (several lines: usage, hint, error) become the one-line
    contract too: ``randlora-io: error: <what> (see 'randlora-io CMD --help')``, exit 2."""
    install_signal_handlers()
    try:
        code = cli.main(prog_name="randlora-io", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "randlora-io"
        fail(f"{exc.format_message()} (see '{where} --help')", exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("aborted; nothing was written", 1)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
