"""The append-only record of a sweep's submissions: ``<base_dir>/.notata/submissions.jsonl``.

One JSON object a line, appended under the sweep's lock (:func:`sweep_lock`), each with
one ``write`` and fsynced, so concurrent submitters never interleave; a reader skips a
line a crash cut short.

Schema 2 (written now): one line per array, written the moment its ``sbatch``
succeeded, so a submission that fails halfway still records what it submitted. The
lines of one submission share ``submission`` (an id) and carry ``part`` and ``parts``.
Fields: ``schema``, ``submission``, ``part``, ``parts``, ``time``, ``unix``, ``user``,
``host``, ``backend`` (``slurm``, ``local``, ``submitit:<executor>``), ``manifest``,
``manifest_hash``, ``sweep``, ``tasks`` (compact spec), ``count``, ``command``,
``options`` (the scheduler options given on top of the manifest: ``time``, ``mem``...,
``sbatch_line``, ``throttle``, ``warn_before``, ``jobs``), ``job_ids``, ``arrays``
(``job_id``, ``spec``, ``offset``, ``script``, ``tasks``, ``tag``, and ``map``, the
tasks in array task order, for an array that lists them); a submitit one,
``function``. Before each ``sbatch`` an ``intent`` line (``arrays`` with the ``tag`` the
array's comment carries) says what may be queued if the answer never comes; all lines
are built by :func:`entry`. A local submission also
records ``pid`` and ``pid_start`` (its tasks count as queued while that process runs),
and a line ``{"submission", "ended": true}`` when it ends. Schema 1 lines (one per
submission, all arrays in one line, no ``submission``/``options``) are still read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from . import layout, lock, runinfo, scheduler, taskspec
from .manifest import Sweep
from .taskspec import compact

logger = logging.getLogger("notata")

SCHEMA = 2
#: The start of the comment notata gives the arrays it submits (``notata:<tag>``, the tag
#: being ``<submission>-<k>``): a collector finds an array by it in the queue even when
#: its job id was never recorded.
TAG_PREFIX = "notata:"


def path(base_dir: Path) -> Path:
    return layout.SweepPaths(base_dir).submissions


def sweep_lock(base_dir: Path) -> lock.Exclusive:
    """The sweep's lock (``.notata/resubmit.lock``): a resubmit holds it from its scan to
    its record, a submit while it submits and records, so no task is taken twice."""
    return lock.exclusive(layout.SweepPaths(base_dir).resubmit_lock)


def new_id() -> str:
    """A submission id: the time and 6 random hex digits, sortable and unique."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def entry(sweep: Sweep, backend: str, submission: str, tasks: Sequence[int],
          **fields: Any) -> dict[str, Any]:
    """The record of one submission (or one part of it) of ``tasks`` of ``sweep``: the one
    shape every backend appends (``fields``: job ids, command, options, arrays...)."""
    return {"backend": backend, "submission": submission, "manifest": str(sweep.path),
            "manifest_hash": sweep.hash, "sweep": sweep.name, "tasks": compact(tasks),
            "count": len(tasks), **fields}


