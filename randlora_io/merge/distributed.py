"""The processes a command runs as under ``torchrun`` (one when not launched by it), and the few collective steps a
shared merge needs: agree that every process succeeded, hand rank 0's temp dir to the others, share out the shards.

Collectives go through a gloo group (CPU objects), whatever device the merge computes on. The group is created
from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) when it does
not exist yet, and destroyed by :meth:`Processes.close` only if this module created it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import RandloraError

T = TypeVar("T")


class PeerFailedError(RuntimeError, RandloraError):
    """Another process of the same ``torchrun`` job failed; its own message was reported by rank 0."""


def is_quiet_rank() -> bool:
    """True in a torchrun process other than rank 0: its outcome is reported by rank 0, once."""
    return int(os.environ.get("RANK", "0") or 0) > 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


@dataclass
class Processes:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _owns_group: bool = False

    @classmethod
    def from_env(cls) -> Processes:
        """One process, or the torchrun job this process belongs to (joining its gloo group)."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group("gloo")
            owns = True
        return cls(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0), _owns_group=owns)

    @property
    def shared(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    def run_all(self, step: Callable[[], T]) -> T | None:
        """Run ``step`` on every process; if it raised anywhere, raise on every process: the first failing rank's
        error itself on that rank and on rank 0 (reworded with the rank when it was another's), and
        :class:`PeerFailedError` elsewhere. Returns ``step``'s result."""
        result, error = None, None
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - handed to every process below, then re-raised
            error = exc
        self.raise_if_any(error)
        return result

    def raise_if_any(self, error: BaseException | None) -> None:
        """Collective: every process says whether it failed; a failure anywhere is raised everywhere."""
        if not self.shared:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        said: list[Any] = [None] * self.world
        mine = None if error is None else (type(error).__name__, str(error) or type(error).__name__)
        dist.all_gather_object(said, mine)
        failed = [(rank, what) for rank, what in enumerate(said) if what is not None]
        if not failed:
            return
        first_rank, (name, message) = failed[0]
        if error is not None and (first_rank == self.rank or not isinstance(error, PeerFailedError)):
            raise error  # a process's own failure is its own error
        if self.rank == 0:
            raise PeerFailedError(f"process {first_rank} of {self.world}: {message}")
        raise PeerFailedError(f"process {first_rank} of {self.world} failed ({name}); see rank 0's message")

    def all_gather(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order, on every process."""
        if not self.shared:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every process."""
        if not self.shared:
            return value
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def share_out(sizes: Mapping[str, int], world: int) -> list[list[str]]:
    """Names of ``sizes`` split among ``world`` processes by bytes: largest first, each to the least loaded process
    (the lowest rank on a tie). Deterministic, so every process computes the same split; each list keeps the
    names' original order."""
    loads = [0] * world
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[name] = rank
        loads[rank] += sizes[name]
    return [[n for n in sizes if owner[n] == rank] for rank in range(world)]
