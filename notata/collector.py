"""The collector: what state every task of a sweep, or every run under a folder, is in.

Nothing is written. A full scan makes one ``scandir`` of the base folder and one
``open`` per run directory (its metadata.json). A sweep's scan first reads the sweep
index (:mod:`notata.index`, one file) and opens only the runs it does not record as
complete, when those are at least half the tasks (else the full scan is the quicker).
A run directory whose metadata cannot be read is ``corrupt`` (with the reason) and
never stops the scan.

One run's classification is :mod:`notata.runstate`'s; which tasks the queue holds,
:mod:`notata.queue`'s.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import index, layout, schema, submissions
from .errors import ManifestError
from .manifest import Sweep
from .queue import LOCAL, Queue, array_offsets, local_holds, queued_tasks
from .runstate import (
    CORRUPT,
    DEFAULT_RESUBMIT,
    MISMATCH,
    MISSING,
    PENDING,
    SCAN_STATUSES,
    STALE,
    RunRecord,
    held,
    read_run,
)

_NO_INDEXED = np.empty(0, dtype=index.DONE)


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
        """Whether no task is still running, pending, or queued to run again (a failed
        task that a job or a live local submission holds: it will run)."""
        return not any(r.status in (schema.RUNNING, schema.INITIALIZED, PENDING)
                       or (r.queued is not None and r.status != schema.COMPLETE)
                       for r in self.read)

    def to_resubmit(self, statuses: Iterable[str] = DEFAULT_RESUBMIT,
                    max_attempts: int | None = None,
                    ) -> tuple[list[int], list[tuple[RunRecord, str]]]:
        """The task indices to submit again, and the selected runs left alone with why.

        Never a complete run, a task the queue (or a live local submission) still
        holds, a run another version of the manifest wrote, a run already at
        ``max_attempts`` attempts, or a run whose lock a live process holds (unless from a
        node the scheduler says is down: the next attempt breaks that lock by the rule for
        another host's holder); nothing from a scan of a folder of runs (no manifest to
        submit them with).
        """
        wanted = set(statuses) - {schema.COMPLETE}
        chosen: list[int] = []
        left: list[tuple[RunRecord, str]] = []
        for r in self.read:
            if r.task is None or self.sweep is None or r.status not in wanted:
                continue
            if r.status == MISMATCH:
                left.append((r, "another version of the manifest wrote it"))
            elif r.queued_by:
                left.append((r, f"it is still {r.queued_by}"))
            elif r.queued:
                left.append((r, f"its job is still queued ({r.queued})"))
            elif max_attempts is not None and r.attempt >= max_attempts:
                left.append((r, f"already at {r.attempt} attempt(s)"))
            elif r.path is not None and os.path.islink(r.path):
                left.append((r, "its run directory is a symlink, which notata never follows"))
            elif r.orphan:
                left.append((r, r.reason or "a process of its command still runs"))
            elif r.run_dir is not None and not r.cut_off and held(r.run_dir):
                left.append((r, "a live process holds its lock"))
            else:
                chosen.append(r.task)
        return chosen, left

    def as_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "runs": [r.as_json() for r in self.runs]}

def _run_dirs(base: Path) -> dict[str, os.DirEntry[str]]:
    """``run_id -> entry`` for every ``log_*`` entry of ``base`` (one scandir)."""
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return {}
    return {e.name[len(layout.RUN_PREFIX):]: e for e in entries
            if e.name.startswith(layout.RUN_PREFIX) and (e.is_dir() or e.is_symlink())}

def _mark_queued(records: list[RunRecord], sweep: Sweep, queue: Queue | None,
                 arrays: Mapping[str, int] | None) -> None:
    """Note the queue's state on every task it holds (a live local submission's tasks
    too). A task with no run directory becomes ``pending``; one with a run (failed, say,
    and submitted again) keeps its status and gets ``queued``, which ``to_resubmit``
    respects. A local submission's tasks also get who holds them (``queued_by``: its pid
    and host), which a pending one gives as its reason.
    """
    every = submissions.read(sweep.base_dir)  # once per scan
    local = local_holds(sweep, queue, every)
    by_task = queued_tasks(sweep, queue, arrays, _passed(records), local, every)
    for r in records:
        if r.task is not None and r.task in by_task and r.queued is None:
            r.queued = by_task[r.task]
            if r.queued == LOCAL:
                r.queued_by = local.get(r.task)
            if r.status == MISSING:
                r.status = PENDING
                r.reason = r.reason or r.queued_by

def scan(target: Sweep | str | os.PathLike[str], *, stale_after: float | None = None,
         queue: Queue | None = None, full: bool = False,
         keep: Callable[[Mapping[str, Any]], Any] | None = None) -> Report:
    """Scan a sweep or a bare base folder (every run in it).

    For a sweep, every task is classified. Tasks that its index (:mod:`notata.index`)
    records as complete are not opened unless ``full``; ``full`` (or a sweep without an
    index) reads every run's metadata.json and also reports runs in the base folder that
    no task names. ``queue`` is the scheduler's view, asked once by the caller; without
    it runs are classified from their files alone. ``keep`` takes more of each metadata
    file read into the records (:func:`notata.runstate.read_run`).
    """
    now = time.time()

    def read(path: str, task: int | None = None, sweep: Sweep | None = None,
             symlink: bool | None = None) -> RunRecord:
        return read_run(path, task, sweep=sweep, queue=queue, stale_after=stale_after,
                        now=now, symlink=symlink, keep=keep)

    if not isinstance(target, Sweep):  # no manifest names the runs: each says its task
        dirs = _run_dirs(Path(target))
        return Report([read_run(dirs[rid].path, queue=queue, stale_after=stale_after, now=now,
                                symlink=dirs[rid].is_symlink(), own_task=True, keep=keep)
                       for rid in sorted(dirs)])
    sweep = target
    done = None if full else index.complete_tasks(sweep.base_dir, sweep.hash, len(sweep))
    if done is None or 2 * len(done) < len(sweep):  # then one scandir beats many lookups
        report = _scan_all(sweep, read)
        arrays = array_offsets(_NO_INDEXED, _ran(report.read), queue) if queue is not None \
            else None
        _mark_queued(report.read, sweep, queue, arrays)
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
    arrays = array_offsets(done, _ran(records), queue) if queue is not None else None
    _mark_queued(records, sweep, queue, arrays)
    return Report(records, sweep, done)

def _ran(records: Iterable[RunRecord]) -> list[tuple[str, int, int]]:
    """(array job id, array task id, sweep index) of the runs read that ran as array tasks
    (one task each: not in a pack)."""
    return [(r.array[0], r.array[1], r.task) for r in records
            if r.array is not None and r.task is not None and not r.packed]


def _passed(records: Iterable[RunRecord]) -> dict[int, frozenset[str]]:
    """Sweep index -> the job keys of the packs that ran it and went on."""
    return {r.task: r.passed for r in records if r.passed and r.task is not None}


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
             full: bool = False, keep: Callable[[Mapping[str, Any]], Any] | None = None
             ) -> Report:
        report = scan(target, stale_after=self.stale_after, queue=queue, full=full, keep=keep)
        now = time.monotonic()
        for r in report.read:
            if r.beat is None or r.limit is None or r.status != schema.RUNNING \
                    or (queue is not None and queue.is_running(r.queued)):
                continue
            limit = r.limit
            seen = self._seen.get(r.run_id)
            if seen is None or seen[0] != r.beat:
                self._seen[r.run_id] = (r.beat, now)
            elif now - seen[1] > limit and not (r.run_dir is not None and held(r.run_dir)):
                r.status = STALE
                r.reason = f"heartbeat unchanged for {now - seen[1]:.0f}s of this collector's clock"
        return report
