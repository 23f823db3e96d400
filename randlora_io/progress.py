"""One progress-bar helper for every long operation: tqdm on stderr, shown only on a terminal."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar when ``enabled`` and stderr is a TTY (``disable=None`` lets tqdm decide); otherwise silent."""
    return tqdm(disable=None if enabled else True, **kwargs)
