"""A content-addressed cache of capture stores and solve directories.

    $CNTINIT_CACHE (default ~/.cache/cntinit)/
        captures/<key>/        a statistics store, exactly as `cntinit capture --out` writes it
        captures/<key>.json    what the key was made of, when it was made and last used
        solves/<key>/ ...      the same for solve directories
        digests/               file content hashes, remembered by the files' identities (storage/memo.py)
        fingerprints/          weight fingerprints (models/fingerprints.py), remembered likewise
        locks/<key>.lock       held while an entry is looked up and computed

The key is the SHA-256 of the model directory's contents, the data's contents and every
option that changes the result (plus cntinit's version), so a repeated run finds its entry
without loading anything, and changing only the solve reuses the capture. Entries appear by
atomic rename; a run computing a key holds its lock, so a second run with the same key waits
and then hits instead of computing it twice. Only entries (and a cache) owned by this user, or by
those $CNTINIT_CACHE_TRUST names, are taken as results: another's may have been planted.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .. import __version__
from ..console import log
from ..errors import CntinitError
from . import memo
from .atomic import atomic_file, remove_leftovers
from .location import DIGESTS, root
from .manifests import read_json
from .store import read_manifest

KINDS = {"capture": ("captures", "cntinit.stats"), "solve": ("solves", "cntinit.solve")}
TRUST = "CNTINIT_CACHE_TRUST"  # users and groups whose cache entries (and cache) this user takes as results


def ready(cache: Path | None = None) -> Path:
    """The cache directory, created if needed; a one-line error when it cannot be written, or when it
    belongs to someone this user does not trust (see `trusted`)."""
    cache = cache or root()
    try:
        (cache / "locks").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache / "locks"):  # a name of its own: runs probe at once
            pass
        owner = cache.stat().st_uid
    except OSError as exc:
        raise CntinitError(f"cannot write in the cache {cache} ({exc.strerror or exc}): set CNTINIT_CACHE to a writable directory") from None
    if not trusted(owner):
        raise CntinitError(f"the cache {cache} belongs to {_name(owner)}, not you, so entries anyone who can write there left would be "
                           f"taken as results: set CNTINIT_CACHE to a cache of your own, or trust its owner with {TRUST}={_name(owner)} "
                           "(a team: group:NAME; docs/recipes.md)")
    return cache


def trusted(uid: int) -> bool:
    """Whether entries owned by `uid` are taken as results: this user's own, and those of the users and
    groups $CNTINIT_CACHE_TRUST names (comma-separated user names or ids, and group:NAME for a group's
    members), as git's safe.directory trusts repositories of other owners."""
    if uid == os.getuid():
        return True
    name = _name(uid)
    for item in filter(None, (part.strip() for part in os.environ.get(TRUST, "").split(","))):
        if item in (name, str(uid)) or (item.startswith("group:") and _in_group(uid, item.removeprefix("group:"))):
            return True
    return False


