"""The ``notata`` command: ``sweep``, ``exec``, ``submit`` and ``status``.

``main(argv) -> int``: a :class:`~notata.NotataError` (a bad manifest, a bad
``--tasks``) prints one line on stderr and returns 2 for bad input, 1 for an
operation that failed; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .array import index_from_env
from .collect import Report, scan
from .errors import ManifestError, NotataError, UsageError
from .manifest import Sweep, load
from .runner import LocalResult, exec_task, run_local


def parse_tasks(spec: str, count: int) -> list[int]:
    """``"3,7,10-12"`` -> ``[3, 7, 10, 11, 12]``; every index must be in the sweep."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UsageError(f"--tasks {spec!r}: {part!r} is not an index or a range a-b") \
                from None
        if a > b or a < 0 or b >= count:
            raise UsageError(f"--tasks {spec!r}: {part!r} is outside the sweep's tasks "
                             f"0..{count - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd)
    if not cmd:
        raise UsageError("no command given: put it after --, e.g. -- python sim.py {omega}")
    return cmd


# -- sweep ---------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load(args.manifest, check_unique=args.task is None)
    if args.task is not None:
        print(json.dumps(sweep.task(args.task).as_json()))
    elif args.json:
        for t in sweep:
            print(json.dumps(t.as_json()))
    else:
        n = len(sweep)
        print(f"sweep {sweep.name}: {n} task{'s' if n != 1 else ''}, manifest hash {sweep.hash}")
        print(f"runs in {sweep.base_dir}")
        shown = list(range(min(n, 5)))
        if n > 6:
            shown.append(n - 1)
        for i in shown:
            if i == n - 1 and n > 6:
                print("  ...")
            t = sweep.task(i)
            print(f"  task {i}: {t.run_id}  {json.dumps(t.params)}")
    return 0


# -- exec ----------------------------------------------------------------------------------------


def cmd_exec(args: argparse.Namespace) -> int:
    sweep = load(args.manifest)
    index = args.task if args.task is not None else index_from_env()
    try:
        sweep.params(index)
    except IndexError as err:
        raise UsageError(str(err)) from None
    return exec_task(sweep, index, _command(args), heartbeat=args.heartbeat)


# -- submit --------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; nothing until the summary elsewhere."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()

    def __call__(self, result: LocalResult, running: int, total: int) -> None:
        if not self.tty:
            return
        finished = len(result.done) + len(result.failed)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / finished * (total - finished) if finished else 0.0
        width = 24
        filled = int(width * finished / total) if total else width
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {finished}/{total}  "
            f"done {len(result.done)}  failed {len(result.failed)}  running {running}  "
            f"{_clock(elapsed)} elapsed  ETA {_clock(eta) if finished else '?'}  ")
        self.stream.flush()

    def summary(self, result: LocalResult) -> str:
        if self.tty:
            self.stream.write("\n")
        text = (f"{len(result.done)} done, {len(result.failed)} failed, "
                f"{len(result.skipped)} already complete, in {_clock(time.monotonic() - self.t0)}")
        if result.failed:
            text += f"; failed tasks: {_spec(result.failed)}"
        return text + (" (interrupted)" if result.interrupted else "")


def _clock(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}"


def _spec(indices: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    parts: list[str] = []
    run: list[int] = []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def cmd_submit(args: argparse.Namespace) -> int:
    sweep = load(args.manifest, check_unique=True)
    cmd = _command(args)
    indices = parse_tasks(args.tasks, len(sweep)) if args.tasks else range(len(sweep))
    if args.backend != "local":
        raise UsageError(f"backend {args.backend!r} is not available; use --backend local")
    jobs = args.jobs or os.cpu_count() or 1
    progress = Progress()
    result = run_local(sweep, indices, cmd, jobs=jobs, progress=progress)
    print(progress.summary(result), file=sys.stderr)
    if result.interrupted:
        return 130
    return 1 if result.failed else 0


# -- status --------------------------------------------------------------------------------------


def _target(path: str) -> Sweep | str:
    if os.path.isdir(path):
        return path
    return load(path, check_unique=True)


def cmd_status(args: argparse.Namespace) -> int:
    report = scan(_target(args.path))
    if args.json:
        print(json.dumps(report.as_json()))
        return 0
    print(format_report(report))
    return 0


def format_report(report: Report) -> str:
    lines = []
    if report.sweep is not None:
        s = report.sweep
        lines.append(f"sweep {s.name}: {len(s)} tasks, manifest hash {s.hash}, "
                     f"runs in {s.base_dir}")
    else:
        lines.append(f"{len(report.runs)} runs")
    for status, n in report.counts.items():
        if n:
            lines.append(f"  {status:<11} {n:>8}")
    pending = [r for r in report.runs if r.status != "complete"]
    if pending:
        lines.append("not complete:")
        for r in pending:
            where = f"task {r.task}" if r.task is not None else "no task"
            line = f"  {where:<10} {r.run_id}  {r.status}"
            if r.attempt:
                line += f" (attempt {r.attempt})"
            if r.reason:
                line += f": {r.reason.splitlines()[0]}"
            lines.append(line)
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notata", description="Parameter sweeps as plain run folders.")
    p.add_argument("--version", action="version", version=f"notata {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sweep", help="show a manifest's tasks",
                       description="Print a sweep's name, task count and a few tasks.")
    s.add_argument("manifest")
    s.add_argument("--task", type=int, help="print task I as JSON")
    s.add_argument("--json", action="store_true", help="print every task, one JSON object a line")
    s.set_defaults(func=cmd_sweep)

    e = sub.add_parser("exec", help="run a command as one task of a sweep",
                       usage="notata exec MANIFEST [--task I] [--heartbeat S] -- CMD [ARGS...]",
                       description="Open task I's Logbook and run CMD in it. {param} in ARGS is "
                       "replaced by the task's value (also {run_dir}, {run_id}, {task}, "
                       "{attempt}); no shell is involved.")
    e.add_argument("manifest")
    e.add_argument("--task", type=int,
                   help="the task index (default: SLURM_ARRAY_TASK_ID + NOTATA_TASK_OFFSET)")
    e.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default 30)")
    e.set_defaults(func=cmd_exec)

    m = sub.add_parser("submit", help="run every task of a sweep",
                       usage="notata submit MANIFEST [options] -- CMD [ARGS...]",
                       description="Run the sweep's tasks, each through notata exec. Complete "
                       "tasks are skipped.")
    m.add_argument("manifest")
    m.add_argument("--backend", choices=("local",), default="local")
    m.add_argument("-j", "--jobs", type=int, help="tasks at a time (default: the CPU count)")
    m.add_argument("--tasks", help="only these indices, e.g. 3,7,10-12")
    m.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="count runs by status",
                        description="PATH is a manifest (tasks without a run are 'missing') or "
                        "a base folder of runs.")
    st.add_argument("path")
    st.add_argument("--json", action="store_true", help='{"counts": {...}, "runs": [...]}')
    st.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command, never notata's options.
    cmd: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, cmd = words[:cut], words[cut + 1:]
    args = parser.parse_args(words)
    args.cmd = cmd
    try:
        return int(args.func(args))
    except NotataError as err:
        if args.debug:
            raise
        print(f"notata {args.command}: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ManifestError, UsageError)) else 1
