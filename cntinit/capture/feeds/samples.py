"""Calibration text as token sequences: samples (records/) tokenized — chat messages rendered by
the tokenizer's chat template, prompts marked so a gradient capture does not predict them — split
into buckets, and cut into padded batches.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ...console import warn
from ...errors import CntinitError
from ...records import Sample

CUT_GROWTH, CUT_FLOOR = 64, 1 << 20  # a sample is never tokenized past max(64 × its first tokens' character bound, 1M characters)


class Tokens(list):
    """One sequence's token ids; the first `prompt` of them are context, not next-token targets."""

    prompt = 0


def tokenize(samples: list[Sample], tokenizer, seq_len: int, pack: bool = False) -> list[Tokens]:
    """Token ids per sequence: each sample alone, truncated to `seq_len` the tokenizer's own
    way (special tokens kept); or, with `pack`, all samples concatenated and cut into
    `seq_len` pieces (the last may be shorter)."""
    texts = [_text(sample, tokenizer) for sample in samples]
    special = [not sample.is_chat for sample in samples]  # a chat template writes its own special tokens
    if pack:
        prompted = next((sample for sample in samples if sample.prompt is not None), None)
        if prompted is not None:
            raise CntinitError(f"{prompted.origin}: --pack would cut prompts and completions into one stream: leave out --pack")
        stream = [token for text, add in zip(texts, special) for token in _ids(tokenizer, text, add)]
        return [Tokens(stream[i : i + seq_len]) for i in range(0, len(stream), seq_len)]
    bound = _char_bound(tokenizer, seq_len)
    ids, long, capped = [], 0, []
    for sample, text, add in zip(samples, texts, special):
        seq, cut, short = _leading_ids(tokenizer, text, add, seq_len, bound)
        seq = Tokens(seq)
        if sample.prompt is not None:  # the prompt's own first tokens, cut as the sample was: all of them kept means no completion is
            prompt = _leading_ids(tokenizer, _text(sample, tokenizer, prompt=True), add, seq_len, bound)[0]
            seq.prompt = len(seq) if prompt == list(seq) else _prompt_length(seq, prompt)
        ids.append(seq)
        long += cut
        capped += [sample.origin] if short else []
    if long:
        warn(f"{long} of {len(ids)} samples are longer than --seq-len {seq_len} tokens and were truncated")
    if capped:
        warn(f"{len(capped)} samples (e.g. {capped[0]}) run past {_cap(bound):,} characters without giving --seq-len tokens (an "
             f"unbroken word?): each was tokenized from its first {_cap(bound):,} characters")
    empty = sum(not seq for seq in ids)
    if empty:
        warn(f"{empty} samples tokenize to zero tokens and were skipped")
    return [seq for seq in ids if seq]


def _prompt_length(seq: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `seq` are the prompt's: where the prompt's own tokens stop agreeing
    with the whole text's (a token merged across the boundary, or an end token the tokenizer adds)."""
    return next((i for i, (a, b) in enumerate(zip(seq, prompt)) if a != b), min(len(seq), len(prompt)))


def _text(sample: Sample, tokenizer, prompt: bool = False) -> str:
    """The sample's text (with `prompt`, its prompt's alone), chat messages rendered by the template."""
    content = sample.prompt if prompt else sample.content
    if not sample.is_chat:
        return content
    if not getattr(tokenizer, "chat_template", None):
        raise CntinitError(f"{sample.origin}: 'messages' needs a chat template, and this model's tokenizer has none: give 'text' instead")
    try:
        return tokenizer.apply_chat_template(content, tokenize=False, add_generation_prompt=prompt)
    except Exception as exc:  # jinja errors name the bad message shape
        raise CntinitError(f"{sample.origin}: the chat template rejected these messages ({exc})") from None


def _ids(tokenizer, text: str, special: bool, max_length: int | None = None) -> list[int]:
    cut = {"truncation": True, "max_length": max_length} if max_length else {}
    return tokenizer(text, add_special_tokens=special, **cut)["input_ids"]


def _char_bound(tokenizer, seq_len: int) -> int | None:
    """Characters that surely hold the first `seq_len` tokens: no token is longer than the longest
    string in the vocabulary (a margin covers special tokens); None when the vocabulary is unknown."""
    if not hasattr(tokenizer, "get_vocab"):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=16)
    return (seq_len + 16) * max(longest, 1)


def _cap(bound: int | None) -> int | None:
    """How many characters of a sample are ever tokenized, given its first tokens' bound."""
    return None if bound is None else max(bound * CUT_GROWTH, CUT_FLOOR)


def _leading_ids(tokenizer, text: str, special: bool, seq_len: int, bound: int | None) -> tuple[list[int], bool, bool]:
    """(the first `seq_len` tokens of `text`, exactly as truncating the whole text gives them; whether it
    was longer; whether it was cut short of that). A long text is tokenized only up to a whitespace past
    `bound` characters — a 20 MB line costs what its first tokens do — and the cut grows while it
    yields too few tokens to be sure (a normalizer that drops characters, one endless word), up to
    `_cap(bound)`: past that the first tokens are those of that many characters (a word of 200 MB,
    taken whole, made the tokenizer abort the process)."""
    cap = _cap(bound)
    while bound is not None and bound < cap and len(text) > bound and getattr(tokenizer, "truncation_side", "right") == "right":
        end = next((i for i in range(bound, min(len(text), 2 * bound)) if text[i].isspace()), None)
        if end is None:  # no word boundary near: a longer cut, or the whole text
            bound *= 2
            continue
        ids = _ids(tokenizer, text[:end], special)
        if len(ids) > seq_len + 1:  # the cut lies beyond the tokens kept, so they are the whole text's
            return _ids(tokenizer, text[:end], special, seq_len), True, False
        bound *= 2
    capped = cap is not None and len(text) > cap and getattr(tokenizer, "truncation_side", "right") == "right"
    if capped:
        text = text[:cap]
    ids = _ids(tokenizer, text, special)
    return (ids if len(ids) <= seq_len else _ids(tokenizer, text, special, seq_len)), len(ids) > seq_len, capped


def split_buckets(sequences: list[list[int]], buckets: int) -> list[list[list[int]]]:
    """K disjoint consecutive slices of the stream, as equal in size as possible."""
    if buckets > len(sequences):
        raise CntinitError(f"--buckets {buckets} is more than the {len(sequences)} sequences: lower --buckets or add data")
    bounds = [round(i * len(sequences) / buckets) for i in range(buckets + 1)]
    return [sequences[bounds[i] : bounds[i + 1]] for i in range(buckets)]


def batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Right-padded (input_ids, attention_mask, targets) batches, longest first so padding stays
    small; `targets` marks the tokens after each prompt (None when no sequence has one).

    The order inside a bucket does not change the sums, only how much padding is computed.
    """
    ordered = sorted(sequences, key=len, reverse=True)
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        prompted = any(getattr(seq, "prompt", 0) for seq in chunk)
        targets = torch.zeros((len(chunk), width), dtype=torch.bool) if prompted else None
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            if targets is not None:
                targets[row, getattr(seq, "prompt", 0) : len(seq)] = True
        yield ids, mask, targets
