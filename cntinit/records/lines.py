"""Records from lines, without dependencies: JSONL (one object per line), .txt (one sample per
non-blank line), a directory of them (sorted, recursive), or `-` (JSONL on stdin). Read as UTF-8,
split at \\n only, a byte-order mark dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

from ..errors import CntinitError, first_line
from .sample import Sample, from_record

SUFFIXES = (".jsonl", ".txt")
STDIN = "stdin"  # the source name of `--data -`, which is JSONL


def read(source: str | Path, field: str = "text", limit: int | None = None, images: bool = False) -> list[Sample]:
    """The samples of `source` in order, the first `limit` of them when given; with `images`, each
    record's image paths (relative to its file)."""
    samples: list[Sample] = []
    for name, lines in _sources(source):
        for lineno, line in enumerate(lines, start=1):
            if limit is not None and len(samples) >= limit:
                return samples
            if not line.strip():
                continue
            where = f"stdin line {lineno}" if name == STDIN else f"{name}:{lineno}"
            if name.endswith(".txt"):
                samples.append(Sample(line.rstrip("\r\n"), where))
            else:
                base = (Path.cwd() if name == STDIN else Path(name).parent) if images else None
                samples.append(_parse(line, where, field, base))
    return samples


def _sources(source: str | Path) -> Iterator[tuple[str, Any]]:
    if str(source) == "-":
        yield STDIN, _stdin_lines()
        return
    path = Path(source)
    if not path.is_dir() and not path.is_file():
        raise CntinitError(f"data path {path} is not a regular file (a pipe or a device): give a file, or - to read JSONL from stdin")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise CntinitError(f"data directory {path} holds no .jsonl or .txt files")
    elif path.suffix in SUFFIXES:
        files = [path]
    else:
        raise CntinitError(f"data file {path} is neither .jsonl or .txt nor a table (.parquet, .arrow, .csv, .json): rename it or "
                           "convert it")
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


def _parse(line: str, where: str, field: str, base: Path | None) -> Sample:
    try:
        record = json_line(line)
    except ValueError as exc:
        if not line.lstrip().startswith(("{", "[", '"')):
            fix = "send JSONL ({\"text\": \"...\"} per line)" if where.startswith(STDIN) else \
                "a .txt file takes one sample per line: rename it to .txt, or write JSONL ({\"text\": \"...\"} per line)"
            raise CntinitError(f"{where}: plain text, not JSON: {fix}") from None
        raise CntinitError(f"{where}: not valid JSON ({exc}): fix or remove that line") from None
    return from_record(record, where, field, base)
