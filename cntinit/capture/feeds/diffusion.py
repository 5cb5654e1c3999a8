"""The feed of a diffusion pipeline: images (resized and center-cropped to the UNet's resolution,
scaled to [−1, 1] as the pipelines do) and their captions, padded to each tokenizer's length; every
prompt position counts (see models/pipelines.py)."""

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
    pixels = images.Pixels(None, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pictures = images.read_pictures(args.data, args.max_samples, args.prompt, need_captions=True)
    encoders = [("input_ids", net.text_encoder, tokenizer)]
    if net.text_encoder_2 is not None:  # SDXL: each encoder reads its own tokenizer's ids (they pad differently)
        encoders.append(("input_ids_2", net.text_encoder_2, net.helpers["tokenizer_2"]))
    # each tokenizer's limit, else its encoder's position table
    lengths = {key: context_length(encoder, encoder_tokenizer) for key, encoder, encoder_tokenizer in encoders}

    def inputs(chunk):
        captions = [p.caption for p in chunk]
        return {"pixel_values": pixels([p.path for p in chunk])} | {
            key: encoder_tokenizer(captions, padding="max_length", max_length=lengths[key], truncation=True, return_tensors="pt")["input_ids"]
            for key, _, encoder_tokenizer in encoders}

    feed = images.feed(pictures, args.data, args.batch_size, args.buckets, inputs,
                       {"image_size": size, "prompt": args.prompt, "noise_timestep": args.noise_timestep, "seed": args.seed}, shard)
    batches = feed.batches

    def seeded() -> Iterator[Batch]:
        net.generator = torch.Generator().manual_seed(args.seed)  # here, so the probe's draw does not shift the noise
        yield from batches()

    feed.batches = seeded
    return feed
