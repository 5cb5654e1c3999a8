"""What the capture loop forwards, one module per kind of model input (`loading.modality`): text
(text.py, reading samples.py), images for a vision encoder (vision.py), images with prompts for a
diffusion pipeline (diffusion.py, both reading images.py), and records with images for a
vision-language model (vlm.py, through the model's processor). A feed module has `build(net, tokenizer,
args, run_dtype, shard) -> Feed` and `OPTIONS`, the capture options only some kinds read; a new kind
is its module and its line in FEEDS.
"""

from __future__ import annotations

from ...errors import CntinitError
from . import diffusion, text, vision, vlm
from .feed import Feed

FEEDS = {"text": text, "vision": vision, "diffusion": diffusion, "vlm": vlm}  # model kind -> its feed module
# the options some kinds take, as the command line names them, in the order a refusal names the first
KIND_OPTIONS = {"prompt": "--prompt", "noise_timestep": "--noise-timestep", "t5_tokens": "--t5-tokens", "image_size": "--image-size", "pack": "--pack",
                "sample_max_norm": "--sample-max-norm", "split": "--split", "data_config": "--data-config",
                "shuffle_seed": "--shuffle-seed"}


def refuse_foreign_options(kind: str, args, model) -> None:
    """An option set for another kind of model than `kind` (a --prompt for a text model) is refused."""
    wrong = [flag for name, flag in KIND_OPTIONS.items()
             if getattr(args, name) is not None and getattr(args, name) is not False and name not in FEEDS[kind].OPTIONS]
    if wrong:
        raise CntinitError(f"{wrong[0]} does not apply to a {kind} model ({model}): leave it out")


def build(kind: str, net, tokenizer, args, run_dtype, shard) -> Feed:
    return FEEDS[kind].build(net, tokenizer, args, run_dtype, shard)
