"""LoRA, EVA and CorDA as METHODS.md defines them, matching PEFT's implementations (see README)."""

from __future__ import annotations

import torch

LORA_INITS = ("kaiming", "gaussian")
CORDA_MODES = ("ipm", "kpm")
CORDA_DAMP = 0.01  # PEFT's starting damping, × mean(diag C)
CORDA_INVERSE_ERROR = 0.05  # PEFT doubles the damping until ‖C C⁻¹ − I‖_F is under this


def lora_a(rank: int, d: int, how: str, generators: list[torch.Generator]) -> torch.Tensor:
    """A of plain LoRA, (one per generator, r, d), drawn on the CPU: PEFT's default
    kaiming_uniform_(a=√5), i.e. U(−1/√d, 1/√d), or its "gaussian" N(0, 1/r²)."""
    if how == "kaiming":
        bound = d**-0.5
        return torch.stack([torch.rand(rank, d, generator=g, dtype=torch.float64) for g in generators]) * (2 * bound) - bound
    return torch.stack([torch.randn(rank, d, generator=g, dtype=torch.float64) for g in generators]) / rank


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
