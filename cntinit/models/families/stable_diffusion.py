"""Stable Diffusion 1.x/2.x and SDXL: a UNet conditioned on CLIP text states, trained by denoising.

Images → VAE latents (the posterior mean, times the VAE's scaling factor) → UNet, clean by default
(timestep 0) or noised to `noise_timestep` by the pipeline's own scheduler; prompts → text encoder
→ the UNet's cross-attention, padded to the tokenizer's full length as the pipelines do (the UNet
attends to every position, padding included).

SDXL conditions as its pipeline and training scripts do: the UNet reads both encoders' penultimate
hidden states side by side, plus `added_cond_kwargs` — the second encoder's pooled projection and
the micro-conditioning `time_ids` (original size = target size = the calibration resolution, crop
at 0, 0).

Training noise (--gradients): each image's latents noised as the training scripts do (a
DDPMScheduler of the pipeline's scheduler config) at a timestep drawn uniformly from
[0, num_train_timesteps) — or at --noise-timestep — and the squared error of the UNet's prediction
against its target (the noise for `epsilon`, the velocity for `v_prediction`, the latents for
`sample`). Timesteps are drawn first, then the noise, from the capture's generator.
"""

from __future__ import annotations

import torch

from ...errors import CntinitError
from .family import Family, register

PREDICTIONS = ("epsilon", "v_prediction", "sample")  # what a UNet may be trained to predict (the scheduler config says)


def training(parts):
    import diffusers

    schedule = diffusers.DDPMScheduler.from_config(parts.helpers["scheduler"].config)
    if schedule.config.prediction_type not in PREDICTIONS:
        raise CntinitError(f"--gradients knows the denoising targets {', '.join(PREDICTIONS)}; this pipeline's scheduler predicts "
                           f"{schedule.config.prediction_type!r}: capture it without --gradients")
    return schedule


def forward(parts, pixel_values: torch.Tensor, ids: dict[str, torch.Tensor]):
    vae, scheduler, unet = parts.helpers["vae"], parts.helpers["scheduler"], parts.unet
    added = None
    if parts.text_encoder_2 is None:
        states = parts.text_encoder(ids["text_encoder"])[0]
    else:
        second = parts.text_encoder_2(ids["text_encoder_2"], output_hidden_states=True)
        states = torch.cat([parts.text_encoder(ids["text_encoder"], output_hidden_states=True).hidden_states[-2],
                            second.hidden_states[-2]], dim=-1)
        height, width = pixel_values.shape[-2:]
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=states.device).repeat(len(states), 1)
        added = {"text_embeds": second[0].to(unet.dtype), "time_ids": time_ids.to(unet.dtype)}
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    training_noise, count = parts.training_noise, latents.shape[0]
    if training_noise is not None and parts.noise_timestep is None:  # training's timesteps: uniform over its schedule
        timestep = torch.randint(0, training_noise.config.num_train_timesteps, (count,), generator=parts.generator)
    else:
        timestep = torch.full((count,), parts.noise_timestep or 0, dtype=torch.long)
    timestep = timestep.to(latents.device)
    noisy, noise = latents, None
    if training_noise is not None or parts.noise_timestep is not None:
        noise = torch.randn(latents.shape, generator=parts.generator, dtype=latents.dtype).to(latents.device)
        noisy = (training_noise if training_noise is not None else scheduler).add_noise(latents, noise, timestep)
    prediction = unet(noisy.to(unet.dtype), timestep, encoder_hidden_states=states.to(unet.dtype), added_cond_kwargs=added).sample
    if training_noise is None:  # a statistics capture: the forward is what the hooks record
        return None
    kind = training_noise.config.prediction_type
    target = noise if kind == "epsilon" else training_noise.get_velocity(latents, noise, timestep) if kind == "v_prediction" else latents
    return prediction, target


def resolution(parts) -> int:
    """The pixel size the UNet was trained on: its latent size times the VAE's downsampling."""
    return parts.unet.config.sample_size * parts.vae_factor


def length(parts, encoder: str) -> None:
    """Each tokenizer's limit, else its encoder's position table (the feed's default)."""
    return None


def multiple(parts) -> int:
    return parts.vae_factor


COMMON = dict(denoiser="unet", optional=(), t5=None, forward=forward, training=training, resolution=resolution, length=length, multiple=multiple)
register(Family("sd", "Stable Diffusion", ("StableDiffusionPipeline",), encoders=(("text_encoder", "tokenizer"),), **COMMON))
register(Family("sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",),
                encoders=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), **COMMON))
