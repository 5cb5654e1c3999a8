"""What every feed gives the capture loop: batches of model inputs, a probe, and what the store
records of the data; and how `--shard i/N` (or a torchrun process) takes its share of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ...errors import CntinitError

# (bucket, model inputs, padding mask or None, which tokens are next-token targets — None: every real one)
Batch = tuple[int, dict[str, torch.Tensor], "torch.Tensor | None", "torch.Tensor | None"]


@dataclass
class Feed:
    probe: dict[str, torch.Tensor]  # one small input: finds which targets read the same tensor
    total: int  # samples, for the progress bar
    unit: str  # "tok" or "img", for the rate
    batches: Callable[[], Iterator[Batch]]
    data: dict  # the store manifest's data section
    settings: dict = field(default_factory=dict)  # extra capture settings to record
    unpredicted: int = 0  # samples with no next token to predict (a single token, or a prompt that fills them): no gradient
    unpadded: Callable[[str], bool] | None = None  # the targets whose inputs are never padding (a VLM's vision tower), by name


def text_settings(seq_len: int, pack: bool, shuffle_seed: int | None) -> dict:
    """The capture settings a feed of records adds to the store: the shuffle seed only when the records
    were drawn with one (stores before it lack the key)."""
    return {"seq_len": seq_len, "pack": pack} | ({"shuffle_seed": shuffle_seed} if shuffle_seed is not None else {})


Shard = tuple[int, int]  # (index, count): this process's share of the data, as `--shard index/count`


def share(part: range, shard: Shard) -> range:
    """Shard `index` of `count`'s contiguous share of one bucket: bucket j of the merged shards is
    then bucket j of one run over all the data."""
    index, count = shard
    return range(part.start + round(index * len(part) / count), part.start + round((index + 1) * len(part) / count))


def shard_total(sizes: list[int], shard: Shard) -> int:
    total = sum(len(share(range(size), shard)) for size in sizes)
    if total == 0:
        raise CntinitError(f"--shard {shard[0]}/{shard[1]} gets no samples of the {sum(sizes)}: use fewer shards")
    return total


def slices(count: int, buckets: int) -> list[range]:
    """`buckets` consecutive, near-equal slices of range(count)."""
    if buckets > count:
        raise CntinitError(f"--buckets {buckets} is more than the {count} samples: lower --buckets")
    bounds = [round(i * count / buckets) for i in range(buckets + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(buckets)]
