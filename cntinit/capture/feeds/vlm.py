"""The feed of a vision-language model (LLaVA-style: a vision tower, a projector, a language model):
records with images and text (records/), preprocessed by the model's own processor — chat template
applied, image placeholders expanded — exactly as its trainer's collator does, so every layer of
both towers sees the inputs it sees in training. Padding is dropped from the language model's
statistics; the vision tower's and projector's rows are image patches, all of them real.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import torch

from ...console import log
from ...errors import CntinitError, first_line
from ...records import Sample, fingerprint, read
from . import images
from .feed import Batch, Feed, Shard, shard_total, share, slices, text_settings

OPTIONS = ("split", "data_config", "shuffle_seed")  # the text options beside the shared ones; --pack would cut images apart
INPUTS = ("input_ids", "attention_mask")  # padded per sequence; the processor's other outputs (pixels, grids) are concatenated


def build(net, processor, args, run_dtype: torch.dtype, shard: Shard = (0, 1)) -> Feed:
    """The records of `args.data` with their images as batches of `args.batch_size` processed sequences."""
    chosen = read(args.data, args.text_field, args.split, args.max_samples, args.shuffle_seed, images=True, config=args.data_config)
    for sample in chosen.samples:
        for path in sample.images:
            if not Path(path).is_file():
                raise CntinitError(f"{sample.origin}: image {path} does not exist: fix the path (relative to the record's file)")
            try:
                images.open_rgb(Path(path), header_only=True)
            except CntinitError as exc:
                raise CntinitError(f"{sample.origin}: {exc}") from None
    coder = Coder(processor, args.seq_len)
    rendered = [(sample, coder.texts(sample)) for sample in chosen.samples]  # placeholders checked against the images before any work
    text_only = sum(not sample.images for sample in chosen.samples)
    if text_only:
        log(f"{text_only} of {len(chosen.samples)} records have no image: their text runs through the language model alone")
    every = [[rendered[i] for i in part] for part in slices(len(rendered), args.buckets)]
    parts = [[part[i] for i in share(range(len(part)), shard)] for part in every]
    total = shard_total([len(part) for part in every], shard)
    prefix = language_model_prefix(net)

    def batches() -> Iterator[Batch]:
        for bucket, part in enumerate(parts):
            for start in range(0, len(part), args.batch_size):
                inputs, targets = coder.batch(part[start : start + args.batch_size], run_dtype)
                yield bucket, inputs, inputs["attention_mask"], targets

    probe, _ = coder.batch(rendered[:1], run_dtype)
    return Feed(probe, total, "tok", batches, chosen.manifest(_fingerprint(chosen.samples), total),
                text_settings(args.seq_len, False, args.shuffle_seed), unpadded=lambda name: not name.startswith(prefix))


def language_model_prefix(net) -> str:
    """The module path (with its dot) under which the language model lies: its inputs are padded tokens."""
    decoder = net.get_decoder() if hasattr(net, "get_decoder") else None
    found = next((name for name, module in net.named_modules() if module is decoder and name), None)
    if found is None:
        raise CntinitError(f"cannot tell {type(net).__name__}'s language model from its vision tower (no get_decoder): "
                           "this vision-language model is not supported yet")
    return found + "."


class Coder:
    """Records to the model's inputs with the processor: the text (chat template rendered, an image
    placeholder per image where the text has none), the images, and which tokens are targets."""

    def __init__(self, processor, seq_len: int):
        self.processor, self.seq_len = processor, seq_len
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "right"  # the recorder drops padding at the end of each row
        self.placeholder = getattr(processor, "image_token", None)
        if self.placeholder is None:
            raise CntinitError(f"the processor {type(processor).__name__} names no image token: this vision-language model is not "
                               "supported yet")
        added = self.tokenizer.get_added_vocab() if hasattr(self.tokenizer, "get_added_vocab") else {}
        self.image_ids = torch.tensor(sorted({self.tokenizer.convert_tokens_to_ids(self.placeholder)} |
                                             {i for token, i in added.items() if "image" in token or "vision" in token}))

    def texts(self, sample: Sample) -> tuple[str, str | None]:
        """(the sample's whole text, its prompt's or None), as the processor reads them."""
        whole, prompt = (self._render(sample.content, False), self._render(sample.prompt, True) if sample.prompt is not None else None)
        if sample.images and not sample.is_chat and self.placeholder not in whole:  # a plain text record: the images lead
            lead = (self.placeholder * len(sample.images)) + "\n"
            whole, prompt = lead + whole, (lead + prompt if prompt is not None else None)
        found = whole.count(self.placeholder)
        if found != len(sample.images):
            raise CntinitError(f"{sample.origin}: {found} image placeholders ({self.placeholder}) for {len(sample.images)} images: give "
                               "one image entry per image in the messages, or leave the placeholders out of a text record")
        return whole, prompt

    def _render(self, content, prompt: bool) -> str:
        if isinstance(content, str):
            return content
        try:
            return self.processor.apply_chat_template(content, tokenize=False, add_generation_prompt=prompt)
        except Exception as exc:
            raise CntinitError(f"the processor's chat template rejected these messages ({exc}): give messages as its trainer "
                               "writes them") from None

    def batch(self, chunk: list[tuple[Sample, tuple[str, str | None]]], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the processor's inputs for `chunk` — records with their `texts` — right-padded and cut to --seq-len;
        which tokens are targets)."""
        samples = [sample for sample, _ in chunk]
        pictures = [[images.open_rgb(Path(path)) for path in sample.images] for sample in samples]
        inputs = self._processed([whole for _, (whole, _) in chunk], [picture for own in pictures for picture in own], samples)
        inputs = self._cut(inputs, samples)
        targets = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], self.image_ids)
        for row, ((sample, (_, prompt)), own) in enumerate(zip(chunk, pictures)):
            if prompt is not None:  # the prompt's tokens, images expanded, are context
                alone = self._processed([prompt], own, [sample])
                targets[row, : alone["input_ids"].shape[1]] = False
        return {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}, targets

    def _processed(self, texts: list[str], pictures: list, chunk: list[Sample]) -> dict[str, torch.Tensor]:
        """The processor's model inputs (its training labels left out: the loss here is cntinit's)."""
        try:
            out = self.processor(text=texts, images=pictures or None, return_tensors="pt", padding=True)
        except Exception as exc:
            where = chunk[0].origin if len(chunk) == 1 else f"{chunk[0].origin} … {chunk[-1].origin}"
            raise CntinitError(f"{where}: the model's processor refused these records ({first_line(exc)}): give records as its "
                               "trainer does (some models take no record without an image)") from None
        return {name: value for name, value in out.items() if name != "labels"}

    def _cut(self, inputs: dict, chunk: list[Sample]) -> dict:
        """Sequences cut to --seq-len, as truncation would, unless that cuts an image's tokens."""
        ids = inputs["input_ids"]
        if ids.shape[1] <= self.seq_len:
            return inputs
        kept = torch.isin(ids[:, : self.seq_len], self.image_ids).sum(1)
        whole = torch.isin(ids, self.image_ids).sum(1)
        if bool((kept != whole).any()):
            sample = chunk[int((kept != whole).nonzero()[0])]
            raise CntinitError(f"{sample.origin}: its image tokens reach past --seq-len {self.seq_len}: raise --seq-len (the images "
                               f"alone take {int(whole.max())} tokens)")
        return {name: value[:, : self.seq_len] if value.dim() == 2 and value.shape == ids.shape else value for name, value in inputs.items()}


def _fingerprint(samples: list[Sample]) -> str:
    """The records' fingerprint, and each image's bytes in order."""
    digest = hashlib.sha256(fingerprint(samples).encode())
    for sample in samples:
        for path in sample.images:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return "sha256:" + digest.hexdigest()
