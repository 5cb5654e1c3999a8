"""What the capture loop forwards: batches of model inputs from text, from images (vision
encoders), or from images with prompts (diffusion pipelines), with what the store records of them.

Text batches carry a padding mask (padding is dropped from the statistics); image batches have
no padding, and in a diffusion pipeline every prompt position counts (see `pipelines`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import data as data_mod
from . import images, models, pipelines
from .console import warn
from .errors import CntinitError, first_line

# (bucket, model inputs, padding mask or None, which tokens are next-token targets — None: every real one)
Batch = tuple[int, dict[str, torch.Tensor], "torch.Tensor | None", "torch.Tensor | None"]


@dataclass
class Feed:
    probe: dict[str, torch.Tensor]  # one small input: finds which targets read the same tensor
    total: int  # samples, for the progress bar
    unit: str  # "tok" or "img", for the rate
    batches: Callable[[], Iterator[Batch]]
    data: dict  # the store manifest's data section
    settings: dict = field(default_factory=dict)  # extra capture settings to record


Shard = tuple[int, int]  # (index, count): this process's share of the data, as `--shard index/count`


def _share(part: range, shard: Shard) -> range:
    """Shard `index` of `count`'s contiguous share of one bucket: bucket j of the merged shards is
    then bucket j of one run over all the data."""
    index, count = shard
    return range(part.start + round(index * len(part) / count), part.start + round((index + 1) * len(part) / count))


def _shard_total(sizes: list[int], shard: Shard) -> int:
    total = sum(len(_share(range(size), shard)) for size in sizes)
    if total == 0:
        raise CntinitError(f"--shard {shard[0]}/{shard[1]} gets no samples of the {sum(sizes)}: use fewer shards")
    return total


def _slices(count: int, buckets: int) -> list[range]:
    """`buckets` consecutive, near-equal slices of range(count)."""
    if buckets > count:
        raise CntinitError(f"--buckets {buckets} is more than the {count} samples: lower --buckets")
    bounds = [round(i * count / buckets) for i in range(buckets + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(buckets)]


def text(net, tokenizer, data, *, seq_len: int, batch_size: int, buckets: int, max_samples, pack: bool,
         text_field: str, shard: Shard = (0, 1)) -> Feed:
    if tokenizer is None:
        raise CntinitError("this model has no tokenizer, so it cannot read text: give --data a folder of images "
                           "(a vision model) or add the tokenizer files to its directory")
    samples = data_mod.read_samples(data, text_field, max_samples)
    context = models.context_length(net, tokenizer)
    if context is not None and seq_len > context:
        warn(f"--seq-len {seq_len} is longer than the model's context ({context} tokens): using {context}")
        seq_len = context
    sequences = data_mod.tokenize(samples, tokenizer, seq_len, pack)
    if not sequences:
        raise CntinitError(f"no sample of {data} has any token: give non-empty text")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _refuse_foreign_ids(net, max(pad_id, *(max(sequence) for sequence in sequences)))
    every = data_mod.split_buckets(sequences, buckets)
    total = _shard_total([len(part) for part in every], shard)
    parts = [[part[i] for i in _share(range(len(part)), shard)] for part in every]

    def batches() -> Iterator[Batch]:
        for bucket, part in enumerate(parts):
            for ids, mask, targets in data_mod.batches(part, batch_size, pad_id):
                yield bucket, {"input_ids": ids, "attention_mask": mask}, mask, targets

    probe = torch.tensor([sequences[0][:8]])
    source = str(data) if str(data) == "-" else str(Path(data).absolute())
    return Feed({"input_ids": probe, "attention_mask": torch.ones_like(probe)}, total, "tok", batches,
                {"fingerprint": data_mod.fingerprint(samples), "sources": [source], "samples": len(samples),
                 "sequences": total}, {"seq_len": seq_len, "pack": pack})


def _refuse_foreign_ids(net, largest: int) -> None:
    """A tokenizer of another model (its files copied beside these weights) gives ids the embeddings
    lack: refused before any work, where the forward stopped with torch's IndexError."""
    try:
        rows = net.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return
    if largest >= rows:
        raise CntinitError(f"the tokenizer gives token id {largest}, but the model's embeddings have {rows} rows: its tokenizer "
                           "files are another model's; put the model's own tokenizer beside its weights")


