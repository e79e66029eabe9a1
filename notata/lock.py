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
  metadata.json, is older than :func:`break_after` (10 minutes, or 10
  heartbeat intervals if longer; when the scheduler says the holder's node is down or
  not responding, 3 intervals, at least a minute, and a start waits for that, up to 5
  minutes), and the holder's record has not changed
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
import stat
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock

from . import _fs, layout, scheduler
from .errors import RunLockedError

MIN_STALE_LOCK_SEC = 600.0
STALE_LOCK_BEATS = 10
#: With the scheduler's word that the holder's node is down or not responding.
DOWN_NODE_BEATS = 3
DOWN_NODE_MIN_SEC = 60.0
#: A start waits at most this long for the lock of a holder on a lost node to be breakable.
DOWN_NODE_WAIT_SEC = 300.0
CONFIRM_SEC = 2.0
#: A busy lock is tried again for this long before it counts as held: a collector's
#: probe (:func:`is_held`) holds it for microseconds.
RETRY_SEC = 1.0
# What flock answers on filesystems that do not support it.
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}


class _Unsupported(Exception):
    """This filesystem refuses flock."""


def _floor() -> float:
    """:data:`MIN_STALE_LOCK_SEC`, or ``NOTATA_LOCK_BREAK_SEC`` where set (tests; a site
    whose shared filesystem releases a dead client's locks sooner)."""
    raw = os.environ.get("NOTATA_LOCK_BREAK_SEC")
    try:
        value = float(raw) if raw else MIN_STALE_LOCK_SEC
    except ValueError:
        value = -1.0
    if not 1.0 <= value < 1e9:  # NaN, negative, zero, garbage: the default, said
        warnings.warn(f"NOTATA_LOCK_BREAK_SEC={raw!r} is not a number of seconds (at "
                      f"least 1); using {MIN_STALE_LOCK_SEC:.0f}", UserWarning, stacklevel=3)
        return MIN_STALE_LOCK_SEC
    return value


def break_after(holder: Mapping[str, Any], node_lost: bool = False) -> float:
    """Seconds without a heartbeat after which a lock held from another host may be broken:
    10 minutes (:func:`_floor`), or 10 heartbeat intervals if longer; when the scheduler
    says the holder's node is down or not responding (``node_lost``), 3 intervals, at
    least :data:`DOWN_NODE_MIN_SEC` (or the floor, if shorter).

    Longer than the collector's :func:`notata.runstate.stale_limit` (which only reports
    a run stale): breaking a live holder's lock would let two processes write one run."""
    hb = holder.get("heartbeat")
    interval = float((hb.get("interval_sec") if isinstance(hb, Mapping) else None) or 0)
    if node_lost:  # at most what a start waits for it (DOWN_NODE_WAIT_SEC)
        return min(max(min(_floor(), DOWN_NODE_MIN_SEC), DOWN_NODE_BEATS * interval),
                   DOWN_NODE_WAIT_SEC)
    return max(_floor(), STALE_LOCK_BEATS * interval)


def _last_beat(holder: Mapping[str, Any]) -> float | None:
    hb = holder.get("heartbeat")
    beat = (hb.get("unix") if isinstance(hb, Mapping) else None) or holder.get("start_unix")
    return float(beat) if isinstance(beat, (int, float)) else None


def holder_is_dead(holder: Mapping[str, Any], now: float | None = None,
                   node_lost: bool = False) -> bool:
    """Whether a lock's holder, as its run's metadata describes it, is known to be gone
    (``node_lost``: the scheduler says its node is down or not responding)."""
    if not holder or holder.get("host") == socket.gethostname():
        return False  # this host's kernel already frees the flock of a dead process
    now = time.time() if now is None else now
    beat = _last_beat(holder)
    if beat is None:
        return False  # nothing to judge by: never break on a guess
    return now - beat > break_after(holder, node_lost)


class LockFileError(OSError):
    """The lock's path is not a plain file (a symlink, a folder): never followed."""


_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)


def _open(path: Path, folder_too: bool) -> tuple[int, bool] | None:
    """Open (or make, with the mode the umask gives) the lock file, never through a
    symlink (``folder_too``: nor through a folder that is one, as a run directory swapped
    for a symlink while its lock was busy); ``(fd, made)``, or None when it vanished in
    between (renamed aside)."""
    where = None
    if folder_too:
        try:
            where = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                            | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise LockFileError(err.errno, "in a folder that is a symlink",
                                    str(path)) from None
            raise
    name = path.name if where is not None else str(path)
    try:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o666,
                         dir_fd=where)
            return fd, True
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDWR | _OPEN_FLAGS, dir_fd=where)
        except PermissionError:  # another user's file without group write: flock still works
            fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=where)
    except FileNotFoundError:
        return None
    except OSError as err:
        if isinstance(err, IsADirectoryError) or err.errno == errno.ELOOP:
            raise LockFileError(err.errno, "not a plain file (a symlink or a folder)",
                                str(path)) from None
        raise
    finally:
        if where is not None:
            os.close(where)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockFileError(errno.EINVAL, "not a plain file", str(path))
    return fd, False


def _flock(path: Path, blocking: bool, folder_too: bool = False) -> int | None:
    """A descriptor holding an exclusive flock on ``path`` (made if missing, with the mode
    the umask gives), or None when another process holds it. Raises :class:`_Unsupported`,
    :class:`LockFileError`."""
    opened = _open(path, folder_too)
    if opened is None:
        return None  # renamed aside in between: the caller tries again
    fd, created = opened
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
    # Its own file: the flock file, left behind by every run where flock works, would
    # read as a holder forever to a soft lock.
    return filelock.SoftFileLock(str(path.with_name(path.name + SOFT_SUFFIX)), timeout=0)


