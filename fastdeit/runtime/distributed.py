"""The torch.distributed world a process belongs to, and the few collectives the trainer uses.

Ranks take their shard of every global batch plan through `BatchPlan.shard(rank, size)`, so
adding ranks does not change which samples are seen nor their augmentations. The process
group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
NCCL on GPUs, gloo on CPUs. Nothing here launches processes: that is torchrun's job
(fastdeit/runtime/launch.py starts it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from fastdeit.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def in_torchrun() -> bool:
    """True when this process was started by torchrun (or a scheduler that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def cuda_index(world: World) -> int:
    """This rank's GPU among those the process sees: LOCAL_RANK where every GPU of the node is
    visible (torchrun), 0 where the scheduler shows each task only its own
    (`srun --gpus-per-task=1`, CUDA_VISIBLE_DEVICES set per task)."""
    visible = torch.cuda.device_count()
    if visible <= 1:
        return 0
    if world.local_rank < visible:
        return world.local_rank
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise UserError(f"LOCAL_RANK is {world.local_rank} but this process sees {visible} GPUs "
                    f"(CUDA_VISIBLE_DEVICES={shown}): show each task all of its node's GPUs, or exactly one")


def init_from_env(device_type: str, timeout_s: float = 1800) -> World:
    """Join the process group torchrun describes; a world of one needs no group."""
    if not in_torchrun():
        return SINGLE
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if world.size == 1:
        return world
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise UserError("this torch build has no NCCL: multi-GPU training needs a CUDA build of torch "
                            "with NCCL (or train on CPUs with --gpus 0 --procs P)")
        torch.cuda.set_device(cuda_index(world))
    if not dist.is_initialized():
        from torch.distributed.rendezvous import rendezvous

        # torchrun keeps one store across restarts of the worker group: keys of the group that
        # died (its peers' addresses) would be read by the new one, so each attempt has its own.
        store, _, _ = next(rendezvous("env://", world.rank, world.size, timeout=timedelta(seconds=timeout_s)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        # device_id binds NCCL's communicator to this rank's GPU at once, so no collective has
        # to guess the device (barrier() would otherwise warn and may pick the wrong one).
        bound = {"device_id": torch.device("cuda", cuda_index(world))} if device_type == "cuda" else {}
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.PrefixStore(
            f"fastdeit/attempt-{attempt}", store), rank=world.rank, world_size=world.size,
            timeout=timedelta(seconds=timeout_s), **bound)
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce(values: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """Sum (or mean) of a tensor over ranks, returned on the tensor's own device; the input
    itself for one process. NCCL reduces GPU tensors only, gloo CPU ones: the tensor is moved
    to where the backend wants it and back."""
    if not world.distributed:
        return values
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = values.to(where)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    if op == "mean":
        out /= world.size
    return out.to(values.device)


def agree_with_main(value: str, world: World) -> str:
    """Rank 0's value on every rank (e.g. a choice made from timings, which differ by rank)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def eval_rows(num_samples: int, batch: int, world: World) -> np.ndarray | None:
    """The val rows of this rank: whole eval batches r, r + W, r + 2W, ... of the
    single-process order, so every rank's batches are exactly single-process batches and the
    reduced counts equal a single-process evaluation bit for bit. None for one process."""
    if not world.distributed:
        return None
    starts = np.arange(world.rank * batch, num_samples, world.size * batch)
    return np.concatenate([np.arange(s, min(s + batch, num_samples)) for s in starts]) if len(starts) \
        else np.zeros(0, dtype=np.int64)


def step_seed(seed: int, rank: int, updates: int) -> int:
    """Seed of the torch RNG for one training step on one rank (stochastic depth, dropout):
    a function of the step, so a resumed or restarted run draws what it would have drawn."""
    return int(np.random.SeedSequence([seed, rank, updates]).generate_state(1, np.uint64)[0] >> 1)


class StopVote:
    """Whether any rank was asked to stop (Ctrl-C, SIGTERM, the requeue signal: to one process
    or to all), agreed on by every rank at the same step boundary without stalling the step:
    each step's vote is all-reduced (max) asynchronously on a CPU (gloo) group and read at the
    next boundary, so all ranks stop after the same step, one step after the request reached
    the first of them. A vote is a reason: None, "stop", or "requeue" (which wins)."""

    REASONS = (None, "stop", "requeue")  # ordered: the max over ranks is the reason all act on

    def __init__(self, world: World) -> None:
        self.world = world
        self.group = dist.new_group(backend="gloo") if world.distributed else None
        self.pending: tuple[torch.Tensor, dist.Work] | None = None

    def __call__(self, requested: str | None) -> str | None:
        """Cast this rank's vote for this step; the reason the previous step's vote agreed on."""
        if not self.world.distributed:
            return requested
        agreed = self.close()
        vote = torch.tensor([self.REASONS.index(requested)], dtype=torch.int32)
        self.pending = (vote, dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return agreed

    def close(self) -> str | None:
        """Wait for the vote in flight (before the group goes away); the reason it agreed on."""
        if self.pending is None:
            return None
        vote, work = self.pending
        work.wait()
        self.pending = None
        return self.REASONS[int(vote.item())]