def vision(net, model_dir: Path, data, *, batch_size: int, buckets: int, max_samples, dtype: torch.dtype,
           image_size: int | None, image_mean, image_std, shard: Shard = (0, 1)) -> Feed:
    """A vision encoder's `pixel_values`, preprocessed by the model's own image processor config when
    its directory has one (unless --image-size overrides it)."""
    processor = None
    if image_size is None and (Path(model_dir) / "preprocessor_config.json").is_file():
        import transformers

        try:
            processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        except Exception as exc:
            raise CntinitError(f"could not load the image processor at {model_dir}: {first_line(exc)} — put the model's own "
                               "preprocessor_config.json beside its weights, or give --image-size to preprocess without it") from None
    pixels = images.Pixels(processor, image_size, image_mean, image_std)
    pictures = images.read_pictures(data, max_samples)
    return _image_feed(pictures, data, batch_size, buckets, lambda chunk: {"pixel_values": pixels([p.path for p in chunk]).to(dtype)},
                       {"image_size": image_size, "image_processor": processor is not None}, shard)


def diffusion(net: pipelines.DiffusionParts, tokenizer, data, *, batch_size: int, buckets: int, max_samples,
              image_size: int | None, prompt: str | None, noise_timestep: int | None, seed: int, shard: Shard = (0, 1)) -> Feed:
    """Images (resized and center-cropped to the UNet's resolution, scaled to [−1, 1] as the pipelines
    do) and their captions, padded to the tokenizer's length."""
    steps = net.helpers["scheduler"].config.num_train_timesteps
    if noise_timestep is not None and not 0 <= noise_timestep < steps:
        raise CntinitError(f"--noise-timestep must be in [0, {steps}) for this scheduler, got {noise_timestep}")
    net.noise_timestep = noise_timestep
    size = image_size or net.resolution
    pixels = images.Pixels(None, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pictures = images.read_pictures(data, max_samples, prompt, need_captions=True)
    encoders = [("input_ids", net.text_encoder, tokenizer)]
    if net.text_encoder_2 is not None:  # SDXL: each encoder reads its own tokenizer's ids (they pad differently)
        encoders.append(("input_ids_2", net.text_encoder_2, net.helpers["tokenizer_2"]))
    # each tokenizer's limit, else its encoder's position table
    lengths = {key: models.context_length(encoder, encoder_tokenizer) for key, encoder, encoder_tokenizer in encoders}

    def inputs(chunk):
        captions = [p.caption for p in chunk]
        return {"pixel_values": pixels([p.path for p in chunk])} | {
            key: encoder_tokenizer(captions, padding="max_length", max_length=lengths[key], truncation=True, return_tensors="pt")["input_ids"]
            for key, _, encoder_tokenizer in encoders}

    feed = _image_feed(pictures, data, batch_size, buckets, inputs,
                       {"image_size": size, "prompt": prompt, "noise_timestep": noise_timestep, "seed": seed}, shard)
    batches = feed.batches

    def seeded() -> Iterator[Batch]:
        net.generator = torch.Generator().manual_seed(seed)  # here, so the probe's draw does not shift the noise
        yield from batches()

    feed.batches = seeded
    return feed


def _image_feed(pictures, data, batch_size: int, buckets: int, inputs, settings: dict, shard: Shard) -> Feed:
    every = _slices(len(pictures), buckets)
    total = _shard_total([len(part) for part in every], shard)
    parts = [_share(part, shard) for part in every]

    def batches() -> Iterator[Batch]:
        for bucket, part in enumerate(parts):
            for start in range(part.start, part.stop, batch_size):
                yield bucket, inputs(pictures[start : min(start + batch_size, part.stop)]), None, None

    return Feed(inputs(pictures[:1]), total, "img", batches,
                {"fingerprint": images.fingerprint(pictures, data), "sources": [str(Path(data).absolute())],
                 "samples": len(pictures), "sequences": total}, settings)
