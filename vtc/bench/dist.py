"""Sharding a bench run across processes started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address).
:func:`context` reads them and, with more than one process, joins the process group (NCCL on
CUDA, gloo on CPU) so the runner can wait at a barrier before rank 0 merges the shards. Process
``r`` of ``w`` answers questions ``r, r + w, r + 2w, ...`` of each cell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from vtc.errors import ConfigError

__all__ = ["DistContext", "context", "shard"]

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, ok: bool) -> bool:
        """True when ``ok`` is true on every process (a collective: every process must call it)."""
        if self.world == 1:
            return ok
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"
        flag = torch.tensor([1 if ok else 0], device=torch.device("cuda", self.local_rank) if nccl else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialized_here = False


def context(timeout_s: float = 4 * 3600) -> DistContext:
    """The process's place in the run, joining the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not (0 <= rank < world):
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; launch with torchrun or accelerate")
    ctx = DistContext(rank=rank, world=world, local_rank=local)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
            ctx.initialized_here = True
    return ctx


def shard(items: list[T], rank: int, world: int) -> list[T]:
    """The items process ``rank`` of ``world`` handles (strided, so each shard spans the list)."""
    return items[rank::world]
