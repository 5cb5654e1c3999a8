"""A diffusers pipeline directory as one module whose attachment points are named by component —
`unet.…` or `transformer.…`, `text_encoder.…`, `text_encoder_2.…`, `text_encoder_3.…` — so every
stage and export can tell the components apart. Which components a pipeline has and how a batch
of images and prompts becomes its denoiser's inputs is its family's (families/: Stable Diffusion
1.x/2.x and SDXL, Flux, Stable Diffusion 3), as its own pipeline and training scripts do it.

Prompts are padded to each tokenizer's full length as the pipelines do, and the denoiser attends to
every one of those states with no mask, so every position counts, padding included: the statistics
are those of the inputs the layers really see in training and generation. Calibration latents are
clean by default (paper option b) or noised to `noise_timestep`; with --gradients the forward also
gives the family's training loss (its prediction and target).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CntinitError, first_line
from . import weight_files
from .families import Family, of_pipeline

INDEX = "model_index.json"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # every family's adaptable parts
HELPERS = ("vae", "scheduler")  # every family's other parts: the VAE only encodes images


def is_pipeline(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


class DiffusionParts(nn.Module):
    """The denoiser and text encoder(s) as submodules (absent ones None); the VAE, scheduler and the
    tokenizers alongside (not submodules, so their linears are never targets). `forward` runs one
    calibration batch as the pipeline's `family` does."""

    def __init__(self, family: Family, parts: dict[str, nn.Module | None], vae, scheduler, tokenizers: dict):
        super().__init__()
        self.family = family
        for name in COMPONENTS:
            setattr(self, name, parts.get(name))
        self.helpers = {"vae": vae, "scheduler": scheduler, "tokenizers": tokenizers}
        self.noise_timestep: int | None = None
        self.t5_tokens: int | None = None  # the length T5 prompts are padded to (set by the feed)
        self.generator: torch.Generator | None = None
        self.training_noise = None  # --gradients: the schedule that noises latents as training does

    def noise_as_training(self) -> None:
        """Noise every batch as training does (`forward` then returns the prediction and its target)."""
        self.training_noise = self.family.training(self)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.family.denoiser)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def components(self) -> list[str]:
        """The parts this pipeline has, of COMPONENTS."""
        return [name for name in COMPONENTS if getattr(self, name) is not None]

    @property
    def encoders(self) -> list[tuple[str, object]]:
        """(text encoder, its tokenizer) for each text encoder the pipeline has, in its order."""
        return [(name, self.helpers["tokenizers"][tokenizer]) for name, tokenizer in self.family.encoders if getattr(self, name) is not None]

    @property
    def vae_factor(self) -> int:
        """How many pixels one latent pixel covers per side."""
        return 2 ** (len(self.helpers["vae"].config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The pixel size the pipeline generates by default."""
        return self.family.resolution(self)

    def to(self, *args, **kwargs):
        # the VAE stays float32 (half-precision VAEs overflow on some images); only its device moves
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        if device is not None:
            self.helpers["vae"].to(device)
        return super().to(*args, **kwargs)

    def forward(self, pixel_values: torch.Tensor, attention_mask=None, **ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One calibration batch (`ids` by text encoder) through the denoiser; with `training_noise`,
        (the denoiser's prediction, its training target)."""
        return self.family.forward(self, pixel_values, ids)

    def save_pretrained(self, directory: Path, source: Path) -> None:
        """A pipeline directory: `source`'s files, with these denoiser and text encoder(s) (a residual base)."""
        import shutil

        shutil.copytree(source, directory, ignore=shutil.ignore_patterns(*self.components), dirs_exist_ok=True)
        for name in self.components:
            getattr(self, name).save_pretrained(directory / name)


def family_of(path: Path) -> tuple[Family, dict]:
    """The family of the pipeline at `path`, and its model_index.json."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise CntinitError(f"could not read {path / INDEX}: {first_line(exc)} — give a directory DiffusionPipeline.save_pretrained wrote") from None
    if not isinstance(index, dict):
        raise CntinitError(f"{path / INDEX} is not a JSON object of components: give a directory DiffusionPipeline.save_pretrained wrote")
    present = {name for name, entry in index.items() if isinstance(entry, list) and entry and entry[0] is not None}
    return of_pipeline(index.get("_class_name"), "text_encoder_2" in present), index


def load(path: str | Path) -> tuple[DiffusionParts, object]:
    """(DiffusionParts, its first tokenizer) from a local pipeline directory, each part in its saved dtype."""
    import diffusers
    import transformers

    path = Path(path)
    for library in (transformers, diffusers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
    family, index = family_of(path)
    absent = {name for name in family.optional if not (index.get(name) or [None])[0]}
    wanted = [family.denoiser, *HELPERS, *(name for pair in family.encoders if pair[0] not in absent for name in pair)]
    missing = [name for name in wanted if not (path / name).is_dir()]
    if missing:
        raise CntinitError(f"{path} lacks the pipeline component folder {missing[0]}: give a complete {family.label} pipeline "
                           f"directory ({', '.join(wanted)})")
    try:
        parts = {name: _component(path, index, name) for name in family.components if name not in absent}
        vae, scheduler = _component(path, index, "vae"), _component(path, index, "scheduler")
    except CntinitError:
        raise
    except Exception as exc:
        raise CntinitError(f"could not load the pipeline at {path}: {first_line(exc)} — give a directory "
                           "DiffusionPipeline.save_pretrained wrote") from None
    tokenizers = {tokenizer: _tokenizer(path, tokenizer) for encoder, tokenizer in family.encoders if encoder not in absent}
    net = DiffusionParts(family, parts, vae, scheduler, tokenizers)
    net.eval().requires_grad_(False)
    vae.eval().requires_grad_(False).float()
    return net, tokenizers[family.encoders[0][1]]


def _component(path: Path, index: dict, name: str):
    """One component as model_index.json names its class: weights checked complete and unquantized."""
    import diffusers
    import transformers

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


def _tokenizer(path: Path, name: str):
    """A tokenizer folder of the pipeline; one that cannot be loaded (T5's needs its tokenizer.json, or
    spiece.model with sentencepiece installed) is named in the error."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path / name)
    except Exception as exc:
        raise CntinitError(f"could not load the tokenizer at {path / name}: {first_line(exc)} — put the pipeline's own tokenizer files "
                           "there (for T5: tokenizer.json, or spiece.model with sentencepiece installed)") from None
