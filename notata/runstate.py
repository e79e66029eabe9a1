"""What state one run is in, read from its files: the collector's classification.

Classification of a task (see :data:`SCAN_STATUSES`):

- a recorded terminal status (``complete``, ``failed``, ``timeout``, ``cancelled``,
  ``preempted``, ``terminated``) is reported as is;
- a run recorded ``running``/``initialized`` is ``running`` while alive, else ``stale``.
  It is stale when its scheduler job is known to be gone (the queue was asked and does
  not list it), when it ran on this host and its pid is gone, or when its heartbeat is
  older than the threshold. A run whose job the queue lists as RUNNING is ``running``
  whatever its heartbeat says (the reason notes "no heartbeat");
- no run directory: ``pending`` if the queue holds the task, in an array that a recorded
  submission of this sweep made or that one of its started tasks ran in, or a local
  submission whose process is alive holds it (:func:`notata.queue.local_holds`), else
  ``missing``;
- a run directory written by a different version of the manifest: ``mismatch``.

Staleness threshold: ``stale_after`` seconds if given, else 3 heartbeat intervals (as
the run recorded them) plus :data:`MARGIN_SEC` (120 s): one missed beat is tolerated
under load, and the margin covers clock skew between the task's node and this one and
attribute caching on shared filesystems (NFS shows changes up to 60 s late). The age is
the collector's clock minus the time the task wrote *into* the file, never a file mtime.
A heartbeat from the future counts as fresh; ``--watch`` then judges by whether the
beat counter moves on the collector's own clock (:class:`notata.collector.Watcher`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from . import _attach, _fs, layout, scheduler, schema
from .heartbeat import DEFAULT_INTERVAL
from .lock import LockFileError, stamp_of
from .lock import is_held as lock_is_held
from .manifest import Sweep
from .pack import let_go_by

if TYPE_CHECKING:
    from .queue import Queue

STALE = "stale"

PENDING = "pending"

MISSING = "missing"

CORRUPT = "corrupt"

MISMATCH = "mismatch"
#: Every status a scan can report, in the order tables show them.
SCAN_STATUSES = (*schema.STATUSES, STALE, PENDING, MISSING, CORRUPT, MISMATCH)

#: Statuses ``resubmit`` can be asked to take (``--failed``...).
SELECTORS = (schema.FAILED, STALE, MISSING, schema.TIMEOUT, schema.CANCELLED,
             schema.PREEMPTED, CORRUPT, schema.TERMINATED, schema.OOM)

#: Statuses ``resubmit`` takes when none is named (``oom``: a death that read ``failed``
#: before notata told it apart, and was taken then).
DEFAULT_RESUBMIT = (schema.FAILED, schema.TIMEOUT, schema.PREEMPTED, STALE, MISSING,
                    schema.OOM)
STALE_BEATS = 3

#: A run whose heartbeat is younger than this many intervals is never judged gone
#: because the queue does not list its job.
FRESH_BEATS = 2

MARGIN_SEC = 120.0


@dataclass
class RunRecord:
    """One run (or one task with no run yet) as a scan saw it."""

    task: int | None
    run_id: str
    status: str
    attempt: int
    reason: str | None = None
    path: str | None = None  # the run directory (a string: a scan makes 10^5 of these)
    queued: str | None = None  # the scheduler's state of its job, when the queue lists it
    beat: tuple[int, float] | None = None  # (beat counter, task's own time) for --watch
    limit: float | None = None  # the staleness threshold that applies to this run
    runtime_sec: float | None = None
    array: tuple[str, int] | None = None  # (array job id, array task id) it ran as
    packed: bool = False  # its last attempt ran in a pack (``array`` is the pack's)
    passed: frozenset[str] = frozenset()  # job keys of the packs that ran it and let it go
    orphan: bool = False  # its wrapper is gone but its command's processes still run here
    cut_off: bool = False  # its lock is held from a node the scheduler says is down
    asked: dict[str, Any] | None = None  # what its last attempt asked the scheduler for
    queued_by: str | None = None  # who holds it queued, when the queue's state does not say
    kept: Any = None  # what the scan's ``keep`` took from its metadata (see read_run)

    @property
    def run_dir(self) -> Path | None:
        return Path(self.path) if self.path is not None else None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "run_id": self.run_id, "status": self.status,
                               "attempt": self.attempt}
        if self.reason:
            out["reason"] = self.reason
        if self.queued:
            out["queued"] = self.queued
        return out

def held(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (a probe: never blocks a start)."""
    try:
        return lock_is_held(run_dir)
    except LockFileError:
        return True  # not a lock notata can take: never run beside whatever it is

