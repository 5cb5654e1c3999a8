"""The diffusion pipeline families cntinit captures, each in its own module: how a family's pipeline
turns a batch of images and prompts into its denoiser's inputs (as its pipeline and its training
scripts do), which components it has, and what it records as its layout. A new family is one new
module plus its import here.
"""

from __future__ import annotations

from . import flux, sd3, stable_diffusion
from .family import FAMILIES, Family

MODULES = (stable_diffusion, flux, sd3)  # each registers its families when imported


def of_pipeline(class_name: str | None, has_second_encoder: bool) -> Family:
    """The family of a pipeline by its model_index.json class; a Stable-Diffusion-style one of another
    class is SD 1.x/2.x, or SDXL when it has a second text encoder."""
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    return FAMILIES["sdxl" if has_second_encoder else "sd"]
