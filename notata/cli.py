"""The ``notata`` command: ``sweep``, ``exec``, ``submit``, ``status``, ``logs``, ``table``,
``report``, ``shepherd`` and ``resubmit``. Its arguments are :mod:`notata.parser`'s; each
command calls the Python API (:mod:`notata.submission`, :mod:`notata.collector`,
:mod:`notata.runner`...) and prints with :mod:`notata.views`.

``main(argv) -> int``: a :class:`~notata.NotataError` (a bad manifest, a bad
``--tasks``) prints one line on stderr and returns 2 for bad input, 1 for an
operation that failed; ``--debug`` (or ``NOTATA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import (
    _function,
    chain,
    efficiency,
    layout,
    logs,
    overview,
    provenance,
    sbatch_options,
    shepherd,
    slurm,
    submission,
    tabulate,
    views,
)
from ._function import FLAG
from .array import pack_parallel, pack_tasks, task_index
from .collector import Watcher
from .errors import ManifestError, NotataError, RunDirError, UsageError
from .heartbeat import interval_from
from .manifest import Sweep, compact, load, parse_indices
from .pack import exec_pack, exec_queue
from .parser import build_parser
from .runner import exec_task
from .runstate import SELECTORS


def _command(args: argparse.Namespace, needed: bool = True) -> list[str]:
    """The command after ``--``, or ``--python MODULE:FUNCTION`` as the command that
    names it (:mod:`notata._function`)."""
    cmd = list(args.cmd)
    if getattr(args, "python", None) is not None:
        if cmd:
            raise UsageError(f"give --python {args.python} or a command after --, not both")
        return [FLAG, args.python]
    if not cmd and needed:
        raise UsageError("no command given: put it after --, e.g. -- python sim.py {omega} "
                         "(or call a Python function: --python simulate:run)")
    return cmd


def _task(sweep: Sweep, index: int) -> int:
    try:
        sweep.params(index)
    except IndexError as err:
        raise UsageError(str(err)) from None
    return index


# -- sweep ---------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load(args.manifest, check_unique=args.task is None)
    if args.task is not None:
        print(json.dumps(sweep.task(_task(sweep, args.task)).as_json()))
    elif args.json:
        for t in sweep:
            print(json.dumps(t.as_json()))
    else:
        n = len(sweep)
        print(f"sweep {sweep.name}: {n} task{'s' if n != 1 else ''}, manifest hash {sweep.hash}")
        print(f"runs in {sweep.base_dir}")
        shown = list(range(n)) if n <= 6 else [0, 1, 2, 3, 4, n - 1]
        for i in shown:
            if i == n - 1 and n > 6:
                print("  ...")
            t = sweep.task(i)
            print(f"  task {i}: {t.run_id}  {json.dumps(t.params)}")
    return 0


# -- exec ----------------------------------------------------------------------------------------


def cmd_exec(args: argparse.Namespace) -> int:
    sweep = load(args.manifest)
    try:
        interval_from(args.heartbeat)
    except ValueError as err:
        raise UsageError(f"--heartbeat: {err}") from None
    if args.task is not None and args.tasks is not None:
        raise UsageError("give --task or --tasks, not both")
    cmd = _command(args)  # a function's module is imported once, where its tasks run
    provenance.use_subject(provenance.subject_of(cmd))
    if args.queue_fd is not None:  # a worker of a pack run side by side
        return exec_queue(sweep, args.queue_fd, args.pack_size or 0, cmd,
                          heartbeat=args.heartbeat, element=pack_tasks() is not None)
    if args.tasks is not None:
        tasks: list[int] | None = parse_indices(args.tasks, len(sweep))
    else:
        tasks = pack_tasks() if args.task is None else None
    if tasks is not None:
        outside = [i for i in tasks if i >= len(sweep)]
        if outside:  # the rest of the pack still runs
            print(f"notata: tasks {compact(outside)} are outside the sweep's {len(sweep)} "
                  "tasks (was the manifest changed since it was submitted?): not run",
                  file=sys.stderr)
        rc = exec_pack(sweep, [i for i in tasks if i < len(sweep)], cmd,
                       heartbeat=args.heartbeat, report=args.report_fd,
                       element=args.tasks is None,
                       parallel=pack_parallel() if args.tasks is None else 1)
        return rc or (1 if outside else 0)
    index, from_array = (args.task, False) if args.task is not None else task_index()
    _task(sweep, index)
    return exec_task(sweep, index, _function.of(cmd) or cmd, heartbeat=args.heartbeat,
                     from_array=from_array)


# -- submit --------------------------------------------------------------------------------------


def _options(args: argparse.Namespace, sweep: Sweep) -> submission.Options:
    """The submit options of the command line, checked."""
    if args.tasks is not None:
        if not args.tasks.strip():
            raise UsageError("--tasks is empty: give indices such as 3,7,10-12")
        tasks: list[int] | None = parse_indices(args.tasks, len(sweep))
    else:
        tasks = None
    scheduler = {key: getattr(args, key) for key in sbatch_options.OPTIONS}
    scheduler.update(throttle=args.throttle, warn_before=args.warn_before,
                     sbatch_line=args.sbatch_line)
    options = submission.Options(backend=args.backend, tasks=tasks, dry_run=args.dry_run,
                                 jobs=args.jobs, pack=args.pack,
                                 pack_parallel=args.pack_parallel,
                                 pack_time=submission.duration(args.pack_time, "--pack-time"),
                                 task_time=submission.duration(args.task_time, "--task-time"),
                                 scheduler=scheduler,
                                 retry=getattr(args, "retry", None))
    options.check()
    return options


def cmd_submit(args: argparse.Namespace) -> int:
    sweep = load(args.manifest)  # submit checks the run ids (and a dry run writes nothing)
    return submission.submit(sweep, _command(args), _options(args, sweep),
                             progress=views.Progress()).status


def _target(path: str) -> Sweep | str:
    """A folder of runs, or a manifest (its run ids checked once: see check_unique)."""
    if os.path.isdir(path):
        return path
    return load(path, check_unique=True)


def _base(target: Sweep | str) -> Path:
    """Where a target's runs are: a sweep's base folder, or the folder given."""
    return target.base_dir if isinstance(target, Sweep) else Path(str(target))


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch >= 0:
        raise UsageError(f"--watch {args.watch}: give seconds between scans, at least 0")
    target = _target(args.path)
    watcher = Watcher(submission.duration(args.stale_after))
    while True:
        queue = slurm.collector_queue(_base(target), "status")
        report = watcher.scan(target, queue, full=args.full or args.resources,
                              keep=efficiency.figures if args.resources else None)
        used = efficiency.measure(target, report) if args.resources else None
        if args.json:
            out = report.as_json()
            if used is not None:
                out["resources"] = used.as_json()
            print(json.dumps(out), flush=True)
        else:
            shepherd = (chain.describe(target.base_dir, target) if isinstance(target, Sweep)
                        else [])
            head, body = views.report_lines(report, shepherd)
            if args.logs:
                body += views.failure_lines(report, target)
            if used is not None:
                body += used.lines()
            if isinstance(target, Sweep):  # a mix of code versions: under the counts
                head += provenance.warnings(target)
            if args.watch is not None and sys.stdout.isatty():
                # the counts stay on screen: the list is cut to the terminal's height
                lines = views.fit(head, body, shutil.get_terminal_size())
                print("\033[H\033[J" + "\n".join(lines), flush=True)
            else:
                print("\n".join(head + body), flush=True)
        if args.watch is None:
            return 0
        if report.terminal and not (isinstance(target, Sweep)  # a shepherd will retry
                                    and chain.active(target.base_dir, target)):
            return 0
        time.sleep(args.watch)


def _run_folder(args: argparse.Namespace) -> Path:
    """The run folder ``notata logs`` is asked about."""
    target = Path(args.target)
    if target.is_dir() and args.run is None and (
            (target / layout.METADATA).exists() or target.name.startswith(layout.RUN_PREFIX)):
        return target
    if target.is_dir():
        if args.run is None:
            raise UsageError(f"{target} is a folder of runs: name one with --run RUN_ID")
        return layout.run_dir(target, args.run)
    sweep = load(args.target)
    if (args.task is None) == (args.run is None):
        raise UsageError("with a manifest, give --task N or --run RUN_ID")
    if args.run is not None:
        return layout.run_dir(sweep.base_dir, args.run)
    _task(sweep, args.task)
    return sweep.task(args.task).run_dir


def cmd_logs(args: argparse.Namespace) -> int:
    if args.tail < 0:
        raise UsageError(f"--tail {args.tail}: give a number of lines, or 0 for all")
    run_dir = _run_folder(args)
    if not run_dir.is_dir():
        print(f"{run_dir}: no run there yet (the task has not started)", file=sys.stderr)
        return 1
    meta = logs.read_meta(run_dir)
    record = logs.attempt_of(meta, args.attempt)
    out = logs.header(meta, record, run_dir)
    attempt = logs.number(record.get("attempt"), 1)
    for part in logs.parts(run_dir, meta, record, tail=args.tail, stdout=args.stdout,
                           stderr=args.stderr, log=args.log):
        out += logs.render(part, attempt)
    if args.slurm:  # the sweep's .notata/ is beside the real run folder, not a link to it
        base = Path(os.path.realpath(run_dir)).parent
        out += logs.render(logs.scheduler_part(record, base, args.tail), attempt)
    print("\n".join(out), flush=True)
    return 0


def cmd_shepherd(args: argparse.Namespace) -> int:
    return shepherd.shepherd(load(args.manifest), then=args.then, as_job=args.as_job)


def cmd_resubmit(args: argparse.Namespace) -> int:
    sweep = load(args.manifest)  # resubmit checks the run ids (and a dry run writes nothing)
    chosen = [s for s in SELECTORS if getattr(args, s)]
    return submission.resubmit(sweep, chosen, _command(args, needed=False),
                               _options(args, sweep),
                               max_attempts=args.max_attempts,
                               stale_after=submission.duration(args.stale_after),
                               full=args.full, progress=views.Progress()).status


def cmd_report(args: argparse.Namespace) -> int:
    target = _target(args.path)
    name = target.name if isinstance(target, Sweep) else Path(str(target)).name
    out = args.output or (f"{name}-report.html" if args.format == "html"
                          else f"{name}-report")
    overview.check_output(out, args.format)  # before the sweep is read
    built = overview.build(target, args.artifact or (),
                           slurm.collector_queue(_base(target), "report"))
    written = built.save(out, args.format)
    print(written[0] if args.format == "html" else f"{len(written)} files in {out}/")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    target = _target(args.path)
    data = tabulate.rows(target, args.artifact or (), args.status,
                         slurm.collector_queue(_base(target), "table"))
    form = args.format or ("text" if sys.stdout.isatty() else "csv")  # pipes keep csv
    write = {"csv": tabulate.to_csv, "json": tabulate.to_json_lines, "text": tabulate.to_text}
    sys.stdout.write(write[form](data))
    return 0


# -- main ----------------------------------------------------------------------------------------


#: The function of each subcommand.
COMMANDS = {"sweep": cmd_sweep, "exec": cmd_exec, "submit": cmd_submit, "status": cmd_status,
            "logs": cmd_logs, "table": cmd_table, "report": cmd_report,
            "shepherd": cmd_shepherd, "resubmit": cmd_resubmit}


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
    debug = args.debug or os.environ.get("NOTATA_DEBUG", "") not in ("", "0")
    try:
        return int(COMMANDS[args.command](args))
    except BrokenPipeError:  # `notata sweep --json | head -1`: end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit says nothing
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C out of `status --watch`: no traceback
        if sys.stderr.isatty():  # the shell's prompt starts a line of its own, not after ^C
            print(file=sys.stderr)
        return 130
    except NotataError as err:  # a user's mistake (exit 2) or a failed operation (exit 1)
        if debug:
            raise
        print(f"notata {args.command}: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ManifestError, UsageError, RunDirError)) else 1
    except OSError as err:
        if debug or err.errno not in _ENVIRONMENT:
            raise  # a bug keeps its traceback
        # a full disk, a quota, a folder this user may not write: the system's words
        print(f"notata {args.command}: {err.filename or ''}: {err.strerror}", file=sys.stderr)
        return 1


#: OSErrors that come from the machine, not from notata: one line, exit 1.
_ENVIRONMENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                          errno.EIO})
