"""A diffusers Stable-Diffusion-style pipeline directory as one module whose attachment points
are named `unet.…` and `text_encoder.…` (so every stage and export can tell the components apart).

Calibration follows METHODS.md's special inputs: images → VAE latents (the posterior mean, times
the VAE's scaling factor) → UNet, clean by default (timestep 0) or noised to `noise_timestep`
by the pipeline's own scheduler; prompts → text encoder → the UNet's cross-attention. Prompts
are padded to the tokenizer's full length as the pipelines do, and the UNet attends to every
one of those states with no mask, so every position counts, padding included: the statistics
are those of the inputs the layers really see in training and generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import CntinitError, first_line

INDEX = "model_index.json"
COMPONENTS = ("unet", "text_encoder")  # the targets; the VAE only encodes images


def is_pipeline(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


class DiffusionParts(nn.Module):
    """UNet and text encoder as submodules; the VAE, tokenizer and scheduler alongside (not submodules,
    so their linears are never targets). `forward` runs one calibration batch."""

    def __init__(self, unet, text_encoder, vae, scheduler):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.helpers = {"vae": vae, "scheduler": scheduler}
        self.noise_timestep: int | None = None
        self.generator: torch.Generator | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def resolution(self) -> int:
        """The pixel size the UNet was trained on: its latent size times the VAE's downsampling."""
        vae = self.helpers["vae"]
        return self.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    def to(self, *args, **kwargs):
        # the VAE stays float32 (half-precision VAEs overflow on some images); only its device moves
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        if device is not None:
            self.helpers["vae"].to(device)
        return super().to(*args, **kwargs)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None) -> None:
        vae, scheduler = self.helpers["vae"], self.helpers["scheduler"]
        states = self.text_encoder(input_ids)[0]
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        timestep = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        if self.noise_timestep is not None:
            timestep += self.noise_timestep
            noise = torch.randn(latents.shape, generator=self.generator, dtype=latents.dtype).to(latents.device)
            latents = scheduler.add_noise(latents, noise, timestep)
        self.unet(latents.to(self.unet.dtype), timestep, encoder_hidden_states=states.to(self.unet.dtype))

    def save_pretrained(self, directory: Path, source: Path) -> None:
        """A pipeline directory: `source`'s files, with this UNet and text encoder (a residual base)."""
        import shutil

        shutil.copytree(source, directory, ignore=shutil.ignore_patterns("unet", "text_encoder"), dirs_exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.text_encoder.save_pretrained(directory / "text_encoder")


def load(path: str | Path) -> tuple[DiffusionParts, object]:
    """(DiffusionParts, tokenizer) from a local pipeline directory, each part in its saved dtype."""
    import diffusers
    import transformers

    path = Path(path)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    try:
        index = json.loads((path / INDEX).read_text())
        missing = [name for name in (*COMPONENTS, "vae", "tokenizer", "scheduler") if not (path / name).is_dir()]
        if missing:
            raise CntinitError(f"{path} lacks the pipeline component folder {missing[0]}: give a complete "
                               "Stable-Diffusion-style pipeline directory (unet, text_encoder, vae, tokenizer, scheduler)")

        def component(name):
            library, class_name = index[name]
            module = diffusers if library == "diffusers" else transformers
            return getattr(module, class_name).from_pretrained(path / name)

        parts = DiffusionParts(component("unet"), component("text_encoder"), component("vae"), component("scheduler"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path / "tokenizer")
    except CntinitError:
        raise
    except Exception as exc:
        raise CntinitError(f"could not load the pipeline at {path}: {first_line(exc)} — give a directory "
                           "DiffusionPipeline.save_pretrained wrote") from None
    parts.eval().requires_grad_(False)
    parts.helpers["vae"].eval().requires_grad_(False).float()
    return parts, tokenizer
