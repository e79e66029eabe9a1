"""Writing files so that nobody ever sees half of one: the only place notata writes.

Every file goes to a temporary sibling (``.NAME.<token>.tmp``) and is renamed
into place; a reader, a crash or a SIGKILL at any instant sees the old file or
the new one. Readers and the scanner skip names that start with a dot, and
:func:`clean_temporaries` removes what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from .errors import CorruptMetadataError

TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = False,
                 still: Callable[[], bool] | None = None) -> bool:
    """Write ``path`` through ``write(fileobj)`` on a temporary file, then rename it.

    ``durable=True`` also fsyncs the file and its folder before returning, so the
    new content survives a crash of the machine, not only of the process.
    The temporary file is removed if ``write`` raises (disk full included). ``still()``,
    asked just before the rename, may call the write off (the temporary file removed,
    False returned): a run's holder whose lock was broken while it was stopped (a frozen
    node) must not put its record over the new holder's.
    """
    tmp = _tmp_name(path)
    # O_EXCL: never write through a name someone planted; mode 0o666 lets umask decide,
    # unlike mkstemp's 0o600, which would hide results from the rest of a group.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if still is not None and not still():
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # e.g. disk full: name the file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    if durable:
        fsync_dir(path.parent)
    return True


def create_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``, atomically, failing with FileExistsError if it exists
    (a temporary file hard-linked into place: never half a file, never a replaced one)."""
    tmp = _tmp_name(path)
    atomic_write_bytes(tmp, data)
    try:
        os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Atomically replace ``path`` with ``data``."""
    atomic_write(path, lambda f: f.write(data), durable=durable)


def dumps_json(obj: Any) -> bytes:
    """The JSON notata writes: indented, sorted keys, UTF-8, final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any, *, durable: bool = False,
                      still: Callable[[], bool] | None = None) -> bool:
    """Atomically replace ``path`` with ``obj`` as JSON (``still``: see atomic_write)."""
    data = dumps_json(obj)
    return atomic_write(path, lambda f: f.write(data), durable=durable, still=still)


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object; any problem is a :class:`CorruptMetadataError` naming the file.

    ``FileNotFoundError`` passes through: a missing file is not a corrupt one.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptMetadataError(str(path), f"not UTF-8 at byte {err.start}") from err
    except json.JSONDecodeError as err:
        problem = f"invalid JSON: {err.msg} at line {err.lineno}" if raw.strip() else "empty file"
        raise CorruptMetadataError(str(path), problem) from err
    if not isinstance(obj, dict):
        raise CorruptMetadataError(str(path), f"expected a JSON object, found {type(obj).__name__}")
    return obj


def identity(path: Path | int) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` (or open as that descriptor): the same
    file, not only the same name; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def detach(path: Path) -> None:
    """Put a copy of the regular file at ``path`` in its place, so that a process still
    holding it open writes into the old file, no longer named, and not into what comes
    next. The old file is renamed aside first, and only what it held at that moment is
    copied (what its writer adds meanwhile is not); a symlink, a device or a folder
    there is not followed, only removed from the name (a symlink) or left (the rest). A
    copy that fails (a full disk) leaves the old file aside, as ``.NAME.detached-*``
    (its writer's, still), and no temporary file: what comes next starts a new file."""
    # not a temporary name: a crash from here on must leave the old file to be found
    aside = path.with_name(f".{path.name}.detached-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    tmp = _tmp_name(path)
    try:
        src = os.open(aside, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:  # a symlink (ELOOP), or nothing notata can read: not the run's output
        with contextlib.suppress(OSError):
            if os.path.islink(aside):
                os.unlink(aside)
            else:
                os.rename(aside, path)
        return
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            os.rename(aside, path)
            return
        with open(src, "rb", closefd=False) as f, open(tmp, "xb") as out:
            shutil.copyfileobj(io.BufferedReader(_Bounded(f, st.st_size)), out)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.replace(tmp, path)
        os.unlink(aside)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)


class _Bounded(io.RawIOBase):
    """The first ``size`` bytes of a file another process may still be appending to."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f, self._left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[:self._left]
        n = self._f.readinto(view) or 0  # type: ignore[attr-defined]
        self._left -= n
        return n


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(paths: Iterable[Path]) -> None:
    """Flush files written earlier without fsync, then their folders."""
    folders = set()
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(p.parent)
    for folder in folders:
        fsync_dir(folder)


def clean_temporaries(root: Path) -> list[Path]:
    """Remove temporary files a killed writer left under ``root``; symlinks are not followed."""
    removed = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                p = Path(folder, name)
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return removed
