"""IniLoRA (METHODS.md): BA ≈ W by Adam, for a batch of equal-shape weights at once; its variants
draw B and A only (IniLoRA-α, IniLoRA-β), unless given --steps.

The loss is the sum over the batch of each module's mean((BA − W)²). Adam works element by
element, so the summed loss gives every module exactly the update its own optimizer would:
one batched problem equals the authors' loop of one optimizer per layer, in fewer, larger
kernels.
"""

from __future__ import annotations

import functools
import math

import torch

from ...models.linears import weight_values
from ..inputs import Batch
from .registry import RESIDUAL, WEIGHTS, Factors, Job, Mode, register

LR = 5e-4
STEP_SIZE, GAMMA = 5000, 0.9  # StepLR
MAX_STEPS = 20000
CHECK_EVERY = 500  # steps between early-stopping checks
TOLERANCE = 1e-3  # stop once no module's loss fell by this fraction over the last CHECK_EVERY steps
ALPHA_STD = 0.5


def start(k: int, d: int, rank: int, mode: str, sigma: float, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting (B, A), (count, k, r) and (count, r, d) with one module per generator, float64, drawn on the CPU:
    N(0, σ²) with σ the mean weight std (inilora), N(0, 0.5²) (alpha), or Kaiming-normal with
    torch's fan-in convention, std √2/√fan_in — fan_in r for B, d for A (beta)."""
    draws = [(torch.randn(k, rank, generator=g, dtype=torch.float64), torch.randn(rank, d, generator=g, dtype=torch.float64))
             for g in generators]
    b, a = torch.stack([draw[0] for draw in draws]), torch.stack([draw[1] for draw in draws])
    if mode == "inilora":
        return b * sigma, a * sigma
    if mode == "inilora-alpha":
        return b * ALPHA_STD, a * ALPHA_STD
    return b * math.sqrt(2 / rank), a * math.sqrt(2 / d)


def fit(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, steps: int | None, on_step=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Adam (lr 5e-4, StepLR 5000/0.9) on Σ_i mean((B_i A_i − W_i)²), in w's dtype and device.

    steps=None runs up to MAX_STEPS with early stopping (TOLERANCE); an int runs exactly that
    many. Returns the fitted (B, A) and the number of steps run. The gradient is written out
    (R = BA − W in one fused kernel; ∇B = c·R Aᵀ, ∇A = c·Bᵀ R, c = 2/(k·d)) rather than
    traced by autograd, which would spend several more passes over every k×d residual.
    """
    b = b.to(w.device, w.dtype).clone()
    a = a.to(w.device, w.dtype).clone()
    optimizer = torch.optim.Adam([b, a], lr=LR)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, STEP_SIZE, GAMMA)
    c = 2 / (w.shape[-2] * w.shape[-1])
    limit = MAX_STEPS if steps is None else steps
    previous = None
    done = 0
    while done < limit:
        residual = torch.baddbmm(w, b, a, beta=-1)  # BA − W
        if steps is None and done % CHECK_EVERY == 0:
            current = residual.square().mean(dim=(-2, -1))  # the loss at the current point
            if previous is not None and bool(((previous - current) <= TOLERANCE * previous).all()):
                break
            previous = current
        b.grad = torch.bmm(residual, a.mT).mul_(c)
        a.grad = torch.bmm(b.mT, residual).mul_(c)
        optimizer.step()
        schedule.step()
        done += 1
        if on_step is not None:
            on_step()
    return b, a, done


def mean_weight_std(modules: dict, options) -> float:
    """IniLoRA's σ: the mean over target modules of each weight's standard deviation."""
    return float(torch.stack([weight_values(m).double().std() for m in modules.values()]).mean())


def factor(batch: Batch, job: Job, default_steps: int | None) -> Factors:
    """The starting draw, then Adam: --steps exactly, else `default_steps` (None: until it stops improving)."""
    count, k, d = batch.weight.shape
    options, bar = job.options, job.bar
    b, a = start(k, d, job.rank, options.mode, job.prepared, job.generators)
    steps = options.steps if options.steps is not None else default_steps
    done = 0
    if steps != 0:
        task = bar.add_task(f"Adam × {count} of {k}×{d}", total=steps or MAX_STEPS)
        b, a, done = fit(batch.weight.float(), b, a, steps, on_step=lambda: bar.advance(task))
        bar.remove_task(task)
    return Factors(b.to(batch.weight), a.to(batch.weight), steps=done)


def _fit_cost(k: int, d: int) -> int:
    return k * d  # per Adam step


DEFAULT_STEPS = {"inilora": None, "inilora-alpha": 0, "inilora-beta": 0}  # Adam steps without --steps (None: until it stops improving)
for _name, _default_steps in DEFAULT_STEPS.items():
    register(Mode(_name, reads=WEIGHTS, init=RESIDUAL, factor=functools.partial(factor, default_steps=_default_steps),
                  options={"steps": lambda given, options: given}, cost=_fit_cost,
                  prepare=mean_weight_std if _name == "inilora" else None,
                  vas="a fit of one rank cannot be cut to another; use pissa for the rank-r optimum"))
