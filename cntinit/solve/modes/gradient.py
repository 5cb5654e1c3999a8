"""The gradient inits, from the mean loss gradient G of each weight (METHODS.md; capture --gradients):

- LoRA-GA (arXiv 2407.05000) as PEFT's `lora_ga_init`: from the SVD G = U S Vᵀ, A takes r of
  the first 2r right singular vectors and B = U S of r others (`direction`), B is rescaled
  (`scale`), and the base becomes W − s·BA so the model starts where it was.
- LoRA-One (arXiv 2502.01235) as its authors' code: from the SVD of −G, B = U_r √S_r / √s₁ and
  A = √S_r V_rᵀ / √s₁, both divided by √γ (`stable`); the base stays W, so the model starts
  one rank-r gradient step away: W − s/(γ s₁) · [G]_r.

`lora_ga` and `lora_one` return the adapter's own (B, A), the ones PEFT would hold; the solve stores them times
√s, so that the stored B A is the weight change s·BA, and export divides by √s again.
"""

from __future__ import annotations

import torch

from ...console import warn
from .. import inputs
from ..linalg import leading_svd, randomized_svd, sign_of_largest, singular_values
from .registry import GRADIENTS, OFFSET, RESIDUAL, Factors, Job, Mode, register

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")  # PEFT's LoraGAConfig.direction
SCALES = {"lora-ga": ("stable", "weight_svd", "gd_scale", "unit"), "lora-one": ("stable", "gd_scale", "unit")}
STABLE_GAMMA = {"lora-ga": 16.0, "lora-one": 128.0}  # PEFT's default; the LoRA-One authors' configuration


def components(grad: torch.Tensor, count: int, niter: int | None = None, generators: list[torch.Generator] | None = None):
    """(U, singular values, Vᵀ) of each matrix with its `count` leading triplets, signs fixed (each u's
    largest entry positive) so the result does not depend on the device: exact, or — with `niter` —
    the randomized SVD PEFT's `lora_ga_init` takes (`torch.svd_lowrank`, q = 2·count, `niter` subspace
    iterations; the test matrix from each module's generator)."""
    if niter is None:
        u, s, vh = leading_svd(grad, count)
    else:
        u, s, vh = randomized_svd(grad, min(2 * count, *grad.shape[-2:]), niter, generators)
        u, vh = u[..., :count], vh[..., :count, :]
    sign = sign_of_largest(u, dim=-2)
    return u * sign.unsqueeze(-2), s, vh * sign.unsqueeze(-1)


def lora_ga(grad: torch.Tensor, weight: torch.Tensor, rank: int, direction: str, scale: str, gamma: float, lora_scale: float,
            generators: list[torch.Generator], niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, singular values of G) for a batch (n, k, d), as PEFT's `lora_ga_init` (exact SVD, or its randomized one with `niter`)."""
    u, s, vh = components(grad, 2 * rank, niter, generators)
    count = grad.shape[0]
    if direction == "random":
        picks = torch.stack([torch.randperm(2 * rank, generator=g)[:rank] for g in generators]).to(grad.device)
        a_rows = b_cols = picks
    else:
        first, second = torch.arange(rank, device=grad.device), torch.arange(rank, 2 * rank, device=grad.device)
        a_rows, b_cols = {"ArB2r": (first, second), "A2rBr": (second, first),
                          "ArBr": (2 * first + 1, 2 * first)}[direction]
        a_rows, b_cols = a_rows.expand(count, rank), b_cols.expand(count, rank)
    a = vh.gather(-2, a_rows.unsqueeze(-1).expand(-1, -1, vh.shape[-1]))
    s_b = s.gather(-1, b_cols)
    b = u.gather(-1, b_cols.unsqueeze(-2).expand(-1, u.shape[-2], -1)) * s_b.unsqueeze(-2)
    if scale == "stable":
        b = b * (grad.shape[-2] ** 0.25 / gamma**0.5)
    elif scale == "weight_svd":
        top = singular_values(weight)[..., :1]
        ratio = torch.where(s_b[..., :1] > 0, top / torch.where(s_b[..., :1] > 0, s_b[..., :1], torch.ones_like(top)), torch.ones_like(top))
        b = b * ratio.unsqueeze(-1)
    elif scale == "gd_scale":
        a, b = a / lora_scale, b / lora_scale
    return b, a, s


