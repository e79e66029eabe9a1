"""What the command line prints: the progress line of a local sweep, ``notata status``'s
report, and the end of each failure's output (``status --logs``)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import layout, logs
from .collector import Report
from .local import LocalResult
from .manifest import Sweep, compact
from .resources import size_text
from .runstate import RunRecord


class Progress:
    """A progress line: on a terminal, one line redrawn in place, cut to the terminal's
    width; elsewhere (a log file, a pipe), a plain line every :attr:`every` seconds."""

    every = 30.0

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr  # looked up now: a test may have replaced it
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.drawn = False
        self._said = self.t0

    def __call__(self, result: LocalResult, running: int, total: int) -> None:
        finished = len(result.done) + len(result.failed) + len(result.stopped)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / finished * (total - finished) if finished else 0.0
        counts = (f"{finished}/{total}  done {len(result.done)}  failed {len(result.failed)}"
                  f"  running {running}  {_clock(elapsed)} elapsed  "
                  f"ETA {_clock(eta) if finished else '?'}")
        if not self.tty:  # now and then, and never a carriage return
            if time.monotonic() - self._said >= self.every and finished < total:
                self._said = time.monotonic()
                self.stream.write(f"notata: {counts}\n")
                self.stream.flush()
            return
        columns = shutil.get_terminal_size((80, 24)).columns
        width = 24 if columns >= 100 else 10 if columns >= 70 else 0
        filled = int(width * finished / total) if total else width
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if width else ""
        line = (bar + counts)[:max(columns - 1, 10)]
        self.stream.write(f"\r{line}\033[K")  # the rest of an older, longer line erased
        self.stream.flush()
        self.drawn = True
        if finished == total or result.interrupted:
            self.stream.write("\n")


def _clock(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}"


def failure_lines(report: Report, target: Sweep | str, limit: int = 5,
                   most: int = 20) -> list[str]:
    """``status --logs``: the end of each failed task's stderr, bounded."""
    bad = [r for r in report.read if r.status in ("failed", "timeout", "oom")
           and r.run_dir is not None]
    out: list[str] = ["the end of each failure's output:"] if bad else []
    for r in bad[:most]:
        where = (f"--task {r.task}" if r.task is not None and isinstance(target, Sweep)
                 else f"--run {shlex.quote(r.run_id)}")
        name = target.path if isinstance(target, Sweep) else target
        assert r.run_dir is not None
        part = logs.part(r.run_dir, layout.STDERR, r.attempt, limit)
        if part.missing:
            part = logs.part(r.run_dir, layout.LOG, r.attempt, limit)
        out.append(f"  {r.run_id} ({r.status}), the end of its {part.name}:")
        out += [f"    | {line}" for line in part.lines] or ["    (empty)"]
        if part.total > len(part.lines):
            out.append(f"    ... {part.total - len(part.lines)} more line(s): "
                       f"notata logs {shlex.quote(str(name))} {where}")
    if len(bad) > most:
        out.append(f"  and {len(bad) - most} more failed run(s): notata status --json lists "
                   "them")
    return out


def format_report(report: Report) -> str:
    """``notata status``'s text: the counts, then the runs that are not complete."""
    head, body = report_lines(report)
    return "\n".join(head + body)


