"""A safetensors file copied with some of its tensors replaced, one tensor in memory at a time: how
export writes the residual base. Loading the whole file to save it again held all of its tensors
at once (a 70B model's 5 GB shard: 5 GB and more; SmolLM2-135M's export peaked at 1.5–1.6 GB, now
0.9 GB); here the tensors kept as they are go from file to file as bytes (in the kernel, with
copy_file_range, where it can), and each replaced one is computed as it is written, block of rows by block.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CntinitError
from . import weight_files

SAFETENSORS_NAMES = {dtype: name for name, dtype in weight_files.STORED_FLOATS.items()}
COPY_CHUNK = 1 << 24


def header(reading: BinaryIO, file: Path) -> tuple[int, dict]:
    """(where the data starts, the header's JSON) of the safetensors `file`, open for `reading`."""
    try:
        reading.seek(0)
        size = struct.unpack("<Q", reading.read(8))[0]
        parsed = json.loads(reading.read(size))
        if not isinstance(parsed, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as exc:
        raise weight_files.damaged(file, exc) from None
    return 8 + size, parsed


def rewrite(source: Path, out: Path, replaced: dict[str, torch.dtype], compute: Callable[[str, object], Iterable[torch.Tensor]]) -> None:
    """`source` written to `out` with each tensor named in `replaced` (key -> the dtype it becomes) taken
    from `compute(key, rows)` — `rows[start:end]` reads those rows of the stored tensor — which gives the
    new tensor's rows in blocks, in order, each written before the next is asked for; every other tensor,
    and the metadata, as stored (metadata naming the format "pt" where there was none)."""
    try:  # safetensors checks the whole header first; a full disk while writing stays the write error it is
        handle = safe_open(source, framework="pt")
    except (OSError, SafetensorError) as exc:
        raise weight_files.damaged(source, exc) from None
    with handle, open(source, "rb") as reading, open(out, "wb", buffering=0) as writing:
        start, entries = header(reading, source)
        order, text = _written_header(entries, replaced)
        _write_all(writing.fileno(), memoryview(text))
        for key in order:
            begin, end = entries[key]["data_offsets"]
            if key not in replaced:
                _copy(reading.fileno(), writing.fileno(), start + begin, end - begin, source)
                continue
            shape, rows = entries[key]["shape"], 0
            for block in compute(key, handle.get_slice(key)):
                if block.dtype != replaced[key] or list(block.shape[1:]) != shape[1:]:
                    raise AssertionError(f"{key}: computed {block.dtype} {list(block.shape)}, declared {replaced[key]} {shape}")
                rows += block.shape[0] if block.dim() else 1
                _write_all(writing.fileno(), memoryview(block.cpu().contiguous().view(torch.uint8).reshape(-1).numpy()))
            if rows != (shape[0] if shape else 1):
                raise AssertionError(f"{key}: computed {rows} rows, declared {shape}")


def _write_all(writing: int, data: memoryview) -> None:
    """Every byte of `data` (one-dimensional): os.write may write fewer than it is given."""
    while data:
        data = data[os.write(writing, data):]


def _written_header(entries: dict, replaced: dict[str, torch.dtype]) -> tuple[list[str], bytes]:
    """(the tensors in the order of their data, the new file's length-prefixed header): each replaced one in
    its new dtype, the offsets laid out again."""
    metadata = entries.pop("__metadata__", None) or {"format": "pt"}  # as save_pretrained writes: some loaders want the format
    order = sorted(entries, key=lambda key: entries[key]["data_offsets"][0])
    written, offset = {"__metadata__": metadata}, 0
    for key in order:
        entry = dict(entries[key])
        begin, end = entry["data_offsets"]
        size = end - begin
        if key in replaced:
            entry["dtype"] = SAFETENSORS_NAMES[replaced[key]]
            size = torch.Size(entry["shape"]).numel() * replaced[key].itemsize
        entry["data_offsets"] = [offset, offset + size]
        written[key], offset = entry, offset + size
    text = json.dumps(written, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned, as safetensors' own writer leaves it
    return order, struct.pack("<Q", len(text)) + text


def _copy(reading: int, writing: int, offset: int, count: int, source: Path) -> None:
    """`count` bytes of `reading` from `offset` to `writing`'s position: in the kernel where it can (copy_file_range)."""
    while count:
        try:
            moved = os.copy_file_range(reading, writing, min(count, COPY_CHUNK), offset)
        except (AttributeError, OSError):  # not Linux, another filesystem, or a kernel without it
            moved = os.write(writing, os.pread(reading, min(count, COPY_CHUNK), offset))
        if not moved:
            raise CntinitError(f"{source} ends before its header says it does: the checkpoint is damaged (a download cut short?); "
                               "use an intact copy")
        offset, count = offset + moved, count - moved

