"""A run this process owns: its lock, its metadata record, its heartbeat and its status.

A :class:`~notata.Logbook` opened by the process that holds the run (not attached under
``notata exec``: see :class:`notata._attach.AttachedRun`) keeps one :class:`OwnedRun`.
The Logbook is the user's API (outputs, params, log lines); this object is the run's
life: it opens the attempt under the lock, writes metadata.json and the sweep index
record, beats, records a signal's status, ends the run once, and lets it go.

Rules it keeps (the README's Guarantees):

- every metadata write happens under :attr:`meta_lock`, inside a section that signals
  wait for (:func:`notata._signals.critical`), so a SIGTERM never cuts a write in two;
- the heartbeat writes only while the run is open, never a terminal status;
- a terminal status is written once, durably, after every output is fsynced; the lock is
  released last (:meth:`release`), when the Logbook is finally closed;
- a handle whose run was moved, replaced, re-locked or reopened writes nothing more
  (:meth:`check_usable`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import _fs, _signals, index, layout, provenance, resources, runinfo, scheduler, schema
from ._attempt import close_lost, first_record, take_over
from .errors import ForkedHandleError, RunDirError, RunLostError, RunSupersededError
from .heartbeat import Heartbeat, Resources, logger
from .lock import LockFileError, RunLock

__all__ = ["OwnedRun"]

class OwnedRun:
    """The run's state as the process holding its lock sees it.

    ``note(message, level)`` writes a line to the run's log.txt; ``on_let_go()`` is called
    when the run is let go, just before its lock is released.
    """

    def __init__(self, path: Path, run_id: str, note: Callable[[str, int], None],
                 on_let_go: Callable[[], None]) -> None:
        self.path = path
        self.run_id = run_id
        self._note = note
        self._on_let_go = on_let_go
        self.meta_lock = threading.Lock()
        self.meta: dict[str, Any] = {}
        self.lock = RunLock(path, self.read_disk)
        self.pid = os.getpid()  # a forked child inherits the handle, not the run
        self.closed = False  # a terminal status is recorded (or the run was given up)
        self.superseded = False
        self.lost = False  # the run directory or its lock was replaced under this handle
        #: Called (from the heartbeat thread) when the heartbeat finds the run lost: a
        #: ``notata exec`` wrapper stops its command, which must not write beside the
        #: attempt that took the run over.
        self.lost_hooks: list[Callable[[], object]] = []
        self.scheduler: scheduler.SchedulerProvider | None = None
        self.t0 = time.monotonic()
        self._unsynced: set[Path] = set()
        self._indexed: tuple[Any, ...] = ()  # (status, hash, task) last sent to the sweep index
        self._heartbeat: Heartbeat | None = None
        self._sampler = Resources()
        self._peak = resources.Peak()

    # -- opening -------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the run lock (:class:`~notata.RunLockedError` when a live process has it)."""
        try:
            self.lock.acquire()
        except LockFileError as err:
            raise RunDirError(str(self.path), f"its {layout.LOCK} is {err.strerror}") from err

    def begin(self, overwrite: bool, superseded: str | None, interval: float,
              track_children: bool, check: Callable[[dict[str, Any]], None] | None,
              fields: Mapping[str, Any]) -> None:
        """Under the lock, with signals held: take the run over and write its first record.

        ``check(previous metadata)`` may refuse the run before anything is written (a
        sweep task refuses a run directory that another task wrote)."""
        if check is not None and not overwrite:
            with contextlib.suppress(FileNotFoundError):
                check(self.read_disk())
        previous = take_over(self.path, self.run_id, overwrite, self.read_disk)
        if self.lock.broke:  # the old holder may only be cut off, its files still open:
            for name in (layout.LOG, layout.STDOUT, layout.STDERR):  # what it writes
                with contextlib.suppress(OSError):  # from now on is not this attempt's
                    _fs.detach(self.path / name)
        self.t0 = time.monotonic()
        start = time.time()
        # The environment only: the first write must come first.
        sched = scheduler.current(os.environ)
        self.scheduler = sched[0] if sched else None
        self._sampler = Resources(tree=track_children)
        self._peak = resources.Peak()  # the kernel's figures so far
        self.meta = {**first_record(self.run_id, previous, superseded, interval, start),
                     **fields}
        if sched:
            self.meta[sched[0].name] = sched[1]
        # The first write, before anything slow: a task killed from here on leaves a run
        # that reads stale (its process gone), never a folder without metadata.json.
        self.write()

    def start(self, interval: float, write: bool = True) -> None:
        """The run is open: ask the scheduler for the rest (the job's time limit, up to
        seconds on a busy cluster), say ``running`` (``write=False``: with the next
        write, which ``notata exec`` makes as soon as its command has started) and start
        the heartbeat."""
        if self.scheduler is not None:
            name = self.scheduler.name
            self.meta[name] = self.scheduler.details(self.meta[name])
            self.meta["resources"] = {
                "asked": self.scheduler.requested(self.meta[name], os.environ)}
            close_lost(self.meta)  # an attempt left open on a node that failed
        code = provenance.for_run(self.path.parent)  # the code this attempt runs
        if code is not None:
            self.meta[provenance.FIELD] = code
            provenance.mark_run(self.path.parent, self.meta)
        if write:
            self.set(status=schema.RUNNING)
        else:
            self.stage(status=schema.RUNNING)
        self._heartbeat = Heartbeat(interval, self.beat)
        self._heartbeat.start()

    def read_disk(self) -> dict[str, Any]:
        return _fs.read_json_object(self.path / layout.METADATA)

    # -- state ---------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return str(self.meta["status"])

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def job_id(self) -> object:
        if self.scheduler is None:
            return None
        ctx = self.meta.get(self.scheduler.name)
        return self.scheduler.job_id(ctx) if isinstance(ctx, Mapping) else None

    def metadata(self) -> dict[str, Any]:
        with self.locked():
            return dict(self.meta)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the metadata lock inside a section that signals wait for."""
        with _signals.critical(), self.meta_lock:
            yield

    def count_worker(self, cpu_sec: float, peak_bytes: int) -> None:
        self._sampler.elsewhere += cpu_sec
        self._peak.elsewhere = max(self._peak.elsewhere, peak_bytes)

    def saved(self, path: Path) -> None:
        """An output was written: it is fsynced before the terminal status."""
        self._unsynced.add(path)

    def check_usable(self) -> None:
        """Refuse a write through a handle that no longer owns its run."""
        if self.superseded:
            raise RunSupersededError(str(self.path))
        if self.lost or not self.lock.still_ours():
            self.lose()
            raise RunLostError(str(self.path), taken_over=self.lock.taken_over)
        if os.getpid() != self.pid or self.lock.held:
            return
        try:  # closed and let go: the run may have been opened again since
            disk = self.read_disk()
        except (OSError, ValueError):
            return
        if not self._same_attempt(disk):
            raise RunSupersededError(str(self.path))

    def check_owner(self, what: str) -> None:
        """The run's metadata and status are the opening process's, not a forked child's."""
        if os.getpid() != self.pid:
            raise ForkedHandleError(f"{self.path}: {what} is for the process that opened the run "
                              f"(pid {self.pid}); a forked process (pid {os.getpid()}) may "
                              "save outputs, not change its metadata or status")

    def _same_attempt(self, disk: Mapping[str, Any]) -> bool:
        return (disk.get("attempt"), disk.get("start_unix")) == \
            (self.meta.get("attempt"), self.meta.get("start_unix"))

    # -- writing -------------------------------------------------------------------------------

    def stage(self, **fields: Any) -> None:
        """Merge ``fields`` into the record; the next write carries them."""
        self.check_usable()
        with self.locked():
            self.meta.update(fields)

    def set(self, **fields: Any) -> None:
        """Merge ``fields`` into the record and write it."""
        self.check_usable()
        self.check_owner("meta()")
        with self._taken_back():
            with self.locked():
                self.meta.update(fields)
            self.write()

    @contextlib.contextmanager
    def _taken_back(self) -> Iterator[None]:
        """For a write after the run was let go (a ``meta()`` or ``mark_failed()`` after
        ``close()``): take the lock again for the write, if this attempt still owns the run."""
        if not self.closed or self.lock.held:
            yield
            return
        self.lock.acquire()  # RunLockedError: another process has the run now
        try:
            if not self.lock.still_ours():
                raise RunLostError(str(self.path), taken_over=self.lock.taken_over)
            if not self._same_attempt(self.read_disk()):
                raise RunSupersededError(str(self.path))  # a newer attempt owns the run
            yield
        finally:
            self.lock.release()

    def write(self, durable: bool = False) -> None:
        """Write metadata.json and, when the status changed, the sweep index record.

        The index may say complete only while metadata.json does (index.py): a complete
        record is written only after a durable write of a complete metadata.json.
        """
        with self.locked():
            status = self.meta.get("status")
            key = (status, self.meta.get("manifest_hash"), self.meta.get("task"))
            changed = key != self._indexed
            if changed and status != schema.COMPLETE:
                index.record(self.path.parent, self.meta)
                self._indexed = key
            if _fs.atomic_write_json(self.path / layout.METADATA, self.meta, durable=durable,
                                     still=self.lock.still_ours) is False:
                self.lost = True  # its lock was broken (a node cut off): nothing written
                raise RunLostError(str(self.path), taken_over=self.lock.taken_over)
            if changed and status == schema.COMPLETE and durable:
                index.record(self.path.parent, self.meta)
                self._indexed = key

    def beat(self) -> None:
        """The heartbeat thread's write: never a terminal status, never an index record.

        The whole write happens under the metadata lock, after checking that the run is
        still open; a terminal status is set under the same lock, so it always comes after.
        """
        sample = self._sampler.sample()
        now = time.time()
        with self.meta_lock:
            if self.closed or self.lost or self.meta.get("status") not in schema.OPEN_STATUSES:
                return
            if self.lock.still_ours():
                hb = self.meta["heartbeat"]
                self.meta["heartbeat"] = {**hb, **sample, "unix": round(now, 3),
                                          "time": runinfo.now_iso(now), "beat": hb["beat"] + 1}
                if _fs.atomic_write_json(self.path / layout.METADATA, self.meta,
                                         still=self.lock.still_ours) is not False:
                    return
            self.lost = True  # (broken between the check and the write: nothing written)
            logger.warning("notata: %s was moved, replaced or its lock broken while this "
                           "process had it open; it writes nothing more there", self.path)
        for hook in self.lost_hooks:  # the next write through the handle lets the run go
            with contextlib.suppress(Exception):
                hook()

    # -- ending --------------------------------------------------------------------------------

    def finish(self, status: str, reason: str | None) -> bool:
        """Write the terminal status once (the first wins), then let the run go. Whether
        this call recorded it (then the Logbook's callback runs)."""
        self.check_usable()
        self.check_owner(f"mark_{status}()")
        try:
            return self._end(status, reason)
        finally:  # a status that cannot be written (a full disk) still lets the run go
            self.release()

    def fail(self, reason: str) -> bool:
        """``mark_failed``: as :meth:`finish`, and, as in notata 0.3, also after complete
        (the sweep index forgets complete first)."""
        if not (self.closed and self.meta.get("status") == schema.COMPLETE):
            return self.finish(schema.FAILED, reason)
        self.check_usable()
        self.check_owner("mark_failed()")
        with self._taken_back():
            index.forget(self.path.parent, self.meta)
            with self.locked():
                self.meta.update(status=schema.FAILED, failure_reason=reason)
            self._note(f"Marked failed: {reason}", logging.INFO)
            self.write(durable=True)
        return True

    def exited(self, code: object) -> bool:
        """``sys.exit(code)`` with a code that is not success left the ``with`` block."""
        return self.finish(schema.FAILED, str(code))  # as notata 0.3: "1"

    @staticmethod
    def failure_reason(exc: BaseException) -> str:
        """An exception's message as the run's failure reason (notata 0.3's)."""
        return str(exc) or type(exc).__name__

    def _end(self, status: str, reason: str | None) -> bool:
        """Record a terminal status, durably, after every output; the lock stays held."""
        with self.locked():
            if self.closed:
                return False
            self.closed = True
            end = time.time()
            self.meta.update(status=status, end_time=runinfo.now_iso(end),
                             end_unix=round(end, 3),
                             runtime_sec=round(self.elapsed, 6))
            self.meta["heartbeat"] = {**self.meta["heartbeat"], **self._sampler.sample()}
            peak = self._peak.at_end(self._sampler.sampled_peak)
            self.meta["resources"] = {**self.meta.get("resources", {}), "used": {
                "runtime_sec": self.meta["runtime_sec"], "peak_rss_bytes": peak,
                "cpu_time_sec": self.meta["heartbeat"].get("cpu_time_sec")}}
            if reason is not None:
                self.meta["failure_reason"] = reason
        self._stop_heartbeat()
        if self.lost or not self.lock.still_ours():  # nothing of ours to write into now
            self.lose()
            raise RunLostError(str(self.path), taken_over=self.lock.taken_over)
        self._note(f"Marked {status}" + (f": {reason}" if reason else ""), logging.INFO)
        _fs.fsync_paths(sorted(self._unsynced))
        self._unsynced.clear()
        self.write(durable=True)
        return True

    def release(self) -> None:
        """Let the next attempt in: the last thing a run does. Safe to call twice."""
        if self.superseded or not self.closed:
            return
        self._let_go()

    def lose(self) -> None:
        """The run is no longer this handle's: stop, let go of what it holds, write no more."""
        self.lost = self.closed = True
        self._stop_heartbeat()
        self._let_go()

    def give_up(self) -> None:
        """Superseded by a newer open of this run in this process: stop, unlock, write no more."""
        with self.locked():
            self.closed = self.superseded = True
        self._stop_heartbeat()
        self._let_go()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop(wait=not self._heartbeat.is_current())

    def _let_go(self) -> None:
        self._on_let_go()
        self.lock.release()

    # -- signals (see notata._signals) ---------------------------------------------------------

    def warned(self) -> bool:
        """SIGUSR1: record it."""
        if self.closed:
            return False
        self._note("SIGUSR1 received: the time limit is near", logging.WARNING)
        self.set(signals=[*self.meta.get("signals", []), _signals.record("SIGUSR1")])
        return True

    def ended(self, signum: int) -> bool:
        """SIGTERM or SIGHUP: record why.

        The cause of a SIGTERM is told apart as: ``timeout`` when SIGUSR1 (the time-limit
        warning) came first or the scheduler says the time is up; ``cancelled`` /
        ``preempted`` as the scheduler reports the job; else ``terminated``. SIGHUP (a
        closed terminal or ssh connection) is ``terminated``, reason "hangup".
        """
        if self.closed:
            return False
        name = signal.Signals(signum).name
        self.meta["signals"] = [*self.meta.get("signals", []), _signals.record(name)]
        if signum == signal.SIGHUP:
            status, why = schema.TERMINATED, "hangup: the terminal or connection closed"
        else:
            status = why = self._termination_status(time.time())
        self._end(status, f"{name} received ({why})")
        return True

    def _termination_status(self, now: float) -> str:
        if any(s["signal"] == "SIGUSR1" for s in self.meta.get("signals", [])):
            return schema.TIMEOUT
        if self.scheduler is not None:
            ctx = self.meta.get(self.scheduler.name, {})
            try:
                status = self.scheduler.termination_status(ctx, now)
            except Exception:  # the scheduler cannot be asked: say what we know
                status = None
            if status in schema.SIGNAL_STATUSES:
                return str(status)
        return schema.TERMINATED