def report_lines(report: Report, more: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``notata status``'s text as (head, body): the head says what was scanned and the
    counts (and ``more``'s first line: the retry shepherd's state), which ``--watch``
    always shows; the body lists what is not complete, runs that share a status and the
    first line of a reason in one line of task ranges (:func:`_not_complete`)."""
    lines = []
    if report.sweep is not None:
        s = report.sweep
        lines.append(f"sweep {s.name}: {len(s)} tasks, manifest hash {s.hash}, "
                     f"runs in {s.base_dir}")
    else:
        lines.append(f"{len(report)} runs")
    for status, n in report.counts.items():
        if n:
            lines.append(f"  {status:<11} {n:>8}")
    head = lines + list(more[:1])
    body = list(more[1:])
    rows = _not_complete([r for r in report.read if r.status != "complete"])
    if rows:
        body.append("not complete:")
        body += _aligned(rows)
    return head, body


#: Past this width a task list or a run id no longer widens its column for every line.
_WIDEST = 32


def _not_complete(records: Sequence[RunRecord]) -> list[tuple[str, str, str]]:
    """(tasks, run id, what) for each line of the list: the runs of the sweep's tasks that
    share a status and what follows it (the first line of the reason, what is queued,
    what the attempt had) in one line of ranges, alone only where that differs; runs no
    task names one line each, last."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        if r.task is not None:
            groups.setdefault((r.status, _after_status(r)), []).append(r)
    ordered: list[tuple[tuple[int, int, str], tuple[str, str, str]]] = []
    for (status, after), members in groups.items():
        tasks = sorted({r.task for r in members if r.task is not None})
        if len(members) == 1:
            r = members[0]
            ordered.append(((0, tasks[0], r.run_id), (f"task {r.task}", r.run_id,
                                                      _one(r, after))))
            continue
        attempts = sorted({r.attempt for r in members})
        said = [str(len(members))]
        if all(r.path is None for r in members):
            said.append("never started")
        elif attempts == [0]:
            pass
        elif len(attempts) == 1:
            said.append(f"attempt {attempts[0]}")
        else:
            said.append(f"attempts {attempts[0]}-{attempts[-1]}")
        ordered.append(((0, tasks[0], ""), ("tasks " + compact(tasks), "",
                                            f"{status} ({', '.join(said)}){after}")))
    ordered += [((1, 0, r.run_id), ("no task", r.run_id, _one(r, _after_status(r))))
                for r in records if r.task is None]
    return [row for _, row in sorted(ordered)]


def _one(r: RunRecord, after: str) -> str:
    return r.status + (f" (attempt {r.attempt})" if r.attempt else "") + after


def _after_status(r: RunRecord) -> str:
    """What a line says after a run's status: what the queue holds of it, what its last
    attempt had, and the first line of its reason."""
    out = ""
    if r.queued and r.status not in ("pending", "running"):
        out += f" [{r.queued_by}]" if r.queued_by else f" [in the queue: {r.queued}]"
    asked = r.asked or {}
    if asked.get("time_limit") or asked.get("mem_bytes"):  # what this attempt had
        had = [f"time {asked['time_limit']}"] if asked.get("time_limit") else []
        had += [f"mem {size_text(asked['mem_bytes'])}"] if asked.get("mem_bytes") else []
        out += f" [{', '.join(had)}]"
    if r.reason:
        out += f": {r.reason.splitlines()[0]}"
    return out


def _aligned(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """The list's lines, the task and run columns as wide as their widest value (up to
    :data:`_WIDEST`); no run column when no line names one run."""
    tasks = min(max(len(t) for t, _, _ in rows), _WIDEST)
    runs = min(max(len(r) for _, r, _ in rows), _WIDEST)
    out = []
    for t, r, what in rows:
        cells = [t.ljust(tasks)] + ([r.ljust(runs)] if runs else []) + [what]
        out.append("  " + "  ".join(cells))
    return out


def fit(head: Sequence[str], body: Sequence[str], size: os.terminal_size) -> list[str]:
    """What ``status --watch`` draws on a terminal: every line of ``head`` (the counts),
    then as much of ``body`` as the screen holds, with a last line saying how many more
    and where to see them all; each line cut to the screen's width, so none wraps."""
    room = size.lines - 1 - len(head)  # the cursor's line stays free
    lines = list(head)
    if len(body) <= room:
        lines += body
    else:
        shown = max(room - 1, 0)
        lines += body[:shown]
        lines.append(f"... and {len(body) - shown} more line(s): notata status without "
                     "--watch lists them all")
    return [line[:max(size.columns - 1, 10)] for line in lines]
