"""The feed of a text model: tokenized samples in padded batches (padding is dropped from the
statistics; with prompt/completion records, prompts are not next-token targets)."""

from __future__ import annotations

from typing import Iterator

import torch

from ...console import warn
from ...errors import CntinitError
from ...models.loading import context_length
from ...records import fingerprint, read
from . import samples
from .feed import Batch, Feed, Shard, shard_total, share, text_settings

OPTIONS = ("pack", "sample_max_norm", "split", "data_config", "shuffle_seed")  # the capture options only this kind of model (or few) reads


def build(net, tokenizer, args, run_dtype: torch.dtype, shard: Shard = (0, 1)) -> Feed:
    """The calibration text `args.data` (records/) as batches of `args.batch_size` sequences."""
    if tokenizer is None:
        raise CntinitError("this model has no tokenizer, so it cannot read text: give --data a folder of images "
                           "(a vision model) or add the tokenizer files to its directory")
    calibration = read(args.data, args.text_field, args.split, args.max_samples, args.shuffle_seed, config=args.data_config)
    chosen = calibration.samples
    seq_len = args.seq_len
    context = context_length(net, tokenizer)
    if context is not None and seq_len > context:
        warn(f"--seq-len {seq_len} is longer than the model's context ({context} tokens): using {context}")
        seq_len = context
    special = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    if seq_len <= special:  # the tokenizer would not truncate at all
        raise CntinitError(f"--seq-len {seq_len} leaves no room beside the {special} special tokens this tokenizer adds: give at least "
                           f"{special + 1}")
    sequences = samples.tokenize(chosen, tokenizer, seq_len, args.pack)
    if not sequences:
        raise CntinitError(f"no sample of {args.data} has any token: give non-empty text")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _refuse_foreign_ids(net, max(pad_id, *(max(sequence) for sequence in sequences)))
    every = samples.split_buckets(sequences, args.buckets)
    total = shard_total([len(part) for part in every], shard)
    parts = [[part[i] for i in share(range(len(part)), shard)] for part in every]

    def batches() -> Iterator[Batch]:
        for bucket, part in enumerate(parts):
            for ids, mask, targets in samples.batches(part, args.batch_size, pad_id):
                yield bucket, {"input_ids": ids, "attention_mask": mask}, mask, targets

    probe = torch.tensor([sequences[0][:8]])
    unpredicted = sum(1 for part in parts for seq in part if len(seq) <= max(seq.prompt, 1))  # position j predicts token j + 1
    return Feed({"input_ids": probe, "attention_mask": torch.ones_like(probe)}, total, "tok", batches,
                calibration.manifest(fingerprint(chosen), total), text_settings(seq_len, args.pack, args.shuffle_seed), unpredicted)


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
