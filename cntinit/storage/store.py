"""The statistics store: the on-disk contract between capture and solve.

    DIR/manifest.json             format, version, model, data, capture options, module map
    DIR/stats-00001.safetensors   for each key: <key>.xxt (d×d), <key>.sum (d), <key>.count ()
                                  and, when buckets K > 1, <key>.bucket_xxt (K×d×d),
                                  <key>.bucket_sum (K×d), <key>.bucket_count (K);
                                  with --gradients, <module>.grad (out×in) of every module
                                  reading that key, in the same file; with --gradients-only
                                  those alone (the manifest's capture.statistics is false)

All sums are raw (never divided), float32 or float64. The README documents the format.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..console import warn
from ..errors import CntinitError
from ..finite import all_finite
from . import location, manifests, memo
from .atomic import atomic_directory, check_name, check_writable, write_failed
from .manifests import scheme_of

FORMAT = "cntinit.stats"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 2 * 1024**3


def sha256_file(path: Path) -> str:
    return "sha256:" + memo.sha256(path)


class Payloads:
    """The store's payload files, written as statistics arrive — all at the end of a capture, one
    block's at a time in a layerwise one — each holding whole keys, up to about SHARD_BYTES.
    `state`/`Payloads(directory, state)` carry an unfinished set across a checkpoint, with each
    file's checksum: a file that changed while the capture was stopped is refused at `finish`."""

    def __init__(self, directory: Path, state: dict | None = None):
        self.directory = Path(directory)
        self.where: dict[str, str] = dict(state["where"]) if state else {}  # key -> file name
        self.written = state["written"] if state else 0
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_keys: list[str] = []
        self.size = 0
        # each file is hashed in the background as soon as it is written (in a layerwise capture, while the next
        # block runs): a 70B model's all-linear store is 320 GB, minutes of sha256 if left to the end
        self.hasher = ThreadPoolExecutor(1)
        self.entries: dict[str, Future] = {name: self.hasher.submit(file_entry, self.directory / name)
                                           for name in sorted(set(self.where.values()))}
        self.recorded: dict[str, dict] = dict(state.get("files", {})) if state else {}  # what the checkpoint saw

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.size + nbytes > SHARD_BYTES:
            self.flush()
        self.pending.update(tensors)
        self.pending_keys.append(key)
        self.size += nbytes

    def flush(self) -> None:
        """Write what is pending as the next file."""
        if not self.pending:
            return
        self.written += 1
        name = f"stats-{self.written:05d}.safetensors"
        try:
            save_file({k: v.contiguous() for k, v in self.pending.items()}, self.directory / name, metadata={"format": "pt"})
        except (OSError, SafetensorError) as exc:  # a layerwise capture writes here outside an atomic write (the checkpoint's or a temporary folder)
            raise write_failed(self.directory / name, exc) from exc
        self.entries[name] = self.hasher.submit(file_entry, self.directory / name)
        self.where.update(dict.fromkeys(self.pending_keys, name))
        self.pending, self.pending_keys, self.size = {}, [], 0

    def state(self) -> dict:
        self.flush()
        # a file the last checkpoint held keeps its recorded checksum (its own is checked at the end)
        return {"where": self.where, "written": self.written, "files": {name: self.recorded.get(name) or self._entry(name) for name in self.entries}}

    def _entry(self, name: str) -> dict:
        try:
            return self.entries[name].result()
        except OSError as error:  # a file a checkpoint held, gone
            raise CntinitError(f"{error.filename} cannot be read ({error.strerror}): delete {self.directory} and capture again") from None

    def finish(self, manifest: dict, into: Path | None = None) -> None:
        """Write what is pending, move the files `into` the store directory (when they were written
        elsewhere), and write the manifest with every file's checksum and every key's file."""
        self.flush()
        names = sorted(set(self.where.values()))
        try:
            entries = {name: self._entry(name) for name in names}
        finally:
            self.hasher.shutdown()
        changed = [name for name, entry in self.recorded.items() if entries.get(name) != entry]
        if changed:
            raise CntinitError(f"{self.directory / changed[0]} changed after the checkpoint saved it (a disk fault, or another "
                               f"process): delete {self.directory} and capture again")
        into = Path(into or self.directory)
        if into != self.directory:
            for name in names:
                os.replace(self.directory / name, into / name)
        manifest["files"] = entries
        for key, name in self.where.items():
            manifest["stats"][key]["file"] = name
        (into / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def write(directory: Path, manifest: dict, tensors_by_key: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write the payloads and the manifest into `directory` (already a temporary one)."""
    payloads = Payloads(directory)
    for key, tensors in tensors_by_key.items():
        payloads.add(key, tensors)
    payloads.finish(manifest)


def header(format: str, version: int) -> dict:
    """The fields every cntinit manifest starts with."""
    return {
        "format": format,
        "format_version": version,
        "cntinit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def file_entry(path: Path) -> dict:
    """A payload's manifest record: checksum and size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def new_manifest(model: dict, data: dict, capture: dict, modules: dict, stats: dict, gradients: dict | None = None) -> dict:
    """A store's manifest; `gradients` (token and batch counts, mean loss) only for a --gradients capture."""
    return {
        **header(FORMAT, FORMAT_VERSION),
        "model": model,
        "data": data,
        "capture": capture,
        "modules": modules,
        "stats": stats,
    } | ({"gradients": gradients} if gradients is not None else {})


def read_manifest(path: str | Path, format: str = FORMAT) -> dict | None:
    """The manifest of a `format` directory (a store by default) at `path`, or None when it is not one."""
    try:
        manifest = manifests.read_json(Path(path) / MANIFEST)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == format else None


KNOWN = {  # format -> what a directory of it is, and which command takes it
    "cntinit.stats": "a statistics store (from `cntinit capture`; `cntinit solve` takes it)",
    "cntinit.solve": "a solve directory (from `cntinit solve`; `cntinit export` takes it)",
    "cntinit.export": "an export (from `cntinit export`; a trainer loads it)",
}


def _format_of(path: Path) -> str | None:
    """The `format` its manifest.json names, if it has a readable one."""
    try:
        manifest = manifests.read_json(path / MANIFEST)
    except (OSError, ValueError):
        return None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    return found if isinstance(found, str) else None  # a list there made the lookup below raise TypeError


def what_it_is(path: Path) -> str:
    """What the directory at `path` holds, for errors that say why it is the wrong one."""
    found = _format_of(path)
    if found in KNOWN:
        return KNOWN[found]
    if (path / "adapter_config.json").is_file():
        return "a PEFT adapter"
    if (path / "config.json").is_file() or (path / "model_index.json").is_file():
        return "a model directory (`cntinit capture` takes it)"
    if (path / MANIFEST).exists():
        return f"a directory whose {MANIFEST} is not a cntinit manifest"
    return f"a directory without {MANIFEST}"


def open_manifest(path: Path, format: str, version: int, noun: str, command: str, checksums: bool = True, problem=None,
                  reread: bool = False) -> dict:
    """The manifest of the `format` directory `path` that `cntinit {command}` wrote, after checking its
    version, its shape (`problem(manifest)` says what is wrong, if anything), and that every payload
    is a file inside, exists, and (with `checksums`) matches its sha256 — remembered by the file's
    identity (memo.py) unless `reread`: bytes that changed under the filesystem, with no metadata
    changed (a disk fault), show only when the file is read again."""
    if not path.is_dir():
        raise CntinitError(f"{path} is not a directory: give the directory `cntinit {command}` wrote")
    manifest = read_manifest(path, format)
    if manifest is None:
        raise CntinitError(f"{path} is {what_it_is(path)}, not a cntinit {noun}: give the directory `cntinit {command}` wrote")
    found = manifest.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool):
        raise CntinitError(f"{path}/{MANIFEST} is corrupt: format_version is {found!r}, not a number: {command} again")
    if found != version:
        raise CntinitError(f"{path} has {noun} format version {found}, this cntinit reads {version}: {command} again")
    for name in manifest.get("files") or {}:
        if not isinstance(name, str) or Path(name).name != name or (path / name).is_symlink():
            raise CntinitError(f"{path}/{MANIFEST} names a payload outside the {noun} ({name}): the manifest was edited")
    wrong = problem(manifest) if problem else None
    if wrong:
        raise CntinitError(f"{path}/{MANIFEST} is corrupt: {wrong}: {command} again")
    for name in manifest["files"]:
        if not (path / name).is_file():
            raise CntinitError(f"{path / name} is missing: the {noun} is incomplete, {command} again")
    if checksums:
        # remembered: a capture solved for many modes and ranks is read once, not hashed per solve
        names = list(manifest["files"])
        digests = memo.sha256_each([path / name for name in names], None if reread else location.root() / location.DIGESTS)
        for name, digest in zip(names, digests):
            if "sha256:" + digest != manifest["files"][name]["sha256"]:
                raise CntinitError(f"{path / name} does not match its checksum in {MANIFEST}: the {noun} is corrupt, {command} again")
    return manifest


class Store:
    """A statistics store opened for reading; payload checksums are verified on open (`reread`: every
    payload read again, not taken as verified while its file is unchanged)."""

    def __init__(self, path: str | Path, verify: bool = True, reread: bool = False):
        self.path = Path(path)
        self.manifest = open_manifest(self.path, FORMAT, FORMAT_VERSION, "statistics store", "capture", checksums=verify,
                                      problem=manifests.store_problem, reread=reread)

    @property
    def keys(self) -> list[str]:
        return list(self.manifest["stats"])

    @property
    def buckets(self) -> int:
        return self.manifest["capture"]["buckets"]

    @property
    def has_gradients(self) -> bool:
        return "gradients" in self.manifest

    @property
    def has_statistics(self) -> bool:
        """False for a --gradients-only capture: its keys count tokens and hold no Σ."""
        return self.manifest["capture"].get("statistics", True) is True

    def gradient(self, name: str) -> torch.Tensor:
        """Module `name`'s weight gradient summed over batches (out × in): divide by the manifest's
        gradients.batches for the mean G."""
        entry = self.manifest["modules"].get(name)
        if entry is None or not self.has_gradients:
            raise CntinitError(f"{self.path} holds no gradient of {name}: capture with --gradients")
        file = self.path / self.manifest["stats"][entry["key"]]["file"]
        with safe_open(file, framework="pt") as handle:
            if f"{name}.grad" not in handle.keys():
                raise CntinitError(f"{file} is corrupt: {name}.grad is missing: capture again")
            grad = handle.get_tensor(f"{name}.grad")
        if tuple(grad.shape) != (entry["out_features"], entry["in_features"]):
            raise CntinitError(f"{file} is corrupt: {name}.grad has shape {tuple(grad.shape)}, not "
                               f"{(entry['out_features'], entry['in_features'])}: capture again")
        if not all_finite(grad):
            raise CntinitError(f"{file} holds NaN or Inf in the gradient of {name}: the statistics store is damaged, capture again")
        return grad

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one key, under their short names (xxt, sum, count, bucket_*)."""
        entry = self.manifest["stats"].get(key)
        if entry is None:
            raise CntinitError(f"{self.path} holds no statistics key {key}")
        if not self.has_statistics:
            raise CntinitError(f"{self.path} holds loss gradients only (captured with --gradients-only), no statistics: capture again "
                               "without --gradients-only")
        prefix = key + "."
        with safe_open(self.path / entry["file"], framework="pt") as handle:
            tensors = {name[len(prefix) :]: handle.get_tensor(name) for name in handle.keys()
                       if name.startswith(prefix) and name[len(prefix) :] != "grad"}  # a module's gradient is not its key's statistic
        dim, buckets = entry["dim"], self.buckets
        shapes = {"xxt": (dim, dim), "sum": (dim,), "count": ()}
        if buckets > 1:
            shapes |= {"bucket_xxt": (buckets, dim, dim), "bucket_sum": (buckets, dim), "bucket_count": (buckets,)}
        wrong = next((f"{key}.{name} {'is missing' if name not in tensors else f'has shape {tuple(tensors[name].shape)}, not {shape}'}"
                      for name, shape in shapes.items() if name not in tensors or tuple(tensors[name].shape) != shape), None)
        wrong = wrong or _misfit(key, tensors)
        if wrong:
            raise CntinitError(f"{self.path / entry['file']} is corrupt: {wrong}: capture again")
        if not all(all_finite(t) for t in tensors.values()):
            raise CntinitError(f"{self.path / entry['file']} holds NaN or Inf in the statistics of {key}: the statistics store "
                               "is damaged, capture again")
        return tensors


SUM_DTYPES = (torch.float32, torch.float64)  # what --accumulate writes


def _misfit(key: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a key's sums beyond their shapes (a hand-edited payload): floating sums, whole
    positive token counts that add up across the buckets."""
    for name in ("xxt", "sum", "bucket_xxt", "bucket_sum"):
        if name in tensors and tensors[name].dtype not in SUM_DTYPES:
            return f"{key}.{name} is {str(tensors[name].dtype).removeprefix('torch.')}, not float32 or float64"
    for name in ("count", "bucket_count"):
        if name in tensors and (tensors[name].is_floating_point() or tensors[name].dtype == torch.bool):
            return f"{key}.{name} is {str(tensors[name].dtype).removeprefix('torch.')}, not a whole number of tokens"
    count = int(tensors["count"])
    if count < 1:
        return f"{key}.count is {count}, not a positive number of tokens"
    if "bucket_count" in tensors and (bool((tensors["bucket_count"] < 0).any()) or int(tensors["bucket_count"].sum()) != count):
        return f"{key}.bucket_count is {tensors['bucket_count'].tolist()}: no bucket counts fewer than 0, and they add up to count {count}"
    return None


def check_out(out: str | Path, model_fingerprint: str, overwrite: bool, format: str = FORMAT, what: str = "a statistics store") -> None:
    """Refuse, before any work, an `out` that cannot be written, anything cntinit did not write
    (even with --overwrite: a user's file or folder is never replaced), and — unless --overwrite —
    an output of another kind or of another model. An empty directory is taken as it is."""
    out = Path(out).absolute()
    check_name(out)
    check_writable(out.parent)
    if not out.exists() and not out.is_symlink():
        return
    refuse_foreign(out)
    if overwrite or not any(out.iterdir()):
        return
    manifest = read_manifest(out, format)
    recorded = manifest.get("model", {}).get("fingerprint") if manifest is not None else None
    if isinstance(recorded, str) and scheme_of(recorded) != scheme_of(model_fingerprint):
        raise CntinitError(f"--out {out} is {what} an earlier cntinit wrote, whose weight fingerprint is of another kind, so whether it "
                           "is of this model cannot be told: choose another path or pass --overwrite to replace it")
    if manifest is None or recorded != model_fingerprint:
        raise CntinitError(f"--out {out} is {what_it_is(out) if manifest is None else what + ' of another model'}, "
                           f"not {what} of this model: choose another path or pass --overwrite to replace it")


def refuse_foreign(out: Path) -> None:
    """An existing `out` must be cntinit's output or an empty directory for anything to replace it."""
    if (out.exists() or out.is_symlink()) and not _replaceable(out):
        raise CntinitError(f"--out {out} is {_foreign(out)}: cntinit replaces only what it wrote (a store, solve directory "
                           "or export) or an empty directory, even with --overwrite; choose another path")


def _replaceable(out: Path) -> bool:
    """cntinit's output or an empty directory (a symbolic link to one: the link is replaced, not what it names)."""
    if not out.is_dir():
        return False
    return not any(out.iterdir()) or _format_of(out) in KNOWN


def _foreign(out: Path) -> str:
    if not out.is_dir():
        return "a file, not a directory"
    return what_it_is(out)


def _shard_set(stores: list[Store]) -> str | None:
    """None when the stores are not `--shard` captures; "complete" when they are every shard of one
    data set; "partial" (with a warning) for some of them. Mixed or repeated shards are refused."""
    shards = [s.manifest["capture"].get("shard") for s in stores]
    if not any(shards):
        return None
    if not all(shards):
        raise CntinitError("some stores are --shard captures and some are not: merge the shards first, then merge the results")
    counts = {shard.split("/")[1] for shard in shards}
    if len(counts) > 1:
        raise CntinitError(f"the shards are of different counts ({', '.join(sorted(shards))}): merge shards of one --shard i/N run")
    if len({s.manifest["data"]["fingerprint"] for s in stores}) > 1:
        raise CntinitError("the shards were cut from different data: merge shards of one data set")
    repeated = sorted({shard for shard in shards if shards.count(shard) > 1})
    if repeated:
        raise CntinitError(f"shard {repeated[0]} is given more than once: each shard counts once")
    if len(shards) < int(counts.pop()):
        warn(f"merging {len(shards)} of {shards[0].split('/')[1]} shards ({', '.join(sorted(shards))}): the result covers part of the data")
        return "partial"
    return "complete"


def _refuse_duplicates(stores: list[Store]) -> None:
    """Whole captures of the same data, summed, count every sample twice."""
    seen: dict[str, Store] = {}
    for store in stores:
        data = store.manifest["data"]["fingerprint"]
        if data in seen:
            raise CntinitError(f"{seen[data].path} and {store.path} hold statistics of the same data ({data[:19]}…): merging them counts "
                               "every sample twice; merge captures of different data, or pass --allow-duplicates to count them twice")
        seen[data] = store


def merge(directories: list[str | Path], out: str | Path, overwrite: bool = False, allow_duplicates: bool = False) -> Path:
    """Sum stores of one model (shards of one calibration set) into a new store at `out`.

    Bucket j of the result is the sum of bucket j of every input. Two whole captures of the same
    data (a store given twice) are refused, as counting every sample twice, unless `allow_duplicates`.
    """
    if len(directories) < 2:
        raise CntinitError("merge needs at least two stores")
    stores = [Store(d) for d in directories]
    first = stores[0].manifest
    for store in stores[1:]:
        other = store.manifest
        if other["modules"] != first["modules"]:
            raise CntinitError(f"{store.path} has other target modules than {stores[0].path}: capture both with the same --targets")
        if scheme_of(other["model"]["fingerprint"]) != scheme_of(first["model"]["fingerprint"]):
            raise CntinitError(f"{store.path} and {stores[0].path} were captured by different cntinit versions, whose weight fingerprints "
                               "are of different kinds, so whether they are of one model cannot be told: capture them again with one version")
        if other["model"]["fingerprint"] != first["model"]["fingerprint"]:
            raise CntinitError(f"{store.path} was captured from other model weights than {stores[0].path}: merge stores of one model only")
        if other["capture"]["buckets"] != first["capture"]["buckets"]:
            raise CntinitError(f"{store.path} has {other['capture']['buckets']} buckets, {stores[0].path} has {first['capture']['buckets']}: use one --buckets")
        if other["capture"].get("sample_max_norm", False) != first["capture"].get("sample_max_norm", False):
            raise CntinitError(f"{store.path} and {stores[0].path} differ in --sample-max-norm: their sums measure different things; capture both alike")
        if store.has_gradients != stores[0].has_gradients:
            with_them = store if store.has_gradients else stores[0]
            raise CntinitError(f"{with_them.path} holds gradients and the other stores do not: capture all with --gradients, or none")
        if store.has_statistics != stores[0].has_statistics:
            alone = store if not store.has_statistics else stores[0]
            raise CntinitError(f"{alone.path} holds gradients only (--gradients-only) and the other stores hold statistics too: capture "
                               "all alike")
        for option in ("seq_len", "pack", "dtype", "accumulate"):
            if other["capture"].get(option) != first["capture"].get(option):
                warn(f"merging stores captured with different {option}: {first['capture'].get(option)} and {other['capture'].get(option)}")
    shards = _shard_set(stores)
    if not shards and not allow_duplicates:
        _refuse_duplicates(stores)
    check_out(out, first["model"]["fingerprint"], overwrite)
    tensors_by_key: dict[str, dict[str, torch.Tensor]] = {}
    stats: dict[str, dict] = {}
    for key in stores[0].keys:
        parts = [s.tensors(key) if stores[0].has_statistics else {} for s in stores]
        summed = {name: sum(p[name] for p in parts) for name in parts[0]}
        tensors_by_key[key] = {f"{key}.{name}": t for name, t in summed.items()}
        if stores[0].has_gradients:
            for name in first["stats"][key]["modules"]:
                tensors_by_key[key][f"{name}.grad"] = sum(s.gradient(name) for s in stores)
        counted = int(summed["count"]) if "count" in summed else sum(s.manifest["stats"][key]["count"] for s in stores)  # gradients only: no tensors
        stats[key] = dict(first["stats"][key], count=counted)
    digest = hashlib.sha256("\n".join(s.manifest["data"]["fingerprint"] for s in stores).encode()).hexdigest()
    data = {
        "fingerprint": "sha256:" + digest,
        "sources": [src for s in stores for src in s.manifest["data"]["sources"]],
        "samples": sum(s.manifest["data"]["samples"] for s in stores),
        "sequences": sum(s.manifest["data"]["sequences"] for s in stores),
        "tokens": sum(s.manifest["data"]["tokens"] for s in stores),
        "merged_from": [str(s.path.absolute()) for s in stores],
    } | {key: first["data"][key] for key in ("split", "config", "repo", "revision")  # a dataset's, where every store read the same one
         if key in first["data"] and all(s.manifest["data"].get(key) == first["data"][key] for s in stores)}
    capture = first["capture"]
    if shards:  # shards of one data set: the result is that data set, as one run would record it
        data |= {"fingerprint": first["data"]["fingerprint"], "sources": first["data"]["sources"], "samples": first["data"]["samples"]}
        partial = ",".join(sorted(s.manifest["capture"]["shard"] for s in stores))
        capture = dict(capture, shard=None if shards == "complete" else partial)
    gradients = None
    if stores[0].has_gradients:
        parts = [s.manifest["gradients"] for s in stores]
        tokens = sum(p["tokens"] for p in parts)
        gradients = {"tokens": tokens, "batches": sum(p["batches"] for p in parts),
                     "mean_loss": sum(p["mean_loss"] * p["tokens"] for p in parts) / max(tokens, 1)}
    manifest = new_manifest(first["model"], data, capture, first["modules"], stats, gradients)
    with atomic_directory(out) as tmp:
        write(tmp, manifest, tensors_by_key)
    return Path(out)
