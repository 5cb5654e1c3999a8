"""Variable adapter structure (METHODS.md, paper eq. 19): ranks from pooled relative variances."""

from __future__ import annotations

import torch


def allocate(
    singular_values: dict[str, torch.Tensor],
    max_ranks: dict[str, int],
    budget: int,
    min_rank: int = 0,
) -> dict[str, int]:
    """Rank per module: its share of the top `budget` pooled relative variances, clamped.

    v_m = s_m² / Σ s² within each module; all v_m are pooled and sorted descending (ties keep
    module order), the top `budget` kept, and a module's rank is how many of the kept values
    are its own, clamped to [min_rank, max_ranks[name]].
    """
    names = list(singular_values)
    variances, owners = [], []
    for index, name in enumerate(names):
        energy = singular_values[name].to(torch.float64).square()
        total = energy.sum()
        variances.append(energy / total if total > 0 else torch.zeros_like(energy))
        owners.append(torch.full((energy.numel(),), index, dtype=torch.long))
    pooled, owner = torch.cat(variances), torch.cat(owners)
    order = torch.argsort(pooled, descending=True, stable=True)
    counts = torch.bincount(owner[order[:budget]], minlength=len(names)).tolist()
    return {name: max(min_rank, min(count, max_ranks[name])) for name, count in zip(names, counts)}
