"""Output directories that appear whole or not at all: written under a temporary name, then swapped in.

A finished directory replaces the old one with one atomic exchange of the two names (Linux's
renameat2 RENAME_EXCHANGE), so a crash at any instant leaves the old or the new output in
place. Where the filesystem cannot exchange, the old output is first moved aside; a crash
between the two renames leaves it under `.NAME.old-*`, and the next write to NAME puts it
back. Temporary names carry the host and process id, so leftovers of a process that died on
this host are removed by the next write beside them (and by `cache prune`); others are reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from ..console import log, warn
from ..errors import CntinitError, first_line

AT_FDCWD, RENAME_EXCHANGE = -100, 2


def check_writable(directory: Path, advice: str = "choose an --out in a writable place") -> None:
    """Refuse, before any work, a `directory` that cannot be created or written in."""
    ancestor = Path(directory).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise CntinitError(f"cannot write in {ancestor} ({'not a directory' if not ancestor.is_dir() else 'permission denied'}): {advice}")


def check_name(out: Path) -> None:
    """Refuse, before any work, an `out` with a name (or a folder above it) longer than its filesystem
    takes — counting the temporary names written beside it, which add to its own."""
    out = Path(out).absolute()
    place, limit = Path(out.anchor), 255
    for part in out.parts[1:-1]:  # the deepest existing folder says what its filesystem takes
        try:
            if len(part.encode()) > limit or not (place / part).is_dir():
                break
        except OSError:
            break
        place = place / part
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(place, "PC_NAME_MAX")
    folder = next((part for part in out.parts[1:-1] if len(part.encode()) > limit), None)
    if folder is not None:
        raise CntinitError(f"{out}: the folder name {folder[:24]}… is {len(folder.encode())} bytes, longer than its filesystem takes "
                           f"({limit}): choose a shorter path")
    room = limit - 1 - max(len(f".tmp-{_tag()}") + 8, len(".checkpoint-rank") + 6, len(".layerwise-") + 8)
    if len(out.name.encode()) > room:
        raise CntinitError(f"--out {out}: its name is {len(out.name.encode())} bytes, and the temporary names cntinit writes beside it "
                           f"must fit this filesystem's {limit}: give a name of at most {room} bytes")


def write_failed(out: Path, exc: BaseException) -> CntinitError:
    """The one-line error of a write that failed (a full disk, permissions): nothing was put in place."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    return CntinitError(f"writing {out} failed ({reason}): nothing was written and what was there is untouched; "
                        "free some space or choose another --out")


def _tag() -> str:
    """Who is writing: host and process, so that a leftover can be told dead or alive."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it replaces `out`.

    On any exception the temporary directory is removed and `out` is left as it was; a write
    that fails (disk full, permissions) becomes a one-line error saying so.
    """
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        restore_interrupted_swap(out)
        remove_leftovers(out.parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tag()}", dir=out.parent))
    except OSError as exc:
        raise CntinitError(f"cannot write in {out.parent} ({exc.strerror or exc}): choose an --out in a writable place") from exc
    try:
        yield tmp
        _as_the_umask_says(tmp)
        _swap_in(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise write_failed(out, exc) from exc
        raise


_UMASK = threading.Lock()  # the umask is read by setting it and putting it back: two threads at once could leave it 0


def _umask() -> int:
    with _UMASK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _as_the_umask_says(root: Path) -> None:
    """Give a finished output the permissions any new file gets: mkdtemp makes its directory 0700
    and safetensors writes 0600, which a trainer running as another user could not read."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.is_dir() or out.is_symlink():
        if out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # out is the new directory, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_tag()}", dir=out.parent)) / out.name
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(aside.parent, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(number, os.strerror(number), str(b))


def restore_interrupted_swap(out: Path) -> None:
    """Where a crash between the two renames of a swap left `out` missing and its old contents
    aside, put them back."""
    if out.exists() or out.is_symlink():
        return
    aside = sorted(out.parent.glob(f".{out.name}.old-*/{out.name}"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.replace(aside[-1], out)
        shutil.rmtree(aside[-1].parent, ignore_errors=True)
        warn(f"restored {out} from {aside[-1].parent.name}, where an interrupted write had moved it")


def remove_leftovers(directory: Path, name: str = "*") -> list[Path]:
    """Remove the temporary directories (of output `name`, or of any) that processes which died on
    this host left in `directory` — an old output moved aside goes back first if its place is
    empty — and report those of other hosts. Returns what was removed."""
    removed, host = [], socket.gethostname().replace("-", "_")
    for kind in ("tmp", "old"):
        for path in sorted(directory.glob(f".{name}.{kind}-*")):
            original, _, owner = path.name[1:].rpartition(f".{kind}-")
            writer, _, rest = owner.partition("-")
            pid = rest.partition("-")[0]
            if not pid.isdigit():
                continue  # not a name this module makes
            if writer != host:
                warn(f"{path} was left by a write on host {writer}: remove it if nothing there is writing {directory / original}")
                continue
            if _alive(int(pid)):
                continue
            if kind == "old":
                restore_interrupted_swap(directory / original)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log(f"removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} left by interrupted writes in {directory}")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside the file `out`; on success it replaces `out`, on failure it is
    removed (a write that fails becomes the same one-line error as a directory's)."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as exc:
        raise CntinitError(f"cannot write in {out.parent} ({exc.strerror or exc}): choose a writable place") from exc
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, out)
    except (OSError, SafetensorError) as exc:
        raise write_failed(out, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
