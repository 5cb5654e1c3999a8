"""Work split across the processes `torchrun` starts, with `torch.distributed` (NCCL on GPUs,
gloo on CPUs).

Capture is data-parallel: every rank streams its own share of the data (the shard of
`--shard rank/world`), the sums are added across ranks, and rank 0 writes the store — equal,
up to float rounding, to one process over all the data. Solve is module-parallel: units of
work (modules, or the modules sharing one statistic) go to ranks by cost, largest first, and
rank 0 gathers the factors and writes the solve directory.

Every meeting of the ranks starts with an exchange of how each one is doing (`everyone`): a
rank that fails says so there, and the others stop with its message.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import CntinitError, first_line


@dataclass
class World:
    rank: int = 0
    size: int = 1
    finished: bool = False  # past the last meeting of the ranks: a failure now concerns this rank alone

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
    world = World(dist.get_rank(), dist.get_world_size())
    try:
        yield world
    except Exception as exc:
        if not world.finished:  # the others wait at the next meeting: tell them why this rank is not coming
            with contextlib.suppress(Exception):
                _exchange(world, (first_line(exc), None))
        raise
    finally:
        if ours:
            dist.destroy_process_group()


def add_across_ranks(world: World, stats: dict, counters: list[int], grads=None, last: bool = True) -> list[int]:
    """Sum every statistic (`stats`: capture's InputStats by key) and gradient sum (`grads`, a GradientSums; in
    place) and the `counters` over all ranks; returns the summed counters.
    A meeting of the ranks: the capture's only one, or with `last=False` one of a layerwise
    capture's (one per block), after which failures still stop every rank."""
    import torch.distributed as dist

    if last:
        _last_meeting(world)
    else:
        everyone(world, None)
    for entry in stats.values():
        if entry.summed:
            dist.all_reduce(entry.xxt)
            dist.all_reduce(entry.sum)
        counts = torch.tensor(entry.count, dtype=torch.int64, device=_device())
        dist.all_reduce(counts)
        entry.count = counts.tolist()
    if grads is not None:
        for total in grads.sums.values():
            dist.all_reduce(total)
        loss = torch.tensor([grads.loss], dtype=torch.float64, device=_device())
        dist.all_reduce(loss)
        grads.loss = float(loss)
        grads.tokens, grads.batches, *counters = _summed([grads.tokens, grads.batches, *counters])
        return counters
    return _summed(counters)


def _device() -> torch.device:
    """Where the backend takes tensors to add: the process's GPU under nccl, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _summed(counters: list[int]) -> list[int]:
    import torch.distributed as dist

    if not counters:
        return []
    totals = torch.tensor(counters, dtype=torch.int64, device=_device())
    dist.all_reduce(totals)
    return totals.tolist()


def assign(costs: dict[str, float], size: int) -> dict[str, int]:
    """The rank that owns each unit: largest cost first, each to the least loaded rank so far
    (greedy bin packing, within 4/3 of the best makespan); ties go to the lower rank."""
    loads = [0.0] * size
    owner = {}
    for unit in sorted(costs, key=lambda u: -costs[u]):  # stable: equal costs keep their order
        rank = min(range(size), key=lambda r: (loads[r], r))
        owner[unit] = rank
        loads[rank] += costs[unit]
    return owner


def everyone(world: World, value: Any) -> list[Any]:
    """`value` from every rank, in rank order (small picklable objects between our own processes).
    Every meeting of the ranks starts here, so a rank that failed before it (and said so from
    `joined`) stops the others with its error rather than leaving them a broken connection."""
    if world.size == 1:
        return [value]
    reports = _exchange(world, (None, value))
    failed = [(rank, failure) for rank, (failure, _) in enumerate(reports) if failure is not None]
    if failed:
        world.finished = True  # the failed ranks have left: no meeting is ahead
        rank, failure = failed[0]
        raise CntinitError(f"process {rank} of {world.size} stopped, so this one stops too: {failure}")
    return [value for _, value in reports]


def pooled(world: World, part: dict) -> dict:
    """The union of every rank's `part` (each rank computed the entries of its own modules)."""
    whole = {}
    for theirs in everyone(world, part):
        whole |= theirs
    return whole


def _last_meeting(world: World) -> None:
    """Every rank is here and well; from now on a failure concerns its own rank alone."""
    everyone(world, None)
    world.finished = True


def _exchange(world: World, report: tuple) -> list[tuple]:
    import torch.distributed as dist

    reports = [None] * world.size
    dist.all_gather_object(reports, report)
    return reports


def gather_factors(world: World, factors: dict[str, tuple[torch.Tensor, ...]], rows: dict[str, dict]):
    """Every rank's factors and report rows at rank 0, as (factors, rows); other ranks get ({}, {}).
    Rows and tensor layouts travel as objects, the tensors point to point, one at a time. The
    solve's last meeting of the ranks."""
    import torch.distributed as dist

    _last_meeting(world)
    layout = {name: [(tuple(t.shape), t.dtype) for t in pair] for name, pair in factors.items()}
    gathered = [None] * world.size if world.leader else None
    dist.gather_object((rows, layout), gathered, dst=0)
    device = _device()
    if not world.leader:
        for pair in factors.values():
            for tensor in pair:
                dist.send(tensor.contiguous().to(device), dst=0)
        return {}, {}
    all_factors, all_rows = dict(factors), {}
    for source, (their_rows, their_layout) in enumerate(gathered):
        all_rows |= their_rows
        if source == 0:
            continue
        for name, specs in their_layout.items():
            received = []
            for shape, dtype in specs:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, src=source)
                received.append(buffer.cpu())
            all_factors[name] = tuple(received)
    return all_factors, all_rows