def append(base_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Add ``entry`` (with schema, time, user and host filled in) and return it."""
    now = time.time()
    fields = runinfo.process_fields()
    record = {"schema": SCHEMA, "time": runinfo.now_iso(now), "unix": round(now, 3),
              "user": fields["user"], "host": fields["host"], **entry}
    target = path(base_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode()
    with lock.exclusive(target.with_name(target.name + ".lock")):
        fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a line a crash cut short stays alone on its line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return record


#: The record files (and their sizes) already warned about in this process: ``status``
#: reads the record from several places, and says a skipped line once.
_WARNED: set[tuple[str, int]] = set()


def read(base_dir: Path) -> list[dict[str, Any]]:
    """Every readable record, oldest first. A line that is not JSON, or whose fields have
    the wrong shape (a hand edit, another tool's line), is skipped, with one warning (per
    process, until the file grows)."""
    try:
        text = path(base_dir).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    bad = 0
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            bad += bool(line.strip())
            continue
        if isinstance(obj, dict) and _well_formed(obj):
            out.append(obj)
        else:
            bad += 1
    seen = (str(path(base_dir)), len(text))
    if bad and seen not in _WARNED:
        _WARNED.add(seen)
        logger.warning("notata: %s: %d line(s) skipped (not a submission record notata can "
                       "read)", path(base_dir), bad)
    return out


def submitted(base_dir: Path) -> list[dict[str, Any]]:
    """The records of what was submitted (one per array, or per local run), oldest first:
    not the intent lines written before each sbatch, the end lines of local runs, nor the
    lines of packs that left tasks unstarted."""
    return [r for r in read(base_dir) if r.get("backend") and not r.get("intent")]


def _well_formed(r: dict[str, Any]) -> bool:
    """The fields readers use have the shapes notata writes."""
    def kind(key: str, types: type | tuple[type, ...]) -> bool:
        return key not in r or r[key] is None or isinstance(r[key], types)

    if not all(kind(k, t) for k, t in (("tasks", str), ("backend", str), ("command", list),
                                       ("options", dict), ("job_ids", list), ("arrays", list),
                                       ("user", str), ("host", str), ("manifest", str),
                                       ("manifest_hash", str), ("left", str))):
        return False
    if not all(isinstance(c, str) for c in r.get("command") or []):
        return False
    if r.get("tasks") and not taskspec.is_spec(r["tasks"]):
        return False
    for a in r.get("arrays") or []:
        if not (isinstance(a, dict) and isinstance(a.get("offset", 0), int)
                and isinstance(a.get("map", ""), str)
                and isinstance(a.get("job_id"), (str, int, type(None)))):
            return False
    return True




def this_process() -> dict[str, Any]:
    """``pid`` and ``pid_start`` of this process, and the scheduler job it runs in, for a
    local submission's record."""
    fields: dict[str, Any] = {"pid": os.getpid(), "pid_start": psutil.Process().create_time()}
    sched = scheduler.current(os.environ)
    key = sched[0].job_key(sched[1]) if sched is not None else None
    if key is not None:
        fields["job_id"] = key
    return fields


def live_local(records: list[dict[str, Any]], host: str, running_jobs: Iterable[str] = (),
               ended: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """The local submissions whose process still runs them (not ended: no end line in
    ``records`` or among the ``ended`` submission ids): on ``host``, by its pid and start
    time; on another host, when it ran inside a SLURM job (``job_id``) that the queue
    lists as running (``running_jobs``), as a pool inside an allocation, seen from the
    login node."""
    ended = {*ended, *(r.get("submission") for r in records if r.get("ended"))}
    jobs = set(running_jobs)
    out = []
    for r in records:
        if r.get("backend") != "local" or r.get("submission") in ended:
            continue
        if r.get("host") != host:
            if r.get("job_id") is not None and str(r["job_id"]) in jobs:
                out.append(r)
            continue
        pid, start = r.get("pid"), r.get("pid_start")
        if not isinstance(pid, int) or not isinstance(start, (int, float)):
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)  # a zombie is a submitter that died unreaped
            if abs(proc.create_time() - start) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(r)
    return out


def holder(record: dict[str, Any], here: str) -> str:
    """Who holds a live local submission's tasks, in words: its pid and host, or, seen
    from another host than ``here``, the SLURM job it runs in."""
    where = f"pid {record.get('pid')} on {record.get('host')}"
    if record.get("job_id") is not None and record.get("host") != here:
        where = f"job {record['job_id']} on {record.get('host')}"
    return f"queued by the local submission, {where}"


def tries(records: Iterable[dict[str, Any]], manifest_hash: str) -> dict[int, int]:
    """Task -> how many of notata's submissions of this manifest version included it (the
    attempts a retry policy counts: SLURM's own requeues of a task are not among them;
    see :func:`left` for those a pack never began). ``records``: :func:`read`."""
    out: dict[int, int] = {}
    for r in records:
        if r.get("manifest_hash") != manifest_hash or r.get("intent") or not r.get("backend"):
            continue
        for i in taskspec.expand(str(r.get("tasks") or "")):
            out[i] = out.get(i, 0) + 1
    return out


def left(records: Iterable[dict[str, Any]], manifest_hash: str, n_tasks: int
         ) -> dict[int, set[str]]:
    """Task -> the array tasks (job keys) whose pack said it left the task unstarted (a
    ``left`` line), for tasks below ``n_tasks``. A requeued pack may begin it later: the
    caller checks the run's attempts before it takes one back."""
    out: dict[int, set[str]] = {}
    for r in records:
        spec, job = r.get("left"), r.get("job")
        if r.get("manifest_hash") != manifest_hash or not isinstance(spec, str) \
                or not isinstance(job, str) or not taskspec.is_spec(spec):
            continue
        for part in spec.split(","):  # a hand-made line cannot name more than the sweep
            lo, _, hi = part.partition("-")
            for i in range(int(lo), min(int(hi or lo), n_tasks - 1) + 1):
                out.setdefault(i, set()).add(job)
    return out


def array_index(array: dict[str, Any]) -> Callable[[int], list[int]]:
    """For a recorded array (``offset``, and ``map`` when it lists its tasks, ``pack``
    when each array task runs several): array task id -> the sweep indices it runs
    (``[]``: no such task in the array)."""
    listed = array.get("map")
    pack = array.get("pack", 1)
    pack = pack if isinstance(pack, int) and not isinstance(pack, bool) and pack > 0 else 1
    if isinstance(listed, str) and listed and taskspec.is_spec(listed):
        order = list(taskspec.expand(listed))
        return lambda k: order[k * pack:(k + 1) * pack] if k >= 0 else []
    offset = array.get("offset", 0)
    offset = offset if isinstance(offset, int) else 0
    return lambda k: [offset + k]
