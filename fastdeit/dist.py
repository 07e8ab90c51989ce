"""The torch.distributed world a process belongs to.

Only the single-process world exists so far; ranks take their shard of every global batch
plan through `BatchPlan.shard(rank, size)`, so adding ranks does not change what is seen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()
