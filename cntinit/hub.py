"""Hugging Face Hub ids (`org/name`) as local directories: the repository's snapshot in the Hugging
Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), downloaded — only the
files cntinit reads — when it is not there and the machine may go online; and a snapshot traced
back to its id and commit, which the manifests record and export writes for trainers elsewhere.

The cache comes first, as for a pinned reproducible run: a snapshot that is there and whole is used
without asking the Hub whether `main` moved (`hf download ID` updates it). Nothing here imports
torch, so the command line resolves or refuses an id before the stages load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import CntinitError, first_line

ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # what `org/name` on the Hub looks like
SNAPSHOT = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
METADATA = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # configs, tokenizers, processors, schedulers, weight indexes
VARIANTS = ["*.fp16.safetensors", "*.bf16.safetensors", "*.non_ema.safetensors", "*.ema.safetensors"]  # diffusers' alternates
DATA_FILES = ["*.parquet", "*.arrow", "*.csv", "*.json", "*.jsonl", "*.txt", "README.md"]  # a dataset's files and its card (splits)
TRUE = {"1", "on", "yes", "true"}


def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it, read when asked (not at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """Whether the Hub may not be contacted (HF_HUB_OFFLINE, or transformers' older TRANSFORMERS_OFFLINE)."""
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in TRUE


def resolve(name: str | Path, revision: str | None = None, kind: str = "model", code: bool = False) -> Path:
    """The local directory of `name`: itself when it is a path that exists (or one that does not look
    like an id: the caller says it is missing), else the Hub id's snapshot at `revision` (default main),
    from the cache or downloaded. `code`: a model's own Python files are wanted too (--trust-remote-code)."""
    path = Path(name).expanduser()
    if path.exists() or not ID.match(str(name)):
        if revision is not None:
            raise CntinitError(f"--revision picks a commit of a Hub id, and {name} is a local path: leave out --revision")
        return path
    repo, revision = str(name), revision or "main"
    cached = _cached(repo, revision, kind)
    if cached is not None and not _missing(cached, kind):
        return cached
    if offline():
        raise CntinitError(_not_cached(repo, revision, kind, cached))
    snapshot = _download(repo, revision, kind, code)
    lacking = _missing(snapshot, kind)
    if lacking:
        raise CntinitError(f"{repo} at {revision} has no {lacking} on the Hub" + (
            ": cntinit reads safetensors only, never pickled *.bin weights; pick a --revision that has them (the Hub's "
            "safetensors conversions are refs/pr/N) or convert them" if lacking.endswith(".safetensors") else ""))
    return snapshot


def _snapshot(path: str | Path) -> re.Match | None:
    """`path` as a snapshot folder of a Hugging Face cache: (models|datasets, org, name, commit), or None."""
    return SNAPSHOT.search(Path(path).absolute().as_posix())


def origin(path: str | Path) -> dict:
    """{"repo": id, "revision": commit} when `path` is a snapshot in a Hugging Face cache, else {}."""
    found = _snapshot(path)
    return {"repo": f"{found[2]}/{found[3]}", "revision": found[4]} if found else {}


def snapshot_kind(path: str | Path) -> str | None:
    """"model" or "dataset" when `path` is a snapshot in a Hugging Face cache, else None."""
    found = _snapshot(path)
    return found[1].removesuffix("s") if found else None


def _repo_folder(repo: str, kind: str) -> Path:
    return cache_dir() / f"{kind}s--{repo.replace('/', '--')}"


def _cached(repo: str, revision: str, kind: str) -> Path | None:
    """The cached snapshot of `repo` at `revision` (a branch or tag through refs/, or a commit), or None."""
    folder = _repo_folder(repo, kind)
    ref = folder / "refs" / revision
    commit = revision if COMMIT.match(revision) else (ref.read_text().strip() if ref.is_file() else None)
    snapshot = folder / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def _missing(snapshot: Path, kind: str) -> str | None:
    """What a cached snapshot lacks that a stage reads (an interrupted or partial download), or None."""
    if kind == "dataset":
        return None if any(p.is_file() for p in snapshot.rglob("*") if p.name != ".gitattributes") else "data files"
    if (snapshot / "model_index.json").is_file():  # a diffusers pipeline: each component's folder
        return next((f"{part}/" for part in _components(snapshot) if not (snapshot / part).is_dir()), None)
    if not (snapshot / "config.json").is_file():
        return "config.json"
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        return next((shard for shard in _shards(index) if not (snapshot / shard).is_file()), None)
    return None if any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin")) else "model.safetensors"


def _components(snapshot: Path) -> list[str]:
    try:
        index = json.loads((snapshot / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    return [name for name, value in index.items() if isinstance(value, list) and value and value[0]] if isinstance(index, dict) else []


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []


def _not_cached(repo: str, revision: str, kind: str, cached: Path | None) -> str:
    """Why an offline run cannot have `repo`, and the fix."""
    download = f"hf download {'--repo-type dataset ' if kind == 'dataset' else ''}{repo}" + \
        (f" --revision {revision}" if revision != "main" else "")
    if cached is not None:
        return (f"the cached snapshot of {repo} lacks {_missing(cached, kind)} and HF_HUB_OFFLINE is set: download it whole "
                f"(`{download}`) where there is network, or unset HF_HUB_OFFLINE")
    refs = _repo_folder(repo, kind) / "refs"
    known = sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []
    if known:
        return (f"{repo} is in the Hugging Face cache, but not at revision {revision} (it has {', '.join(known)}): give one of those "
                f"with --revision, or download it (`{download}`)")
    return (f"{repo} is neither a local path nor a {kind} in the Hugging Face cache ({cache_dir()}), and HF_HUB_OFFLINE is set: "
            f"check the path, or download it (`{download}`) where there is network, or unset HF_HUB_OFFLINE")


def _download(repo: str, revision: str, kind: str, code: bool) -> Path:
    """Fetch what a stage reads of `repo` into the cache: for a model, its small files first, then only
    the weights they name (never *.bin, a single-file checkpoint beside them, or diffusers' variants)."""
    from huggingface_hub import snapshot_download

    try:
        if kind == "dataset":
            return Path(snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache_dir(), allow_patterns=DATA_FILES))
        small = METADATA + (["*.py"] if code else [])
        meta = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), allow_patterns=small))
        return Path(snapshot_download(repo, revision=meta.name, cache_dir=cache_dir(), allow_patterns=small + weight_patterns(meta),
                                      ignore_patterns=VARIANTS))
    except Exception as exc:
        raise CntinitError(_hub_error(exc, repo, revision, kind)) from None


