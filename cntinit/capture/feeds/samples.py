"""Calibration text: reading samples from files or stdin, tokenizing, and padded batches.

A sample is one sequence: a JSONL record (`text`, chat `messages` rendered with the
tokenizer's chat template, or `prompt` + `completion` — strings, or message lists — whose prompt
tokens a gradient capture does not predict) or one non-blank line of a .txt file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ...console import warn
from ...errors import CntinitError, first_line

DATA_SUFFIXES = (".jsonl", ".txt")
CUT_GROWTH, CUT_FLOOR = 64, 1 << 20  # a sample is never tokenized past max(64 × its first tokens' character bound, 1M characters)


@dataclass(frozen=True)
class Sample:
    content: str | list  # text, or a list of chat messages
    origin: str  # "file:line", for error messages
    prompt: str | list | None = None  # the leading part that is context, not a target (prompt/completion records)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.content, list)


class Tokens(list):
    """One sequence's token ids; the first `prompt` of them are context, not next-token targets."""

    prompt = 0


STDIN = "stdin"  # the source name of `--data -`, which is JSONL


def read_samples(source: str | Path, text_field: str = "text", max_samples: int | None = None) -> list[Sample]:
    """All samples of a .jsonl/.txt file, a directory of them (sorted, recursive), or `-` (JSONL on stdin)."""
    samples: list[Sample] = []
    for name, lines in _sources(source):
        for lineno, line in enumerate(lines, start=1):
            if max_samples is not None and len(samples) >= max_samples:
                return samples
            if not line.strip():
                continue
            where = f"stdin line {lineno}" if name == STDIN else f"{name}:{lineno}"
            if name.endswith(".txt"):
                samples.append(Sample(line.rstrip("\r\n"), where))
            else:
                samples.append(_parse_jsonl(line, where, text_field))
    if not samples:
        raise CntinitError(f"no samples in {source}: give a .jsonl (one object per line) or .txt (one sample per line) with content")
    return samples


def must_exist(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CntinitError(f"data path {path} does not exist: give a .jsonl or .txt file, a folder of them "
                           "(of images for vision models and pipelines), or - for stdin")
    return path


def _sources(source: str | Path) -> Iterator[tuple[str, Any]]:
    if str(source) == "-":
        yield STDIN, _stdin_lines()
        return
    path = must_exist(source)
    if not path.is_dir() and not path.is_file():
        raise CntinitError(f"data path {path} is not a regular file (a pipe or a device): give a file, or - to read JSONL from stdin")
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
    """The file's lines, split at \\n only: U+2028 or U+0085 inside a JSON string is text, not a line end."""
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise CntinitError(f"data file {file} looks binary (it holds NUL bytes): give UTF-8 text")
    try:
        return [line.removesuffix("\r") for line in raw.decode("utf-8-sig").split("\n")]  # a byte-order mark is not data
    except UnicodeDecodeError as exc:
        raise CntinitError(f"data file {file} is not UTF-8 (byte {exc.start}): re-encode it as UTF-8") from None


def _stdin_lines() -> Iterator[str]:
    """Standard input's lines, as the files' are read (UTF-8, split at \\n only)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None or sys.stdin.closed:
        raise CntinitError("--data - reads JSONL from stdin, but stdin is closed: pipe the data in (cat calib.jsonl | cntinit ...)")
    for lineno, raw in enumerate(stream, start=1):
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not data
        if b"\x00" in raw:
            raise CntinitError(f"stdin line {lineno} looks binary (it holds NUL bytes): give UTF-8 JSONL")
        try:
            yield raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise CntinitError(f"stdin line {lineno} is not UTF-8 (byte {exc.start}): re-encode the data as UTF-8") from None


def json_line(line: str):
    """The value of one JSONL line, or a ValueError saying in a few words why it is not JSON: broken,
    nested past Python's recursion limit, or holding an integer of more digits than Python converts."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except RecursionError:
        raise ValueError("nested deeper than JSON can be read") from None
    except ValueError as exc:
        raise ValueError(first_line(exc)) from None


def _parse_jsonl(line: str, where: str, text_field: str) -> Sample:
    try:
        record = json_line(line)
    except ValueError as exc:
        if not line.lstrip().startswith(("{", "[", '"')):
            fix = "send JSONL ({\"text\": \"...\"} per line)" if where.startswith(STDIN) else \
                "a .txt file takes one sample per line: rename it to .txt, or write JSONL ({\"text\": \"...\"} per line)"
            raise CntinitError(f"{where}: plain text, not JSON: {fix}") from None
        raise CntinitError(f"{where}: not valid JSON ({exc}): fix or remove that line") from None
    if not isinstance(record, dict):
        raise CntinitError(f"{where}: expected a JSON object with '{text_field}' or 'messages'")
    if isinstance(record.get(text_field), str):
        return Sample(record[text_field], where)
    if isinstance(record.get("messages"), list):
        return Sample(_messages(record["messages"], where), where)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = _messages(prompt, where)
        return Sample(prompt + _messages(completion, where, len(prompt)), where, prompt)
    if isinstance(prompt, str) and isinstance(completion, str):
        return Sample(prompt + completion, where, prompt)
    if prompt is not None and completion is not None:
        raise CntinitError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of chat messages")
    raise CntinitError(f"{where}: no string field '{text_field}', no 'messages' list and no 'prompt' + 'completion' pair: "
                       "pass --text-field NAME")


def _messages(messages: list, where: str, first: int = 0) -> list:
    """Chat messages as chat templates read them: objects with a string role and a content that is
    text, or a list of typed parts ({"type": "text", "text": ...}); numbered from `first` in errors."""
    for number, message in enumerate(messages, start=first):
        if not isinstance(message, dict):
            raise CntinitError(f"{where}: message {number} is not a JSON object: write {{\"role\": ..., \"content\": ...}}")
        if not isinstance(message.get("role"), str):
            raise CntinitError(f"{where}: message {number} has no string 'role' (user, assistant, system): fix or remove that line")
        if "content" not in message:
            raise CntinitError(f"{where}: message {number} has no content: fix or remove that line")
        content = message["content"]
        if not (isinstance(content, str) or isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("type"), str)
                                                                              for part in content)):
            raise CntinitError(f"{where}: message {number}'s content is neither text nor a list of typed parts "
                               "({\"type\": \"text\", \"text\": ...}): fix or remove that line")
    return messages


def fingerprint(samples: list[Sample]) -> str:
    """sha256 of the samples' content in order (not their file names)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(sample.content, ensure_ascii=False, sort_keys=True).encode())
        if sample.prompt is not None:  # where the prompt ends changes what a gradient capture predicts
            digest.update(json.dumps({"prompt": sample.prompt}, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


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