def stale_limit(meta: Mapping[str, Any], stale_after: float | None) -> float:
    """Seconds without a heartbeat after which a collector calls a run stale (see the
    module docstring). Not the lock's rule: a start breaks another host's lock only after
    :func:`notata.lock.break_after` (longer, since breaking it cannot be undone)."""
    if stale_after is not None:
        return stale_after
    interval = (meta.get("heartbeat") or {}).get("interval_sec") or DEFAULT_INTERVAL
    return STALE_BEATS * float(interval) + MARGIN_SEC

def read_run(run_dir: str | os.PathLike[str], task: int | None = None, *,
             sweep: Sweep | None = None,
             queue: Queue | None = None, stale_after: float | None = None,
             now: float | None = None, symlink: bool | None = None,
             own_task: bool = False,
             keep: Callable[[Mapping[str, Any]], Any] | None = None) -> RunRecord:
    """The record of one run directory; never raises for what is on disk.

    One ``open`` (metadata.json); ``symlink`` comes from the caller's scandir when known.
    Metadata that parses but has fields of the wrong shape reads ``corrupt``, with why.
    ``own_task``: with no ``task`` given, the record takes the task its metadata records
    (a scan of a folder of runs, where no manifest names them). ``keep(meta)``, when
    given, takes what else a caller needs of the metadata into :attr:`RunRecord.kept` (so
    that nothing reads the file twice); it must not raise for odd field types (its record
    would read ``corrupt``).
    """
    run_dir = os.fspath(run_dir)
    run_id = os.path.basename(run_dir).removeprefix(layout.RUN_PREFIX)
    if os.path.islink(run_dir) if symlink is None else symlink:
        return RunRecord(task, run_id, CORRUPT, 0, "the run directory is a symlink; not followed",
                         run_dir)
    try:
        meta = _fs.read_json_object(os.path.join(run_dir, layout.METADATA))
    except FileNotFoundError:
        return _without_metadata(run_dir, task, run_id, time.time() if now is None else now)
    except (OSError, ValueError) as err:
        return RunRecord(task, run_id, CORRUPT, 0, str(err), run_dir)
    recorded = meta.get("task")
    if own_task and task is None and isinstance(recorded, int) \
            and not isinstance(recorded, bool) and recorded >= 0:
        task = recorded
    try:
        record = _classify(meta, task, run_id, run_dir, sweep, queue, stale_after,
                           time.time() if now is None else now)
        if keep is not None:
            try:
                record.kept = keep(meta)
            except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
                record.kept = None  # what was to be kept is lost; the run's status is not
        return record
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as err:
        return RunRecord(task, run_id, CORRUPT, 0, f"malformed {layout.METADATA}: {err}",
                         run_dir)

