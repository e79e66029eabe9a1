"""Run statuses and the metadata.json schema: the one place both are defined.

metadata.json (schema 1) is a JSON object. Keys kept from notata 0.3, so old
readers and ``jq`` one-liners keep working:

- ``run_id``, ``status`` (one of :data:`STATUSES`), ``start_time``, ``end_time``
  (local ISO-8601, seconds), ``runtime_sec``, ``failure_reason`` (failed and
  signal states only).

Added by this notata:

- ``schema``: 1.
- ``attempt``: 1 for the first attempt, N+1 after each resume.
- ``attempts``: the earlier attempts, oldest first, each ``{attempt, status,
  start_time, end_time, runtime_sec, failure_reason, host, pid, slurm, resources, pack,
  signals}`` (those it had).
- ``start_unix`` / ``end_unix``: the same instants as seconds since the epoch.
- ``host``, ``pid``, ``user``, ``cwd``, ``argv``, ``python``, ``notata``.
- ``slurm``: present inside SLURM: ``job_id``, ``array_job_id``, ``array_task_id``,
  ``restart_count``, ``nodelist``, ``partition``, ``time_limit`` (the job's
  limit as SLURM prints it), ``end_unix`` (when known). A run's identity in an
  array is ``array_job_id`` + ``array_task_id``, never ``job_id``.
- ``heartbeat``: ``{unix, time, beat, interval_sec, rss_bytes, peak_rss_bytes,
  cpu_time_sec, cpu_percent, pids}``. ``beat`` counts up by one per write, so a
  reader can tell a live run from a dead one by content, not by file mtimes.
- ``signals``: the signals the run received, ``[{signal, unix, time}]``.
- ``resources``: what the attempt asked the scheduler for and what it used
  (:mod:`notata.resources`): ``{asked: {time_limit, mem_bytes, cpus, gpus}, used:
  {runtime_sec, peak_rss_bytes, cpu_time_sec}}``, ``asked`` only under a scheduler.
- ``provenance``: the code the attempt ran (:mod:`notata.provenance`): ``{state, commit,
  dirty, diff, env, repo}`` (ids and hashes; ``commit`` None outside git, with ``why``).
- Added by sweeps (``notata.task`` / ``notata exec``): ``task`` (the index), ``sweep``
  (its name), ``manifest`` (absolute path), ``manifest_hash``, ``tasks`` (the sweep's
  size), ``task_from`` (``array``: the index is the job array's own, task id + offset;
  ``pack``: the task ran in a pack, ``pack: {position, size}`` saying where; ``given``:
  passed in, so it says nothing of the array); by ``notata exec``:
  ``command`` (the argv run), ``command_pid`` (its process, the leader of its group) and
  ``exit_code``.
- In ``attempts``, an attempt that a newer open of the run in the same process took over
  has the status ``superseded``; one still open on another host whose node failed (the
  scheduler says the node is down or not responding, or requeued the job from under it)
  has ``node_fail``, written by the attempt that took over.

Any other key a user sets with ``meta(**fields)`` is kept as is; notata's own keys
(:data:`RESERVED`) are refused there.
"""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 1

INITIALIZED: Final = "initialized"
RUNNING: Final = "running"
COMPLETE: Final = "complete"
FAILED: Final = "failed"
TIMEOUT: Final = "timeout"
CANCELLED: Final = "cancelled"
PREEMPTED: Final = "preempted"
TERMINATED: Final = "terminated"
#: Killed for memory (:mod:`notata.resources`); after every other status: the sweep index
#: stores a status by its position.
OOM: Final = "oom"

#: Every status a run can record, in lifecycle order.
STATUSES: Final = (
    INITIALIZED, RUNNING, COMPLETE, FAILED, TIMEOUT, CANCELLED, PREEMPTED, TERMINATED, OOM,
)
#: Statuses a run is still in while its process is alive.
OPEN_STATUSES: Final = frozenset({INITIALIZED, RUNNING})
#: Statuses written once, flushed to disk, and never left except by a new attempt.
TERMINAL_STATUSES: Final = frozenset(STATUSES) - OPEN_STATUSES
#: Terminal statuses that a signal (scheduler or user) caused.
SIGNAL_STATUSES: Final = frozenset({TIMEOUT, CANCELLED, PREEMPTED, TERMINATED})

#: Metadata fields notata itself keeps: ``Logbook.meta()`` refuses to set them.
RESERVED: Final = frozenset({
    "schema", "run_id", "status", "attempt", "attempts", "start_time", "start_unix",
    "end_time", "end_unix", "runtime_sec", "failure_reason", "heartbeat", "signals", "host",
    "pid", "user", "task", "sweep", "manifest", "manifest_hash", "tasks", "command",
    "command_pid", "exit_code", "task_from", "resources", "pack",
    "provenance",
})
