"""The data-free baselines, from W alone: LoRA (B = 0, A drawn as PEFT draws it) and the splits of W
itself — PiSSA (principal), MiLoRA (minor), OLoRA (QR) — and MiCA (A = 0 under a frozen B of W's
minor directions), as METHODS.md defines them and PEFT implements them."""

from __future__ import annotations

import functools
from typing import Iterator

import torch

from .. import inputs
from ..linalg import minor_left, sign_of_largest, split
from .registry import OFFSET, RESIDUAL, WEIGHTS, Factors, Job, Mode, register

LORA_INITS = ("kaiming", "gaussian")


def lora_a(rank: int, d: int, how: str, generators: list[torch.Generator]) -> torch.Tensor:
    """A of plain LoRA, (one per generator, r, d), drawn on the CPU: PEFT's default
    kaiming_uniform_(a=√5), i.e. U(−1/√d, 1/√d), or its "gaussian" N(0, 1/r²)."""
    if how == "kaiming":
        bound = d**-0.5
        return torch.stack([torch.rand(rank, d, generator=g, dtype=torch.float64) for g in generators]) * (2 * bound) - bound
    return torch.stack([torch.randn(rank, d, generator=g, dtype=torch.float64) for g in generators]) / rank


def lora(batch: inputs.Batch, job: Job) -> Factors:
    count, k, d = batch.weight.shape
    a = lora_a(job.rank, d, job.options.lora_init, job.generators)
    return Factors(torch.zeros(count, k, job.rank, device=batch.weight.device, dtype=batch.weight.dtype), a.to(batch.weight))


def zero_deltas(stats, modules: dict, options, dev: torch.device, dtype: torch.dtype) -> Iterator[inputs.Batch]:
    """W, with no change wanted of it (LoRA's report: ‖ΔW‖ = 0)."""
    for batch in inputs.weights(stats, modules, options, dev, dtype):
        yield batch._replace(delta=torch.zeros_like(batch.weight))


def split_weight(batch: inputs.Batch, job: Job, minor: bool = False) -> Factors:
    """B A = the rank-r split of W: its r largest singular triplets (PiSSA; with --niter, PEFT's randomized
    SVD), its r smallest (`minor`: MiLoRA), or QR's first r columns (OLoRA)."""
    options = job.options
    b, a, values = split(batch.delta, job.rank, options.decompose, options.split_p, minor, options.niter, job.generators)
    return Factors(b, a, values)


def mica(batch: inputs.Batch, job: Job) -> Factors:
    """B = U of W's r smallest singular triplets (each u's largest entry positive), A = 0."""
    count, _, d = batch.weight.shape
    u, values = minor_left(batch.weight, job.rank)
    b = u * sign_of_largest(u, dim=-2).unsqueeze(-2)
    return Factors(b, torch.zeros(count, job.rank, d, device=batch.weight.device, dtype=batch.weight.dtype), values)


def _minor(options) -> bool:
    return True


register(Mode("lora", reads=WEIGHTS, init=OFFSET, factor=lora, batches=zero_deltas, zero_update=True,
              options={"lora_init": lambda given, options: given or "kaiming"}, vas="B = 0 leaves no spectrum to allocate by",
              notes=("B = 0: the adapter starts as zero",)))
register(Mode("pissa", reads=WEIGHTS, init=RESIDUAL, factor=split_weight, decompose="svd", options={"niter": lambda given, options: given}))
register(Mode("milora", reads=WEIGHTS, init=RESIDUAL, factor=functools.partial(split_weight, minor=True), decompose="svd", minor=_minor))
register(Mode("olora", reads=WEIGHTS, init=RESIDUAL, factor=split_weight, decompose="qr"))
register(Mode("mica", reads=WEIGHTS, init=OFFSET, factor=mica, zero_update=True, decompose="svd", minor=_minor,
              vas="A = 0 leaves no spectrum to allocate by", peft_variant="mica", label="MiCA"))
