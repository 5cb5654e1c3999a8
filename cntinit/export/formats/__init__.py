"""Every adapter format `cntinit export` writes, one module each, registered in registry.FORMATS:

    peft.py       PEFT (transformers models): adapter_model.safetensors + adapter_config.json
    kohya.py      sd-scripts (diffusion pipelines): one file, its per-architecture name maps
    diffusers.py  diffusers (diffusion pipelines): pytorch_lora_weights.safetensors

The imports below register them, in the order --format lists them.
"""

from . import peft, kohya, diffusers  # isort: skip
from .registry import BASE_DIR, FORMATS, Adapter, Format, get

MODULES = (peft, kohya, diffusers)  # imported in this order: --format lists them so
__all__ = ["BASE_DIR", "FORMATS", "Adapter", "Format", "get"]
