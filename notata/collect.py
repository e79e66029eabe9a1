"""The collector: what state every task of a sweep, or every run under a folder, is in.

Nothing is written. A full scan makes one ``scandir`` of the base folder and one
``open`` per run directory (its metadata.json). A sweep's scan first reads the sweep
index (:mod:`notata.index`, one file) and opens only the runs it does not record as
complete, when those are at least half the tasks (else the full scan is the quicker).
A run directory whose metadata cannot be read is ``corrupt`` (with the reason) and
never stops the scan.

Classification of a task (see :data:`SCAN_STATUSES`):

- a recorded terminal status (``complete``, ``failed``, ``timeout``, ``cancelled``,
  ``preempted``, ``terminated``) is reported as is;
- a run recorded ``running``/``initialized`` is ``running`` while alive, else ``stale``.
  It is stale when its scheduler job is known to be gone (the queue was asked and does
  not list it), when it ran on this host and its pid is gone, or when its heartbeat is
  older than the threshold. A run whose job the queue lists as RUNNING is ``running``
  whatever its heartbeat says (the reason notes "no heartbeat");
- no run directory: ``pending`` if the queue holds the task, in an array that a recorded
  submission of this sweep made or that one of its started tasks ran in, else ``missing``;
- a run directory written by a different version of the manifest: ``mismatch``.

Staleness threshold: ``stale_after`` seconds if given, else 3 heartbeat intervals (as
the run recorded them) plus :data:`MARGIN_SEC` (120 s): one missed beat is tolerated
under load, and the margin covers clock skew between the task's node and this one and
attribute caching on shared filesystems (NFS shows changes up to 60 s late). The age is
the collector's clock minus the time the task wrote *into* the file, never a file mtime.
A heartbeat from the future counts as fresh; ``--watch`` then judges by whether the
beat counter moves on the collector's own clock (:class:`Watcher`).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from . import _attach, _fs, index, layout, schema, submissions
from .errors import ManifestError
from .lock import SOFT_SUFFIX, LockFileError
from .lock import is_held as lock_is_held
from .manifest import Sweep

STALE = "stale"
PENDING = "pending"
MISSING = "missing"
CORRUPT = "corrupt"
MISMATCH = "mismatch"
#: Every status a scan can report, in the order tables show them.
SCAN_STATUSES = (*schema.STATUSES, STALE, PENDING, MISSING, CORRUPT, MISMATCH)
#: Statuses ``resubmit`` can be asked to take (``--failed``...).
SELECTORS = (schema.FAILED, STALE, MISSING, schema.TIMEOUT, schema.CANCELLED,
             schema.PREEMPTED, CORRUPT, schema.TERMINATED)
#: Statuses ``resubmit`` takes when none is named.
DEFAULT_RESUBMIT = (schema.FAILED, schema.TIMEOUT, schema.PREEMPTED, STALE, MISSING)
STALE_BEATS = 3
#: Queue states of a job that is alive: its run is never stale while the queue says so.
ALIVE_STATES = frozenset({"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STOPPED",
                          "RESIZING", "SIGNALING", "STAGE_OUT"})
#: At most this many arrays that runs ran in are asked for by id in one scan (the newest).
MAX_ASKED_ARRAYS = 1000
#: A run whose heartbeat is younger than this many intervals is never judged gone
#: because the queue does not list its job.
FRESH_BEATS = 2
MARGIN_SEC = 120.0
_NO_INDEXED = np.empty(0, dtype=index.DONE)


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
    array: tuple[str, int] | None = None  # (SLURM array job id, array task id) it ran as
    orphan: bool = False  # its wrapper is gone but its command's processes still run here

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


Row = tuple[str, str, str]  # (job key "123" or "123_4", state, comment)


class Queue:
    """What the scheduler has queued: job key (``"123"`` or ``"123_4"``) -> state, and
    array job id -> the tag notata put in its comment (``notata:<submission>-<k>``).

    The queue is asked per user (a group-shared sweep holds several users' jobs):
    ``fetch(users, jobs)`` is called once for the users given at construction, once more
    for each user that a run's metadata names later in the scan, and once for the arrays
    that runs ran in and that no user asked about lists (a colleague's own array). A user
    whose jobs could not be listed is remembered; "its job is gone" is never concluded
    for them.
    """

    def __init__(self, jobs: Mapping[str, str] | None = None,
                 fetch: Callable[[list[str], list[str]], list[Row]] | None = None,
                 users: Iterable[str] = ()) -> None:
        self.jobs: dict[str, str] = dict(jobs or {})
        self.tags: dict[str, str] = {}
        self._fetch = fetch
        self.users: set[str] = set()
        self.unknown: set[str] = set()  # users whose jobs could not be listed
        self._asked_jobs: set[str] = set()
        self.include(users)

    def _add(self, rows: list[Row]) -> None:
        for key, state, comment in rows:
            self.jobs[key] = state
            if comment.startswith(submissions.TAG_PREFIX):  # the user's comment may follow
                tag = comment[len(submissions.TAG_PREFIX):].split(" ", 1)[0]
                self.tags[key.partition("_")[0]] = tag

    def include(self, users: Iterable[str]) -> None:
        """Ask the scheduler for the jobs of ``users`` not asked yet (one call)."""
        new = sorted(set(users) - self.users - self.unknown)
        if not new or self._fetch is None:
            return
        try:
            self._add(self._fetch(new, []))
            self.users.update(new)
        except Exception:  # a scheduler that cannot answer: classify from files alone
            self.unknown.update(new)
            if not self.users:
                raise

    def include_jobs(self, job_ids: Iterable[str]) -> None:
        """Ask for these array jobs, whoever submitted them, unless already listed."""
        listed = {k.partition("_")[0] for k in self.jobs}
        new = sorted(set(job_ids) - listed - self._asked_jobs)
        if not new or self._fetch is None:
            return
        self._asked_jobs.update(new)
        with contextlib.suppress(Exception):
            self._add(self._fetch([], new))

    def knows(self, meta: Mapping[str, Any]) -> bool:
        """Whether the jobs of the user who ran ``meta`` were listed (asking now if not)."""
        user = meta.get("user")
        if isinstance(user, str) and self._fetch is not None:
            self.include([user])
            return user not in self.unknown
        return True

    def state(self, meta: Mapping[str, Any]) -> str | None:
        """The state of the job a run's metadata names, if queued."""
        job = meta.get("slurm")
        if not isinstance(job, Mapping):
            return None
        if "array_job_id" in job:
            return self.jobs.get(f"{job['array_job_id']}_{job.get('array_task_id')}")
        if "job_id" in job:
            return self.jobs.get(str(job["job_id"]))
        return None


@dataclass
class Report:
    """A scan's result.

    ``read`` holds what the scan read from files (and the tasks with no run yet), sorted
    by task, runs that no task of the manifest names last; ``indexed`` the tasks the
    sweep index records as complete (:data:`notata.index.DONE`: ``task``, ``attempt``,
    ``array_job``, ``array_task``), which it did not open. ``runs`` is every run, both
    merged (built on first use: 10^6 records are slow).
    """

    read: list[RunRecord]
    sweep: Sweep | None = None
    indexed: np.ndarray = field(default_factory=lambda: _NO_INDEXED)

    @cached_property
    def runs(self) -> list[RunRecord]:
        if not len(self.indexed) or self.sweep is None:
            return self.read
        sweep = self.sweep
        done = [RunRecord(int(t), sweep.run_id(int(t), check=False), schema.COMPLETE, int(a))
                for t, a, *_ in self.indexed.tolist()]
        named = [r for r in self.read if r.task is not None]
        return [*heapq.merge(named, done, key=lambda r: r.task or 0),
                *(r for r in self.read if r.task is None)]

    @property
    def counts(self) -> dict[str, int]:
        keys = SCAN_STATUSES if self.sweep else tuple(
            s for s in SCAN_STATUSES if s not in (PENDING, MISSING, MISMATCH))
        counts = dict.fromkeys(keys, 0)
        for r in self.read:
            counts[r.status] = counts.get(r.status, 0) + 1
        counts[schema.COMPLETE] += len(self.indexed)
        return counts

    def __len__(self) -> int:
        return len(self.read) + len(self.indexed)

    def indices(self, *statuses: str) -> list[int]:
        """The task indices whose status is one of ``statuses``, in order."""
        got = [r.task for r in self.read if r.status in statuses and r.task is not None]
        if schema.COMPLETE in statuses and len(self.indexed):
            got = sorted(got + self.indexed["task"].tolist())
        return got

    @property
    def terminal(self) -> bool:
        """Whether no task is still running or pending."""
        return not any(r.status in (schema.RUNNING, schema.INITIALIZED, PENDING)
                       for r in self.read)

    def to_resubmit(self, statuses: Iterable[str] = DEFAULT_RESUBMIT,
                    max_attempts: int | None = None,
                    ) -> tuple[list[int], list[tuple[RunRecord, str]]]:
        """The task indices to submit again, and the selected runs left alone with why.

        Never a complete run, a task the queue still holds, a run another version of
        the manifest wrote, a run already at ``max_attempts`` attempts, or a run whose
        lock a live process holds.
        """
        wanted = set(statuses) - {schema.COMPLETE}
        chosen: list[int] = []
        left: list[tuple[RunRecord, str]] = []
        for r in self.read:
            if r.task is None or r.status not in wanted:
                continue
            if r.status == MISMATCH:
                left.append((r, "another version of the manifest wrote it"))
            elif r.queued:
                left.append((r, f"its job is still queued ({r.queued})"))
            elif max_attempts is not None and r.attempt >= max_attempts:
                left.append((r, f"already at {r.attempt} attempt(s)"))
            elif r.path is not None and os.path.islink(r.path):
                left.append((r, "its run directory is a symlink, which notata never follows"))
            elif r.orphan:
                left.append((r, r.reason or "a process of its command still runs"))
            elif r.run_dir is not None and _held(r.run_dir):
                left.append((r, "a live process holds its lock"))
            else:
                chosen.append(r.task)
        return chosen, left

    def as_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "runs": [r.as_json() for r in self.runs]}


def _held(run_dir: Path) -> bool:
    try:
        return lock_is_held(run_dir)
    except LockFileError:
        return True  # not a lock notata can take: never run beside whatever it is


def threshold(meta: Mapping[str, Any], stale_after: float | None) -> float:
    """Seconds without a heartbeat after which a run is stale (see the module docstring)."""
    if stale_after is not None:
        return stale_after
    interval = (meta.get("heartbeat") or {}).get("interval_sec") or 30.0
    return STALE_BEATS * float(interval) + MARGIN_SEC


def read_run(run_dir: str | os.PathLike[str], task: int | None = None, *,
             sweep: Sweep | None = None,
             queue: Queue | None = None, stale_after: float | None = None,
             now: float | None = None, symlink: bool | None = None) -> RunRecord:
    """The record of one run directory; never raises for what is on disk.

    One ``open`` (metadata.json); ``symlink`` comes from the caller's scandir when known.
    Metadata that parses but has fields of the wrong shape reads ``corrupt``, with why.
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
    try:
        return _classify(meta, task, run_id, run_dir, sweep, queue, stale_after,
                         time.time() if now is None else now)
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
    if names - {layout.LOCK, layout.LOCK + SOFT_SUFFIX}:
        return RunRecord(task, run_id, CORRUPT, 0, f"no {layout.METADATA}", run_dir)
    if held or now - made < MARGIN_SEC:
        return RunRecord(task, run_id, schema.RUNNING, 0, f"starting: no {layout.METADATA} "
                         "yet", run_dir)
    return RunRecord(task, run_id, STALE, 0, f"its start died before it wrote "
                     f"{layout.METADATA} (nothing ran)", run_dir)


_SHAPES: dict[str, type | tuple[type, ...]] = {
    "attempt": int, "heartbeat": dict, "slurm": dict, "pid": int, "host": str,
    "runtime_sec": (int, float), "start_unix": (int, float), "failure_reason": str,
}


def _classify(meta: dict[str, Any], task: int | None, run_id: str, run_dir: str,
              sweep: Sweep | None, queue: Queue | None, stale_after: float | None,
              now: float) -> RunRecord:
    status = meta.get("status")
    wrong = [k for k, kind in _SHAPES.items() if k in meta and meta[k] is not None
             and (not isinstance(meta[k], kind) or isinstance(meta[k], bool))]
    if wrong:
        raise TypeError(f"{', '.join(wrong)} of the wrong type")
    record = RunRecord(task, run_id, str(status), meta.get("attempt", 1), None, run_dir)
    record.runtime_sec = meta.get("runtime_sec")
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
        job = meta.get("slurm") or {}
        if isinstance(job.get("array_task_id"), int) and "array_job_id" in job \
                and meta.get("task_from", "array") == "array":
            record.array = (str(job["array_job_id"]), job["array_task_id"])
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
        return record
    hb = meta.get("heartbeat") or {}
    if isinstance(hb.get("beat"), int) and isinstance(hb.get("unix"), (int, float)):
        record.beat = (hb["beat"], float(hb["unix"]))
    record.limit = threshold(meta, stale_after)
    record.status, record.reason = _liveness(meta, record.queued, asked, stale_after, now)
    if record.status != STALE:
        return record
    if _held(Path(run_dir)):  # a live process holds its lock: alive, whatever else says
        record.status = schema.RUNNING
        record.reason = f"{record.reason}, but a live process holds its lock"
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


def _liveness(meta: Mapping[str, Any], queued: str | None, asked: bool,
              stale_after: float | None, now: float) -> tuple[str, str | None]:
    """``running`` or ``stale`` (with why) for a run recorded as open."""
    hb = meta.get("heartbeat") or {}
    beat = hb.get("unix") or meta.get("start_unix")
    age = now - float(beat) if isinstance(beat, (int, float)) else float("inf")
    limit = threshold(meta, stale_after)
    pid = meta.get("pid")
    if meta.get("host") == socket.gethostname() and isinstance(pid, int) \
            and not psutil.pid_exists(pid):  # certain, whatever the queue says of its job
        return STALE, f"its process (pid {pid} on this host) is gone"
    if queued in ALIVE_STATES:
        return schema.RUNNING, (f"no heartbeat for {age:.0f}s, but its job is "
                                f"{queued.lower()}" if age > limit else None)
    if asked and meta.get("slurm") and queued is None:
        # Never over a fresh heartbeat: a queue that does not list a job that is still
        # beating (another user's, another cluster's) is wrong, not the run.
        interval = float(hb.get("interval_sec") or 30.0)
        if age > FRESH_BEATS * interval:
            return STALE, "its SLURM job is gone"
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
    until = float(last) + float(hb.get("interval_sec") or 30.0) + 5
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


def _run_dirs(base: Path) -> dict[str, os.DirEntry[str]]:
    """``run_id -> entry`` for every ``log_*`` entry of ``base`` (one scandir)."""
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return {}
    return {e.name[len(layout.RUN_PREFIX):]: e for e in entries
            if e.name.startswith(layout.RUN_PREFIX) and (e.is_dir() or e.is_symlink())}


#: The queue state :func:`queued_tasks` gives a task that a live local submission holds.
LOCAL = "LOCAL"


def queued_tasks(sweep: Sweep, queue: Queue | None,
                 arrays: Mapping[str, int] | None = None) -> dict[int, str]:
    """Sweep index -> queue state, for every task of this sweep that is queued.

    A queued array task is mapped through its array's offset (the sweep index of array
    task 0): from the recorded submissions of this manifest file (of any version of it:
    a queued array runs the manifest as it is when it starts), found by job id or, for an
    array whose job id was never recorded, by the tag in its comment; else from
    ``arrays`` (array job id -> offset, learned from tasks that already ran in it, so
    that a user's own ``sbatch --array`` counts once one of its tasks has started).
    Submitit jobs are mapped only through the job ids their submission recorded
    (``map_array`` over chosen tasks has no offset). The tasks of a local submission whose
    process still runs (on this host, or in a SLURM job the queue lists as running) are
    :data:`LOCAL`. One pass over the queue.
    """
    out: dict[int, str] = {}
    offsets = dict(arrays or {})
    every = submissions.read(sweep.base_dir)
    records = [r for r in every
               if r.get("manifest_hash") == sweep.hash or r.get("manifest") == str(sweep.path)]
    running_jobs = {k for k, v in queue.jobs.items() if v == "RUNNING"} if queue else set()
    ended = {r.get("submission") for r in every if r.get("ended")}
    for record in submissions.live_local(records, socket.gethostname(), running_jobs, ended):
        for i in _expand(str(record.get("tasks", ""))):
            out[i] = LOCAL
    if queue is None:
        return out
    by_tag = {}
    for record in records:
        for array in record.get("arrays", []):
            if array.get("job_id") is not None:
                offsets[str(array["job_id"])] = int(array.get("offset", 0))
            if array.get("tag"):
                by_tag[str(array["tag"])] = int(array.get("offset", 0))
        if str(record.get("backend", "")).startswith("submitit"):
            tasks = _expand(record.get("tasks", ""))
            for job_id, i in zip(record.get("job_ids", []), tasks, strict=False):
                offsets.pop(str(job_id).partition("_")[0], None)
                if str(job_id) in queue.jobs:
                    out[i] = queue.jobs[str(job_id)]
    for job, tag in queue.tags.items():
        if tag in by_tag:
            offsets.setdefault(job, by_tag[tag])
    for key, state in queue.jobs.items():
        job, _, task = key.partition("_")
        if job in offsets and task.isdigit():
            out.setdefault(offsets[job] + int(task), state)
    return out


def _array_offsets(records: list[RunRecord], done: np.ndarray, queue: Queue) -> dict[str, int]:
    """Array job id -> sweep index of its array task 0, learned from the tasks that ran in
    it (by their array index, not a ``--task`` of their own), for the arrays the queue
    still holds; arrays no asked user's listing shows (a colleague's) are asked for by
    id. An array whose tasks disagree (sweep index is not array task + a constant) has
    no offset and is left out."""
    ran = done[done["array_task"] >= 0]
    seen = {str(j) for j in np.unique(ran["array_job"]).tolist()}
    seen |= {r.array[0] for r in records if r.array is not None and r.array[0].isdigit()}
    queue.include_jobs(sorted(seen, key=int)[-MAX_ASKED_ARRAYS:])
    keys = (k.partition("_") for k in queue.jobs)
    queued = [int(job) for job, _, task in keys if job.isdigit() and task.isdigit()]
    ran = ran[np.isin(ran["array_job"], queued)]
    pairs = set(zip(ran["array_job"].tolist(), (ran["task"] - ran["array_task"]).tolist(),
                    strict=True))
    pairs |= {(int(r.array[0]), r.task - r.array[1]) for r in records
              if r.array is not None and r.task is not None and r.array[0].isdigit()}
    offsets: dict[str, int] = {}
    mixed = set()
    for job, offset in pairs:
        if offsets.setdefault(str(job), offset) != offset:
            mixed.add(str(job))
    return {job: offset for job, offset in offsets.items() if job not in mixed}


def _mark_queued(records: list[RunRecord], by_task: Mapping[int, str]) -> None:
    """Note the queue's state on every task it holds. A task with no run directory
    becomes ``pending``; one with a run (failed, say, and submitted again) keeps its
    status and gets ``queued``, which ``to_resubmit`` respects.
    """
    for r in records:
        if r.task is not None and r.task in by_task and r.queued is None:
            r.queued = by_task[r.task]
            if r.status == MISSING:
                r.status = PENDING


def _expand(spec: str) -> Iterable[int]:
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        yield from range(int(lo), int(hi or lo) + 1)


def scan(target: Sweep | str | os.PathLike[str], *, stale_after: float | None = None,
         queue: Queue | None = None, full: bool = False) -> Report:
    """Scan a sweep or a bare base folder (every run in it).

    For a sweep, every task is classified. Tasks that its index (:mod:`notata.index`)
    records as complete are not opened unless ``full``; ``full`` (or a sweep without an
    index) reads every run's metadata.json and also reports runs in the base folder that
    no task names. ``queue`` is the scheduler's view, asked once by the caller; without
    it runs are classified from their files alone.
    """
    now = time.time()

    def read(path: str, task: int | None = None, sweep: Sweep | None = None,
             symlink: bool | None = None) -> RunRecord:
        return read_run(path, task, sweep=sweep, queue=queue, stale_after=stale_after,
                        now=now, symlink=symlink)

    if not isinstance(target, Sweep):
        dirs = _run_dirs(Path(target))
        return Report([read(dirs[rid].path, symlink=dirs[rid].is_symlink())
                       for rid in sorted(dirs)])
    sweep = target
    done = None if full else index.complete_tasks(sweep.base_dir, sweep.hash, len(sweep))
    if done is None or 2 * len(done) < len(sweep):  # then one scandir beats many lookups
        report = _scan_all(sweep, read)
        arrays = _array_offsets(report.read, _NO_INDEXED, queue) if queue is not None else None
        _mark_queued(report.read, queued_tasks(sweep, queue, arrays))
        return report
    todo = np.ones(len(sweep), dtype=bool)
    todo[done["task"]] = False
    records = []
    base = os.fspath(sweep.base_dir)
    for i in np.flatnonzero(todo).tolist():
        rid = sweep.run_id(i, check=False)
        path = os.path.join(base, layout.RUN_PREFIX + rid)
        record = read(path, i, sweep)
        if record.status == CORRUPT and not os.path.lexists(path):
            record = RunRecord(i, rid, MISSING, 0)
        records.append(record)
    arrays = _array_offsets(records, done, queue) if queue is not None else None
    _mark_queued(records, queued_tasks(sweep, queue, arrays))
    return Report(records, sweep, done)


def _scan_all(sweep: Sweep, read: Callable[..., RunRecord]) -> Report:
    """Every task from its files (one scandir, one open per run), plus unnamed runs."""
    dirs = _run_dirs(sweep.base_dir)
    records = []
    seen: dict[str, int] = {}
    for i in range(len(sweep)):
        rid = sweep.run_id(i, check=False)
        if rid in seen:  # the whole-sweep duplicate check, for free while scanning
            raise ManifestError(str(sweep.path), f"tasks {seen[rid]} and {i} have the same "
                                                 f"run id {rid!r}")
        seen[rid] = i
        entry = dirs.pop(rid, None)
        if entry is not None:
            records.append(read(entry.path, i, sweep, entry.is_symlink()))
        else:
            records.append(RunRecord(i, rid, MISSING, 0))
    records += [read(dirs[rid].path, symlink=dirs[rid].is_symlink()) for rid in sorted(dirs)]
    return Report(records, sweep)


class Watcher:
    """Repeated scans judged on the collector's own clock: a run whose beat counter has
    not moved for the threshold, by this process's clock, is stale whatever time it
    wrote (this catches a dead run whose node's clock runs ahead)."""

    def __init__(self, stale_after: float | None = None) -> None:
        self.stale_after = stale_after
        self._seen: dict[str, tuple[tuple[int, float], float]] = {}

    def scan(self, target: Sweep | str | os.PathLike[str], queue: Queue | None = None,
             full: bool = False) -> Report:
        report = scan(target, stale_after=self.stale_after, queue=queue, full=full)
        now = time.monotonic()
        for r in report.read:
            if r.beat is None or r.limit is None or r.status != schema.RUNNING \
                    or r.queued == "RUNNING":
                continue
            limit = r.limit
            seen = self._seen.get(r.run_id)
            if seen is None or seen[0] != r.beat:
                self._seen[r.run_id] = (r.beat, now)
            elif now - seen[1] > limit and not (r.run_dir is not None and _held(r.run_dir)):
                r.status = STALE
                r.reason = f"heartbeat unchanged for {now - seen[1]:.0f}s of this collector's clock"
        return report


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")


def parse_duration(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` or plain seconds, as seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 10m, 2h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
