"""The feed of a diffusion pipeline: images (resized and center-cropped to the pipeline's resolution,
scaled to [−1, 1] as the pipelines do) and their captions, tokenized for each text encoder and padded
to the length its pipeline pads to; every prompt position counts (see models/pipelines.py)."""

from __future__ import annotations

from typing import Iterator

import torch

from ...errors import CntinitError
from ...models.loading import context_length
from ...models.pipelines import DiffusionParts
from . import images
from .feed import Batch, Feed, Shard

OPTIONS = ("prompt", "noise_timestep", "image_size", "t5_tokens")


def build(net: DiffusionParts, tokenizer, args, run_dtype: torch.dtype, shard: Shard = (0, 1)) -> Feed:
    steps = net.helpers["scheduler"].config.num_train_timesteps
    if args.noise_timestep is not None and not 0 <= args.noise_timestep < steps:
        raise CntinitError(f"--noise-timestep must be in [0, {steps}) for this scheduler, got {args.noise_timestep}")
    net.noise_timestep = args.noise_timestep
    size = args.image_size or net.resolution
    multiple = net.family.multiple(net)
    if size % multiple:
        raise CntinitError(f"--image-size {size} is not a multiple of {multiple}, which a {net.family.label} pipeline's latents need: "
                           f"give --image-size {max(multiple, size // multiple * multiple)}")
    pixels = images.Pixels(None, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pictures = images.read_pictures(args.data, args.max_samples, args.prompt, need_captions=True)
    lengths = _lengths(net, args.t5_tokens)

    def inputs(chunk):
        captions = [p.caption for p in chunk]
        return {"pixel_values": pixels([p.path for p in chunk])} | {
            name: tokenizer(captions, padding="max_length", max_length=lengths[name], truncation=True, return_tensors="pt")["input_ids"]
            for name, tokenizer in net.encoders}

    feed = images.feed(pictures, args.data, args.batch_size, args.buckets, inputs,
                       {"image_size": size, "prompt": args.prompt, "noise_timestep": args.noise_timestep, "seed": args.seed}
                       | ({"t5_tokens": net.t5_tokens} if net.t5_tokens is not None else {}), shard)
    batches = feed.batches

    def seeded() -> Iterator[Batch]:
        net.generator = torch.Generator().manual_seed(args.seed)  # here, so the probe's draw does not shift the noise
        yield from batches()

    feed.batches = seeded
    return feed


def _lengths(net: DiffusionParts, t5_tokens: int | None) -> dict[str, int | None]:
    """The tokens each text encoder's prompts are padded to: its pipeline's (T5's: `t5_tokens` when
    given), else its tokenizer's limit or its position table. Each encoder reads its own tokenizer's
    ids (they pad differently)."""
    family = net.family
    if t5_tokens is not None:
        if family.t5 is None:
            raise CntinitError(f"--t5-tokens sets the prompt length of a T5 text encoder, and a {family.label} pipeline has none: leave it out")
        if t5_tokens < 1:
            raise CntinitError(f"--t5-tokens must be a positive number of tokens, got {t5_tokens}")
    if family.t5 is not None:
        net.t5_tokens = t5_tokens or family.length(net, family.t5)
    return {name: (net.t5_tokens if name == family.t5 else family.length(net, name)) or context_length(getattr(net, name), tokenizer)
            for name, tokenizer in net.encoders}
