"""What a diffusion pipeline family is (`Family`) and the registry the families add themselves to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...registry import Registry


@dataclass(frozen=True)
class Family:
    """One kind of diffusers pipeline, as `models/pipelines.py` loads and runs it."""

    name: str  # the model record's layout (export's kohya names follow it); "sd" is recorded as no layout
    label: str  # in messages: "Flux", "Stable Diffusion 3"
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s it is (the first: what a directory without one is)
    denoiser: str  # its denoiser component: "unet" or "transformer"
    encoders: tuple[tuple[str, str], ...]  # (text encoder, its tokenizer), in the pipeline's order
    optional: tuple[str, ...]  # encoders a pipeline may be saved without (SD3's T5): model_index.json says null
    t5: str | None  # its T5 text encoder, whose prompt length --t5-tokens sets (None: it has none)
    forward: Callable  # (parts, pixel_values, ids by encoder) -> None, or (prediction, target) with training noise
    training: Callable  # (parts) -> the schedule that noises latents as training does (refusing one it has no loss for)
    resolution: Callable  # (parts) -> the pixel size it generates by default
    length: Callable  # (parts, encoder) -> the tokens the pipeline pads that encoder's prompts to (None: the tokenizer's limit)
    multiple: Callable  # (parts) -> what an image side must be a multiple of (latent packing, patches)

    @property
    def components(self) -> tuple[str, ...]:
        """Its adaptable parts: the denoiser, then the text encoders."""
        return (self.denoiser, *(encoder for encoder, _ in self.encoders))


FAMILIES: Registry[Family] = Registry("layout")
register = FAMILIES.add