def _without_metadata(run_dir: str, task: int | None, run_id: str, now: float) -> RunRecord:
    """A run folder with no metadata.json: a start (in progress, or one that died), or not
    notata's at all.

    A start makes the folder, takes its lock and writes metadata.json within
    milliseconds; one caught in between is ``running`` ("starting"). A folder holding
    nothing but its free lock (or nothing at all), made more than :data:`MARGIN_SEC` ago
    by the file system's clock, is a start that died: ``stale``, resubmitted, resumed.
    A folder with other files and no lock was never opened by notata: ``corrupt``.
    """
    if not os.path.lexists(run_dir):  # gone, or not made yet (a scan racing a start)
        return RunRecord(task, run_id, MISSING, 0)
    if not os.path.isdir(run_dir):
        return RunRecord(task, run_id, CORRUPT, 0, "not a folder", run_dir)
    try:
        names = {n for n in os.listdir(run_dir) if not n.endswith(_fs.TMP_SUFFIX)}
        held = lock_is_held(Path(run_dir))
        made = max([os.stat(run_dir).st_mtime,
                    *(os.stat(os.path.join(run_dir, n)).st_mtime for n in names)])
    except LockFileError as err:
        return RunRecord(task, run_id, CORRUPT, 0, f"its {layout.LOCK} is {err.strerror}",
                         run_dir)
    except OSError as err:
        return RunRecord(task, run_id, CORRUPT, 0, str(err), run_dir)
    if names - {layout.LOCK, layout.SOFT_LOCK}:
        return RunRecord(task, run_id, CORRUPT, 0, f"no {layout.METADATA}", run_dir)
    if held or now - made < MARGIN_SEC:
        return RunRecord(task, run_id, schema.RUNNING, 0, f"starting: no {layout.METADATA} "
                         "yet", run_dir)
    return RunRecord(task, run_id, STALE, 0, f"its start died before it wrote "
                     f"{layout.METADATA} (nothing ran)", run_dir)

_SHAPES: dict[str, type | tuple[type, ...]] = {
    "attempt": int, "heartbeat": dict, "pid": int, "host": str,
    "runtime_sec": (int, float), "start_unix": (int, float), "failure_reason": str,
}

@functools.lru_cache(maxsize=4)
def _shapes(schedulers: frozenset[str]) -> dict[str, type | tuple[type, ...]]:
    """The field shapes, the registered schedulers' records included (built once, not per
    run of a scan)."""
    return {**_SHAPES, **dict.fromkeys(schedulers, dict)}


