"""The run lock: one live writer per run directory.

The lock is ``<run>/.lock`` taken with the ``filelock`` package (``flock`` on
Unix), held for the run's lifetime, never inherited by child processes.

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

After taking the lock, the holder checks that ``.lock`` is still the file it
locked; a writer that lost a race against a break gives up instead of running
beside the winner.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
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
#: probe (:func:`notata.collect.lock_is_held`) holds it for microseconds.
RETRY_SEC = 1.0


def stale_threshold(holder: Mapping[str, Any]) -> float:
    """Seconds without a heartbeat after which a lock held from another host may be broken."""
    interval = float((holder.get("heartbeat") or {}).get("interval_sec") or 0)
    return max(MIN_STALE_LOCK_SEC, STALE_LOCK_BEATS * interval)


def holder_is_dead(holder: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether a lock's holder, as its run's metadata describes it, is known to be gone."""
    if not holder or holder.get("host") == socket.gethostname():
        return False  # this host's kernel already frees the flock of a dead process
    now = time.time() if now is None else now
    beat = (holder.get("heartbeat") or {}).get("unix") or holder.get("start_unix")
    if not isinstance(beat, (int, float)):
        return False  # nothing to judge by: never break on a guess
    return now - beat > stale_threshold(holder)


class RunLock:
    """The lock of one run directory. ``holder()`` reads who holds it, for error messages."""

    def __init__(self, run_dir: Path, holder: Callable[[], dict[str, Any]]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / layout.LOCK
        self._holder = holder
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`; a dead holder's lock is broken."""
        deadline = time.monotonic() + RETRY_SEC
        while not self._try():
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
            if self._try():
                return
        raise RunLockedError(str(self.run_dir), holder)

    def release(self) -> None:
        """Let the next attempt in. Safe to call twice."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release(force=True)

    def _try(self) -> bool:
        lock = filelock.FileLock(str(self.path), timeout=0, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        if not self._still_ours(lock):
            lock.release(force=True)
            return False
        self._lock = lock
        return True

    def _still_ours(self, lock: filelock.BaseFileLock) -> bool:
        # A breaker may have renamed the file between our open and our flock.
        fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
        if fd is None:
            return True
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _read_holder(self) -> dict[str, Any]:
        try:
            return self._holder()
        except Exception:  # a holder we cannot describe is still a holder
            return {}
