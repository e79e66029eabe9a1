"""What the command line prints: the progress line of a local sweep, ``notata status``'s
report, and the end of each failure's output (``status --logs``)."""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from typing import Any

from . import layout, logs
from .collector import Report
from .local import LocalResult
from .manifest import Sweep, compact
from .resources import size_text


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
    pending = [r for r in report.read if r.status != "complete"]
    if pending:
        lines.append("not complete:")
        # tasks that never ran say nothing more than their status: one line of ranges each
        never = [r for r in pending if r.path is None and r.task is not None
                 and not r.reason and r.status in ("missing", "pending")]
        for status in ("pending", "missing"):
            tasks = [r.task for r in never if r.status == status and r.task is not None]
            if tasks:
                lines.append(f"  {'tasks ' + compact(tasks):<10} {status} ({len(tasks)}, "
                             "never started)")
        collapsed = {id(r) for r in never}
        for r in (r for r in pending if id(r) not in collapsed):
            where = f"task {r.task}" if r.task is not None else "no task"
            line = f"  {where:<10} {r.run_id}  {r.status}"
            if r.attempt:
                line += f" (attempt {r.attempt})"
            if r.queued and r.status not in ("pending", "running"):
                line += f" [in the queue: {r.queued}]"
            asked = r.asked or {}
            if asked.get("time_limit") or asked.get("mem_bytes"):  # what this attempt had
                had = [f"time {asked['time_limit']}"] if asked.get("time_limit") else []
                had += [f"mem {size_text(asked['mem_bytes'])}"] if asked.get("mem_bytes") else []
                line += f" [{', '.join(had)}]"
            if r.reason:
                line += f": {r.reason.splitlines()[0]}"
            lines.append(line)
    return "\n".join(lines)
