"""Flow matching, as Flux and Stable Diffusion 3 are trained (diffusers' train_dreambooth_lora_flux/
_sd3 with weighting scheme "none"; sd-scripts' defaults draw σ from another distribution): latents
x₀ and noise n mixed as x_σ = (1 − σ)·x₀ + σ·n, the denoiser predicting the velocity n − x₀, its
squared error unweighted.

σ comes from the training schedule — the pipeline's FlowMatchEulerDiscreteScheduler config as
built, its `num_train_timesteps` N steps with their shift where it is static (SD3's), unshifted where
the pipeline shifts at generation time (Flux's dynamic shifting), as the training scripts read it:
- training noise (--gradients): index i drawn uniformly from [0, N), σ = sigmas[i];
- --noise-timestep t: σ = sigmas[N − 1 − t] (t = 0 the least noise, N − 1 the most);
- neither: clean latents, σ = 0.
The denoiser is told σ·N (SD3) or σ·N/1000 (Flux), as its pipeline tells it. Indices are drawn
first, then the noise, from the capture's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CntinitError

SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)  # the schedulers whose training noise is defined here


@dataclass
class Noised:
    """One batch's latents as the denoiser reads them, its timestep, and (with training noise) the target."""

    latents: torch.Tensor
    timestep: torch.Tensor  # σ·N per sample
    target: torch.Tensor | None


def training(parts):
    """The training schedule: a fresh copy of the pipeline's scheduler (generation moves its own)."""
    import diffusers

    scheduler = parts.helpers["scheduler"]
    name = type(scheduler).__name__
    if name not in SCHEDULERS:
        raise CntinitError(f"--gradients knows the flow-matching loss of {', '.join(SCHEDULERS)}; this pipeline's scheduler is {name}, "
                           "whose training loss is not defined here yet: capture it without --gradients")
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)


def noised(parts, latents: torch.Tensor) -> Noised:
    """`latents` as the denoiser reads them: clean, at --noise-timestep, or noised as training does."""
    import diffusers

    count, training_noise = latents.shape[0], parts.training_noise
    if training_noise is None and parts.noise_timestep is None:
        return Noised(latents, torch.zeros(count, device=latents.device), None)
    schedule = training_noise or diffusers.FlowMatchEulerDiscreteScheduler.from_config(parts.helpers["scheduler"].config)
    steps = schedule.config.num_train_timesteps
    if parts.noise_timestep is None:
        index = (torch.rand(count, generator=parts.generator) * steps).long()
    else:
        index = torch.full((count,), steps - 1 - parts.noise_timestep, dtype=torch.long)
    noise = torch.randn(latents.shape, generator=parts.generator, dtype=latents.dtype).to(latents.device)
    sigma = schedule.sigmas[index].to(latents.device, latents.dtype).view(-1, *[1] * (latents.dim() - 1))
    mixed = (1 - sigma) * latents + sigma * noise
    return Noised(mixed, schedule.timesteps[index].to(latents.device), noise - latents if training_noise is not None else None)


def latents(parts, pixel_values: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior mean, shifted and scaled as Flux's and SD3's pipelines and trainers do."""
    vae = parts.helpers["vae"]
    mean = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean
    return (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
