"""The model fingerprint: what ties a store, a solve directory and an export to the weights they
were computed from, checked by every stage that reads the weights again.

It hashes each target's name, shape and float32 values (W as out × in), so it does not depend on
the dtype the model ran in; every value must be finite. Every stage hashes every target weight —
274 GB of float32 for a 70B model's linear layers — so the weights are hashed side by side, each
in its own sha256, and the fingerprint is the sha256 of those digests in name order
(`sha256-weights:`). Stores written before 2026-11-27 hold `sha256:`, one stream over the same
bytes in name order, which no number of cores could speed up; they are still verified in it.

Given the directory the weights were read from, the fingerprint is remembered in the cache
(`fingerprints/`) by the identities of the directory's files (storage/memo.py): capture, solve and
export of one model hash its weights once, and any change to a file computes it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from torch import nn

from .. import __version__
from ..errors import CntinitError
from ..finite import all_finite
from ..storage import cache, memo
from .linears import weight_values

SCHEME = "sha256-weights"
LEGACY = "sha256"  # one stream over every weight in turn
CHUNK_BYTES = 64 * 2**20  # float32 rows converted and hashed at a time: a weight is never copied whole


def fingerprint(modules: dict[str, nn.Module], read: Callable | None = None, loaded: torch.dtype | None = None,
                scheme: str = SCHEME, model_dir: Path | None = None) -> str:
    """The fingerprint of `modules`' weights in `scheme` (`storage.manifests.scheme_of` of a recorded one, to verify it).

    `read(name, module, loaded)` supplies W (out × in) where the module holds none (a layerwise
    capture reads it from the checkpoint, in the dtype `loaded` that from_pretrained would give it).
    `model_dir`: the directory the weights were loaded from and are unchanged since — the value is
    remembered for its files as they are.
    """
    if model_dir is None:
        return _computed(modules, read, loaded, scheme)
    dtypes = sorted({str(loaded)} if read else {str(module.weight.dtype) for module in modules.values()})
    what = repr(("fingerprint", scheme, __version__, torch.__version__, transformers.__version__, dtypes, sorted(modules)))
    return memo.remembered(cache.root() / "fingerprints", what, cache.tree_files(Path(model_dir)),
                           lambda: _computed(modules, read, loaded, scheme))


def _computed(modules: dict[str, nn.Module], read: Callable | None, loaded: torch.dtype | None, scheme: str) -> str:
    names = sorted(modules)

    def weight(name: str) -> torch.Tensor:
        return read(name, modules[name], loaded) if read else weight_values(modules[name])

    if scheme == LEGACY:
        digest = hashlib.sha256()
        with ThreadPoolExecutor(1) as reader:  # the next weight is read while this one is hashed
            upcoming = reader.submit(weight, names[0]) if names else None
            for position, name in enumerate(names):
                current = upcoming.result()
                upcoming = reader.submit(weight, names[position + 1]) if position + 1 < len(names) else None
                _hash(digest, name, current)
        return f"{LEGACY}:{digest.hexdigest()}"
    if scheme != SCHEME:
        raise CntinitError(f"a fingerprint of kind {scheme!r} was recorded, which this cntinit does not know: use the cntinit that "
                           "wrote it, or capture again")
    # an offloaded model moves each weight in and out through its hooks: one at a time
    threads = 1 if any(getattr(m, "_hf_hook", None) is not None for m in modules.values()) else memo.threads()
    with ThreadPoolExecutor(threads) as pool:  # hashlib and torch release the GIL: the weights are hashed side by side
        digests = list(pool.map(lambda name: _hash(hashlib.sha256(), name, weight(name)).hexdigest(), names))
    return f"{SCHEME}:{hashlib.sha256(''.join(d + chr(10) for d in digests).encode()).hexdigest()}"


def _hash(digest, name: str, weight: torch.Tensor):
    """Add `name:(shape)\\n` and W's float32 bytes, row by row, to `digest`, refusing NaN and Inf."""
    digest.update(f"{name}:{tuple(weight.shape)}\n".encode())
    rows = max(1, CHUNK_BYTES // (4 * max(1, weight.shape[1])))
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows].to("cpu", torch.float32).contiguous()
        if not all_finite(part):  # every stage reads the weights through here: one check for all
            raise CntinitError(f"the weight of {name} holds NaN or Inf: the model's checkpoint is damaged; use an intact copy")
        digest.update(part.numpy())  # the buffer itself: no copy
    return digest
