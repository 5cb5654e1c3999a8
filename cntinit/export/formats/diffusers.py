"""diffusers' LoRA format, for diffusion pipelines: pytorch_lora_weights.safetensors with `unet.…`/
`text_encoder.…` module keys, which `pipe.load_lora_weights` reads at α = r (scale 1) per module, as
diffusers does for files without alphas."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from . import peft
from .registry import Adapter, Format, register

FILE = "pytorch_lora_weights.safetensors"


def key(name: str, manifest: dict, prefix: str) -> str:
    return name


def write(directory: Path, adapter: Adapter) -> None:
    save_file(adapter.tensors, directory / FILE, metadata={"format": "pt"})


register(Format("diffusers", FILE, pipelines=True, client="diffusers", key=key, tensors=peft.tensors, write=write,
                how_to_load=peft.how_to_load, lacks=("--rslora", "--dora", "--module-prefix", "--task-type"), fixed_scale=True))
