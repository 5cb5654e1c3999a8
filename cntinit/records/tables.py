"""Records from tables, through the `datasets` library (the optional extra `cntinit[datasets]`):
.parquet, .arrow, .csv and .json (a list of records, or JSON lines) files, a folder `save_to_disk`
wrote, a dataset repository's folder (its README's configs and file names say the splits) — which is
what a Hub dataset id resolves to. One split is read; the text column is found once, by name, for the
whole table, and each row becomes a sample as a JSONL record would (sample.py)."""

from __future__ import annotations

import re
from pathlib import Path

from .. import hub
from ..errors import CntinitError, first_line
from .sample import Sample, from_record

SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes: a DatasetDict's index of splits, or one Dataset's state
INSTALL = "pip install 'cntinit[datasets]'"
DEFAULT_SPLIT = "train"
TEXT_TYPES = ("string", "large_string")
CARDS = ("README.md", "LICENSE")  # beside a dataset's files, not data
IMAGE_COLUMNS = ("image", "images")  # paths, for a vision-language model


def is_table(path: Path) -> bool:
    """Whether `path` is read through `datasets`: a table file, a save_to_disk folder, a Hub dataset's
    snapshot, or a folder of table files only (a folder with .jsonl/.txt or images is not one)."""
    if path.is_file():
        return path.suffix in SUFFIXES
    if not path.is_dir():
        return False
    if any((path / name).is_file() for name in SAVED) or hub.snapshot_kind(path) == "dataset":
        return True
    found = False
    for file in path.rglob("*"):  # the first image or .jsonl ends the walk: the CLI asks this of every --data folder
        if file.is_file() and file.name not in CARDS and not file.name.startswith("."):
            if file.suffix not in SUFFIXES:
                return False
            found = True
    return found


def sniff(file: Path) -> None:
    """Refuse a table file whose first bytes are not what its extension says, before `datasets` loads."""
    with open(file, "rb") as handle:
        head = handle.read(4096)
    kind = SUFFIXES[file.suffix]
    fits = {"parquet": head[:4] == b"PAR1", "arrow": head[:6] == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff",
            "csv": bool(head) and b"\x00" not in head, "json": head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"[", b"{")}[kind]
    if not fits:
        raise CntinitError(f"data file {file} is not a {kind} file (its first bytes say otherwise): give it the extension of what it holds "
                           "(.jsonl, .txt, .parquet, .arrow, .csv, .json) or convert it")


def _library():
    try:
        import datasets
    except ImportError:
        raise CntinitError(f"reading parquet, arrow, csv, json and Hugging Face datasets needs the datasets library: {INSTALL} "
                           "(or give .jsonl or .txt)") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures come back as one line of ours
    return datasets


def open_table(path: Path, split: str | None, shown: str, config: str | None = None):
    """(the dataset of `split` — of `config`, for a repository with several — and the split's name, or
    None for a table without splits)."""
    datasets = _library()
    if config is not None and (path.is_file() or any((path / name).is_file() for name in SAVED)):
        raise CntinitError(f"--data-config {config} picks a config of a dataset repository, and {shown} is a single table: leave it out")
    try:
        if path.is_file():
            if split not in (None, DEFAULT_SPLIT):
                raise CntinitError(f"--split {split}: {shown} is one file, a single split: leave out --split")
            if SUFFIXES[path.suffix] == "arrow":
                return datasets.Dataset.from_file(str(path)), None  # memory-mapped where it lies
            return datasets.load_dataset(SUFFIXES[path.suffix], data_files=str(path), split=DEFAULT_SPLIT), None
        if any((path / name).is_file() for name in SAVED):
            loaded = datasets.load_from_disk(str(path))
            if not isinstance(loaded, datasets.DatasetDict):
                if split is not None:
                    raise CntinitError(f"--split {split}: {shown} was saved as one dataset, without splits: leave out --split")
                return loaded, None
            chosen = _choose(split, list(loaded), shown)
            return loaded[chosen], chosen
        files = datasets.load_dataset_builder(str(path), name=config).config.data_files or {}
        chosen = _choose(split, list(files), shown)
        # only the chosen split's files are prepared
        return datasets.load_dataset(str(path), name=config, data_files={chosen: files[chosen]}, split=chosen), chosen
    except CntinitError:
        raise
    except Exception as exc:
        raise CntinitError(_unreadable(exc, path, shown)) from None


def _unreadable(exc: Exception, path: Path, shown: str) -> str:
    text = first_line(exc)
    if path.suffix == ".parquet" and _parquet_rows(path) == 0:  # datasets (5.2) fails on a parquet file of no rows
        return f"{shown} is empty (0 rows): give a split or file with records"
    listed = re.search(r"\[(.*?)\]", str(exc))
    names = ", ".join(name.strip(" '\"") for name in listed[1].split(",")) if listed else "see its README"
    if "Config name is missing" in text:
        return f"{shown} has several configs: pick one with --data-config ({names})"
    if "BuilderConfig" in text and "not found" in text:
        return f"{shown} has no config {text.split(chr(39))[1]}: give one of {names} with --data-config"
    what = f"a {SUFFIXES[path.suffix]} file" if path.is_file() else "a dataset"
    return f"could not read {shown} as {what} ({text}): check that it is one, or convert it to .jsonl"


def _parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


def _choose(split: str | None, splits: list[str], shown: str) -> str:
    """The split to read: the one asked for, else train, else the only one."""
    if not splits:
        raise CntinitError(f"{shown} holds no data files in any split: give a dataset with records")
    if split is None:
        if DEFAULT_SPLIT in splits or len(splits) == 1:
            return DEFAULT_SPLIT if DEFAULT_SPLIT in splits else splits[0]
        raise CntinitError(f"{shown} has no train split: pick one with --split ({', '.join(splits)})")
    if split not in splits:
        raise CntinitError(f"{shown} has no split {split}: give one of {', '.join(splits)}")
    return split


def columns(dataset, field: str, shown: str) -> list[str]:
    """The columns a sample is made of: `field` (text), else — for the default field — `messages`, else
    `prompt` + `completion`; a missing or non-text column is refused, naming the columns there are."""
    names = list(dataset.column_names)
    there = f"its columns: {', '.join(names)}"
    if field in names and field != "messages":
        kind = getattr(dataset.features[field], "dtype", type(dataset.features[field]).__name__)
        if kind not in TEXT_TYPES:
            raise CntinitError(f"column {field!r} of {shown} holds {kind}, not text: pass --field with a text column ({there})")
        return [field]
    if "messages" in names and field in ("text", "messages"):
        return ["messages"]
    if field == "text" and {"prompt", "completion"} <= set(names):
        return ["prompt", "completion"]
    raise CntinitError(f"{shown} has no column {field!r}" + (", 'messages' or 'prompt' + 'completion'" if field == "text" else "") +
                       f": pass --field NAME ({there})")


def samples(dataset, shown: str, field: str, indices: list[int] | None, base: Path | None = None) -> list[Sample]:
    """The rows `indices` (all, in order, when None) of `dataset` as samples; with a `base`, their image
    paths too, relative to it."""
    if dataset.num_rows == 0:
        raise CntinitError(f"{shown} is empty (0 rows): give a split or file with records")
    pictures = [name for name in IMAGE_COLUMNS if name in dataset.column_names] if base is not None else []
    part = dataset.select_columns(columns(dataset, field, shown) + pictures)
    numbers = range(part.num_rows) if indices is None else indices
    rows = part if indices is None else part.select(indices)
    return [from_record(row, f"{shown} row {number}", field, base) for number, row in zip(numbers, rows)]
