"""The one-line error contract of the CLI: one line on stderr naming the file and what is wrong, exit 1
(2 for usage, from click), no traceback unless ``--debug``."""

from __future__ import annotations

import functools

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
