"""A run's next attempt: what carries over from the last one, and its first record.

A run opened with ``resume=True`` keeps its outputs and its history: the last attempt's
fields move into ``attempts`` (:data:`_ATTEMPT_FIELDS`), the fields of one attempt only
are dropped (:data:`_VOLATILE`, and the scheduler's), and everything else (the user's
``meta()`` fields, the sweep task) carries over. ``overwrite=True`` starts afresh.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import _fs, index, layout, runinfo, scheduler, schema
from .errors import RunCompleteError

# Fields of one attempt that move into ``attempts`` when the next attempt starts.
_ATTEMPT_FIELDS = ("attempt", "status", "start_time", "end_time", "start_unix", "end_unix",
                   "runtime_sec", "failure_reason", "host", "pid", "exit_code", "resources",
                   "pack", "signals")
# Fields that describe one attempt only: the next attempt starts without them.
_VOLATILE = frozenset({"end_time", "end_unix", "runtime_sec", "failure_reason", "signals",
                       "heartbeat", "command", "exit_code", "resources", "pack"})
#: The status an attempt's history entry gets when a newer open in the same process took over.
SUPERSEDED = "superseded"
#: The status an attempt's history entry gets when it was still open on another host whose
#: node failed (:func:`close_lost`): nothing of it ran a handler.
NODE_FAIL = "node_fail"


def close_lost(meta: dict[str, Any]) -> None:
    """At the start of an attempt under a scheduler: the last attempt, if it is still open
    in the history (its process never ended it), is closed as :data:`NODE_FAIL` when the
    scheduler says the node it ran on (another host) is down or not responding, or when
    this is the same job requeued by the scheduler (on any node, its own included once it
    is back: a job requeued from under a live attempt gets SIGTERM, and a SIGTERM is
    recorded, so an attempt left open died with its node, or at least its slurmd), or
    when it ran in another job that the scheduler says ended for a node failure (a task
    resubmitted without requeue, maybe onto its node once back). An attempt that ended
    without a word otherwise (a SIGKILL on this host) stays as it was recorded. Asks the
    scheduler (slow: not for the first write)."""
    history = meta.get("attempts") or []
    last = history[-1] if history and isinstance(history[-1], dict) else None
    if last is None or last.get("status") not in schema.OPEN_STATUSES:
        return
    lost = scheduler.node_lost(last) if last.get("host") != meta.get("host") else None
    if lost is None and _requeued(meta, last):
        lost = f"its job was requeued while it ran on {last.get('host')}"
    if lost is None and _other_job(meta, last):  # resubmitted, maybe onto the node revived
        lost = scheduler.ended_with_node(last)
    if lost is not None:
        last["status"] = NODE_FAIL
        last["failure_reason"] = f"{lost}: the attempt ended with its node, no handler ran"


def _other_job(meta: Mapping[str, Any], last: Mapping[str, Any]) -> bool:
    """Whether the last attempt ran in another job of the same scheduler than this one."""
    mine, theirs = scheduler.job_of(meta), scheduler.job_of(last)
    return mine is not None and theirs is not None and mine[0] is theirs[0] \
        and mine[0].job_key(mine[1]) != mine[0].job_key(theirs[1])


def _requeued(meta: Mapping[str, Any], last: Mapping[str, Any]) -> bool:
    """Whether this attempt's job is the last one's, requeued since (its restart count
    rose)."""
    mine, theirs = scheduler.job_of(meta), scheduler.job_of(last)
    if mine is None or theirs is None or mine[0] is not theirs[0] \
            or mine[0].job_key(mine[1]) != mine[0].job_key(theirs[1]):
        return False
    return mine[0].restarts(mine[1]) > mine[0].restarts(theirs[1])


def take_over(path: Path, run_id: str, overwrite: bool,
              read_disk: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Under the lock: clear the run (overwrite) or read the attempt being resumed."""
    if overwrite:
        with contextlib.suppress(FileNotFoundError, ValueError):
            index.forget(path.parent, read_disk())
        # First say, durably, that this run starts afresh: a kill while the old files
        # go leaves a run that reads stale (its process gone), never the old "complete"
        # over half its outputs, nor a folder without metadata.json.
        now = time.time()
        _fs.atomic_write_json(path / layout.METADATA, {
            "schema": schema.SCHEMA_VERSION, "run_id": run_id,
            "status": schema.INITIALIZED, "attempt": 1, "start_unix": round(now, 3),
            "start_time": runinfo.now_iso(now), **runinfo.process_fields(),
            "failure_reason": "overwrite: the earlier run's files are being removed"},
            durable=True)
        for entry in path.iterdir():
            if entry.name in (layout.LOCK, layout.METADATA):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return {}
    try:
        previous = read_disk()
    except FileNotFoundError:
        previous = {}
    if previous.get("status") == schema.COMPLETE:
        raise RunCompleteError(str(path))
    _fs.clean_temporaries(path)
    return previous


def first_record(run_id: str, previous: Mapping[str, Any], superseded: str | None,
                 interval: float, start: float) -> dict[str, Any]:
    """The metadata an attempt starts with (``initialized``), from the last attempt's."""
    return {
        **{k: v for k, v in previous.items()
           if k not in _VOLATILE and k not in scheduler.names()},
        "schema": schema.SCHEMA_VERSION,
        "run_id": run_id,
        "status": schema.INITIALIZED,
        "start_time": runinfo.now_iso(start),
        "start_unix": round(start, 3),
        "attempt": int(previous.get("attempt", 0)) + 1,
        "attempts": _history(previous, superseded),
        **runinfo.process_fields(),
        "heartbeat": {"unix": round(start, 3), "time": runinfo.now_iso(start), "beat": 0,
                      "interval_sec": interval},
    }


def _history(previous: Mapping[str, Any], superseded: str | None) -> list[dict[str, Any]]:
    """The attempts list of a run about to start its next attempt."""
    history = list(previous.get("attempts", []))
    if previous:
        record = {k: previous[k] for k in _ATTEMPT_FIELDS if k in previous}
        record.setdefault("attempt", len(history) + 1)
        record.update({k: previous[k] for k in scheduler.names() if k in previous})
        if superseded is not None and previous.get("status") in schema.OPEN_STATUSES:
            record["status"] = SUPERSEDED
            record["failure_reason"] = "superseded by a newer open of the run in the same process"
        history.append(record)
    return history
