"""The Logbook: one run, one directory of plain files, safe under crashes and signals.

The Logbook is the user's API (outputs, params, log lines, ``with``); the run's life
(lock, metadata, heartbeat, status) is its run object's: an :class:`~notata._run.OwnedRun`
when this process holds the run, an :class:`~notata._attach.AttachedRun` under
``notata exec``. Signals reach it through :class:`~notata._signals.RunSignals`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from . import _attach, _fs, _signals, layout, scheduler, schema
from ._attempt import SUPERSEDED
from ._convert import to_plain
from ._outputs import LogFile, Outputs, render_params
from ._run import OwnedRun
from .errors import RunExistsError, RunLockedError, UsageError
from .heartbeat import interval_from

if TYPE_CHECKING:
    from .manifest import Task

__all__ = ["SUPERSEDED", "Logbook"]

_OPEN: weakref.WeakSet[Logbook] = weakref.WeakSet()


class Logbook(Outputs):
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
            SIGUSR1 to :meth:`on_warning` hooks (see :mod:`notata._signals`).
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
        _fields: Mapping[str, Any] | None = None,
        _wrapper: bool = False,
    ) -> None:
        if isinstance(base_dir, Mapping):
            raise TypeError("Logbook's second argument is base_dir (as in notata 0.3); "
                            "pass parameters as params=...")
        if overwrite and resume:
            raise UsageError("choose one of overwrite=True (start afresh) and resume=True")
        self.run_id = layout.check_run_id(run_id)
        super().__init__(layout.run_dir(base_dir, self.run_id))
        self.log_path = self.path / layout.LOG
        self.datadir = self.path / layout.DATA
        self.plotdir = self.path / layout.PLOTS
        self.artifactsdir = self.path / layout.ARTIFACTS
        self.callback = callback
        self._text = LogFile(self.log_path, self.run_id, level)
        #: notata 0.3's logger (``notata.logbook.<run_id>``, not propagated): handlers added
        #: to it receive every line written to log.txt.
        self.logger = self._text.logger
        # Everything that can refuse the params does so before anything is made.
        plain = to_plain(dict(params), "params") if params is not None else None
        interval = interval_from(heartbeat)
        self._with_depth = 0  # inside ``with`` blocks of this handle
        self._thread = threading.get_ident()
        #: The sweep task this run is (set by :func:`notata.task`); ``log.task.params``.
        self.task: Task | None = None
        layout.check_run_dir(self.path)
        if _attach.wrapper_holds(self.path):
            self._run: OwnedRun | _attach.AttachedRun = _attach.AttachedRun(self.path,
                                                                            self._let_go)
            self._signals = _signals.RunSignals(self, self._run, on_warning)
            # The wrapper saved the same params already (the same sweep's same task, or
            # the same bytes): said and written once.
            meta = self._run.meta
            if plain is not None and not (_fields and all(
                    meta.get(k) == _fields.get(k) for k in ("manifest_hash", "task"))):
                rendered = render_params(plain, "yaml")
                if not _holds(self.path / layout.PARAMS_YAML, rendered):
                    self._save_params_file(layout.PARAMS_YAML, rendered)
            if signals:  # hooks and finally blocks run; the wrapper records the status
                _signals.listen(self._signals)
            return
        params_file = render_params(plain, "yaml") if plain is not None else None
        self._open(overwrite, resume, interval, params_file, preallocate, track_children,
                   signals, on_warning, _check, _fields or {}, _wrapper)

    def _open(self, overwrite: bool, resume: bool, interval: float, params_file: bytes | None,
              preallocate: bool, track_children: bool, signals: bool, on_warning: Any,
              check: Callable[[dict[str, Any]], None] | None,
              fields: Mapping[str, Any], wrapper: bool = False) -> None:
        """Take the run (this process holds it): lock, first record (with notata's own
        ``fields``: a sweep task's), params, heartbeat. ``wrapper``: ``notata exec``'s
        run, whose ``running`` is written with its command's pid (one write less)."""
        existed = os.path.lexists(self.path)
        if existed and not (overwrite or resume):
            raise RunExistsError(
                f"Run directory {self.path} already exists. Pass resume=True to continue "
                "that run (as its next attempt, outputs kept) or overwrite=True to start it "
                "afresh (its outputs removed), or choose another run_id.")
        superseded = _supersede(self.path) if existed else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            self.path.mkdir()
        layout.check_run_dir(self.path)  # again: it may have been replaced since the first look
        run = self._run = OwnedRun(self.path, self.run_id, self.log, self._let_go)
        self._signals = _signals.RunSignals(self, run, on_warning)
        run.acquire()
        try:
            # From here on a signal waits until the run is open, then ends it.
            with _signals.critical():
                if signals:
                    _signals.listen(self._signals)
                try:
                    # Looked at again under the lock: the folder may have been swapped for a
                    # symlink while the lock was busy; nothing is emptied or written before.
                    layout.check_run_dir(self.path)
                    run.begin(overwrite, superseded, interval, track_children, check, fields)
                    if preallocate:
                        for d in (self.datadir, self.plotdir, self.artifactsdir):
                            d.mkdir(exist_ok=True)
                    if params_file is not None:
                        self._save_params_file(layout.PARAMS_YAML, params_file)
                    self.info("Logbook initialized" if self.attempt == 1
                              else f"Logbook resumed as attempt {self.attempt}")
                    run.start(interval, write=not wrapper)
                    _OPEN.add(self)
                except BaseException:
                    _signals.forget(self._signals)
                    raise
        except BaseException:
            run.lock.release()
            raise

    # -- state ---------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether this handle is attached to a run that a ``notata exec`` wrapper holds."""
        return isinstance(self._run, _attach.AttachedRun)

    @property
    def status(self) -> str:
        """The run's status (one of :data:`notata.schema.STATUSES`)."""
        return self._run.status

    def current_status(self) -> str:
        """The run's status (the seed's name for :attr:`status`)."""
        return self.status

    @property
    def attempt(self) -> int:
        """1 for a run's first attempt, N+1 after each resume."""
        return int(self._run.meta["attempt"])

    @property
    def job_id(self) -> object:
        """The scheduler's id of the job this run runs in (SLURM_JOB_ID, an int), else None."""
        return self._run.job_id

    @property
    def elapsed(self) -> float:
        """Seconds since this attempt started."""
        return self._run.elapsed

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the run's metadata as last written."""
        return self._run.metadata()

    def meta(self, **fields: Any) -> None:
        """Merge ``fields`` into metadata.json (values must be YAML/JSON-able).

        notata's own fields (``status``, ``attempt``, ``heartbeat``...:
        :data:`notata.schema.RESERVED`) are refused with ValueError: a status is set with
        :meth:`mark_complete` / :meth:`mark_failed`.
        """
        reserved = sorted(set(fields) & (schema.RESERVED | scheduler.names()))
        if reserved:
            raise UsageError(f"meta({reserved[0]}=...): {reserved[0]!r} is notata's own "
                             "metadata field; choose another name (a status is set with "
                             "mark_complete() or mark_failed())")
        self._set(**{k: to_plain(v, f"meta[{k!r}]") for k, v in fields.items()})

    def _set(self, **fields: Any) -> None:
        """Merge notata's own fields (a sweep task's, exec's) into the run's metadata."""
        self._run.set(**fields)

    def _stage(self, **fields: Any) -> None:
        """Merge notata's own fields into the run's metadata for its next write (the
        terminal status's, say): one write less where nothing must be on disk sooner."""
        if isinstance(self._run, OwnedRun):
            self._run.stage(**fields)
        else:
            self._run.set(**fields)

    # -- signals -------------------------------------------------------------------------------

    def on_warning(self, hook: Any) -> Any:
        """Call ``hook(log)`` on SIGUSR1 (``sbatch --signal=B:USR1@secs``): checkpoint now."""
        self._signals.warning_hooks.append(hook)
        return hook

    def _on_lost(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` (from the heartbeat thread) if the heartbeat finds the run lost
        (its lock broken by another host's attempt): ``notata exec`` stops its command."""
        if isinstance(self._run, OwnedRun):
            self._run.lost_hooks.append(hook)

    def on_terminate(self, hook: Any) -> Any:
        """Call ``hook(log, signum)`` after a SIGTERM's or SIGHUP's status is on disk, before
        the exit, with the run lock still held (also in a command attached under
        ``notata exec``, whose wrapper records the status)."""
        self._signals.terminate_hooks.append(hook)
        return hook

    def holding_signals(self) -> contextlib.AbstractContextManager[None]:
        """A block that SIGTERM, SIGHUP and SIGUSR1 wait for (main thread): e.g. starting a
        command and registering the hook that stops it."""
        return _signals.critical()

    # -- outputs -------------------------------------------------------------------------------

    def _guard(self) -> None:
        self._run.check_usable()

    def _lock_identity(self) -> tuple[int, int] | None:
        """The identity of the run lock this handle holds (None when attached)."""
        return self._run.lock.identity() if isinstance(self._run, OwnedRun) else None

    def _store(self, target: Path, write: Callable[[IO[bytes]], Any], message: str) -> None:
        _fs.atomic_write(target, write)
        self._run.saved(target)
        self.info(message)

    # -- messages ------------------------------------------------------------------------------

    def log(self, message: str, level: int | str = logging.INFO) -> None:
        """Append ``[YYYY-MM-DDTHH:MM:SS] LEVEL message`` to log.txt."""
        self._guard()
        if self._text.write(message, level):  # the file was opened: fsync it at the end
            self._run.saved(self.log_path)

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
        self._ended(lambda: self._run.fail(str(reason)))

    def mark_timeout(self, reason: str = "time limit reached") -> None:
        """Record the run as timed out with ``reason`` (e.g. before a requeue), and release it."""
        self._finish(schema.TIMEOUT, str(reason))

    def mark_cancelled(self, reason: str = "cancelled") -> None:
        """Record the run as cancelled (stopped on purpose) with ``reason``, and release it."""
        self._finish(schema.CANCELLED, str(reason))

    def close(self) -> None:
        """Complete the run if nothing has ended it yet (what a clean ``with`` exit does)."""
        if not self._run.closed:
            self.mark_complete()
        else:
            self._run.release()

    def _count_worker(self, cpu_sec: float, peak_bytes: int) -> None:
        """CPU time and peak RSS of a process that worked for this run and that another
        process reaped (a function task's worker): the run's figures count them."""
        if isinstance(self._run, OwnedRun):
            self._run.count_worker(cpu_sec, peak_bytes)

    def _finish(self, status: str, reason: str | None) -> None:
        """Write the terminal status once (the first terminal status wins), then release."""
        self._ended(lambda: self._run.finish(status, reason))

    def _ended(self, end: Callable[[], bool]) -> None:
        """A signal waits until the run is recorded, let go and its callback has run (an
        Experiment's index row): it cannot cut the end of a run in two."""
        with _signals.critical():
            if end() and self.callback:
                self.callback(self)

    def _let_go(self) -> None:
        """The run lets go (its lock is released next): close what this handle holds."""
        self._text.close()
        _signals.forget(self._signals)
        _OPEN.discard(self)

    def __reduce__(self) -> Any:
        raise TypeError("a Logbook cannot be pickled or copied: it is one process's handle on "
                        "its run (pass the run directory, log.path, and open a LogReader)")

    def __enter__(self) -> Logbook:
        self._with_depth += 1
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._with_depth -= 1
        if self._run.superseded or os.getpid() != self._run.pid:
            return  # a forked child leaving the block: the run is not its to end
        if exc is None:
            self.close()
        elif isinstance(exc, KeyboardInterrupt):
            self.mark_cancelled("KeyboardInterrupt")
        elif isinstance(exc, SystemExit):
            if exc.code in (0, None):
                self.close()
            else:
                self._ended(lambda: self._run.exited(exc.code))
        else:
            self._finish(schema.FAILED, self._run.failure_reason(exc))


def _supersede(path: Path) -> str | None:
    """Before an overwrite/resume open: an older Logbook of this run in this process gives
    up the run (a notebook cell run again), unless it is inside a ``with`` block or belongs
    to another thread (then :class:`RunLockedError`). The older one's status, if any."""
    for old in list(_OPEN):
        if old._run.superseded or not _same_dir(old.path, path):
            continue
        if old._with_depth:
            raise RunLockedError(str(path), {"in_process": "inside a running with block"})
        if old._thread != threading.get_ident():
            raise RunLockedError(str(path), {"in_process": "opened by another thread"})
        status = str(old._run.meta.get("status"))
        if isinstance(old._run, OwnedRun):
            old._run.give_up()
        return status
    return None


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file at ``path`` holds exactly ``data``."""
    try:
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@atexit.register
def _close_forgotten() -> None:
    """A run still open when the interpreter exits did not finish: say so on disk, and
    release what a signal ended (its lock was kept for the ``finally`` blocks)."""
    for log in list(_OPEN):
        if log._run.pid != os.getpid():
            continue  # a forked child's copy of its parent's run
        with contextlib.suppress(Exception):
            log._finish(schema.FAILED, "the process exited without marking the run complete")


def _forget_runs_in_child() -> None:
    """After fork: the parent's runs are not the child's to end, nor to keep locked (a
    worker that outlives the parent must not hold the run's lock)."""
    for log in list(_OPEN):
        if isinstance(log._run, OwnedRun):
            with contextlib.suppress(Exception):
                log._run.lock.drop_in_child()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_runs_in_child)
