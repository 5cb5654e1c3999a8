"""Output directories that appear whole or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CntinitError


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it replaces `out`.

    On any exception the temporary directory is removed and `out` is left as it was; a write
    that fails (disk full, permissions) becomes a one-line error saying so.
    """
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise CntinitError(f"cannot write in {out.parent} ({exc.strerror or exc}): choose an --out in a writable place") from exc
    previous = None  # where the old `out` waits while the new one moves in
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
            os.replace(out, previous)
            os.replace(tmp, out)
            shutil.rmtree(previous.parent, ignore_errors=True)
            previous = None
        else:
            if out.exists() or out.is_symlink():
                out.unlink()
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            os.replace(previous, out)
            shutil.rmtree(previous.parent, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CntinitError(f"writing {out} failed ({exc.strerror or exc}): nothing was written and what was there is "
                               "untouched; free some space or choose another --out") from exc
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside the file `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
