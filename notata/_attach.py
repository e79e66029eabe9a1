"""Attaching: a process that ``notata exec`` runs opens the same run as its wrapper.

The wrapper holds the run's lock, heartbeat and status. A Python command it runs that
opens the same run (``notata.task`` or ``Logbook``) gets an *attached* handle: it writes
outputs and log lines itself, and hands its ``meta()`` fields and its failure reason to
the wrapper through ``<run>/.attached.json``, which the wrapper merges into metadata.json.
The wrapper is recognised by ``NOTATA_RUN_DIR`` and ``NOTATA_WRAPPER_PID`` naming the same
run and one of our ancestor processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from . import _fs, layout, scheduler, schema
from .errors import RunLostError

#: Set by ``notata exec`` for its command: the wrapper's pid, host and scheduler job.
ENV_WRAPPER_PID = "NOTATA_WRAPPER_PID"
ENV_WRAPPER_HOST = "NOTATA_WRAPPER_HOST"
ENV_WRAPPER_JOB = "NOTATA_WRAPPER_JOB"
#: ``device:inode`` of the run lock the wrapper holds: its command's writes check that
#: the run's ``.lock`` is still that file.
ENV_WRAPPER_LOCK = "NOTATA_WRAPPER_LOCK"


def wrapper_environment(job: object = None,
                        lock: tuple[int, int] | None = None) -> dict[str, str]:
    """What ``notata exec`` adds to its command's environment so the command can find it
    (``job``: the scheduler's job id the wrapper runs in, if any; ``lock``: the identity
    of the run lock it holds, :meth:`notata.lock.RunLock.identity`)."""
    env = {ENV_WRAPPER_PID: str(os.getpid()), ENV_WRAPPER_HOST: socket.gethostname()}
    if job is not None:
        env[ENV_WRAPPER_JOB] = str(job)
    if lock is not None:
        env[ENV_WRAPPER_LOCK] = f"{lock[0]}:{lock[1]}"
    return env


def _wrapper_lock(path: Path) -> tuple[int, int] | None:
    """The lock the wrapper says it holds (the run's .lock now may already be a newer
    attempt's, if this process attaches late), else the run's .lock as it is now."""
    said = os.environ.get(ENV_WRAPPER_LOCK, "").split(":")
    if len(said) == 2 and all(x.isdigit() for x in said):
        return int(said[0]), int(said[1])
    return _fs.identity(path / layout.LOCK)


def under_wrapper(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the wrapper the environment names runs this process: one of our ancestors
    on this host, or (a command started through ``srun`` inside the wrapper's job, which
    slurmstepd, not the wrapper, parents, maybe on another node) the same scheduler job.

    Variables inherited from elsewhere (a job submitted from inside a task, which sbatch's
    ``--export=ALL`` carries to another node) name a pid that is not our ancestor there,
    and another job.
    """
    env = os.environ if environ is None else environ
    wrapper, host = env.get(ENV_WRAPPER_PID, ""), env.get(ENV_WRAPPER_HOST)
    if not wrapper.isdigit() or int(wrapper) <= 1:
        return False
    job = env.get(ENV_WRAPPER_JOB)
    if job:
        sched = scheduler.current(env)
        if sched is not None and str(sched[0].job_id(sched[1])) == job:
            return True
    if host != socket.gethostname():
        return False
    return int(wrapper) in _ancestors()


def _ancestors() -> set[int]:
    """This process's ancestors' pids, from ``/proc/PID/stat`` (psutil's ``parents()``
    costs a millisecond more, which a pack of short tasks feels)."""
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):
            try:
                return out | {p.pid for p in psutil.Process().parents()}
            except psutil.Error:
                return out
    return out


def wrapper_holds(path: Path) -> bool:
    """Whether a ``notata exec`` wrapper of ours holds the run at ``path``: the environment
    names the run and the wrapper (see :func:`under_wrapper`), and the run's metadata
    names that wrapper as its live holder (variables copied by hand attach to nothing)."""
    env = os.environ
    run_dir = env.get("NOTATA_RUN_DIR")
    if not run_dir:
        return False
    try:
        if not os.path.samefile(run_dir, path):
            return False
        meta = _fs.read_json_object(path / layout.METADATA)
    except (OSError, ValueError):
        return False
    if (str(meta.get("pid")), meta.get("host")) != (env.get(ENV_WRAPPER_PID),
                                                    env.get(ENV_WRAPPER_HOST)):
        return False
    return meta.get("status") in schema.OPEN_STATUSES and under_wrapper(env)


def hand_over(run_dir: Path, fields: dict[str, Any]) -> None:
    """Attached side: give fields to the wrapper, which merges them into metadata.json."""
    side = run_dir / layout.ATTACHED
    try:
        current = _fs.read_json_object(side)
    except (FileNotFoundError, ValueError):
        current = {}
    _fs.atomic_write_json(side, {**current, **fields})


