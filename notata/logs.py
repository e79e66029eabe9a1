"""A run's output, one attempt at a time: ``notata logs`` and ``notata status --logs``.

A task's command writes ``stdout.txt`` and ``stderr.txt`` in its run directory; each
attempt's part begins with the wrapper's header line, ``=== notata attempt N: COMMAND``
(:mod:`notata.runner`), so the part of one attempt is the lines from its header to the
next. A plain Logbook run has no such files: its output is ``log.txt``, whose attempts
begin at ``Logbook initialized`` / ``Logbook resumed as attempt N``. The scheduler's own
output file of the job an attempt ran in (``.notata/slurm-A_T.out`` for notata's array
tasks) is found through the scheduler seam.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _fs, layout, scheduler
from .errors import UsageError

HEADER = "=== notata attempt "
_LOG_ATTEMPT = re.compile(r"\] \w+ Logbook (?:initialized|resumed as attempt (\d+))$")
#: The most of a file a part is read from (its end): a runaway log is not read whole.
READ_LIMIT = 8 << 20


@dataclass
class Part:
    """The lines one file holds for one attempt (``lines``: the last ones asked for, of
    ``total``); ``missing``: the file is not there."""

    name: str
    lines: list[str]
    total: int
    missing: bool = False


def attempt_of(meta: Mapping[str, Any], attempt: int | None) -> dict[str, Any]:
    """The record of attempt ``attempt`` (default: the run's current one): the run's own
    metadata for the current attempt, its entry in ``attempts`` for an earlier one. A
    :class:`~notata.errors.UsageError` naming the attempts there are when there is none."""
    current = int(meta.get("attempt") or 1)
    if attempt is None or attempt == current:
        return dict(meta)
    for entry in meta.get("attempts") or []:
        if isinstance(entry, Mapping) and entry.get("attempt") == attempt:
            return dict(entry)
    raise UsageError(f"run {meta.get('run_id')}: no attempt {attempt} (it has attempts 1 to "
                     f"{current})")


def part(run_dir: Path, name: str, attempt: int, tail: int) -> Part:
    """The last ``tail`` lines (0: all) of ``name`` that attempt ``attempt`` wrote."""
    path = run_dir / name
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - READ_LIMIT))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return Part(name, [], 0, missing=True)
    except OSError as err:
        return Part(name, [f"(cannot read {path}: {err.strerror or err})"], 1)
    lines = _attempt_lines(text.splitlines(), name, attempt)
    shown = lines if tail <= 0 else lines[-tail:]
    return Part(name, shown, len(lines))


def _attempt_lines(lines: list[str], name: str, attempt: int) -> list[str]:
    """The lines of one attempt, by the headers the file has (all of it when it has none:
    a file written before headers, or by the user)."""
    starts: dict[int, int] = {}
    if name == layout.LOG:
        for k, line in enumerate(lines):
            m = _LOG_ATTEMPT.search(line)
            if m:
                starts.setdefault(int(m.group(1) or 1), k)
    else:
        for k, line in enumerate(lines):
            if line.startswith(HEADER):
                number = line[len(HEADER):].split(":", 1)[0]
                if number.isdigit():
                    starts[int(number)] = k  # the last header of that number: its last try
    if attempt not in starts:
        return [] if starts else lines
    begin = starts[attempt] + (0 if name == layout.LOG else 1)
    if name == layout.LOG:  # the lines an attempt writes before saying it began are its own
        begin = 0 if attempt == min(starts) else begin
        while begin > 0 and "] INFO Saved params" in lines[begin - 1] and \
                begin - 1 not in starts.values():
            begin -= 1
    later = [k for k in starts.values() if k > starts[attempt]]
    return lines[begin:min(later, default=len(lines))]


def header(meta: Mapping[str, Any], record: Mapping[str, Any], run_dir: Path) -> list[str]:
    """Who, where and how an attempt ended, in a few lines."""
    task = meta.get("task")
    what = f"run {meta.get('run_id')}" + (
        f" (task {task} of sweep {meta.get('sweep')})" if task is not None else "")
    attempt, total = record.get("attempt", 1), meta.get("attempt", 1)
    status = record.get("status", "?")
    lines = [f"{what}, attempt {attempt} of {total}: {status}"
             + (f": {record['failure_reason']}" if record.get("failure_reason") else "")]
    where = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    job = scheduler.describe(record)
    if job:
        where.append(job)
    if record.get("pack"):
        pack = record["pack"]
        where.append(f"position {pack.get('position')} of a pack of {pack.get('size')}")
    if record.get("exit_code") is not None:
        where.append(f"exit code {record['exit_code']}")
    lines.append("  " + ", ".join(where))
    when = record.get("start_time", "?")
    if record.get("end_time"):
        when += f" to {record['end_time']}"
    if isinstance(record.get("runtime_sec"), (int, float)):
        when += f" ({float(record['runtime_sec']):.3g} s)"
    lines.append(f"  {when}; {run_dir}")
    return lines


def parts(run_dir: Path, record: Mapping[str, Any], *, tail: int, stdout: bool, stderr: bool,
          log: bool) -> list[Part]:
    """The parts to show: those asked for; by default the command's stdout and stderr, or
    log.txt for a run without them (a plain Logbook run)."""
    attempt = int(record.get("attempt") or 1)
    if not (stdout or stderr or log):
        found = [part(run_dir, n, attempt, tail) for n in (layout.STDOUT, layout.STDERR)]
        if all(p.missing for p in found):
            return [part(run_dir, layout.LOG, attempt, tail)]
        return found
    names = [n for n, wanted in ((layout.STDOUT, stdout), (layout.STDERR, stderr),
                                 (layout.LOG, log)) if wanted]
    return [part(run_dir, n, attempt, tail) for n in names]


def scheduler_part(record: Mapping[str, Any], base_dir: Path, tail: int) -> Part:
    """The scheduler's own output file of the job the attempt ran in (the whole file: an
    array task's pack shares it)."""
    path = scheduler.output_file(record, base_dir)
    if path is None:
        return Part("the scheduler's output file", [], 0, missing=True)
    try:
        text = path.read_bytes()[-READ_LIMIT:].decode("utf-8", errors="replace")
    except OSError:
        return Part(str(path), [], 0, missing=True)
    lines = text.splitlines()
    return Part(str(path), lines if tail <= 0 else lines[-tail:], len(lines))


def render(part: Part, attempt: int) -> list[str]:
    """A part under a rule that says what it is and how much of it is shown."""
    if part.missing:
        return [f"--- {part.name}: none (this run wrote no {part.name})"]
    if not part.total:
        return [f"--- {part.name}, attempt {attempt}: empty"]
    shown = len(part.lines)
    size = f"all {part.total} lines" if shown == part.total else \
        f"last {shown} of {part.total} lines"
    return [f"--- {part.name}, attempt {attempt} ({size})", *part.lines]


def read_meta(run_dir: Path) -> dict[str, Any]:
    """A run's metadata.json, or a :class:`~notata.errors.UsageError` saying there is no
    run at ``run_dir``."""
    try:
        return _fs.read_json_object(run_dir / layout.METADATA)
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: no run there (no {layout.METADATA})") from None
