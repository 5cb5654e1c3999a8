"""Stable Diffusion 3 and 3.5: a diffusion transformer (MMDiT) trained by flow matching
(flow_matching.py), conditioned as StableDiffusion3Pipeline.encode_prompt conditions it: CLIP-L's
and CLIP-G's penultimate hidden states side by side (each prompt padded to 77 tokens), zero-padded
to T5's width and followed by T5's last hidden states (256 tokens, the pipeline's and sd-scripts'
default, or --t5-tokens; zeros of that length where the pipeline was saved without T5), and the two CLIPs' pooled projections side
by side. Latents are the VAE's posterior mean, shifted and scaled; the transformer reads the
timestep σ·N as the pipeline gives it.
"""

from __future__ import annotations

import torch

from . import flow_matching
from .family import Family, register

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length and sd-scripts' t5xxl_max_token_length


def forward(parts, pixel_values: torch.Tensor, ids: dict[str, torch.Tensor]):
    transformer = parts.transformer
    dtype = transformer.dtype
    clip_states, pooled = [], []
    for encoder in ("text_encoder", "text_encoder_2"):
        out = getattr(parts, encoder)(ids[encoder], output_hidden_states=True)
        pooled.append(out[0])
        clip_states.append(out.hidden_states[-2])
    clip = torch.cat(clip_states, dim=-1)
    if parts.text_encoder_3 is not None:
        t5 = parts.text_encoder_3(ids["text_encoder_3"])[0]
    else:
        t5 = torch.zeros(clip.shape[0], parts.t5_tokens, transformer.config.joint_attention_dim, dtype=clip.dtype, device=clip.device)
    states = torch.cat([torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(clip.dtype)], dim=-2)
    noised = flow_matching.noised(parts, flow_matching.latents(parts, pixel_values))
    prediction = transformer(hidden_states=noised.latents.to(dtype), timestep=noised.timestep.to(dtype),
                             encoder_hidden_states=states.to(dtype), pooled_projections=torch.cat(pooled, dim=-1).to(dtype)).sample
    return None if noised.target is None else (prediction, noised.target)


def resolution(parts) -> int:
    """The transformer's latent size times the VAE's downsampling (1024 for SD3)."""
    return parts.transformer.config.sample_size * parts.vae_factor


def length(parts, encoder: str) -> int | None:
    return T5_TOKENS if encoder == "text_encoder_3" else None


register(Family("sd3", "Stable Diffusion 3", ("StableDiffusion3Pipeline",), denoiser="transformer",
                encoders=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")),
                optional=("text_encoder_3",), t5="text_encoder_3", forward=forward, training=flow_matching.training, resolution=resolution, length=length,
                multiple=lambda parts: parts.vae_factor * parts.transformer.config.patch_size))