def _name(uid: int) -> str:
    """The user name of `uid`, or the number where the system has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _in_group(uid: int, group: str) -> bool:
    try:
        found = grp.getgrnam(group)
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == found.gr_gid or user.pw_name in found.gr_mem


def file_digests(files: list[Path], cache: Path) -> list[str]:
    """SHA-256 of each file's bytes, side by side, remembered under the file's identity (storage/memo.py)
    so a 14 GB checkpoint is read once, not on every run."""
    return memo.sha256_each(files, cache / DIGESTS)


def tree_digest(path: str | Path, cache: Path) -> str:
    """SHA-256 over a file, or over a directory's files (relative path and content; hidden
    files and folders left out), independent of where the tree lives."""
    path = Path(path)
    if not path.exists():
        raise CntinitError(f"{path} does not exist: check the path")
    if path.is_file():
        return file_digests([path], cache)[0]
    digest = hashlib.sha256()
    files = tree_files(path)
    for file, each in zip(files, file_digests(files, cache)):  # a sharded checkpoint's files side by side
        digest.update(f"{file.relative_to(path).as_posix()}\0{each}\n".encode())
    return digest.hexdigest()


def tree_files(path: Path) -> list[Path]:
    """The files under the directory `path` that make up its contents, sorted: hidden files and folders left out."""
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


def key(kind: str, inputs: dict) -> str:
    """The content key of an entry: SHA-256 of its inputs as canonical JSON."""
    text = json.dumps({"kind": kind, "cntinit": __version__, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Entry:
    kind: str
    key: str
    path: Path
    meta: dict
    bytes: int  # measured when listed, so a removal can still say how much it freed
    manifest: dict  # the capture's or solve's, read when listed
    link: str | None = None  # where the entry points when it is a symbolic link (a user's own arrangement): removing it keeps that

    @property
    def used(self) -> float:
        return self.meta.get("used", self.path.stat().st_mtime)


def entry_dir(cache: Path, kind: str, key: str) -> Path:
    return cache / KINDS[kind][0] / key


def obtain(kind: str, inputs: dict, label: str, compute: Callable[[Path], object], cache: Path | None = None) -> tuple[Path, bool]:
    """(the entry's directory, whether it was already there and intact). A hit is checked under a
    shared lock (runs using one entry do not wait for each other); a miss, or an entry whose files
    no longer match their checksums, is computed by `compute(directory)` (atomically, as capture
    and solve write) under the key's exclusive lock, so two runs never compute it twice."""
    cache = cache or root()
    digest = key(kind, inputs)
    path = entry_dir(cache, kind, digest)
    with _locked(cache, digest, label, shared=True):
        if _intact(path, KINDS[kind][1], cache) and _owned(path) is None:
            _touch(path, kind, digest, label, inputs)
            return path, True
    with _locked(cache, digest, label):
        stranger = _owned(path)
        hit = stranger is None and _intact(path, KINDS[kind][1], cache)  # another run may have computed it meanwhile
        if not hit:
            if stranger is not None:
                log(f"cache entry {digest[:12]} ({label}) was written by {_name(stranger)}, whom {TRUST} does not name; computing it again")
                _discard(path)
            elif path.exists() or path.is_symlink():
                log(f"cache entry {digest[:12]} ({label}) is damaged (a file is missing or changed); computing it again")
                _discard(path)
            compute(path)
        _touch(path, kind, digest, label, inputs)
    return path, hit


@contextlib.contextmanager
def in_use(path: Path, cache: Path | None = None) -> Iterator[None]:
    """Hold the entry at `path` while a run reads it: `cache rm` and `prune` leave it alone."""
    with _locked(cache or root(), path.name, path.name, shared=True):
        yield


def _touch(path: Path, kind: str, digest: str, label: str, inputs: dict) -> None:
    meta_file = path.with_suffix(".json")
    meta = _read_json(meta_file) or {"kind": kind, "key": digest, "label": label, "created": time.time(), "inputs": inputs}
    _write_atomic(meta_file, json.dumps(meta | {"used": time.time()}, indent=2, default=str))


def _owned(path: Path) -> int | None:
    """The owner of the entry at `path` (its directory or its manifest) when not a trusted one, else None."""
    for part in (path, path / "manifest.json"):
        try:
            owner = part.stat().st_uid
        except OSError:
            continue
        if not trusted(owner):
            return owner
    return None


def _discard(path: Path) -> None:
    """Remove an entry (a link to one: the link only; what it names is not the cache's to delete)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def _intact(path: Path, format: str, cache: Path) -> bool:
    """A readable manifest whose payloads all exist with their recorded sizes and checksums (each
    file's hash is remembered by its size, mtime and inode, so a repeated hit reads nothing)."""
    manifest = read_manifest(path, format)
    if manifest is None:
        return False
    recorded = manifest.get("files", {})
    files = [path / name for name in recorded]
    if not all(file.is_file() and file.stat().st_size == recorded[file.name].get("bytes") for file in files):
        return False
    return all("sha256:" + digest == recorded[file.name].get("sha256")  # a cached 7B store's dozen payloads side by side
               for file, digest in zip(files, file_digests(files, cache)))


def entries(cache: Path | None = None) -> list[Entry]:
    """Every complete entry, most recently used first."""
    cache = cache or root()
    found = []
    for kind, (folder, format) in KINDS.items():
        directory = cache / folder
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            manifest = read_manifest(path, format) if path.is_dir() and not path.name.startswith(".") else None
            if manifest is not None:
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                link = os.readlink(path) if path.is_symlink() else None
                found.append(Entry(kind, path.name, path, _read_json(path.with_suffix(".json")) or {}, size, manifest, link))
    return sorted(found, key=lambda e: e.used, reverse=True)


def remove(entry: Entry, cache: Path | None = None) -> bool:
    """Delete one entry unless a run holds its lock; whether it was removed. An entry that is a symbolic
    link loses the link only: what it names is not the cache's to delete."""
    cache = cache or root()
    try:
        with _locked(cache, entry.key, entry.meta.get("label", entry.key), wait=False):
            _discard(entry.path)
            entry.path.with_suffix(".json").unlink(missing_ok=True)
            return True
    except BlockingIOError:
        return False


def match(prefixes: list[str], cache: Path | None = None) -> list[Entry]:
    """Entries whose key starts with each prefix; a prefix that matches none or several is an error."""
    all_entries = entries(cache)
    chosen = []
    for prefix in prefixes:
        hits = [e for e in all_entries if e.key.startswith(prefix.lower())]
        if not hits:
            raise CntinitError(f"no cache entry has a key starting with {prefix}: see `cntinit cache ls`")
        if len(hits) > 1:
            raise CntinitError(f"{len(hits)} cache entries have keys starting with {prefix}: give more of the key")
        chosen.append(hits[0])
    return chosen


AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)i?B?$", re.IGNORECASE)


def parse_age(text: str) -> float:
    """'30d' → seconds."""
    found = AGE.match(text.strip())
    if not found:
        raise CntinitError(f"--older-than {text} is not an age: write e.g. 12h, 30d or 2w")
    return float(found[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[found[2]]


def parse_size(text: str) -> int:
    """'20G' → bytes (powers of 1024)."""
    found = SIZE.match(text.strip())
    if not found:
        raise CntinitError(f"--max-size {text} is not a size: write e.g. 500M or 20G")
    return int(float(found[1]) * 1024 ** " KMGT".index(found[2].upper() or " "))


def prune(older_than: float | None, max_bytes: int | None, cache: Path | None = None) -> tuple[list[Entry], list[Entry]]:
    """(removed, kept because in use): entries unused for `older_than` seconds, then the least
    recently used until the rest fits in `max_bytes`. Temporary directories that interrupted
    runs left behind go too (`atomic.remove_leftovers`)."""
    cache = cache or root()
    for folder, _ in KINDS.values():
        if (cache / folder).is_dir():
            remove_leftovers(cache / folder)
    now = time.time()
    remaining = entries(cache)
    doomed = [e for e in remaining if older_than is not None and now - e.used > older_than]
    remaining = [e for e in remaining if e not in doomed]
    if max_bytes is not None:
        total = sum(e.bytes for e in remaining)
        while remaining and total > max_bytes:
            oldest = remaining.pop()
            total -= oldest.bytes
            doomed.append(oldest)
    removed, busy = [], []
    for entry in doomed:
        (removed if remove(entry, cache) else busy).append(entry)
    return removed, busy


def leftovers(cache: Path | None = None) -> list[Path]:
    """Temporary directories interrupted writes left among the entries."""
    cache = cache or root()
    return [p for folder, _ in KINDS.values() for pattern in (".*.tmp-*", ".*.old-*") for p in (cache / folder).glob(pattern)]


@contextlib.contextmanager
def _locked(cache: Path, digest: str, label: str, wait: bool = True, shared: bool = False) -> Iterator[None]:
    """The key's lock: exclusive to compute or remove an entry, shared to read one."""
    handle = open(ready(cache) / "locks" / f"{digest}.lock", "a+")
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            log(f"waiting for another run that is {'computing' if shared else 'computing or using'} {label} ({digest[:12]})")
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