def lora_one(grad: torch.Tensor, rank: int, scale: str, gamma: float, lora_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, singular values of G) for a batch (n, k, d), as the LoRA-One authors' `reinit_lora_modules`."""
    u, s, vh = components(-grad, rank)
    top = s[..., :1]
    root = (s[..., :rank] / torch.where(top > 0, top, torch.ones_like(top))).sqrt()  # √(s_i / s₁): 0 for a zero gradient
    b, a = u * root.unsqueeze(-2), root.unsqueeze(-1) * vh
    if scale == "stable":
        b, a = b / gamma**0.5, a / gamma**0.5
    elif scale == "gd_scale":
        b, a = b / lora_scale, a / lora_scale
    return b, a, s


def warn_unreached(mode: str, names: list[str]) -> None:
    """Modules whose loss gradient is zero (their output never reaches the loss) get no useful init."""
    start = "B = 0 (plain LoRA's start)" if mode == "lora-ga" else "A = B = 0, which never trains"
    warn(f"{len(names)} modules have a zero loss gradient, so their output never reaches the loss (e.g. {names[0]}; "
         f"SDXL's first text encoder's last layer is one): {mode} gives them {start}; leave them out of --targets")


def share(values: torch.Tensor, rank: int, grad: torch.Tensor) -> float:
    """The share of ‖G‖² in its leading rank-r subspace (‖G‖² itself from G: a randomized SVD finds
    only the leading singular values)."""
    total = float(grad.double().square().sum())
    return float(values[:rank].double().square().sum()) / total if total > 0 else 1.0


def lora_ga_factor(batch: inputs.Batch, job: Job) -> Factors:
    o = job.options
    b, a, values = lora_ga(batch.delta, batch.weight, job.rank, o.direction, o.scale, o.stable_gamma, o.lora_scale, job.generators,
                           o.niter)
    return Factors(b * o.lora_scale**0.5, a * o.lora_scale**0.5, values)


def lora_one_factor(batch: inputs.Batch, job: Job) -> Factors:
    o = job.options
    b, a, values = lora_one(batch.delta, job.rank, o.scale, o.stable_gamma, o.lora_scale)
    return Factors(b * o.lora_scale**0.5, a * o.lora_scale**0.5, values)


def _sizing(mode: str) -> dict:
    """The options that size B and A for the trainer's LoRA scale, and their defaults."""
    return {"scale": lambda given, options: given or "stable",
            "stable_gamma": lambda given, options: float(given if given is not None else STABLE_GAMMA[mode]),
            "alpha": lambda given, options: float(given if given is not None else options.rank),
            "rslora": lambda given, options: bool(given)}


NOTES = ("‖ΔW‖ here = ‖G‖, the mean loss gradient", "kept = share of ‖G‖² in its rank-r subspace", "out Δ = tr(BA Σ (BA)ᵀ)/tr(W Σ Wᵀ)")
register(Mode("lora-ga", reads=GRADIENTS, init=RESIDUAL, factor=lora_ga_factor, batches=inputs.gradients, picks=2, notes=NOTES,
              options={"direction": lambda given, options: given or "ArB2r", "niter": lambda given, options: given} | _sizing("lora-ga"),
              vas="its factors are sized for one rank"))
register(Mode("lora-one", reads=GRADIENTS, init=OFFSET, factor=lora_one_factor, batches=inputs.gradients, notes=NOTES,
              options=_sizing("lora-one"), vas="its factors are sized for one rank"))
