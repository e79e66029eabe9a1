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
``extra``, ``throttle``, ``warn_before``, ``jobs``), ``job_ids``, ``arrays``
(``job_id``, ``spec``, ``offset``, ``script``, ``tasks``). A local submission also
records ``pid`` and ``pid_start`` (its tasks count as queued while that process runs),
and a line ``{"submission", "ended": true}`` when it ends. Schema 1 lines (one per
submission, all arrays in one line, no ``submission``/``options``) are still read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import psutil

from . import layout, lock, runinfo

SCHEMA = 2


def path(base_dir: Path) -> Path:
    return base_dir / layout.SWEEP_DIR / layout.SUBMISSIONS


def sweep_lock(base_dir: Path) -> lock.Exclusive:
    """The sweep's lock (``.notata/resubmit.lock``): a resubmit holds it from its scan to
    its record, a submit while it submits and records, so no task is taken twice."""
    return lock.exclusive(base_dir / layout.SWEEP_DIR / layout.RESUBMIT_LOCK)


def new_id() -> str:
    """A submission id: the time and 6 random hex digits, sortable and unique."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


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
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return record


def read(base_dir: Path) -> list[dict[str, Any]]:
    """Every readable record, oldest first."""
    try:
        text = path(base_dir).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def this_process() -> dict[str, Any]:
    """``pid`` and ``pid_start`` of this process, for a local submission's record."""
    return {"pid": os.getpid(), "pid_start": psutil.Process().create_time()}


def live_local(records: list[dict[str, Any]], host: str) -> list[dict[str, Any]]:
    """The local submissions on ``host`` whose process still runs them (not ended)."""
    ended = {r.get("submission") for r in records if r.get("ended")}
    out = []
    for r in records:
        if r.get("backend") != "local" or r.get("host") != host or r.get("submission") in ended:
            continue
        pid, start = r.get("pid"), r.get("pid_start")
        if not isinstance(pid, int) or not isinstance(start, (int, float)):
            continue
        with contextlib.suppress(psutil.Error):
            if abs(psutil.Process(pid).create_time() - start) < 1.0:
                out.append(r)
    return out
