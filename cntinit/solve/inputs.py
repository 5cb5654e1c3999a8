"""What a solve reads, in batches of equal-shape modules on its device: the weights W, each module's
pooled Σ for the report, the mean loss gradient G (gradient modes) and each statistic's Σ per bucket
(CNT modes, modes/cnt.py). Memory stays bounded by CHUNK_BYTES plus the model itself.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, NamedTuple

import torch

from ..errors import CntinitError
from ..models.linears import in_out_features, weight_values
from ..storage.store import Store
from .linalg import second_moment

CHUNK_BYTES = 1 << 30
CPU_BATCH_BYTES = 1 << 24  # W's batch on the CPU: below glibc's 32 MB mmap threshold the heap reuses freed memory, where a fresh
# mapping page-faults every page (gathering SmolLM2-135M's 210 weights: 0.28–0.39 s in batches of 25, 0.15–0.22 s one by one)


class Batch(NamedTuple):
    names: list[str]
    weight: torch.Tensor  # (n, k, d)
    delta: torch.Tensor  # (n, k, d): W_est − W for the CNT modes; W itself for the residual modes; 0 for lora; G for the gradient modes
    sigma: torch.Tensor | None  # (n, d, d): pooled uncentered second moment, for the report; None without a capture
    floored: list[int]  # eigen/singular values under the floor, worst bucket
    metric: tuple[torch.Tensor, torch.Tensor] | None = None  # corda: (C, C⁻¹), split ΔW C then A ← A C⁻¹


def weights(stats: Store | None, modules: dict, options, dev: torch.device, dtype: torch.dtype,
            metric: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> Iterator[Batch]:
    """W itself (as the delta too), in batches of equal shape. With a capture's statistics, the pooled Σ of each
    module rides along for the report; `metric` (corda's) makes each batch's metric from the
    modules' own second moments (centered with --centered)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, module in modules.items():
        by_shape.setdefault(in_out_features(module), []).append(name)
    with_sigma = stats is not None and stats.has_statistics
    for (d, k), names in by_shape.items():
        # per module: W and its float64 work (6kd), and with statistics its d × d matrices — Σ, and for CorDA C, C⁻¹ and their
        # temporaries (8d²): counted, or a batch of 25 MLP down projections held 3 GB where PEFT's CorDA peaks at 2.4
        square = (8 if metric is not None else 2) * d * d if with_sigma else 0
        per_batch = batch_size(k, d, square, dev, dtype)
        for s in range(0, len(names), per_batch):
            group = names[s : s + per_batch]
            w = stacked_weights(modules, group, dev, dtype)
            sigma, made = None, None
            if with_sigma:
                keys = [stats.manifest["modules"][n]["key"] for n in group]
                tensors = {key: {t: v.to(dev, torch.float64) for t, v in stats.tensors(key).items()} for key in dict.fromkeys(keys)}
                sigma = torch.stack([pooled_sigma(tensors[key]) for key in keys]).to(dev, dtype)
                if metric is not None:
                    own = {key: second_moment(t["xxt"], t["sum"], t["count"], options.centered) for key, t in tensors.items()}
                    made = metric(torch.stack([own[key] for key in keys]).to(dev, dtype))
            yield Batch(group, w, w, sigma, [0] * len(group), made)


def gradients(stats: Store, modules: dict, options, dev: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """The mean loss gradient G (the stored sum over the K batches / K) as each batch's delta, with W
    and the pooled Σ (for the report), in batches of equal shape."""
    count = stats.manifest["gradients"]["batches"]
    for batch in weights(stats, modules, options, dev, dtype):
        grad = torch.empty(batch.weight.shape, dtype=dtype)
        for i, name in enumerate(batch.names):
            grad[i] = stats.gradient(name)
        yield batch._replace(delta=grad.to(dev).div_(count))


def batch_size(k: int, d: int, square: int, dev: torch.device, dtype: torch.dtype) -> int:
    """How many k × d modules a batch holds: CHUNK_BYTES of float64 work for each one's W (6kd) and `square`
    entries of its d × d matrices; on the CPU also W's batch within CPU_BATCH_BYTES. At least one."""
    count = CHUNK_BYTES // ((6 * k * d + square) * 8)
    if dev.type == "cpu":
        count = min(count, CPU_BATCH_BYTES // (k * d * dtype.itemsize))
    return max(1, count)


def stacked_weights(modules: dict, names: list[str], dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The W of `names` (equal shapes) as one (n, k, d) batch in `dtype` on `dev`, each converted as it is copied
    into its place (stacking, then converting, passed over the batch twice); for a GPU, gathered in the
    model's own dtype (the fewest bytes to move; the widest, where a model keeps some modules in float32) and
    converted there."""
    d, k = in_out_features(modules[names[0]])
    held = dtype if dev.type == "cpu" else functools.reduce(torch.promote_types, (modules[n].weight.dtype for n in names))
    batch = torch.empty(len(names), k, d, dtype=held)
    for i, name in enumerate(names):
        batch[i] = weight_values(modules[name])
    return batch.to(dev, dtype)


def pooled_sigma(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled uncentered second moment (d, d), float64: what the report measures output energy with."""
    return second_moment(tensors["xxt"].double(), tensors["sum"].double(), tensors["count"], centered=False)


def sigmas(tensors: dict[str, torch.Tensor], key: str, options, buckets: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ per bucket used by the mode (B, d, d), pooled uncentered Σ (d, d)), float64 on `dev`
    (on a GPU this arithmetic over d² entries costs a fraction of what it costs on the CPU)."""
    t = {name: value.to(dev, torch.float64) for name, value in tensors.items()}
    pooled = pooled_sigma(t)
    if options.pooled or buckets == 1:
        return second_moment(t["xxt"], t["sum"], t["count"], options.centered)[None], pooled
    empty = (t["bucket_count"] == 0).nonzero().flatten().tolist()
    if empty:
        raise CntinitError(f"bucket {empty[0]} of {key} holds no tokens: capture with fewer --buckets, or solve with --pooled")
    return second_moment(t["bucket_xxt"], t["bucket_sum"], t["bucket_count"], options.centered), pooled


def bucket_weights(options, buckets: int) -> list[float]:
    """w_j of eq. 18: one per bucket (all 1 by default), or [1] for the pooled statistics."""
    count = 1 if options.pooled else buckets
    weights_given = options.bucket_weights or [1.0] * count
    if len(weights_given) != count:
        what = "the pooled statistics take one weight" if options.pooled else f"the capture has {buckets} bucket(s)"
        raise CntinitError(f"--bucket-weights has {len(weights_given)} value(s) but {what}: give {count} comma-separated numbers")
    return [float(w) for w in weights_given]
