"""Resumable checkpoints of ``randlora-io train``: ``<dir>/step-<N>/`` holds the adapter file (λ, γ, header) and
``state.pt`` (optimizer, LR schedule, step, data order, RNG), written atomically; resuming restores all of it, so a
resumed run continues exactly as the uninterrupted one would have."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_directory
from ..errors import SourceFormatError
from .handle import AttachHandle

ADAPTER_FILE = "adapter.randlora.safetensors"
STATE_FILE = "state.pt"


@dataclass
class DataOrder:
    """Where the loop is in its shuffled pass over the examples: a permutation, a cursor into it, and the generator
    that draws the next permutation."""

    generator: torch.Generator
    perm: torch.Tensor
    cursor: int = 0

    @classmethod
    def start(cls, n: int, seed: int) -> DataOrder:
        generator = torch.Generator().manual_seed(seed)
        return cls(generator, torch.randperm(n, generator=generator))

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The indices of the next ``batch_size`` examples (a new permutation when this one runs out)."""
        n = len(self.perm)
        if batch_size > n:
            return self.perm.repeat(-(-batch_size // n))[:batch_size]
        if self.cursor + batch_size > n:
            self.perm, self.cursor = torch.randperm(n, generator=self.generator), 0
        index = self.perm[self.cursor: self.cursor + batch_size]
        self.cursor += batch_size
        return index


def save_checkpoint(directory: Path, step: int, handle: AttachHandle, optimizer, scheduler, order: DataOrder,
                    scaler=None) -> Path:
    """Write ``directory/step-<step>`` atomically; returns its path."""
    dst = directory / f"step-{step}"
    with atomic_directory(dst, overwrite=True) as tmp:
        handle.save(tmp / ADAPTER_FILE)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "order": {"generator": order.generator.get_state(), "perm": order.perm, "cursor": order.cursor},
                    "torch_rng": torch.get_rng_state(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / STATE_FILE)
    return dst


def load_checkpoint(path: str | os.PathLike, handle: AttachHandle, optimizer, scheduler, n_examples: int,
                    scaler=None) -> tuple[int, DataOrder]:
    """Restore a checkpoint written by :func:`save_checkpoint` into the attached ``handle`` and the optimizer and
    scheduler built for it; returns (step, data order)."""
    path = Path(path)
    if not (path / ADAPTER_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise SourceFormatError(f"{path}: not a training checkpoint (expected {ADAPTER_FILE} and {STATE_FILE}, as "
                                "--save-every writes them)")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
        raise SourceFormatError(f"{path / STATE_FILE}: cannot be read ({type(exc).__name__}: {exc})") from None
    if len(state["order"]["perm"]) != n_examples:
        raise SourceFormatError(f"{path}: was written for {len(state['order']['perm'])} training examples, the data "
                                f"now gives {n_examples}; resume with the same data, --seq-len and --eval-split")
    handle.load_scales(path / ADAPTER_FILE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    generator = torch.Generator()
    generator.set_state(state["order"]["generator"])
    return int(state["step"]), DataOrder(generator, state["order"]["perm"], int(state["order"]["cursor"]))
