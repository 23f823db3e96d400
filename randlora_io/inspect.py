"""Describe and validate any supported adapter (``randlora-io inspect`` / ``validate``): the path is detected once
(sources/registry.py) and its kind module says what it holds and checks it."""

from __future__ import annotations

import os
from typing import Any

from .checkpoint.disk import path_bytes
from .sources.registry import detect, kind_of


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary: kind, generator, seed, rank, and per layer shape, r, N, params, bytes."""
    probe = detect(path)
    info: dict[str, Any] = {"path": str(probe.path), "kind": probe.kind, "file_bytes": path_bytes(probe.path)}
    info.update(kind_of(probe).describe(probe))
    info["trainable_params"] = sum(layer["params"] for layer in info["layers"])
    return info


def validate(path: str | os.PathLike) -> str:
    """Full validation; returns a short description of what was checked, raises on the first defect."""
    probe = detect(path)
    return kind_of(probe).validate(probe)
