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
import stat
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
#: The longest line shown whole (a binary blob or a progress bar without newlines).
LINE_LIMIT = 2000
#: Control characters (a terminal's escape sequences, NULs) shown as "?"; tabs stay.
_CONTROLS = {c: "?" for c in [*range(0, 9), *range(10, 32), 127]}


@dataclass
class Part:
    """The lines one file holds for one attempt (``lines``: the last ones asked for, of
    ``total``); ``missing``: the file is not there."""

    name: str
    lines: list[str]
    total: int
    missing: bool = False
    #: Why the part could not be read (not a regular file, out of reach), if it could not.
    note: str = ""
    #: Only the end of a file longer than :data:`READ_LIMIT` was read.
    partial: bool = False


def attempt_of(meta: Mapping[str, Any], attempt: int | None) -> dict[str, Any]:
    """The record of attempt ``attempt`` (default: the run's current one): the run's own
    metadata for the current attempt, its entry in ``attempts`` for an earlier one. A
    :class:`~notata.errors.UsageError` naming the attempts there are when there is none."""
    current = number(meta.get("attempt"), 1)
    if attempt is None or attempt == current:
        return dict(meta)
    entries = meta.get("attempts")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping) and number(entry.get("attempt"), 0) == attempt:
            return dict(entry)
    raise UsageError(f"run {meta.get('run_id')}: no attempt {attempt} recorded (its "
                     f"metadata.json has attempt {current}, and the earlier ones it lists)")


def number(value: Any, default: int) -> int:
    """A whole number a record holds, or ``default`` for anything else (a hand edit)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _read_end(path: Path) -> tuple[str, bool] | str:
    """The text of the last :data:`READ_LIMIT` bytes of a regular file, and whether that
    is not all of it; or why it was not read. Never blocks (a FIFO), never reads more."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file: not read"
        start = max(0, st.st_size - READ_LIMIT)
        data = os.pread(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace"), start > 0


def _shown(line: str) -> str:
    """A line as a terminal can show it: control characters as "?", cut when huge."""
    line = line.translate(_CONTROLS)
    if len(line) > LINE_LIMIT:
        line = line[:LINE_LIMIT] + f"... ({len(line) - LINE_LIMIT} more characters)"
    return line


def part(run_dir: Path, name: str, attempt: int, tail: int, last: int | None = None) -> Part:
    """The last ``tail`` lines (0: all) of ``name`` that attempt ``attempt`` wrote (``last``:
    the run's latest attempt, to which the end of a file without a header belongs)."""
    path = run_dir / name
    try:
        read = _read_end(path)
    except FileNotFoundError:
        return Part(name, [], 0, missing=True)
    except OSError as err:
        return Part(name, [], 0, note=f"cannot be read: {err.strerror or err}")
    if isinstance(read, str):
        return Part(name, [], 0, note=read)
    text, partial = read
    lines = _attempt_lines(text.splitlines(), name, attempt,
                           attempt if last is None else last, partial)
    if lines is None:
        return Part(name, [], 0, note=f"attempt {attempt}'s lines are before the last "
                    f"{READ_LIMIT >> 20} MiB of the file, which is all that is read")
    shown = lines if tail <= 0 else lines[-tail:]
    return Part(name, [_shown(x) for x in shown], len(lines), partial=partial)


def _attempt_lines(lines: list[str], name: str, attempt: int, last: int,
                   partial: bool) -> list[str] | None:
    """The lines of one attempt, by the headers the file has (all of it when it has none:
    a file written before headers, or by the user); None when they are not in ``lines``
    (only the end of the file was read). A header counts only when its number is greater
    than the one before and at most ``last``: one the program printed itself does not."""
    starts: dict[int, int] = {}
    if name == layout.LOG:
        for k, line in enumerate(lines):
            m = _LOG_ATTEMPT.search(line)
            if m:
                starts.setdefault(int(m.group(1) or 1), k)
    else:
        split: list[str] = []
        for line in lines:  # a header after output that did not end its line
            at = line.find(HEADER)
            if at > 0:
                split += [line[:at], line[at:]]
            else:
                split.append(line)
        lines = split
        for k, line in enumerate(lines):
            if line.startswith(HEADER):
                n = line[len(HEADER):].split(":", 1)[0]
                if n.isdigit() and max(starts, default=0) < int(n) <= last:
                    starts[int(n)] = k
    if attempt not in starts:
        if starts:
            return None if partial and attempt < min(starts) else []
        return lines if not partial or attempt == last else None
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
    pack = record.get("pack")
    if isinstance(pack, Mapping):
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


def parts(run_dir: Path, meta: Mapping[str, Any], record: Mapping[str, Any], *, tail: int,
          stdout: bool, stderr: bool, log: bool) -> list[Part]:
    """The parts to show: those asked for; by default the command's stdout and stderr, or
    log.txt for a run without them (a plain Logbook run)."""
    attempt, last = number(record.get("attempt"), 1), number(meta.get("attempt"), 1)
    if not (stdout or stderr or log):
        found = [part(run_dir, n, attempt, tail, last) for n in (layout.STDOUT, layout.STDERR)]
        if all(p.missing for p in found):
            return [part(run_dir, layout.LOG, attempt, tail, last)]
        return found
    names = [n for n, wanted in ((layout.STDOUT, stdout), (layout.STDERR, stderr),
                                 (layout.LOG, log)) if wanted]
    return [part(run_dir, n, attempt, tail, last) for n in names]


def scheduler_part(record: Mapping[str, Any], base_dir: Path, tail: int) -> Part:
    """The scheduler's own output file of the job the attempt ran in (the whole file: an
    array task's pack shares it)."""
    path = scheduler.output_file(record, base_dir)
    if path is None:
        return Part("the scheduler's output file", [], 0,
                    note="not known (the attempt did not run as a notata array task)")
    try:
        read = _read_end(path)
    except FileNotFoundError:
        return Part(str(path), [], 0, note="not there")
    except OSError as err:
        return Part(str(path), [], 0, note=f"cannot be read: {err.strerror or err}")
    if isinstance(read, str):
        return Part(str(path), [], 0, note=read)
    lines = read[0].splitlines()
    shown = lines if tail <= 0 else lines[-tail:]
    return Part(str(path), [_shown(x) for x in shown], len(lines), partial=read[1])


def render(part: Part, attempt: int) -> list[str]:
    """A part under a rule that says what it is and how much of it is shown."""
    if part.missing:
        return [f"--- {part.name}: none (this run wrote no {part.name})"]
    if part.note:
        return [f"--- {part.name}: {part.note}"]
    if not part.total:
        return [f"--- {part.name}, attempt {attempt}: empty"]
    shown = len(part.lines)
    of = f"the last {READ_LIMIT >> 20} MiB's {part.total}" if part.partial else f"{part.total}"
    size = f"all {of} lines" if shown == part.total else f"last {shown} of {of} lines"
    return [f"--- {part.name}, attempt {attempt} ({size})", *part.lines]


def read_meta(run_dir: Path) -> dict[str, Any]:
    """A run's metadata.json, or a :class:`~notata.errors.UsageError` saying there is no
    run at ``run_dir``."""
    try:
        return _fs.read_json_object(run_dir / layout.METADATA)
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: no run there (no {layout.METADATA})") from None