#: The soft lock's file is the lock's name with this suffix (a run's: ``layout.SOFT_LOCK``).
SOFT_SUFFIX = layout.SOFT_LOCK.removeprefix(layout.LOCK)



def _stamp(fd: int) -> None:
    """Write who holds the lock into the lock file (host, pid, time), at once: a breaker
    on another host reads it before breaking (see :meth:`RunLock.acquire`)."""
    text = f"{socket.gethostname()} {os.getpid()} {time.time():.3f}\n".encode()
    with contextlib.suppress(OSError):  # a read-only descriptor: the metadata must do
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)


def stamp_of(path: Path) -> str:
    """What the lock file at ``path`` says of its holder: ``HOST PID UNIX`` ("" when
    unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(256).decode(errors="replace").strip()
    except OSError:
        return ""


class RunLock:
    """The lock of one run directory. ``holder()`` reads who holds it, for error messages."""

    def __init__(self, run_dir: Path, holder: Callable[[], dict[str, Any]]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / layout.LOCK
        self._holder = holder
        self._fd: int | None = None
        self._soft: filelock.BaseFileLock | None = None
        #: Whether :meth:`acquire` broke the lock of a holder taken for dead (maybe only
        #: cut off: its processes may still hold the run's files open).
        self.broke = False
        #: Whether another attempt broke this holder's lock (set by :meth:`still_ours`
        #: when it finds the lock it holds renamed aside): the run was taken over, not
        #: moved or deleted by hand.
        self.taken_over = False

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
        lost = holder.get("host") not in (None, socket.gethostname()) \
            and scheduler.node_lost(holder) is not None
        beat = _last_beat(holder)
        if lost and beat is not None:  # its node is gone: wait out the shorter rule
            until = time.monotonic() + min(beat + break_after(holder, True) - time.time() + 1,
                                           DOWN_NODE_WAIT_SEC)
            while time.monotonic() < until and not holder_is_dead(holder, node_lost=True):
                time.sleep(min(5.0, max(0.1, until - time.monotonic())))
                if self.try_acquire():
                    return
                holder = self._read_holder()
        if holder_is_dead(holder, node_lost=lost):
            # A new holder may have taken the lock and not yet written its record: it has
            # stamped the lock file, so a stamp that changes or names another holder than
            # the dead one's record means the lock is taken.
            stamp = stamp_of(self.path)
            time.sleep(CONFIRM_SEC)
            again = stamp_of(self.path)
            named = again.split()[:2]
            if (self._read_holder() != holder or again != stamp
                    or (named and named != [str(holder.get("host")), str(holder.get("pid"))])):
                raise RunLockedError(str(self.run_dir), self._read_holder())
            when = time.strftime("%Y%m%dT%H%M%S")
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, self.path.with_name(layout.BROKEN_LOCK.format(when=when)))
            if self.try_acquire():
                self.broke = True
                return
        raise RunLockedError(str(self.run_dir), holder)

    def try_acquire(self, stamp: bool = True) -> bool:
        """Take the lock if it is free, without waiting (``stamp``: say who holds it, in
        the file; a collector's probe does not)."""
        if self._soft is None:
            try:
                self._fd = _flock(self.path, blocking=False, folder_too=True)
            except _Unsupported:
                self._soft = _soft(self.path)
            else:
                if self._fd is not None and stamp:
                    _stamp(self._fd)
                return self._fd is not None
        try:
            self._soft.acquire(timeout=0)
        except filelock.Timeout:
            return False
        return True

    def still_ours(self) -> bool:
        """Whether ``.lock`` is still the file this object locked: false once the run
        directory was moved, deleted and made again, replaced, or its lock broken."""
        if self._fd is None:
            return True  # not held here, or a soft lock (no descriptor to compare)
        held = _fs.identity(self._fd)
        if held is None:
            return False
        if _fs.identity(self.path) == held:
            return True
        self.taken_over = self.taken_over or any(
            _fs.identity(aside) == held
            for aside in self.run_dir.glob(layout.BROKEN_LOCK.format(when="*")))
        return False

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the lock this object holds (a command attached to the run
        compares the run's ``.lock`` with it), None when not held by a descriptor."""
        return None if self._fd is None else _fs.identity(self._fd)

    def drop_in_child(self) -> None:
        """In a forked child: close the child's copy of the lock's descriptor, so that the
        lock goes when the process that took it goes, whatever the child does."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

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


def is_held(run_dir: Path, probe: bool = True) -> bool:
    """Whether a live process holds the run's lock right now (a non-blocking try).

    No ``.lock`` file: nobody holds it (a holder creates it), and none is created here.
    A free lock is held for microseconds by the try; a task starting in that instant
    retries (:data:`RETRY_SEC`) rather than read it as taken. Raises
    :class:`LockFileError` when ``.lock`` is a symlink or a folder. ``probe=False``:
    only that check, no try.
    """
    try:
        kind = os.lstat(run_dir / layout.LOCK).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(kind):
        raise LockFileError(errno.EINVAL, "not a plain file (a symlink or a folder)",
                            str(run_dir / layout.LOCK))
    if not probe:  # only the file's kind was asked about
        return False
    lock = RunLock(run_dir, dict)
    try:
        taken = lock.try_acquire(stamp=False)
    except LockFileError:
        raise
    except OSError:
        return False
    if taken:
        lock.release()
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

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it, without waiting; whether taken
        (then :meth:`release` gives it up). Never blocks, even on a soft lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = _flock(self.path, blocking=False)
        except _Unsupported:
            soft = _soft(self.path)
            try:
                soft.acquire(timeout=0)
            except filelock.Timeout:
                return False
            self._soft = soft
            return True
        return self._fd is not None

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
