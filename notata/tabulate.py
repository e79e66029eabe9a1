"""One row per run: status, params and scalar results, for a sweep or a folder of runs.

This replaces ``jq '.E' outputs/log_*/artifacts/final_metrics.json`` at any number of
runs: ``notata table sweep.yaml --artifact final_metrics`` gives a column
``final_metrics.E``. With a manifest the params come from the sweep itself (no file is
read for them); for a bare folder, from each run's params file. As csv, JSON lines,
aligned text (:func:`to_text`, what a terminal gets) or a pandas DataFrame (:func:`table`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import scheduler
from .collector import scan
from .errors import UsageError
from .manifest import Sweep
from .queue import Queue
from .reader import LogReader
from .runstate import CORRUPT, MISSING, PENDING, SCAN_STATUSES

BASE_COLUMNS = ["run_id", "task", "status", "attempt", "runtime_sec", "exit_code", "job",
                "failure_reason"]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is None or isinstance(value, (str, int, float, bool)):
        out[prefix] = value


def _fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The table's columns that come from a run's metadata (read once, by the scan)."""
    job = scheduler.job_of(meta)
    return {"exit_code": meta.get("exit_code"),
            "job": job[0].job_key(job[1]) if job is not None else None,
            "failure_reason": meta.get("failure_reason")}


def rows(target: Sweep | str | os.PathLike[str], artifacts: Sequence[str] = (),
         statuses: Iterable[str] | None = None, queue: Queue | None = None
         ) -> list[dict[str, Any]]:
    """The table's rows, in task order; ``statuses`` keeps only runs with those statuses;
    ``queue``: the scheduler's, as ``notata status`` asks it (a task SLURM requeued reads
    ``pending``, as there), else the runs' files alone.

    A status that is not one, or an artifact that no run of the table has, is a
    :class:`~notata.errors.UsageError` naming the valid choices (not an empty table or
    empty columns)."""
    keep = set(statuses) if statuses else None
    unknown = sorted((keep or set()) - set(SCAN_STATUSES))
    if unknown:
        raise UsageError(f"--status {', '.join(unknown)}: not a status; the statuses are "
                         f"{', '.join(SCAN_STATUSES)}")
    sweep = target if isinstance(target, Sweep) else None
    out = []
    seen: set[str] = set()  # the artifacts the runs have
    for r in scan(target, full=True, keep=_fields, queue=queue).runs:
        if keep is not None and r.status not in keep:
            continue
        row: dict[str, Any] = {"run_id": r.run_id, "task": r.task, "status": r.status,
                               "attempt": r.attempt, "runtime_sec": r.runtime_sec}
        has_meta = r.run_dir is not None and r.status not in (CORRUPT, MISSING, PENDING)
        reader = LogReader(r.run_dir) if has_meta and r.run_dir is not None else None
        if r.kept is not None:
            row.update(r.kept)
        if reader is not None and artifacts:
            seen.update(reader.artifacts)
        params: dict[str, Any] = {}
        if sweep is not None and r.task is not None:
            _flatten("", sweep.params(r.task), params)
        elif reader is not None:
            _flatten("", reader.params, params)
        row.update({k: v for k, v in params.items() if k not in row})
        for name in artifacts:
            try:
                data = reader.load_json(name) if reader is not None else {}
            except ValueError:
                data = {}
            _flatten(name, data if isinstance(data, Mapping) else {}, row)
        out.append(row)
    missing = [a for a in artifacts if f"{a.removesuffix('.json')}.json" not in seen]
    if missing and out:
        have = sorted(n.removesuffix(".json") for n in seen if n.endswith(".json"))
        raise UsageError(f"--artifact {', '.join(missing)}: no run of this table has it; "
                         "the JSON artifacts they have: " + (", ".join(have) or "none"))
    return out


def columns(table: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = list(BASE_COLUMNS)
    for row in table:
        cols += [k for k in row if k not in cols]
    return cols


def to_csv(table: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(table), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def to_json_lines(table: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in table)


#: A cell of the text view longer than this is cut (csv and JSON keep it whole).
CELL_WIDTH = 50


def to_text(table: Sequence[Mapping[str, Any]]) -> str:
    """The table aligned for a reader: a header, then a row per run; numbers to the
    right, ``-`` for no value, floats to 6 significant digits, long cells cut; the
    columns no row has a value in are left out."""
    cols = [c for c in columns(table) if any(row.get(c) is not None for row in table)] \
        or columns(table)

    def cell(value: Any) -> str:
        text = ("-" if value is None else f"{value:.6g}" if isinstance(value, float)
                else str(value))
        text = text.replace("\n", " ")
        return text if len(text) <= CELL_WIDTH else text[:CELL_WIDTH - 3] + "..."

    def numeric(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    cells = [[cell(row.get(c)) for c in cols] for row in table]
    widths = [max([len(c)] + [len(r[k]) for r in cells]) for k, c in enumerate(cols)]
    right = [any(numeric(row.get(c)) for row in table)
             and all(numeric(row.get(c)) or row.get(c) is None for row in table)
             for c in cols]
    lines = []
    for values in [cols, *cells]:
        lines.append("  ".join(v.rjust(w) if r else v.ljust(w)
                               for v, w, r in zip(values, widths, right, strict=True)).rstrip())
    return "".join(line + "\n" for line in lines)


def table(target: Sweep | str | os.PathLike[str], artifact: str | Sequence[str] = (),
          status: str | Iterable[str] | None = None, *,
          artifacts: str | Sequence[str] | None = None,
          statuses: str | Iterable[str] | None = None) -> Any:
    """The table as a pandas DataFrame (the ``pandas`` extra); ``target`` is a
    :class:`~notata.Sweep` or the path of a manifest or of a folder of runs.

    ``artifact``: a JSON artifact's name, or several, as ``--artifact`` takes them
    (``final_metrics`` gives the columns ``final_metrics.E``...); ``status``: keep only
    runs with this status (or these). ``artifacts`` and ``statuses``, their names before,
    still work. Raises what ``notata table`` says in one line (a status that is not one,
    an artifact no run has) as :class:`~notata.UsageError`, and ImportError without
    pandas.
    """
    try:
        import pandas as pd  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as err:
        raise ImportError("notata.table() needs pandas: pip install pandas (or notata's "
                          "pandas extra)") from err
    if (artifacts is not None and artifact) or (statuses is not None and status is not None):
        raise TypeError("give artifact= or artifacts=, status= or statuses=, not both")
    if artifacts is not None:
        artifact = artifacts
    if statuses is not None:
        status = statuses
    names = [artifact] if isinstance(artifact, str) else list(artifact)
    kept = [status] if isinstance(status, str) else status
    if not isinstance(target, Sweep) and not os.path.isdir(target):
        from .manifest import load

        target = load(target)
    data = rows(target, names, kept)
    return pd.DataFrame(data, columns=columns(data))
