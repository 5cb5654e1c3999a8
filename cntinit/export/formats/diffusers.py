"""diffusers' LoRA format, for diffusion pipelines: pytorch_lora_weights.safetensors with `unet.…`/
`transformer.…`/`text_encoder.…` module keys, which `pipe.load_lora_weights` reads at α = r (scale 1)
per module, as diffusers does for files without alphas. diffusers' Flux and SD3 loaders load no T5
adapter (Flux's text_encoder_2, SD3's text_encoder_3): modules there are refused."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ...errors import CntinitError
from . import peft
from .registry import Adapter, Format, register

FILE = "pytorch_lora_weights.safetensors"


# the T5 encoder, which diffusers' loader of each layout skips, and the targets that leave it out
UNLOADED = {"flux": ("text_encoder_2.", "re:(transformer|text_encoder)\\..*"),
            "sd3": ("text_encoder_3.", "re:(transformer|text_encoder|text_encoder_2)\\..*")}


def key(name: str, manifest: dict, prefix: str) -> str:
    t5, targets = UNLOADED.get(manifest["model"].get("layout"), (None, None))
    if t5 is not None and name.startswith(t5):
        raise CntinitError(f"{name} is in the T5 text encoder, which diffusers' load_lora_weights does not load for this pipeline: "
                           f"export --format kohya (sd-scripts trains T5 as lora_te3), or solve without T5 targets "
                           f"(--targets '{targets}')")
    return name


def write(directory: Path, adapter: Adapter) -> None:
    save_file(adapter.tensors, directory / FILE, metadata={"format": "pt"})


register(Format("diffusers", FILE, pipelines=True, client="diffusers", key=key, tensors=peft.tensors, write=write,
                how_to_load=peft.how_to_load, lacks=("--rslora", "--dora", "--module-prefix", "--task-type"), fixed_scale=True))