def take_handed_over(run_dir: Path) -> dict[str, Any]:
    """Wrapper side: take (read and remove) what an attached process handed over.

    The file is first renamed to a private name, so that a hand-over written while the
    take reads (by a process the command left behind) is a new file, never one removed
    unread by this take.
    """
    side = run_dir / layout.ATTACHED
    taken = side.with_name(f"{side.name}.{os.getpid()}-taken{_fs.TMP_SUFFIX}")  # a temporary
    try:
        os.replace(side, taken)
    except FileNotFoundError:
        return {}
    try:
        return _fs.read_json_object(taken)
    except (FileNotFoundError, ValueError):
        return {}
    finally:
        with contextlib.suppress(FileNotFoundError):
            taken.unlink()


#: How often an attached process asks whether its run's lock is still its wrapper's.
CHECK_EVERY_SEC = 1.0


class AttachedRun:
    """A run as an attached process sees it (the wrapper owns the lock and the status).

    The same small interface as :class:`notata._run.OwnedRun`, so that the Logbook never
    asks which it has: fields and an ending status are handed over; nothing is locked,
    beaten or recorded here; the user's hooks and ``finally`` blocks still run on a
    signal, and the wrapper records its status.
    """

    superseded = False  # an attached handle is never superseded: it takes no lock
    job_id = None

    def __init__(self, path: Path, on_let_go: Callable[[], None]) -> None:
        self.path = path
        self._on_let_go = on_let_go
        self.meta = _fs.read_json_object(path / layout.METADATA)
        self.pid = os.getpid()
        self.closed = False
        self._handed: str | None = None  # the status handed over, if any
        self._t0 = time.monotonic()
        self._lock = _wrapper_lock(path)
        self._checked = -math.inf  # when the lock was last found to be the wrapper's

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    @property
    def status(self) -> str:
        return str(_fs.read_json_object(self.path / layout.METADATA).get("status",
                                                                           schema.RUNNING))

    def metadata(self) -> dict[str, Any]:
        return dict(self.meta)

    def saved(self, path: Path) -> None:
        """Outputs are the wrapper's to fsync when it ends the run."""

    def check_usable(self) -> None:
        """Usable while the run's lock is the one its wrapper held when this process
        attached: once another attempt has broken it (this node was cut off, then came
        back), this process writes nothing more there. The wrapper decides when the run
        ends."""
        if not self._ours():
            raise RunLostError(str(self.path))

    def _ours(self, fresh: bool = False) -> bool:
        """Whether the run's lock is still the wrapper's. For log lines and outputs it is
        asked at most once a second (a lock is broken only after its holder has missed
        beats for 20 s at the least, and a process cut off that long finds the second
        gone), so a log line costs no stat; ``fresh`` (what is handed to the wrapper:
        fields, a status) always asks."""
        now = time.monotonic()
        if not fresh and now - self._checked < CHECK_EVERY_SEC:
            return True
        ours = self._lock is None or _fs.identity(self.path / layout.LOCK) == self._lock
        self._checked = now if ours else -math.inf
        return ours

    def set(self, **fields: Any) -> None:
        if not self._ours(fresh=True):
            raise RunLostError(str(self.path))
        hand_over(self.path, fields)

    def finish(self, status: str | None, reason: str | None) -> bool:
        """Hand over what this process marked (``status`` None: nothing, the wrapper has
        the exit status). A failure marked after complete still counts, as for a run of
        its own. False: the Logbook's callback is the wrapper's to run."""
        if self.closed and not (status == schema.FAILED and self._handed == schema.COMPLETE):
            return False
        self.closed = True
        if status is not None and self._ours(fresh=True):  # nothing for another attempt
            self._handed = status
            fields = {"status": status}
            if reason is not None:
                fields["failure_reason"] = reason
            hand_over(self.path, fields)
        self._on_let_go()
        return False

    def fail(self, reason: str) -> bool:
        return self.finish(schema.FAILED, reason)

    def exited(self, code: object) -> bool:
        """``sys.exit(code)``: the wrapper records an int exit status itself."""
        return self.finish(None if isinstance(code, int) else schema.FAILED, str(code))

    def release(self) -> None:
        """Nothing to release: the wrapper holds the lock."""

    @staticmethod
    def failure_reason(exc: BaseException) -> str:
        """The last line of its traceback, as the wrapper reports it."""
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def warned(self) -> bool:
        """SIGUSR1: the wrapper records it; the hooks run while the handle is open."""
        return not self.closed

    def ended(self, signum: int) -> bool:
        """SIGTERM/SIGHUP: the wrapper records it; the hooks (and finally blocks) run, and
        their writes ask afresh whether the run is still the wrapper's (a wrapper stops
        its command when the run was taken over)."""
        self._checked = -math.inf
        return True
