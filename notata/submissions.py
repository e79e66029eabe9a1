"""The append-only record of a sweep's submissions: ``<base_dir>/.notata/submissions.jsonl``.

One JSON object a line (schema 1): time, backend, job ids, array specs, the sweep
indices covered, the manifest and its hash, and the command. Lines are appended
under a lock, each with one ``write``, so concurrent submitters never interleave;
a reader skips a line a crash cut short.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import filelock

from . import layout, runinfo

SCHEMA = 1


def path(base_dir: Path) -> Path:
    return base_dir / layout.SWEEP_DIR / layout.SUBMISSIONS


def append(base_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Add ``entry`` (with schema, time, user and host filled in) and return it."""
    now = time.time()
    fields = runinfo.process_fields()
    record = {"schema": SCHEMA, "time": runinfo.now_iso(now), "unix": round(now, 3),
              "user": fields["user"], "host": fields["host"], **entry}
    target = path(base_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode()
    with filelock.FileLock(str(target) + ".lock"):
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