def weight_patterns(snapshot: Path) -> list[str]:
    """The weight files a model's small files name: each pipeline component's safetensors, the shards
    of a safetensors index, or model.safetensors."""
    if (snapshot / "model_index.json").is_file():
        return [f"{part}/*.safetensors" for part in _components(snapshot)]
    index = snapshot / "model.safetensors.index.json"
    return _shards(index) if index.is_file() else ["model.safetensors"]


def _hub_error(exc: Exception, repo: str, revision: str, kind: str) -> str:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return f"{repo} is gated on the Hugging Face Hub: accept its terms at https://huggingface.co/{repo} and log in (`hf auth login`, or set HF_TOKEN)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo} has no revision {revision}: give a branch, tag or commit it has with --revision"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"there is no {kind} {repo} on the Hugging Face Hub, or it is private: check the id (a local path that does not exist "
                "reads as one), or log in (`hf auth login`) if it is yours")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return (f"{repo} is not in the Hugging Face cache ({cache_dir()}) and the Hub cannot be reached: connect, or download it where "
                f"there is network (`hf download {repo}`) and copy the cache here, or check the path if it is a local one")
    if isinstance(exc, OSError) and not isinstance(exc, errors.HfHubHTTPError):  # the Hub's HTTP errors are OSErrors too
        return f"could not write {repo} into the Hugging Face cache ({cache_dir()}): {first_line(exc)} — free space, or set HF_HUB_CACHE"
    return f"the Hugging Face Hub refused {repo} ({first_line(exc)}): try again, or download it with `hf download {repo}`"
