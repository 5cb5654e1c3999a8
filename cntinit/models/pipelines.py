"""A diffusers Stable-Diffusion-style pipeline directory as one module whose attachment points
are named `unet.…`, `text_encoder.…` and, for SDXL, `text_encoder_2.…` (so every stage and export
can tell the components apart).

Calibration follows METHODS.md's special inputs: images → VAE latents (the posterior mean, times
the VAE's scaling factor) → UNet, clean by default (timestep 0) or noised to `noise_timestep`
by the pipeline's own scheduler; prompts → text encoder → the UNet's cross-attention. Prompts
are padded to the tokenizer's full length as the pipelines do, and the UNet attends to every
one of those states with no mask, so every position counts, padding included: the statistics
are those of the inputs the layers really see in training and generation.

SDXL (a pipeline with `text_encoder_2`) conditions as its pipeline and training scripts do: the
UNet reads both encoders' penultimate hidden states side by side, plus `added_cond_kwargs` —
the second encoder's pooled projection and the micro-conditioning `time_ids` (original size =
target size = the calibration resolution, crop at 0, 0).

With --gradients the forward also gives the training loss: each image's latents noised as the
training scripts do (a DDPMScheduler of the pipeline's scheduler config) at a timestep drawn
uniformly from [0, num_train_timesteps) — or at --noise-timestep — and the squared error of the
UNet's prediction against its target (the noise for `epsilon`, the velocity for `v_prediction`,
the latents for `sample`). Timesteps are drawn first, then the noise, from the capture's generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CntinitError, first_line
from . import weight_files

INDEX = "model_index.json"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the targets (SDXL has the third); the VAE only encodes images
REQUIRED = ("unet", "text_encoder", "vae", "tokenizer", "scheduler")
SDXL = "sdxl"  # the model record's layout for a pipeline with two text encoders
PREDICTIONS = ("epsilon", "v_prediction", "sample")  # what a UNet may be trained to predict (the scheduler config says)


def is_pipeline(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


class DiffusionParts(nn.Module):
    """UNet and text encoder(s) as submodules; the VAE, scheduler and SDXL's second tokenizer
    alongside (not submodules, so their linears are never targets). `forward` runs one calibration batch."""

    def __init__(self, unet, text_encoder, vae, scheduler, text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
        self.helpers = {"vae": vae, "scheduler": scheduler, "tokenizer_2": tokenizer_2}
        self.noise_timestep: int | None = None
        self.generator: torch.Generator | None = None
        self.training_noise = None  # --gradients: the DDPMScheduler that noises latents as training does

    def noise_as_training(self) -> None:
        """Noise every batch as training does (`forward` then returns the prediction and its target)."""
        import diffusers

        schedule = diffusers.DDPMScheduler.from_config(self.helpers["scheduler"].config)
        if schedule.config.prediction_type not in PREDICTIONS:
            raise CntinitError(f"--gradients knows the denoising targets {', '.join(PREDICTIONS)}; this pipeline's scheduler predicts "
                               f"{schedule.config.prediction_type!r}: capture it without --gradients")
        self.training_noise = schedule

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def components(self) -> list[str]:
        """The parts this pipeline has, of COMPONENTS."""
        return [name for name in COMPONENTS if getattr(self, name) is not None]

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

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None,
                attention_mask=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One calibration batch through the UNet; with `training_noise`, (the UNet's prediction, its training target)."""
        vae, scheduler = self.helpers["vae"], self.helpers["scheduler"]
        added = None
        if self.text_encoder_2 is None:
            states = self.text_encoder(input_ids)[0]
        else:
            second = self.text_encoder_2(input_ids_2, output_hidden_states=True)
            states = torch.cat([self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2],
                                second.hidden_states[-2]], dim=-1)
            height, width = pixel_values.shape[-2:]
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=states.device).repeat(len(states), 1)
            added = {"text_embeds": second[0].to(self.unet.dtype), "time_ids": time_ids.to(self.unet.dtype)}
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        training, count = self.training_noise, latents.shape[0]
        if training is not None and self.noise_timestep is None:  # training's timesteps: uniform over its schedule
            timestep = torch.randint(0, training.config.num_train_timesteps, (count,), generator=self.generator)
        else:
            timestep = torch.full((count,), self.noise_timestep or 0, dtype=torch.long)
        timestep = timestep.to(latents.device)
        noisy, noise = latents, None
        if training is not None or self.noise_timestep is not None:
            noise = torch.randn(latents.shape, generator=self.generator, dtype=latents.dtype).to(latents.device)
            noisy = (training if training is not None else scheduler).add_noise(latents, noise, timestep)
        prediction = self.unet(noisy.to(self.unet.dtype), timestep, encoder_hidden_states=states.to(self.unet.dtype),
                               added_cond_kwargs=added).sample
        if training is None:  # a statistics capture: the forward is what the hooks record
            return None
        kind = training.config.prediction_type
        target = noise if kind == "epsilon" else training.get_velocity(latents, noise, timestep) if kind == "v_prediction" else latents
        return prediction, target

    def save_pretrained(self, directory: Path, source: Path) -> None:
        """A pipeline directory: `source`'s files, with this UNet and text encoder(s) (a residual base)."""
        import shutil

        shutil.copytree(source, directory, ignore=shutil.ignore_patterns(*self.components), dirs_exist_ok=True)
        for name in self.components:
            getattr(self, name).save_pretrained(directory / name)


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
        sdxl = (index.get("text_encoder_2") or [None])[0] is not None
        missing = [name for name in (*REQUIRED, *(("text_encoder_2", "tokenizer_2") if sdxl else ())) if not (path / name).is_dir()]
        if missing:
            raise CntinitError(f"{path} lacks the pipeline component folder {missing[0]}: give a complete "
                               "Stable-Diffusion-style pipeline directory (unet, text_encoder, vae, tokenizer, scheduler; "
                               "SDXL also text_encoder_2, tokenizer_2)")

        def component(name):
            library, class_name = index[name]
            module = diffusers if library == "diffusers" else transformers
            if name == "scheduler":
                scheduler = getattr(module, class_name).from_pretrained(path / name)
                steps = scheduler.config.num_train_timesteps
                if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                    raise CntinitError(f"{path / name} says num_train_timesteps {steps}: a scheduler trains over at least one timestep; "
                                       "put the pipeline's own scheduler_config.json there")
                return scheduler
            weight_files.refuse_quantized(path / name, json.loads((path / name / "config.json").read_text()))
            model, loading = getattr(module, class_name).from_pretrained(path / name, output_loading_info=True)
            weight_files.refuse_incomplete(path / name, loading["missing_keys"])  # diffusers refuses other shapes itself
            weight_files.refuse_codes(path / name, model, "diffusion_pytorch_model" if library == "diffusers" else "model")
            return model

        second = (component("text_encoder_2"), transformers.AutoTokenizer.from_pretrained(path / "tokenizer_2")) if sdxl else (None, None)
        parts = DiffusionParts(component("unet"), component("text_encoder"), component("vae"), component("scheduler"), *second)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path / "tokenizer")
    except CntinitError:
        raise
    except Exception as exc:
        raise CntinitError(f"could not load the pipeline at {path}: {first_line(exc)} — give a directory "
                           "DiffusionPipeline.save_pretrained wrote") from None
    parts.eval().requires_grad_(False)
    parts.helpers["vae"].eval().requires_grad_(False).float()
    return parts, tokenizer
