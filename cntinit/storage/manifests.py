"""The shape of each manifest, checked whole when a store or solve directory is opened: the
statistics store's here, with the fields every manifest shares; the solve directory's beside its
format (solve/solution.py), which checks its parameters as the solve's options.

A field that is missing, unknown, of the wrong type or out of range makes the directory
corrupt, and the error names the field: a hand-edited manifest never reaches the numeric code.
A key ending in "?" may be absent; `Each` is a mapping of any names to one shape; `Maybe`
allows null; a list holds items of its one shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 64 << 20  # no manifest or state file cntinit writes comes near this (a 70B model's store manifest: about 1 MB)


def read_json(path: Path, limit: int = MAX_BYTES):
    """The JSON in the regular file `path`, read no further than `limit` bytes: a larger file, a device
    or a pipe in its place, or JSON nested past Python's recursion limit is a ValueError, as broken
    JSON is (FileNotFoundError where there is nothing)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path} nests deeper than JSON can be read") from None


@dataclass(frozen=True)
class Each:
    shape: object


@dataclass(frozen=True)
class Maybe:
    shape: object


HEADER = {"format": str, "format_version": int, "cntinit_version": str, "created": str}
FILES = Each({"sha256": str, "bytes": int})
MODEL = {"path": str, "class": str, "fingerprint": str, "kind?": str, "layout?": str, "repo?": str, "revision?": str}
STORE = HEADER | {
    "model": MODEL,
    "data": {"fingerprint": str, "sources": [str], "samples": int, "sequences": int, "tokens": int, "merged_from?": [str],
             "split?": str, "config?": str, "repo?": str, "revision?": str},
    "capture": {"targets": str, "seq_len": int, "batch_size": int, "max_samples": Maybe(int), "pack": bool, "buckets": int,
                "dtype": str, "accumulate": str, "sample_max_norm": bool, "device": str, "shard": Maybe(str),
                "image_size?": Maybe(int), "image_processor?": bool, "prompt?": Maybe(str), "noise_timestep?": Maybe(int), "t5_tokens?": int, "seed?": int,
                "gradients?": bool, "statistics?": bool, "shuffle_seed?": int},
    "modules": Each({"key": str, "in_features": int, "out_features": int, "layer": str}),
    "stats": Each({"dim": int, "count": int, "modules": [str], "file": str}),
    "gradients?": {"tokens": int, "batches": int, "mean_loss": float},
    "files": FILES,
}


def problem(value, shape, where: str = "") -> str | None:
    """What is wrong with `value` as `shape` (naming the field), or None."""
    if isinstance(shape, Maybe):
        return None if value is None else problem(value, shape.shape, where)
    if isinstance(shape, Each):
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, not a mapping"
        return next((p for name, item in value.items() if (p := problem(item, shape.shape, f"{where}.{name}"))), None)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {_kind(value)}, not a list"
        return next((p for i, item in enumerate(value) if (p := problem(item, shape[0], f"{where}[{i}]"))), None)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'the manifest'} is {_kind(value)}, not a mapping"
        fields = {name.rstrip("?"): name.endswith("?") for name in shape}
        for name, optional in fields.items():
            if name not in value and not optional:
                return f"{where + '.' if where else ''}{name} is missing"
        unknown = [name for name in value if name not in fields]
        if unknown:
            return f"{where + '.' if where else ''}{unknown[0]} is not a field of this format"
        return next((p for key, item in value.items() if (p := problem(item, shape[key if key in shape else key + "?"],
                                                                         f"{where + '.' if where else ''}{key}"))), None)
    if shape is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{where} is {_kind(value)}, not an integer"
    if not isinstance(value, shape):
        return f"{where} is {_kind(value)}, not {shape.__name__}"
    return None


def scheme_of(fingerprint: str) -> str:
    """The kind of a recorded weight fingerprint (`sha256-weights`, or the older `sha256`): the text before its colon."""
    return fingerprint.partition(":")[0]


def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:60]


def store_problem(manifest: dict) -> str | None:
    """The first thing wrong with a statistics store's manifest, or None."""
    found = problem(manifest, STORE)
    if found:
        return found
    if manifest["capture"]["buckets"] < 1:
        return f"capture.buckets is {manifest['capture']['buckets']}"
    for key, entry in manifest["stats"].items():
        if entry["dim"] < 1 or entry["count"] < 1:
            return f"stats.{key} has dim {entry['dim']} and count {entry['count']}: a captured statistic has both above 0"
        if entry["file"] not in manifest["files"]:
            return f"stats.{key} names a payload outside the statistics store's files ({entry['file']})"
    if manifest["capture"].get("statistics", True) is False and "gradients" not in manifest:
        return "capture.statistics says no statistics were summed, and no gradients were either"
    if "gradients" in manifest and min(manifest["gradients"]["tokens"], manifest["gradients"]["batches"]) < 1:
        return "gradients.tokens and gradients.batches must be at least 1: a gradient capture sums at least one batch"
    for name, entry in manifest["modules"].items():
        stats = manifest["stats"].get(entry["key"])
        if stats is None:
            return f"modules.{name}.key {entry['key']} is not among its statistics"
        if entry["in_features"] != stats["dim"] or entry["out_features"] < 1:
            return f"modules.{name} reads {entry['in_features']} features but its statistic has dimension {stats['dim']}"
    return None
