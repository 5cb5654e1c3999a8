"""The feed of a vision encoder: images as `pixel_values`, preprocessed by the model's own image
processor config when its directory has one (unless --image-size overrides it); no padding."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CntinitError, first_line
from . import images
from .feed import Feed, Shard

OPTIONS = ("image_size", "sample_max_norm")


def build(net, tokenizer, args, run_dtype: torch.dtype, shard: Shard = (0, 1)) -> Feed:
    processor = None
    if args.image_size is None and (Path(args.model) / "preprocessor_config.json").is_file():
        import transformers

        try:
            processor = transformers.AutoImageProcessor.from_pretrained(args.model)
        except Exception as exc:
            raise CntinitError(f"could not load the image processor at {args.model}: {first_line(exc)} — put the model's own "
                               "preprocessor_config.json beside its weights, or give --image-size to preprocess without it") from None
    pixels = images.Pixels(processor, args.image_size, args.image_mean, args.image_std)
    pictures = images.read_pictures(args.data, args.max_samples)
    return images.feed(pictures, args.data, args.batch_size, args.buckets,
                       lambda chunk: {"pixel_values": pixels([p.path for p in chunk]).to(run_dtype)},
                       {"image_size": args.image_size, "image_processor": processor is not None}, shard)
