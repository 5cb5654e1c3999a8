"""Data-parallel capture under `torchrun`: every rank streams its own share of the data (the
shard of `--shard rank/world`), the sums are added across ranks with `torch.distributed`
(NCCL on GPUs, gloo on CPUs), and rank 0 writes the store — equal, up to float rounding, to
one process over all the data.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from .stats import InputStats


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def joined() -> Iterator[World]:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT), joined for the duration; a single process outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World()
        return
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size())
    finally:
        if ours:
            dist.destroy_process_group()


def add_across_ranks(stats: dict[str, InputStats], counters: list[int]) -> list[int]:
    """Sum every statistic (in place) and the `counters` over all ranks; returns the summed counters."""
    import torch.distributed as dist

    for entry in stats.values():
        dist.all_reduce(entry.xxt)
        dist.all_reduce(entry.sum)
        counts = torch.tensor(entry.count, dtype=torch.int64, device=entry.sum.device)
        dist.all_reduce(counts)
        entry.count = counts.tolist()
    device = next(iter(stats.values())).sum.device
    totals = torch.tensor(counters, dtype=torch.int64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()
