"""The run lock (one live writer per run directory), and the sweep's own locks.

The run lock is an exclusive ``flock`` on ``<run>/.lock``, held for the run's lifetime
through a descriptor that child processes do not inherit (``O_CLOEXEC``). notata
takes the ``flock`` itself rather than through ``filelock``: the file must be created
with the mode the umask gives (a group-shared sweep; filelock before 3.24 forced
0644), must never be unlinked on release (filelock 3.21-3.28 did, which lets two
openers lock two different files), and the holder must check that ``.lock`` is still
the file it locked (a breaker may have renamed it aside), which needs the descriptor.
Where the filesystem refuses ``flock`` (Lustre without ``flock``, NFS with
``nolock``), ``filelock.SoftFileLock`` takes over (an ``O_EXCL`` file naming host and
pid; a dead holder on this host is recognised by it), with a warning.

How a dead holder is recognised:

- **Same host**: the kernel drops an ``flock`` when its process dies, so a
  killed run never blocks the next attempt, and a lock that is held has a live
  holder: it is never broken.
- **Another host** (a lost node on a shared filesystem): the holder's lock is
  broken only when its last heartbeat, by the time the holder wrote into
  metadata.json, is older than :func:`stale_threshold` (10 minutes, or 10
  heartbeat intervals if longer), and the holder's record has not changed
  after a short second look (so a new holder that has just taken the lock and
  not yet written its record is not mistaken for the old one). Breaking
  renames the old lock file aside (``.lock.broken-<time>``) and takes a new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock

from . import layout
from .errors import RunLockedError

MIN_STALE_LOCK_SEC = 600.0
STALE_LOCK_BEATS = 10
CONFIRM_SEC = 2.0
#: A busy lock is tried again for this long before it counts as held: a collector's
#: probe (:func:`is_held`) holds it for microseconds.
RETRY_SEC = 1.0
# What flock answers on filesystems that do not support it.
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}


class _Unsupported(Exception):
    """This filesystem refuses flock."""


def stale_threshold(holder: Mapping[str, Any]) -> float:
    """Seconds without a heartbeat after which a lock held from another host may be broken."""
    hb = holder.get("heartbeat")
    interval = hb.get("interval_sec") if isinstance(hb, Mapping) else None
    return max(MIN_STALE_LOCK_SEC, STALE_LOCK_BEATS * float(interval or 0))


def holder_is_dead(holder: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether a lock's holder, as its run's metadata describes it, is known to be gone."""
    if not holder or holder.get("host") == socket.gethostname():
        return False  # this host's kernel already frees the flock of a dead process
    now = time.time() if now is None else now
    hb = holder.get("heartbeat")
    beat = (hb.get("unix") if isinstance(hb, Mapping) else None) or holder.get("start_unix")
    if not isinstance(beat, (int, float)):
        return False  # nothing to judge by: never break on a guess
    return now - beat > stale_threshold(holder)


def _flock(path: Path, blocking: bool) -> int | None:
    """A descriptor holding an exclusive flock on ``path`` (made if missing, with the mode
    the umask gives), or None when another process holds it. Raises :class:`_Unsupported`."""
    created = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:  # another user's file without group write: flock still works
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # renamed aside in between: the caller tries again
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as err:
        os.close(fd)
        if err.errno in _UNSUPPORTED:
            if created:  # leave no empty file that a soft lock would take for a holder
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise _Unsupported from err
        raise
    try:  # a breaker may have renamed the file aside between our open and our flock
        ours = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        ours = False
    if not ours:
        os.close(fd)
        return None
    return fd


def _soft(path: Path) -> filelock.BaseFileLock:
    warnings.warn(f"{path.parent}: this filesystem does not support flock; using a soft lock "
                  "(a file naming host and pid), which cannot see a dead holder on another host",
                  UserWarning, stacklevel=3)
    return filelock.SoftFileLock(str(path), timeout=0)


class RunLock:
    """The lock of one run directory. ``holder()`` reads who holds it, for error messages."""

    def __init__(self, run_dir: Path, holder: Callable[[], dict[str, Any]]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / layout.LOCK
        self._holder = holder
        self._fd: int | None = None
        self._soft: filelock.BaseFileLock | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None or (self._soft is not None and self._soft.is_locked)

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`; a dead holder's lock is broken."""
        deadline = time.monotonic() + RETRY_SEC
        while not self.try_acquire():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
        holder = self._read_holder()
        if holder_is_dead(holder):
            time.sleep(CONFIRM_SEC)
            if self._read_holder() != holder:
                raise RunLockedError(str(self.run_dir), self._read_holder())
            stamp = time.strftime("%Y%m%dT%H%M%S")
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, self.path.with_name(f"{layout.LOCK}.broken-{stamp}"))
            if self.try_acquire():
                return
        raise RunLockedError(str(self.run_dir), holder)

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting."""
        if self._soft is None:
            try:
                self._fd = _flock(self.path, blocking=False)
                return self._fd is not None
            except _Unsupported:
                self._soft = _soft(self.path)
        try:
            self._soft.acquire(timeout=0)
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        """Let the next attempt in. Safe to call twice. The file stays (see the module doc)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock
        if self._soft is not None and self._soft.is_locked:
            self._soft.release(force=True)

    def _read_holder(self) -> dict[str, Any]:
        try:
            return self._holder()
        except Exception:  # a holder we cannot describe is still a holder
            return {}


def is_held(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock right now (a non-blocking try).

    No ``.lock`` file: nobody holds it (a holder creates it), and none is created here.
    A free lock is held for microseconds by the try; a task starting in that instant
    retries (:data:`RETRY_SEC`) rather than read it as taken.
    """
    if not (run_dir / layout.LOCK).exists():
        return False
    probe = RunLock(run_dir, dict)
    try:
        taken = probe.try_acquire()
    except OSError:
        return False
    if taken:
        probe.release()
    return not taken


class Exclusive:
    """An exclusive lock on ``path``, waited for: the sweep's own records (submissions,
    resubmit) and an Experiment's index. A context manager; :meth:`release` may end it
    early (a local run releases the sweep's lock once it has recorded itself)."""

    def __init__(self, path: Path, *, noop: bool = False) -> None:
        self.path = path
        self._fd: int | None = None
        self._soft: filelock.BaseFileLock | None = None
        self._depth = 0
        self._noop = noop  # a dry run: takes nothing, writes nothing

    def __enter__(self) -> Exclusive:
        self._depth += 1
        if self._depth > 1 or self._noop:  # entered again by the same holder: already held
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            while self._fd is None:
                self._fd = _flock(self.path, blocking=True)
        except _Unsupported:
            self._soft = _soft(self.path)
            self._soft.acquire(timeout=-1)
        return self

    def release(self) -> None:
        """Give the lock up now (safe to call twice)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        soft, self._soft = self._soft, None
        if soft is not None:
            soft.release(force=True)

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.release()


def no_lock() -> Exclusive:
    """An :class:`Exclusive` that takes nothing: for a dry run, which writes nothing."""
    return Exclusive(Path(os.devnull), noop=True)


def exclusive(path: Path) -> Exclusive:
    """``with exclusive(path):`` holds :class:`Exclusive` on ``path`` for the block."""
    return Exclusive(path)
