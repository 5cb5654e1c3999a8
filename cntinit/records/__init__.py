"""Calibration records — the text a capture reads — from where users keep them: JSONL, .txt or
stdin (lines.py, no dependencies); parquet, arrow, csv, JSON, `save_to_disk` folders and Hub dataset
ids through the `datasets` library (tables.py). Each record becomes a Sample (sample.py); `read`
takes the first N, or N drawn with a seed, the same way for every source.

Nothing here imports torch, so the command line checks the data (path, id, split, column) before
the stages load.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .. import hub
from ..errors import CntinitError
from . import lines, tables
from .lines import STDIN, json_line
from .sample import Sample

__all__ = ["Records", "STDIN", "Sample", "check", "draw", "fingerprint", "json_line", "locate", "read"]


@dataclass
class Records:
    samples: list[Sample]
    described: dict = field(default_factory=dict)  # what the store manifest's data section records of the source

    def manifest(self, fingerprint: str, sequences: int) -> dict:
        """The store manifest's data section (but the tokens, counted by the capture) for these records."""
        return {"fingerprint": fingerprint, **self.described, "samples": len(self.samples), "sequences": sequences}


def locate(source: str | Path) -> Path | str:
    """`source` as a local path (a Hub dataset id resolved to its cached snapshot), or "-" for stdin;
    a table file whose bytes contradict its extension is refused here already."""
    if str(source) == "-":
        return "-"
    path = hub.resolve(source, kind="dataset")
    if not path.exists():
        raise CntinitError(f"data path {path} does not exist: give a .jsonl, .txt, .parquet, .arrow, .csv or .json file, a folder of "
                           "them (of images for vision models and pipelines), a Hugging Face dataset id (org/name), or - for stdin")
    if path.is_file() and path.suffix in tables.SUFFIXES:
        tables.sniff(path)
    return path


def draw(total: int, limit: int | None, seed: int | None) -> list[int] | None:
    """The records used, by index: all in order (None), the first `limit`, or — with a seed — `limit`
    (else all) in an order drawn from it, the same for every source of the same records."""
    if seed is None:
        return None if limit is None or limit >= total else list(range(limit))
    return random.Random(seed).sample(range(total), min(limit or total, total))


def fingerprint(samples: list[Sample]) -> str:
    """sha256 of the samples' content in order (not their file names)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(sample.content, ensure_ascii=False, sort_keys=True).encode())
        if sample.prompt is not None:  # where the prompt ends changes what a gradient capture predicts
            digest.update(json.dumps({"prompt": sample.prompt}, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def _is_table(path: Path | str) -> bool:
    return path != "-" and tables.is_table(Path(path))


def _shown(source: str | Path, path: Path | str) -> str:
    origin = hub.origin(path) if path != "-" else {}
    return origin["repo"] if origin and str(source) == origin["repo"] else str(source)


def check(source: str | Path, split: str | None = None, field: str = "text", config: str | None = None) -> None:
    """Refuse, cheaply, data that cannot be read: a missing path or id, a lying extension, a config, a
    split or a column a table does not have."""
    path = locate(source)
    if _is_table(path):
        dataset, _ = tables.open_table(Path(path), split, _shown(source, path), config)
        tables.columns(dataset, field, _shown(source, path))
    elif split is not None or config is not None:
        raise _no_splits(source, "--split" if split is not None else "--data-config")


def _no_splits(source, option: str = "--split") -> CntinitError:
    what = "a split" if option == "--split" else "a config"
    return CntinitError(f"{option} picks {what} of a dataset, and {source} is read line by line (JSONL or text): leave out {option}")


def read(source: str | Path, field: str = "text", split: str | None = None, max_samples: int | None = None,
         shuffle_seed: int | None = None, images: bool = False, config: str | None = None) -> Records:
    """The samples of `source` (of its `config` and `split`, for a dataset) that a capture uses (see
    `draw`), and what the manifest records of it; with `images`, each record's image paths (for a
    vision-language model)."""
    path = locate(source)
    shown = _shown(source, path)
    described = {"sources": ["-" if path == "-" else str(Path(path).absolute())]}
    if _is_table(path):
        dataset, chosen = tables.open_table(Path(path), split, shown, config)
        base = (Path(path) if Path(path).is_dir() else Path(path).parent) if images else None
        samples = tables.samples(dataset, shown, field, draw(dataset.num_rows, max_samples, shuffle_seed), base)
        described |= ({"split": chosen} if chosen else {}) | ({"config": config} if config else {}) | hub.origin(path)
    else:
        if split is not None or config is not None:
            raise _no_splits(source, "--split" if split is not None else "--data-config")
        samples = lines.read(path, field, max_samples if shuffle_seed is None else None, images)
        indices = draw(len(samples), max_samples, shuffle_seed)
        samples = samples if indices is None else [samples[i] for i in indices]
    if not samples:
        raise CntinitError(f"no samples in {source}: give a .jsonl (one object per line) or .txt (one sample per line) with content")
    return Records(samples, described)
