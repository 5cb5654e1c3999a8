"""Every adapter format `cntinit export` writes, one module each, registered in registry.FORMATS:

    peft.py       PEFT (transformers models): adapter_model.safetensors + adapter_config.json
    kohya.py      sd-scripts (diffusion pipelines): one file, its per-architecture name maps
    diffusers.py  diffusers (diffusion pipelines): pytorch_lora_weights.safetensors

The imports below register them, in the order --format lists them.
"""

from . import peft, kohya, diffusers  # isort: skip (the order --format lists them in)
from .registry import BASE_DIR, FORMAT, FORMAT_VERSION, FORMATS, Adapter, Format, get

__all__ = ["peft", "kohya", "diffusers", "BASE_DIR", "FORMAT", "FORMAT_VERSION", "FORMATS", "Adapter", "Format", "get"]
