"""Hub push/pull (issue 8). Only adapter-argument resolution exists so far."""

from __future__ import annotations

from .errors import HubError


def resolve_adapter_arg(arg: str) -> str:
    """A local path stays as is; ``hub:REPO_ID[@revision]`` is not supported yet."""
    if arg.startswith("hub:"):
        raise HubError(f"{arg}: Hub sources are not implemented yet; download the adapter and pass its path")
    return arg
