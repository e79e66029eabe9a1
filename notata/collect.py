"""Scanning runs: what state every task of a sweep, or every run under a folder, is in.

One ``open`` per run directory (its metadata.json) and one ``scandir`` of the base
folder; no file is ever written. A run directory whose metadata cannot be read is
``corrupt`` (with the reason) and never stops the scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _fs, layout, schema
from .manifest import Sweep

MISSING = "missing"
CORRUPT = "corrupt"
#: Every status a scan can report, in the order tables show them.
SCAN_STATUSES = (*schema.STATUSES, MISSING, CORRUPT)


@dataclass
class RunRecord:
    """One run (or one task with no run yet) as a scan saw it."""

    task: int | None
    run_id: str
    status: str
    attempt: int
    reason: str | None = None
    run_dir: Path | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "run_id": self.run_id, "status": self.status,
                               "attempt": self.attempt}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Report:
    """A scan's result: ``runs`` sorted by task (runs no manifest names last, by run id)."""

    runs: list[RunRecord]
    sweep: Sweep | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SCAN_STATUSES if self.sweep else
                               (*schema.STATUSES, CORRUPT), 0)
        for r in self.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    def indices(self, *statuses: str) -> list[int]:
        """The task indices whose status is one of ``statuses``."""
        return [r.task for r in self.runs if r.status in statuses and r.task is not None]

    def as_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "runs": [r.as_json() for r in self.runs]}


def read_run(run_dir: Path, task: int | None = None) -> RunRecord:
    """The record of one run directory; never raises for what is on disk."""
    run_id = run_dir.name.removeprefix(layout.RUN_PREFIX)
    if run_dir.is_symlink():
        return RunRecord(task, run_id, CORRUPT, 0, "the run directory is a symlink; not followed",
                         run_dir)
    try:
        meta = _fs.read_json_object(run_dir / layout.METADATA)
    except FileNotFoundError:
        return RunRecord(task, run_id, CORRUPT, 0, f"no {layout.METADATA}", run_dir)
    except (OSError, ValueError) as err:
        return RunRecord(task, run_id, CORRUPT, 0, str(err), run_dir)
    status = meta.get("status")
    if status not in schema.STATUSES:
        return RunRecord(task, run_id, CORRUPT, 0, f"unknown status {status!r}", run_dir)
    attempt = meta.get("attempt", 1)
    reason = meta.get("failure_reason") if status != schema.COMPLETE else None
    return RunRecord(task, run_id, status, attempt if isinstance(attempt, int) else 1,
                     str(reason) if reason else None, run_dir)


def _run_dirs(base: Path) -> dict[str, Path]:
    """``run_id -> path`` for every ``log_*`` entry of ``base`` (one scandir)."""
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return {}
    return {e.name.removeprefix(layout.RUN_PREFIX): Path(e.path) for e in entries
            if e.name.startswith(layout.RUN_PREFIX) and (e.is_dir() or e.is_symlink())}


def scan(target: Sweep | str | os.PathLike[str]) -> Report:
    """Scan a sweep (every task, plus runs in its base folder that it does not name)
    or a bare base folder (every run in it)."""
    if not isinstance(target, Sweep):
        dirs = _run_dirs(Path(target))
        return Report([read_run(dirs[rid]) for rid in sorted(dirs)])
    sweep = target
    dirs = _run_dirs(sweep.base_dir)
    records = []
    for t in sweep:
        path = dirs.pop(t.run_id, None)
        records.append(read_run(path, t.index) if path is not None
                       else RunRecord(t.index, t.run_id, MISSING, 0))
    records += [read_run(dirs[rid]) for rid in sorted(dirs)]
    return Report(records, sweep)
