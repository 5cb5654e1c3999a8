"""Where cntinit keeps what outlives a run: the cache of captures and solves (cache.py), and the file
digests and weight fingerprints remembered by the files' identities (memo.py)."""

from __future__ import annotations

import os
from pathlib import Path

DIGESTS = "digests"  # under the root: the file checksums memo.py remembers (the cache's and a store's payloads')


def root() -> Path:
    """$CNTINIT_CACHE, else $XDG_CACHE_HOME/cntinit, else ~/.cache/cntinit."""
    explicit = os.environ.get("CNTINIT_CACHE")
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().absolute() / "cntinit"
