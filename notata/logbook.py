"""The Logbook: one run, one directory of plain files, safe under crashes and signals."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import yaml

from . import _attach, _fs, _signals, index, layout, runinfo, schema
from ._convert import to_plain
from ._outputs import OutputsMixin
from ._signals import SignalsMixin
from .errors import (
    NotataError,
    RunCompleteError,
    RunDirError,
    RunLockedError,
    RunLostError,
    RunSupersededError,
)
from .heartbeat import Heartbeat, Resources, interval_from, logger
from .lock import LockFileError, RunLock
from .reader import read_params

if TYPE_CHECKING:
    from .manifest import Task
    from .runinfo import SchedulerProvider

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
# Fields of one attempt that move into ``attempts`` when the next attempt starts.
_ATTEMPT_FIELDS = ("attempt", "status", "start_time", "end_time", "start_unix", "end_unix",
                   "runtime_sec", "failure_reason", "host", "pid", "exit_code")
# Fields that describe one attempt only: the next attempt starts without them.
_VOLATILE = frozenset({"end_time", "end_unix", "runtime_sec", "failure_reason", "signals",
                       "heartbeat", "slurm", "command", "exit_code"})
_OPEN: weakref.WeakSet[Logbook] = weakref.WeakSet()
#: The status an attempt's history entry gets when a newer open in the same process took over.
SUPERSEDED = "superseded"


class Logbook(SignalsMixin, OutputsMixin):
    """One run's directory: ``<base_dir>/log_<run_id>/`` with log, params, metadata and outputs.

    Use it as a context manager (complete on a clean exit; failed, with the
    exception's message, when one propagates, and the exception still
    propagates) or by hand with :meth:`mark_complete` / :meth:`mark_failed`.

    Args:
        run_id: the run's name; see :func:`notata.layout.check_run_id` for what is refused.
        base_dir: the folder holding run directories (second, as in notata 0.3).
        params: parameters to save now as ``params.yaml``.
        overwrite: start an existing run afresh (its files are deleted).
        preallocate: make ``data/``, ``plots/`` and ``artifacts/`` now, not on first use.
        callback: called with the Logbook after it is marked complete or failed (notata 0.3).
        resume: take over an existing, unfinished run as its next attempt, keeping its
            outputs and history; a complete run raises :class:`RunCompleteError`.
        heartbeat: seconds between liveness updates (default ``NOTATA_HEARTBEAT`` or 30).
        signals: in the main thread, record SIGTERM as a terminal status and pass
            SIGUSR1 to :meth:`on_warning` hooks (see :meth:`_on_signal`).
        on_warning: a hook called with the Logbook when SIGUSR1 arrives.
        level: the lowest level written to log.txt (``"INFO"``, as in notata 0.3).
        track_children: report the resources of this process and all its descendants.

    Attaching: a process started by ``notata exec`` that opens the run its wrapper
    holds (``NOTATA_RUN_DIR`` names it and ``NOTATA_WRAPPER_PID`` is an ancestor)
    gets an *attached* handle instead of a lock error: it writes outputs, params
    and log lines; its ``meta()`` fields and failure reason are handed to the
    wrapper (``.attached.json``), which owns the lock, heartbeat and status.

    Raises:
        FileExistsError: the run exists and neither ``overwrite`` nor ``resume`` is set.
        RunCompleteError: ``resume=True`` and the run is already complete.
        RunLockedError: another live process has the run open.
        CorruptMetadataError: the run's metadata.json cannot be read.
        ValueError, TypeError: a bad run id, or params that cannot be written.
    """

    def __init__(
        self,
        run_id: str | int,
        base_dir: str | os.PathLike[str] = "outputs",
        params: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        preallocate: bool = False,
        callback: Callable[[Logbook], Any] | None = None,
        *,
        resume: bool = False,
        heartbeat: float | None = None,
        signals: bool = True,
        on_warning: Callable[[Logbook], Any] | None = None,
        level: str = "INFO",
        track_children: bool = False,
        _check: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if isinstance(base_dir, Mapping):
            raise TypeError("Logbook's second argument is base_dir (as in notata 0.3); "
                            "pass parameters as params=...")
        if overwrite and resume:
            raise ValueError("choose one of overwrite=True (start afresh) and resume=True")
        self.run_id = layout.check_run_id(run_id)
        self.path = layout.run_dir(base_dir, self.run_id)
        self.log_path = self.path / layout.LOG
        self.datadir = self.path / layout.DATA
        self.plotdir = self.path / layout.PLOTS
        self.artifactsdir = self.path / layout.ARTIFACTS
        self.callback = callback
        self._level = _LEVELS[level.upper()]
        #: notata 0.3's logger (``notata.logbook.<run_id>``, not propagated): handlers added
        #: to it receive every line written to log.txt.
        self.logger = logging.getLogger(f"notata.logbook.{self.run_id}")
        self.logger.propagate = False
        self.logger.setLevel(self._level)
        # Everything that can refuse the params does so before anything is made.
        params_file = _render_params(to_plain(dict(params), "params"), "yaml") \
            if params is not None else None
        interval = interval_from(heartbeat)

        self._meta_lock = threading.Lock()
        self._unsynced: set[Path] = set()
        self._warning_hooks: list[Callable[[Logbook], Any]] = [on_warning] if on_warning else []
        self._terminate_hooks: list[Callable[[Logbook, int], Any]] = []
        self._log_fd: int | None = None
        self._closed = False  # a terminal status is recorded (or the handle is attached/closed)
        self._superseded = False
        self._handed: str | None = None  # the status an attached handle handed over
        self._with_depth = 0  # inside ``with`` blocks of this handle
        self._thread = threading.get_ident()
        self._pid = os.getpid()  # a forked child inherits the handle, not the run
        self._lost = False  # the run directory or its lock was replaced under this handle
        self._scheduler: SchedulerProvider | None = None
        self._meta: dict[str, Any] = {}
        self._indexed: tuple[Any, ...] = ()  # (status, hash, task) last sent to the sweep index
        #: The sweep task this run is (set by :func:`notata.task`); ``log.task.params``.
        self.task: Task | None = None
        self._t0 = time.monotonic()
        _check_run_dir(self.path)
        self.attached = _attach.wrapper_holds(self.path)
        if self.attached:
            self._meta = self._read_disk_metadata()
            if params_file is not None:
                self._save_params_file(layout.PARAMS_YAML, params_file)
            if signals:  # hooks and finally blocks run; the wrapper records the status
                _signals.listen(self)
            return

        existed = os.path.lexists(self.path)
        if existed and not (overwrite or resume):
            raise FileExistsError(f"Run directory {self.path} already exists.")
        superseded = _supersede(self.path) if existed else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            self.path.mkdir()
        _check_run_dir(self.path)  # again: it may have been replaced since the first look
        self._lock = RunLock(self.path, self._read_disk_metadata)
        try:
            self._lock.acquire()
        except LockFileError as err:
            raise RunDirError(str(self.path), f"its {layout.LOCK} is {err.strerror}") from err
        try:
            # From here on a signal waits until the run is open, then ends it.
            with _signals.critical():
                if signals:
                    _signals.listen(self)
                try:
                    # Looked at again under the lock: the folder may have been swapped for a
                    # symlink while the lock was busy; nothing is emptied or written before.
                    _check_run_dir(self.path)
                    self._open(overwrite, superseded, interval, params_file, preallocate,
                               track_children, _check)
                except BaseException:
                    _signals.forget(self)
                    raise
        except BaseException:
            self._lock.release()
            raise

    def _open(self, overwrite: bool, superseded: str | None, interval: float,
              params_file: bytes | None, preallocate: bool, track_children: bool,
              check: Callable[[dict[str, Any]], None] | None) -> None:
        """Under the lock, with signals held: take the run over and write its first files.

        ``check(previous metadata)`` may refuse the run before anything is written (a
        sweep task refuses a run directory that another task wrote)."""
        if check is not None and not overwrite:
            with contextlib.suppress(FileNotFoundError):
                check(self._read_disk_metadata())
        previous = self._take_over(overwrite)
        self._t0 = time.monotonic()
        start = time.time()
        sched = runinfo.scheduler()  # the environment only: the first write must come first
        self._scheduler = sched[0] if sched else None
        self._resources = Resources(tree=track_children)
        self._meta = {
            **{k: v for k, v in previous.items() if k not in _VOLATILE},
            "schema": schema.SCHEMA_VERSION,
            "run_id": self.run_id,
            "status": schema.INITIALIZED,
            "start_time": runinfo.now_iso(start),
            "start_unix": round(start, 3),
            "attempt": int(previous.get("attempt", 0)) + 1,
            "attempts": _history(previous, superseded),
            **runinfo.process_fields(),
            "heartbeat": {"unix": round(start, 3), "time": runinfo.now_iso(start), "beat": 0,
                          "interval_sec": interval},
        }
        if sched:
            self._meta[sched[0].name] = sched[1]
        # The first write, before anything slow: a task killed from here on leaves a run
        # that reads stale (its process gone), never a folder without metadata.json.
        self._write_meta()
        if preallocate:
            for d in (self.datadir, self.plotdir, self.artifactsdir):
                d.mkdir(exist_ok=True)
        if params_file is not None:
            self._save_params_file(layout.PARAMS_YAML, params_file)
        self.info("Logbook initialized" if self.attempt == 1
                  else f"Logbook resumed as attempt {self.attempt}")
        if sched:  # e.g. the job's time limit, from scontrol (up to seconds on a busy cluster)
            self._meta[sched[0].name] = sched[0].details(sched[1])
        self._set(status=schema.RUNNING)
        self._heartbeat = Heartbeat(interval, self._beat)
        self._heartbeat.start()
        _OPEN.add(self)

    # -- opening -------------------------------------------------------------------------------

    def _take_over(self, overwrite: bool) -> dict[str, Any]:
        """Under the lock: clear the run (overwrite) or read the attempt being resumed."""
        if overwrite:
            with contextlib.suppress(FileNotFoundError, ValueError):
                index.forget(self.path.parent, self._read_disk_metadata())
            # First say, durably, that this run starts afresh: a kill while the old files
            # go leaves a run that reads stale (its process gone), never the old "complete"
            # over half its outputs, nor a folder without metadata.json.
            now = time.time()
            _fs.atomic_write_json(self.path / layout.METADATA, {
                "schema": schema.SCHEMA_VERSION, "run_id": self.run_id,
                "status": schema.INITIALIZED, "attempt": 1, "start_unix": round(now, 3),
                "start_time": runinfo.now_iso(now), **runinfo.process_fields(),
                "failure_reason": "overwrite: the earlier run's files are being removed"},
                durable=True)
            for entry in self.path.iterdir():
                if entry.name in (layout.LOCK, layout.METADATA):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            return {}
        try:
            previous = self._read_disk_metadata()
        except FileNotFoundError:
            previous = {}
        if previous.get("status") == schema.COMPLETE:
            raise RunCompleteError(str(self.path))
        _fs.clean_temporaries(self.path)
        return previous

    def _read_disk_metadata(self) -> dict[str, Any]:
        return _fs.read_json_object(self.path / layout.METADATA)

    def _check_usable(self) -> None:
        """Refuse a write through a handle that no longer owns its run."""
        if self._superseded:
            raise RunSupersededError(str(self.path))
        if self._lost or (not self.attached and not self._lock.still_ours()):
            self._lose()
            raise RunLostError(str(self.path))
        if self.attached or os.getpid() != self._pid or self._lock.held:
            return
        try:  # closed and let go: the run may have been opened again since
            disk = self._read_disk_metadata()
        except (OSError, ValueError):
            return
        if (disk.get("attempt"), disk.get("start_unix")) != \
                (self._meta.get("attempt"), self._meta.get("start_unix")):
            raise RunSupersededError(str(self.path))

    def _lose(self) -> None:
        """The run is no longer this handle's: stop, let go of what it holds, write no more."""
        self._lost = self._closed = True
        if not self._heartbeat.is_current():
            self._heartbeat.stop(wait=True)
        self._let_go()

    def _check_owner(self, what: str) -> None:
        """The run's metadata and status are the opening process's, not a forked child's."""
        if os.getpid() != self._pid:
            raise NotataError(f"{self.path}: {what} is for the process that opened the run "
                              f"(pid {self._pid}); a forked process (pid {os.getpid()}) may "
                              "save outputs, not change its metadata or status")

    def _give_up(self) -> None:
        """Superseded by a newer open of this run in this process: stop, unlock, write no more."""
        with self._locked():
            self._closed = self._superseded = True
        self._heartbeat.stop(wait=not self._heartbeat.is_current())
        self._let_go()

    # -- state ---------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The run's status (one of :data:`notata.schema.STATUSES`)."""
        if self.attached:
            return str(self._read_disk_metadata().get("status", schema.RUNNING))
        return str(self._meta["status"])

    def current_status(self) -> str:
        """The run's status (the seed's name for :attr:`status`)."""
        return self.status

    @property
    def attempt(self) -> int:
        """1 for a run's first attempt, N+1 after each resume."""
        return int(self._meta["attempt"])

    @property
    def job_id(self) -> object:
        """The scheduler's id of the job this run runs in (SLURM_JOB_ID), else None."""
        if self._scheduler is None:
            return None
        ctx = self._meta.get(self._scheduler.name)
        return ctx.get("job_id") if isinstance(ctx, Mapping) else None

    @property
    def elapsed(self) -> float:
        """Seconds since this attempt started."""
        return time.monotonic() - self._t0

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the run's metadata as last written."""
        with self._locked():
            return dict(self._meta)

    def meta(self, **fields: Any) -> None:
        """Merge ``fields`` into metadata.json (values must be YAML/JSON-able).

        notata's own fields (``status``, ``attempt``, ``heartbeat``...:
        :data:`notata.schema.RESERVED`) are refused with ValueError: a status is set with
        :meth:`mark_complete` / :meth:`mark_failed`.
        """
        reserved = sorted(set(fields) & (schema.RESERVED | runinfo.scheduler_names()))
        if reserved:
            raise ValueError(f"meta({reserved[0]}=...): {reserved[0]!r} is notata's own "
                             "metadata field; choose another name (a status is set with "
                             "mark_complete() or mark_failed())")
        self._set(**{k: to_plain(v, f"meta[{k!r}]") for k, v in fields.items()})

    def _set(self, **fields: Any) -> None:
        self._check_usable()
        if self.attached:
            _attach.hand_over(self.path, fields)
            return
        self._check_owner("meta()")
        with self._taken_back():
            with self._locked():
                self._meta.update(fields)
            self._write_meta()

    @contextlib.contextmanager
    def _taken_back(self) -> Iterator[None]:
        """For a write after the run was let go (a ``meta()`` or ``mark_failed()`` after
        ``close()``): take the lock again for the write, if this attempt still owns the run."""
        if not self._closed or self._lock.held:
            yield
            return
        self._lock.acquire()  # RunLockedError: another process has the run now
        try:
            if not self._lock.still_ours():
                raise RunLostError(str(self.path))
            disk = self._read_disk_metadata()
            if (disk.get("attempt"), disk.get("start_unix")) != \
                    (self._meta.get("attempt"), self._meta.get("start_unix")):
                raise RunSupersededError(str(self.path))  # a newer attempt owns the run
            yield
        finally:
            self._lock.release()

    def take_handed_over(self) -> dict[str, Any]:
        """Wrapper side: take what an attached process handed over (see :mod:`._attach`)."""
        return _attach.take_handed_over(self.path)

    def _write_meta(self, durable: bool = False) -> None:
        """Write metadata.json and, when the status changed, the sweep index record.

        The index may say complete only while metadata.json does (index.py): a complete
        record is written only after a durable write of a complete metadata.json.
        """
        with self._locked():
            status = self._meta.get("status")
            key = (status, self._meta.get("manifest_hash"), self._meta.get("task"))
            changed = key != self._indexed
            if changed and status != schema.COMPLETE:
                index.record(self.path.parent, self._meta)
                self._indexed = key
            _fs.atomic_write_json(self.path / layout.METADATA, self._meta, durable=durable)
            if changed and status == schema.COMPLETE and durable:
                index.record(self.path.parent, self._meta)
                self._indexed = key

    def _beat(self) -> None:
        """The heartbeat thread's write: never a terminal status, never an index record.

        The whole write happens under the metadata lock, after checking that the run is
        still open; a terminal status is set under the same lock, so it always comes after.
        """
        sample = self._resources.sample()
        now = time.time()
        with self._meta_lock:
            if self._closed or self._lost or self._meta.get("status") not in schema.OPEN_STATUSES:
                return
            if not self._lock.still_ours():
                self._lost = True
                logger.warning("notata: %s was moved, replaced or its lock broken while this "
                               "process had it open; it writes nothing more there", self.path)
                return  # the next write through the handle lets the run go (_lose)
            hb = self._meta["heartbeat"]
            self._meta["heartbeat"] = {**hb, **sample, "unix": round(now, 3),
                                       "time": runinfo.now_iso(now), "beat": hb["beat"] + 1}
            _fs.atomic_write_json(self.path / layout.METADATA, self._meta)

    def _saved(self, path: Path) -> None:
        self._unsynced.add(path)

    # -- params --------------------------------------------------------------------------------

    def save_params(self, params: Mapping[str, Any], preferred: str = "yaml") -> None:
        """Write ``params`` as params.yaml or params.json, replacing the saved params (the
        other file, if any, is removed)."""
        self._write_params(to_plain(dict(params), "params"), preferred, merge=False)
        other = layout.PARAMS_JSON if preferred == "yaml" else layout.PARAMS_YAML
        with contextlib.suppress(FileNotFoundError):
            (self.path / other).unlink()

    def params(self, ext: str = "yaml", **kwargs: Any) -> None:
        """notata 0.3: merge ``kwargs`` into ``params.<ext>`` (read from that same file)."""
        self._write_params(to_plain(kwargs, "params"), ext, merge=True)

    def load_params(self) -> dict[str, Any]:
        """The saved params: params.yaml and params.json together (JSON wins a shared key)."""
        return read_params(self.path)

    def _write_params(self, values: dict[str, Any], ext: str, merge: bool) -> None:
        self._check_usable()
        name = {"yaml": layout.PARAMS_YAML, "json": layout.PARAMS_JSON}.get(ext)
        if name is None:
            raise ValueError(f"params format must be 'yaml' or 'json', not {ext!r}")
        if merge:
            values = {**read_params(self.path, only=name), **values}
        self._save_params_file(name, _render_params(values, ext))

    def _save_params_file(self, name: str, data: bytes) -> None:
        target = self.path / name
        _fs.atomic_write_bytes(target, data)
        self._saved(target)
        self.info(f"Saved params ({name.rpartition('.')[2]}) in {name}")

    # -- messages ------------------------------------------------------------------------------

    def log(self, message: str, level: int | str = logging.INFO) -> None:
        """Append ``[YYYY-MM-DDTHH:MM:SS] LEVEL message`` to log.txt."""
        self._check_usable()
        num = _LEVELS[level.upper()] if isinstance(level, str) else int(level)
        if num < self._level:
            return
        if self.logger.handlers:  # notata 0.3 wrote through this logger: its handlers see it
            self.logger.log(num, message)
        line = f"[{runinfo.now_iso()}] {logging.getLevelName(num)} {message}\n"
        if self._log_fd is None:
            self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o666)
            self._saved(self.log_path)
        os.write(self._log_fd, line.encode("utf-8", "backslashreplace"))

    def note(self, message: str, level: int | str = logging.INFO) -> None:
        """notata 0.3 name of :meth:`log`."""
        self.log(message, level)

    def debug(self, msg: str) -> None:
        self.log(msg, logging.DEBUG)

    def info(self, msg: str) -> None:
        self.log(msg, logging.INFO)

    def warning(self, msg: str) -> None:
        self.log(msg, logging.WARNING)

    def error(self, msg: str) -> None:
        self.log(msg, logging.ERROR)

    # -- ending --------------------------------------------------------------------------------

    def mark_complete(self) -> None:
        """Record the run as complete, flushed to disk, and release it."""
        self._finish(schema.COMPLETE, None)

    def mark_failed(self, reason: str) -> None:
        """Record the run as failed with ``reason``, flushed to disk, and release it.

        As in notata 0.3, this also turns a run already marked complete into a failed
        one (its sweep index record is cleared first).
        """
        if not self.attached and self._closed and self._meta.get("status") == schema.COMPLETE:
            self._check_usable()
            self._check_owner("mark_failed()")
            self._fail_after_complete(str(reason))
        else:
            self._finish(schema.FAILED, str(reason))

    def mark_timeout(self, reason: str = "time limit reached") -> None:
        """Record the run as timed out with ``reason`` (e.g. before a requeue), and release it."""
        self._finish(schema.TIMEOUT, str(reason))

    def mark_cancelled(self, reason: str = "cancelled") -> None:
        """Record the run as cancelled (stopped on purpose) with ``reason``, and release it."""
        self._finish(schema.CANCELLED, str(reason))

    def close(self) -> None:
        """Complete the run if nothing has ended it yet (what a clean ``with`` exit does)."""
        if not self._closed:
            self.mark_complete()
        else:
            self._release()

    def _finish(self, status: str, reason: str | None) -> None:
        """Write the terminal status once (the first terminal status wins), then release."""
        self._check_usable()
        if self.attached:
            self._hand_over_end(status, reason)
            return
        self._check_owner(f"mark_{status}()")
        # A signal waits until the run is recorded, let go and its callback has run (an
        # Experiment's index row): it cannot cut the end of a run in two.
        with _signals.critical():
            try:
                finished = self._end(status, reason)
            finally:  # a status that cannot be written (a full disk) still lets the run go
                self._release()
            if finished and self.callback:
                self.callback(self)

    def _hand_over_end(self, status: str | None, reason: str | None) -> None:
        """An attached run: the wrapper decides the status; hand over what this process
        marked (``status`` None: nothing, the wrapper has the exit status). A failure
        marked after complete still counts, as for a run of its own."""
        if self._closed and not (status == schema.FAILED and self._handed == schema.COMPLETE):
            return
        self._closed = True
        if status is not None:
            self._handed = status
            fields = {"status": status}
            if reason is not None:
                fields["failure_reason"] = reason
            _attach.hand_over(self.path, fields)
        _signals.forget(self)
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def _end(self, status: str, reason: str | None) -> bool:
        """Record a terminal status, durably, after every output; the lock stays held."""
        with self._locked():
            if self._closed:
                return False
            self._closed = True
            end = time.time()
            self._meta.update(status=status, end_time=runinfo.now_iso(end),
                              end_unix=round(end, 3), runtime_sec=round(self.elapsed, 6))
            self._meta["heartbeat"] = {**self._meta["heartbeat"], **self._resources.sample()}
            if reason is not None:
                self._meta["failure_reason"] = reason
        self._heartbeat.stop(wait=not self._heartbeat.is_current())
        if self._lost or not self._lock.still_ours():  # nothing of ours to write into now
            self._lose()
            raise RunLostError(str(self.path))
        self.info(f"Marked {status}" + (f": {reason}" if reason else ""))
        _fs.fsync_paths(sorted(self._unsynced))
        self._unsynced.clear()
        self._write_meta(durable=True)
        return True

    def _release(self) -> None:
        """Let the next attempt in: the last thing a run does. Safe to call twice."""
        if self.attached or self._superseded or not self._closed:
            return
        self._let_go()

    def _let_go(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        _signals.forget(self)
        self._lock.release()
        _OPEN.discard(self)

    def _fail_after_complete(self, reason: str) -> None:
        """``mark_failed`` after ``mark_complete``: the index forgets complete first."""
        with self._taken_back():
            index.forget(self.path.parent, self._meta)
            with self._locked():
                self._meta.update(status=schema.FAILED, failure_reason=reason)
            self.info(f"Marked failed: {reason}")
            self._write_meta(durable=True)
        if self.callback:
            self.callback(self)

    def __enter__(self) -> Logbook:
        self._with_depth += 1
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._with_depth -= 1
        if self._superseded or os.getpid() != self._pid:
            return  # a forked child leaving the block: the run is not its to end
        if exc is None:
            self.close()
        elif isinstance(exc, KeyboardInterrupt):
            self.mark_cancelled("KeyboardInterrupt")
        elif isinstance(exc, SystemExit):
            if exc.code in (0, None):
                self.close()
            elif self.attached and isinstance(exc.code, int):
                self._hand_over_end(None, None)  # the wrapper records the exit status
            else:
                self._finish(schema.FAILED, str(exc.code))  # as notata 0.3: "1"
        else:
            reason = str(exc) or type(exc).__name__
            if self.attached:  # the last line of its traceback, as the wrapper reports it
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._finish(schema.FAILED, reason)


def _render_params(values: dict[str, Any], ext: str) -> bytes:
    if ext == "json":
        return _fs.dumps_json(values)
    try:
        return yaml.safe_dump(values, sort_keys=True, allow_unicode=True).encode()
    except yaml.YAMLError as err:  # to_plain lets nothing through that YAML refuses
        raise TypeError(f"params: cannot be written as YAML: {err}") from err


def _check_run_dir(path: Path) -> None:
    """Refuse a run directory that is a symlink or not a folder (looked at with lstat)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(str(path), "the run directory is a symlink, which notata never "
                                     "follows (it would write outside the base folder)")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(str(path), "the run directory is not a folder")


def _supersede(path: Path) -> str | None:
    """Before an overwrite/resume open: an older Logbook of this run in this process gives
    up the run (a notebook cell run again), unless it is inside a ``with`` block or belongs
    to another thread (then :class:`RunLockedError`). The older one's status, if any."""
    for old in list(_OPEN):
        if old._superseded or not _same_dir(old.path, path):
            continue
        if old._with_depth:
            raise RunLockedError(str(path), {"in_process": "inside a running with block"})
        if old._thread != threading.get_ident():
            raise RunLockedError(str(path), {"in_process": "opened by another thread"})
        status = str(old._meta.get("status"))
        old._give_up()
        return status
    return None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _history(previous: Mapping[str, Any], superseded: str | None) -> list[dict[str, Any]]:
    """The attempts list of a run about to start its next attempt."""
    history = list(previous.get("attempts", []))
    if previous:
        record = {k: previous[k] for k in _ATTEMPT_FIELDS if k in previous}
        record.setdefault("attempt", len(history) + 1)
        if "slurm" in previous:
            record["slurm"] = previous["slurm"]
        if superseded is not None and previous.get("status") in schema.OPEN_STATUSES:
            record["status"] = SUPERSEDED
            record["failure_reason"] = "superseded by a newer open of the run in the same process"
        history.append(record)
    return history


@atexit.register
def _close_forgotten() -> None:
    """A run still open when the interpreter exits did not finish: say so on disk, and
    release what a signal ended (its lock was kept for the ``finally`` blocks)."""
    for log in list(_OPEN):
        if log._pid != os.getpid():
            continue  # a forked child's copy of its parent's run
        with contextlib.suppress(Exception):
            log._finish(schema.FAILED, "the process exited without marking the run complete")


def _forget_runs_in_child() -> None:
    """After fork: the parent's runs are not the child's to end, nor to keep locked (a
    worker that outlives the parent must not hold the run's lock)."""
    for log in list(_OPEN):
        with contextlib.suppress(Exception):
            log._lock.drop_in_child()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_runs_in_child)
