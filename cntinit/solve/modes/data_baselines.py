"""The baselines that read activation statistics, as METHODS.md defines them and PEFT implements them:
EVA (A = the top eigenvectors of each input's Σ, B = 0, ranks redistributed by explained variance)
and CorDA (the split of W C, C the damped covariance, then A ← A C⁻¹)."""

from __future__ import annotations

import functools

import torch

from ... import distributed
from ...console import progress
from ...models.linears import weight_values
from .. import inputs, vas
from ..linalg import eigen, second_moment, split
from .registry import OFFSET, RESIDUAL, STATISTICS, Factors, Job, Mode, register

CORDA_MODES = ("ipm", "kpm")
CORDA_DAMP = 0.01  # PEFT's starting damping, × mean(diag C)
CORDA_INVERSE_ERROR = 0.05  # PEFT doubles the damping until ‖C C⁻¹ − I‖_F is under this


def corda_metric(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, C⁻¹) per matrix, C = Σ + damp · mean(diag Σ) · I as PEFT's `collect_eigens_for_layer`:
    damp starts at 0.01 and doubles, per matrix, until the inverse is accurate."""
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    scale = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # Σ = 0 (an input that is always zero): C = damp · I
    damp = torch.full_like(scale, CORDA_DAMP)
    while True:
        metric = sigma + damp * scale * eye
        inverse = torch.linalg.inv(metric)
        error = torch.linalg.matrix_norm(metric @ inverse - eye)[..., None, None]
        bad = ~(error < CORDA_INVERSE_ERROR)
        if not bool(bad.any()):
            return metric, inverse
        damp = torch.where(bad, 2 * damp, damp)


def explained_variance(values: torch.Tensor) -> torch.Tensor:
    """Explained-variance ratios λ_i / tr Σ of descending eigenvalues, float64, as EVA pools them
    for its rank redistribution; tiny negative eigenvalues count as zero."""
    values = values.clamp(min=0).to(torch.float64)
    total = values.sum()
    return values / total if total > 0 else torch.zeros_like(values)


def corda(batch: inputs.Batch, job: Job) -> Factors:
    """Split W C at rank r (its principal components, or with --corda-mode kpm its minor ones), then A ← A C⁻¹."""
    metric, inverse = batch.metric
    b, a, values = split(batch.delta @ metric, job.rank, "svd", job.options.split_p, job.options.corda_mode == "kpm")
    return Factors(b, a @ inverse, values)


def eva(stats, modules: dict, mine: dict, options, dev: torch.device, dtype: torch.dtype, world: distributed.World):
    """EVA: A = the top eigenvectors of each input's Σ, B = 0; ranks redistributed as PEFT's
    `get_eva_state_dict` does: every module offers its first round(r·ρ) explained-variance
    ratios λ_i / tr Σ, the r × modules largest of the pool are kept (ties to the earlier module).
    This process computes the eigenvectors of `mine`; the ratios of all are shared for the ranks.
    Returns (ranks, factors, report rows)."""
    cap = round(options.rank * options.rho)
    keys = {name: stats.manifest["modules"][name]["key"] for name in modules}
    own_keys = list(dict.fromkeys(keys[name] for name in mine))
    components, explained = {}, {}
    with progress() as bar:
        task = bar.add_task("eigenvectors", total=len(own_keys))
        for key in own_keys:
            t = {name: value.double() for name, value in stats.tensors(key).items()}
            sigma = second_moment(t["xxt"], t["sum"], t["count"], options.centered)
            values, vectors = eigen(sigma.to(dev, dtype)[None])
            components[key] = vectors[0, :, :cap].mT.cpu()
            explained[key] = explained_variance(values[0])[:cap].cpu()
            bar.update(task, advance=1)
    explained = distributed.pooled(world, explained)
    ranks = vas.top_counts({name: explained[key] for name, key in keys.items()}, options.rank * len(modules))
    factors, rows = {}, {}
    for name, module in mine.items():
        r, key = ranks[name], keys[name]
        w = weight_values(module)
        rows[name] = {"rank": r, "weight_norm": float(w.double().norm()), "delta_norm": 0.0, "update_norm": 0.0,
                      "kept": float(explained[key][:r].sum()), "output_change": 0.0, "floored": 0}
        if r:
            factors[name] = (torch.zeros(w.shape[0], r), components[key][:r])
    return ranks, factors, rows


def _kpm(options) -> bool:
    return options.corda_mode == "kpm"


register(Mode("eva", reads=STATISTICS, init=OFFSET, factor=None, solve_all=eva, zero_update=True, by_key=True,
              options={"rho": lambda given, options: given if given is not None else 2.0},
              vas="eva redistributes ranks itself (see --rho)",
              notes=("kept = explained variance of the kept eigenvectors (B = 0, so BA = 0)",)))
register(Mode("corda", reads=STATISTICS, init=RESIDUAL, factor=corda, batches=functools.partial(inputs.weights, metric=corda_metric),
              decompose="svd", minor=_kpm, options={"corda_mode": lambda given, options: given or "ipm"}))