def _classify(meta: dict[str, Any], task: int | None, run_id: str, run_dir: str,
              sweep: Sweep | None, queue: Queue | None, stale_after: float | None,
              now: float) -> RunRecord:
    status = meta.get("status")
    shapes = _shapes(scheduler.names())
    wrong = [k for k, kind in shapes.items() if k in meta and meta[k] is not None
             and (not isinstance(meta[k], kind) or isinstance(meta[k], bool))]
    if wrong:
        raise TypeError(f"{', '.join(wrong)} of the wrong type")
    record = RunRecord(task, run_id, str(status), meta.get("attempt", 1), None, run_dir)
    record.runtime_sec = meta.get("runtime_sec")
    asked = (meta.get("resources") or {}).get("asked") if isinstance(
        meta.get("resources"), dict) else None
    record.asked = asked if isinstance(asked, dict) else None
    if status not in schema.STATUSES:
        record.status, record.reason = CORRUPT, f"unknown status {status!r}"
        return record
    recorded = meta.get("manifest_hash")
    if sweep is not None and recorded not in (None, sweep.hash):
        record.status = MISMATCH
        record.reason = f"written by manifest hash {recorded}, not {sweep.hash}"
        return record
    asked = queue is not None and queue.knows(meta)  # whoever ran it: their jobs are listed
    if queue is not None:
        record.queued = queue.state(meta)
        array = scheduler.array_of(meta)
        came = meta.get("task_from", "array")
        if array is not None and came in ("array", "pack"):
            record.array = (str(array[0]), array[1])
            record.packed = came == "pack"
        if status != schema.COMPLETE:  # packs that ran it and went on hold it no more
            record.passed = frozenset(let_go_by(meta, queue.key))
            if record.queued is not None and queue.key(meta) in record.passed:
                record.queued = None
    if status == schema.COMPLETE:
        return record
    try:  # a run that may be run again: its lock must be one notata can take
        lock_is_held(Path(run_dir), probe=False)
    except LockFileError as err:
        record.status, record.reason = CORRUPT, f"its {layout.LOCK} is {err.strerror}"
        return record
    if status not in schema.OPEN_STATUSES:
        reason = meta.get("failure_reason")
        record.reason = str(reason) if reason else None
        if status == schema.FAILED and (record.reason or "").startswith(
                "command killed by SIGKILL"):
            _killed_for_memory(record, meta)  # below the 90 % rule, but SLURM says so
        return record
    hb = meta.get("heartbeat") or {}
    if isinstance(hb.get("beat"), int) and isinstance(hb.get("unix"), (int, float)):
        record.beat = (hb["beat"], float(hb["unix"]))
    record.limit = stale_limit(meta, stale_after)
    record.status, record.reason = _liveness(meta, queue if asked else None, record.queued,
                                             stale_after, now)
    if record.status != STALE:
        return record
    if held(Path(run_dir)):  # a live process holds its lock: alive, whatever else says
        lost = queue.node_trouble(meta) if queue is not None and asked else None
        if lost and lost.endswith("is down") and meta.get("host") != socket.gethostname() \
                and stamp_of(Path(run_dir) / layout.LOCK).split()[:1] == [meta.get("host")]:
            # (the lock's stamp still names that host: no new attempt has taken it since)
            # ... except on a node the scheduler has given up on: cut off, not dead; the
            # next attempt breaks its lock by the rule for another host's holder
            record.reason = f"{record.reason}; its lock is still held from there"
            record.cut_off = True
            return record
        record.status = schema.RUNNING
        record.reason = f"{record.reason}, but a live process holds its lock"
        return record
    if _killed_for_memory(record, meta):  # the wrapper died with its command
        return record
    pid = meta.get("pid")
    if meta.get("host") == socket.gethostname() and isinstance(pid, int) \
            and not psutil.pid_exists(pid):
        survivor = _surviving_command(meta, run_dir, now)
        if survivor is not None:
            record.orphan = True
            record.reason = (f"its wrapper (pid {pid}) is gone, but a process of its command "
                             f"still runs here (pid {survivor}); stop it before running the "
                             "task again")
    return record

def _killed_for_memory(record: RunRecord, meta: Mapping[str, Any]) -> bool:
    """A run the scheduler says was killed for memory reads ``oom``, with its words."""
    said = scheduler.out_of_memory(meta, Path(str(record.path)).parent)
    if said is None:
        return False
    record.status, record.reason = schema.OOM, f"killed for memory ({said})"
    return True


