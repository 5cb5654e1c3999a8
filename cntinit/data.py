"""Calibration text: reading samples from files or stdin, tokenizing, and padded batches.

A sample is one sequence: a JSONL record (`text`, or chat `messages` rendered with the
tokenizer's chat template) or one non-blank line of a .txt file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .console import warn
from .errors import CntinitError

DATA_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class Sample:
    content: str | list  # text, or a list of chat messages
    origin: str  # "file:line", for error messages

    @property
    def is_chat(self) -> bool:
        return isinstance(self.content, list)


def read_samples(source: str | Path, text_field: str = "text", max_samples: int | None = None) -> list[Sample]:
    """All samples of a .jsonl/.txt file, a directory of them (sorted, recursive), or `-` (JSONL on stdin)."""
    samples: list[Sample] = []
    for name, lines in _sources(source):
        for lineno, line in enumerate(lines, start=1):
            if max_samples is not None and len(samples) >= max_samples:
                return samples
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            if name.endswith(".txt"):
                samples.append(Sample(line.rstrip("\r\n"), where))
            else:
                samples.append(_parse_jsonl(line, where, text_field))
    if not samples:
        raise CntinitError(f"no samples in {source}: give a .jsonl (one object per line) or .txt (one sample per line) with content")
    return samples


def _sources(source: str | Path) -> Iterator[tuple[str, Any]]:
    if str(source) == "-":
        yield "<stdin>.jsonl", sys.stdin
        return
    path = Path(source)
    if not path.exists():
        raise CntinitError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise CntinitError(f"data directory {path} holds no .jsonl or .txt files")
    elif path.suffix in DATA_SUFFIXES:
        files = [path]
    else:
        raise CntinitError(f"data file {path} is neither .jsonl nor .txt: rename it or convert it")
    for file in files:
        yield str(file), _text_lines(file)


def _text_lines(file: Path) -> list[str]:
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise CntinitError(f"data file {file} looks binary (it holds NUL bytes): give UTF-8 text")
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CntinitError(f"data file {file} is not UTF-8 (byte {exc.start}): re-encode it as UTF-8") from None


def _parse_jsonl(line: str, where: str, text_field: str) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CntinitError(f"{where}: not valid JSON ({exc.msg}): fix or remove that line") from None
    if not isinstance(record, dict):
        raise CntinitError(f"{where}: expected a JSON object with '{text_field}' or 'messages'")
    if isinstance(record.get(text_field), str):
        return Sample(record[text_field], where)
    if isinstance(record.get("messages"), list):
        return Sample(record["messages"], where)
    raise CntinitError(f"{where}: no string field '{text_field}' and no 'messages' list: pass --text-field NAME")


def fingerprint(samples: list[Sample]) -> str:
    """sha256 of the samples' content in order (not their file names)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(sample.content, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def tokenize(samples: list[Sample], tokenizer, seq_len: int, pack: bool = False) -> list[list[int]]:
    """Token ids per sequence: each sample alone, truncated to `seq_len` the tokenizer's own
    way (special tokens kept); or, with `pack`, all samples concatenated and cut into
    `seq_len` pieces (the last may be shorter)."""
    ids = [_encode(sample, tokenizer) for sample in samples]
    if pack:
        stream = [token for seq in ids for token in seq]
        return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    long = [i for i, seq in enumerate(ids) if len(seq) > seq_len]
    if long:
        warn(f"{len(long)} of {len(ids)} samples are longer than --seq-len {seq_len} tokens and were truncated")
        for i in long:
            ids[i] = _encode(samples[i], tokenizer, max_length=seq_len)
    empty = sum(not seq for seq in ids)
    if empty:
        warn(f"{empty} samples tokenize to zero tokens and were skipped")
    return [seq for seq in ids if seq]


def _encode(sample: Sample, tokenizer, max_length: int | None = None) -> list[int]:
    cut = {"truncation": True, "max_length": max_length} if max_length else {}
    if not sample.is_chat:
        return tokenizer(sample.content, add_special_tokens=True, **cut)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise CntinitError(f"{sample.origin}: 'messages' needs a chat template, and this model's tokenizer has none: give 'text' instead")
    try:
        text = tokenizer.apply_chat_template(sample.content, tokenize=False)
    except Exception as exc:  # jinja errors name the bad message shape
        raise CntinitError(f"{sample.origin}: the chat template rejected these messages ({exc})") from None
    return tokenizer(text, add_special_tokens=False, **cut)["input_ids"]


def split_buckets(sequences: list[list[int]], buckets: int) -> list[list[list[int]]]:
    """K disjoint consecutive slices of the stream, as equal in size as possible."""
    if buckets > len(sequences):
        raise CntinitError(f"--buckets {buckets} is more than the {len(sequences)} sequences: lower --buckets or add data")
    bounds = [round(i * len(sequences) / buckets) for i in range(buckets + 1)]
    return [sequences[bounds[i] : bounds[i + 1]] for i in range(buckets)]


def batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches, longest first so padding stays small.

    The order inside a bucket does not change the sums, only how much padding is computed.
    """
    ordered = sorted(sequences, key=len, reverse=True)
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids, mask
