"""Entry point: the click group, global ``--debug``, and the one-line error contract.

Errors: one line on stderr naming the file and what is wrong, exit 1 (2 for usage), no traceback unless --debug.
"""

from __future__ import annotations

import functools
import sys

import click

from ..errors import RandloraError

_STATE = {"debug": False}


def fail(message: str, code: int = 1) -> None:
    """Print ``randlora-io: error: <message>`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())
    click.echo(f"randlora-io: error: {one_line}", err=True)
    raise SystemExit(code)


def handle_errors(func):
    """Turn library and OS errors into :func:`fail`; unexpected ones too, unless ``--debug``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except (RandloraError, OSError, ValueError) as exc:
            if _STATE["debug"]:
                raise
            fail(str(exc) or type(exc).__name__)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except Exception as exc:  # noqa: BLE001 - the contract: never a traceback without --debug
            if _STATE["debug"]:
                raise
            fail(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug and report it")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="randlora-io")
def cli(debug: bool) -> None:
    """Read, write, convert, merge, train and share RandLoRA adapters."""
    _STATE["debug"] = debug


def _register() -> None:
    from . import convert_cmd, hub_cmd, inspect_cmd, merge_cmd, train_cmd

    for module in (inspect_cmd, convert_cmd, merge_cmd, train_cmd, hub_cmd):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="randlora-io")


if __name__ == "__main__":
    sys.exit(main())
