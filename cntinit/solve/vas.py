"""Variable adapter structure (METHODS.md, paper eq. 19): ranks from pooled relative variances."""

from __future__ import annotations

import torch


def relative_variances(singular_values: torch.Tensor) -> torch.Tensor:
    """v_m = s_m² / Σ s², float64 (all zeros for a zero matrix)."""
    energy = singular_values.to(torch.float64).square()
    total = energy.sum()
    return energy / total if total > 0 else torch.zeros_like(energy)


def allocate(
    singular_values: dict[str, torch.Tensor],
    max_ranks: dict[str, int],
    budget: int,
    min_rank: int = 0,
) -> dict[str, int]:
    """Rank per module: its share of the top `budget` pooled relative variances, clamped.

    v_m = s_m² / Σ s² within each module; all v_m are pooled and sorted descending (ties keep
    module order), the top `budget` kept, and a module's rank is how many of the kept values
    are its own, clamped to [min_rank, max_ranks[name]] — a module smaller than min_rank gets all it has.
    """
    counts = top_counts({name: relative_variances(s) for name, s in singular_values.items()}, budget)
    return {name: min(max(min_rank, count), max_ranks[name]) for name, count in counts.items()}


def top_counts(shares: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """How many of the `budget` largest pooled values each module owns (ties keep module order)."""
    names = list(shares)
    pooled = torch.cat([shares[name].to(torch.float64) for name in names])
    owner = torch.cat([torch.full((shares[name].numel(),), i, dtype=torch.long) for i, name in enumerate(names)])
    order = torch.argsort(pooled, descending=True, stable=True)
    counts = torch.bincount(owner[order[:budget]], minlength=len(names)).tolist()
    return dict(zip(names, counts))