def _liveness(meta: Mapping[str, Any], asked: Queue | None, queued: str | None,
              stale_after: float | None, now: float) -> tuple[str, str | None]:
    """``running`` or ``stale`` (with why) for a run recorded as open; ``asked``: the queue,
    when it listed the jobs of the user who ran it."""
    hb = meta.get("heartbeat") or {}
    beat = hb.get("unix") or meta.get("start_unix")
    age = now - float(beat) if isinstance(beat, (int, float)) else float("inf")
    limit = stale_limit(meta, stale_after)
    pid = meta.get("pid")
    if meta.get("host") == socket.gethostname() and isinstance(pid, int) \
            and not psutil.pid_exists(pid):  # certain, whatever the queue says of its job
        return STALE, f"its process (pid {pid} on this host) is gone"
    job = scheduler.job_of(meta)
    if asked is not None and job is not None and job[0].name != asked.provider.name:
        asked = None  # another scheduler's queue says nothing of this job
    interval = float(hb.get("interval_sec") or DEFAULT_INTERVAL)
    late = age > FRESH_BEATS * interval  # two beats missed

    def trouble() -> str | None:  # the scheduler's word on the run's node (asked once)
        return asked.node_trouble(meta) if asked is not None and job is not None else None

    if queued is not None and job is not None and job[0].is_alive(queued):
        said = trouble() if late else None  # the scheduler may not have given up on it yet
        if said:
            return schema.RUNNING, (f"{said} (its job is still {queued.lower()}); no "
                                    f"heartbeat for {age:.0f}s")
        return schema.RUNNING, (f"no heartbeat for {age:.0f}s, but its job is "
                                f"{queued.lower()}" if age > limit else None)
    beat = hb.get("unix") if isinstance(hb.get("unix"), (int, float)) else None
    if queued is not None and job is not None and job[0].is_waiting(queued) \
            and asked is not None and beat is not None and beat < asked.listed_at - 1:
        # Queued again while its run says it runs, and no beat since the queue said so
        # (a task that starts while the scan reads is not this): the attempt ended
        # without a word (its node failed, or the job was requeued from under it).
        said = trouble()
        return PENDING, (f"requeued after {said}" if said else f"requeued by {job[0].title} "
                         f"(its attempt on {meta.get('host')} ended without a word)")
    if asked is not None and job is not None and queued is None and late:
        # Never over a fresh heartbeat: a queue that does not list a job that is still
        # beating (another user's, another cluster's) is wrong, not the run.
        said = trouble()
        if said and said.endswith("is down"):  # nothing of it runs: not after the threshold
            return STALE, f"its {job[0].title} job is gone and {said}"
        return STALE, f"its {job[0].title} job is gone"
    if age > limit:
        return STALE, f"no heartbeat for {age:.0f}s (threshold {limit:.0f}s)"
    return schema.RUNNING, None

def _surviving_command(meta: Mapping[str, Any], run_dir: str, now: float) -> int | None:
    """A live process that the dead wrapper of this run (on this host) left behind, else
    None: one whose environment names this run and that wrapper (the command, whatever it
    started, a daemon that left the group), or, for one that cleared its environment or
    belongs to another user, a member of the command's process group that was started
    while the run was alive (a recycled pid, after a reboot say, is a later process)."""
    by_env, by_group = _processes(now)()
    found = by_env.get((os.path.realpath(run_dir), str(meta.get("pid"))))
    if found is not None:
        return found
    leader, start = meta.get("command_pid"), meta.get("start_unix")
    hb = meta.get("heartbeat") or {}
    last = hb.get("unix") if isinstance(hb.get("unix"), (int, float)) else start
    if not isinstance(leader, int) or not isinstance(start, (int, float)) or last is None:
        return None
    until = float(last) + float(hb.get("interval_sec") or DEFAULT_INTERVAL) + 5
    return next((pid for pid, made in by_group.get(leader, ())
                 if start - 1 <= made <= until), None)

@functools.lru_cache(maxsize=1)
def _processes(scan_time: float) -> Callable[[], tuple[dict[tuple[str, str], int],
                                                       dict[int, list[tuple[int, float]]]]]:
    """This host's live processes by the run and wrapper their environment names, and by
    process group (pid, start time), listed once per scan (``scan_time`` tells scans
    apart): a scan of many stale runs looks at every process once, not once per run."""
    @functools.cache
    def listing() -> tuple[dict[tuple[str, str], int], dict[int, list[tuple[int, float]]]]:
        by_env: dict[tuple[str, str], int] = {}
        by_group: dict[int, list[tuple[int, float]]] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                by_group.setdefault(os.getpgid(proc.pid), []).append(
                    (proc.pid, proc.create_time()))
                env = proc.environ()
                if "NOTATA_RUN_DIR" in env:
                    key = (os.path.realpath(env["NOTATA_RUN_DIR"]),
                           env.get(_attach.ENV_WRAPPER_PID, ""))
                    by_env.setdefault(key, proc.pid)
        return by_env, by_group
    return listing
