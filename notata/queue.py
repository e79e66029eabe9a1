"""The scheduler's queue as a scan sees it, and which of a sweep's tasks it holds.

A queued task has no run directory yet, so its sweep index comes from how it was
submitted: the offset of the array it is in (recorded by ``notata submit``, found by job
id or by the tag in the array's comment, or learned from the array's tasks that already
ran), a submitit job id, or a local submission whose process still runs. The queue is
asked once per user per scan (:class:`Queue`); the scheduler's keys and states are read
through :mod:`notata.scheduler`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np

from . import scheduler, submissions, taskspec
from .manifest import Sweep

#: At most this many arrays that runs ran in are asked for by id in one scan (the newest).
MAX_ASKED_ARRAYS = 1000


Row = tuple[str, str, str]  # (job key "123" or "123_4", state, comment)

class Queue:
    """What the scheduler has queued: job key (``"123"`` or ``"123_4"``) -> state, and
    array job id -> the tag notata put in its comment (``notata:<submission>-<k>``).

    The queue is asked per user (a group-shared sweep holds several users' jobs):
    ``fetch(users, jobs)`` is called once for the users given at construction, once more
    for each user that a run's metadata names later in the scan, and once for the arrays
    that runs ran in and that no user asked about lists (a colleague's own array). A user
    whose jobs could not be listed is remembered; "its job is gone" is never concluded
    for them. ``provider`` reads the keys and states (default: the registered scheduler).
    """

    def __init__(self, jobs: Mapping[str, str] | None = None,
                 fetch: Callable[[list[str], list[str]], list[Row]] | None = None,
                 users: Iterable[str] = (),
                 provider: scheduler.SchedulerProvider | None = None,
                 nodes: Callable[[], Mapping[str, str]] | Mapping[str, str] | None = None
                 ) -> None:
        provider = provider or scheduler.default()
        if provider is None:
            raise RuntimeError("no scheduler is registered (notata/__init__.py registers SLURM)")
        self.provider = provider
        self.jobs: dict[str, str] = dict(jobs or {})
        self.tags: dict[str, str] = {}
        self._fetch = fetch
        self.users: set[str] = set()
        self.unknown: set[str] = set()  # users whose jobs could not be listed
        self._asked_jobs: set[str] = set()
        self._nodes = nodes
        self._node_states: Mapping[str, str] | None = None
        #: When the queue was listed (first asked): a run that beat after that is newer
        #: than what the listing says of its job.
        self.listed_at = time.time()
        self.include(users)

    def _add(self, rows: list[Row]) -> None:
        for key, state, comment in rows:
            self.jobs[key] = state
            if comment.startswith(submissions.TAG_PREFIX):  # the user's comment may follow
                tag = comment[len(submissions.TAG_PREFIX):].split(" ", 1)[0]
                self.tags[self.provider.split_key(key)[0]] = tag

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
        listed = {self.provider.split_key(k)[0] for k in self.jobs}
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

    def key(self, meta: Mapping[str, Any]) -> str | None:
        """The key of the job a run's metadata names (``"123_4"`` for an array task)."""
        ctx = meta.get(self.provider.name)
        return self.provider.job_key(ctx) if isinstance(ctx, Mapping) else None

    def state(self, meta: Mapping[str, Any]) -> str | None:
        """The state of the job a run's metadata names, if queued."""
        key = self.key(meta)
        return self.jobs.get(key) if key is not None else None

    def node_trouble(self, meta: Mapping[str, Any]) -> str | None:
        """``"node n2 is down"`` when the scheduler says a node a run's job ran on is
        down or not responding, else None. The nodes are asked once per queue, when first
        needed: only for a run recorded as open whose job is queued again, gone, or whose
        heartbeat is late."""
        ctx = meta.get(self.provider.name)
        names = self.provider.nodes_of(ctx) if isinstance(ctx, Mapping) else []
        if not names or self._nodes is None:
            return None
        if self._node_states is None:
            try:
                self._node_states = dict(self._nodes() if callable(self._nodes)
                                         else self._nodes)
            except Exception:  # a scheduler that cannot answer says nothing of its nodes
                self._node_states = {}
        return scheduler.trouble_among(self.provider, names, self._node_states)

    def running(self) -> set[str]:
        """The keys of the jobs running now."""
        return {k for k, state in self.jobs.items() if self.provider.is_running(state)}

    def is_running(self, state: str | None) -> bool:
        """Whether a job in ``state`` runs now."""
        return state is not None and self.provider.is_running(state)

#: The queue state :func:`queued_tasks` gives a task that a live local submission holds.
LOCAL = "LOCAL"

def _of(sweep: Sweep, every: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The submission records of this sweep: of its manifest file (any version of it),
    or of this version (its hash) wherever its file was."""
    return [r for r in every
            if r.get("manifest_hash") == sweep.hash or r.get("manifest") == str(sweep.path)]


def local_holds(sweep: Sweep, queue: Queue | None,
                every: list[dict[str, Any]] | None = None) -> dict[int, str]:
    """Sweep index -> who holds it, in words (:func:`notata.submissions.holder`), for every
    task of a local submission of this manifest file whose process still runs: on this
    host (its pid alive and not a zombie, with the start time recorded, so a reused pid
    does not count), or in a SLURM job the queue lists as running. ``every``: the
    sweep's submission records (:func:`notata.submissions.read`), read here if not given.
    """
    every = submissions.read(sweep.base_dir) if every is None else every
    records = _of(sweep, every)
    here = socket.gethostname()
    ended = {r.get("submission") for r in every if r.get("ended")}
    out: dict[int, str] = {}
    for record in submissions.live_local(records, here, queue.running() if queue else (),
                                         ended):
        why = submissions.holder(record, here)
        for i in taskspec.expand(str(record.get("tasks", ""))):
            out[i] = why
    return out


def queued_tasks(sweep: Sweep, queue: Queue | None,
                 arrays: Mapping[str, int] | None = None,
                 passed: Mapping[int, Collection[str]] | None = None,
                 local: Mapping[int, str] | None = None,
                 every: list[dict[str, Any]] | None = None) -> dict[int, str]:
    """Sweep index -> queue state, for every task of this sweep that is queued.

    A queued array task is mapped through its array's offset (the sweep index of array
    task 0), or its task list for an array that lists its tasks: from the recorded
    submissions of this manifest file (of any version of it:
    a queued array runs the manifest as it is when it starts), found by job id or, for an
    array whose job id was never recorded, by the tag in its comment; else from
    ``arrays`` (array job id -> offset, learned from tasks that already ran in it, so
    that a user's own ``sbatch --array`` counts once one of its tasks has started).
    Submitit jobs are mapped only through the job ids their submission recorded
    (``map_array`` over chosen tasks has no offset). The tasks of a local submission whose
    process still runs (on this host, or in a SLURM job the queue lists as running) are
    :data:`LOCAL` (``local``: :func:`local_holds`'s answer, asked here when not given;
    ``every``: the sweep's submission records, read here when not given).
    An array task that runs a pack holds each of its tasks until it has
    run it: ``passed`` (sweep index -> the job keys of the packs that let it go) names
    those that no longer hold it. One pass over the queue.
    """
    offsets = dict(arrays or {})
    every = submissions.read(sweep.base_dir) if every is None else every
    out = dict.fromkeys(local_holds(sweep, queue, every) if local is None else local, LOCAL)
    if queue is None:
        return out
    records = _of(sweep, every)
    located: dict[str, Callable[[int], list[int]]] = {}  # array job -> its tasks' indices
    by_tag = {}
    for record in records:
        for array in record.get("arrays", []):
            if array.get("job_id") is not None:
                located[str(array["job_id"])] = submissions.array_index(array)
            if array.get("tag"):
                by_tag[str(array["tag"])] = submissions.array_index(array)
        if str(record.get("backend", "")).startswith("submitit"):
            # a job per task, or (packed) a job per list of tasks: ``job_tasks``
            packs = record.get("job_tasks")
            groups = ([taskspec.expand(p) if isinstance(p, str) and taskspec.is_spec(p) else []
                       for p in packs] if isinstance(packs, list)
                      else [[i] for i in taskspec.expand(record.get("tasks", ""))])
            for job_id, group in zip(record.get("job_ids", []), groups, strict=False):
                offsets.pop(queue.provider.split_key(str(job_id))[0], None)
                located.pop(queue.provider.split_key(str(job_id))[0], None)
                if str(job_id) in queue.jobs:
                    for i in group:
                        if str(job_id) not in (passed or {}).get(i, ()):
                            out[i] = queue.jobs[str(job_id)]
    for job, tag in queue.tags.items():
        if tag in by_tag:
            located.setdefault(job, by_tag[tag])
    for job, offset in offsets.items():  # learned from runs: only where nothing recorded
        located.setdefault(job, submissions.array_index({"offset": offset}))
    passed = passed or {}
    for key, state in queue.jobs.items():
        job, task = queue.provider.split_key(key)
        if job in located and task is not None:
            for index in located[job](task):
                if key not in passed.get(index, ()):
                    out.setdefault(index, state)
    return out

def array_offsets(done: np.ndarray, ran: Iterable[tuple[str, int, int]],
                  queue: Queue) -> dict[str, int]:
    """Array job id -> sweep index of its array task 0, learned from the tasks that ran in
    it by their array index (not a ``--task`` of their own): ``done``, the sweep index's
    complete records, and ``ran``, (array job id, array task id, sweep index) of the runs
    a scan read. Only for the arrays the queue still holds; arrays no asked user's listing
    shows (a colleague's) are asked for by id. An array whose tasks disagree (sweep index
    is not array task + a constant) has no offset and is left out."""
    ran = [(job, task, i) for job, task, i in ran if job.isdigit()]
    done = done[done["array_task"] >= 0]
    seen = {str(j) for j in np.unique(done["array_job"]).tolist()} | {job for job, _, _ in ran}
    queue.include_jobs(sorted(seen, key=int)[-MAX_ASKED_ARRAYS:])
    keys = (queue.provider.split_key(k) for k in queue.jobs)
    queued = [int(job) for job, task in keys if job.isdigit() and task is not None]
    done = done[np.isin(done["array_job"], queued)]
    pairs = set(zip(done["array_job"].tolist(), (done["task"] - done["array_task"]).tolist(),
                    strict=True))
    pairs |= {(int(job), i - task) for job, task, i in ran}
    offsets: dict[str, int] = {}
    mixed = set()
    for job, offset in pairs:
        if offsets.setdefault(str(job), offset) != offset:
            mixed.add(str(job))
    return {job: offset for job, offset in offsets.items() if job not in mixed}
