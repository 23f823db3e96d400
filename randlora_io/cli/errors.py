"""The one-line error contract of the CLI: one line on stderr naming the file and what is wrong, exit 1
(2 for usage, from click), no traceback unless ``--debug``."""

from __future__ import annotations

import functools
import signal

import click

from ..merge.distributed import is_quiet_rank
from ..errors import RandloraError

_STATE = {"debug": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, SLURM, Kubernetes) raised in the main thread like Ctrl-C, so every ``finally`` that
    removes temp output runs; the CLI then exits 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def install_signal_handlers() -> None:
    """Make SIGTERM unwind like SIGINT (only possible from the main thread; elsewhere the default stays)."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        pass


def fail(message: str, code: int = 1) -> None:
    """Print ``randlora-io: error: <message>`` as one line on stderr and exit with ``code`` (under torchrun only
    rank 0 prints: it reports the first failing process's message)."""
    one_line = " ".join(str(message).split())
    if not is_quiet_rank():
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
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            fail(f"{'terminated' if terminated else 'interrupted'}; nothing was written", 143 if terminated else 130)
        except Exception as exc:  # noqa: BLE001 - the contract: never a traceback without --debug
            if _STATE["debug"]:
                raise
            fail(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug and report it")

    return wrapper
