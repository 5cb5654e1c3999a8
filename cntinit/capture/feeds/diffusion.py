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

OPTIONS = ("prompt", "noise_timestep", "image_size")


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
    # each encoder reads its own tokenizer's ids (they pad differently), as long as its pipeline pads them
    lengths = {name: net.family.length(net, name, tokenizer) or context_length(getattr(net, name), tokenizer) for name, tokenizer in net.encoders}

    def inputs(chunk):
        captions = [p.caption for p in chunk]
        return {"pixel_values": pixels([p.path for p in chunk])} | {
            name: tokenizer(captions, padding="max_length", max_length=lengths[name], truncation=True, return_tensors="pt")["input_ids"]
            for name, tokenizer in net.encoders}

    feed = images.feed(pictures, args.data, args.batch_size, args.buckets, inputs,
                       {"image_size": size, "prompt": args.prompt, "noise_timestep": args.noise_timestep, "seed": args.seed}, shard)
    batches = feed.batches

    def seeded() -> Iterator[Batch]:
        net.generator = torch.Generator().manual_seed(args.seed)  # here, so the probe's draw does not shift the noise
        yield from batches()

    feed.batches = seeded
    return feed
