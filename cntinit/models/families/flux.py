"""FLUX.1 (dev and schnell): a diffusion transformer trained by flow matching (flow_matching.py),
conditioned as FluxPipeline.encode_prompt conditions it — CLIP's pooled output (its prompt padded
to CLIP's 77 tokens) and T5's last hidden states (padded to 512 tokens for dev, 256 for schnell, as
sd-scripts pads them, or to --t5-tokens; no attention mask, as the pipeline and sd-scripts' default run T5), text ids
all zero.

Latents (the VAE's posterior mean, shifted and scaled) are packed into 2×2 patches with their
image ids as FluxPipeline packs them; dev (a transformer with a guidance embedding) is told
guidance 3.5, the pipeline's and sd-scripts' default; the transformer reads the timestep
σ·N/1000. Training's target, the velocity n − x₀, is packed alike.
"""

from __future__ import annotations

import torch

from . import flow_matching
from .family import Family, register

GUIDANCE = 3.5  # FluxPipeline's guidance_scale and sd-scripts' --guidance_scale default
T5_TOKENS = {True: 512, False: 256}  # by whether the transformer embeds guidance (dev) or not (schnell), as sd-scripts pads T5


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(height: int, width: int) -> torch.Tensor:
    """Each packed patch's (0, row, column): FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def forward(parts, pixel_values: torch.Tensor, ids: dict[str, torch.Tensor]):
    transformer = parts.transformer
    dtype = transformer.dtype
    pooled = parts.text_encoder(ids["text_encoder"], output_hidden_states=False).pooler_output
    states = parts.text_encoder_2(ids["text_encoder_2"], output_hidden_states=False)[0]
    clean = flow_matching.latents(parts, pixel_values)
    noised = flow_matching.noised(parts, clean)
    count, _, height, width = clean.shape
    guidance = torch.full((count,), GUIDANCE, dtype=torch.float32, device=clean.device) if transformer.config.guidance_embeds else None
    prediction = transformer(
        hidden_states=pack(noised.latents).to(dtype), timestep=(noised.timestep / 1000).to(dtype), guidance=guidance,
        pooled_projections=pooled.to(dtype), encoder_hidden_states=states.to(dtype),
        txt_ids=torch.zeros(states.shape[1], 3, device=clean.device, dtype=dtype),
        img_ids=image_ids(height // 2, width // 2).to(clean.device, dtype), return_dict=False)[0]
    return None if noised.target is None else (prediction, pack(noised.target))


def resolution(parts) -> int:
    """FluxPipeline's default: 128 latent pixels times the VAE's downsampling (1024 for FLUX.1)."""
    return 128 * parts.vae_factor


def length(parts, encoder: str) -> int | None:
    return T5_TOKENS[bool(parts.transformer.config.guidance_embeds)] if encoder == "text_encoder_2" else None


register(Family("flux", "Flux", ("FluxPipeline",), denoiser="transformer",
                encoders=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), optional=(), t5="text_encoder_2",
                forward=forward, training=flow_matching.training, resolution=resolution, length=length,
                multiple=lambda parts: 2 * parts.vae_factor))
