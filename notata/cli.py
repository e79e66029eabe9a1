"""The ``notata`` command: ``sweep``, ``exec``, ``submit``, ``status``, ``resubmit`` and
``table``. It parses arguments and calls the Python API (:mod:`notata.submission`,
:mod:`notata.collector`, :mod:`notata.runner`).

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
import textwrap
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
    sbatch,
    shepherd,
    slurm,
    submission,
    tabulate,
    views,
)
from ._function import FLAG
from ._version import __version__
from .array import pack_parallel, pack_tasks, task_index
from .collector import Watcher
from .errors import ManifestError, NotataError, RunDirError, UsageError
from .heartbeat import interval_from
from .manifest import Sweep, compact, load, parse_indices
from .pack import exec_pack, exec_queue
from .runner import exec_task
from .runstate import SCAN_STATUSES, SELECTORS


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
    scheduler = {key: getattr(args, key) for key in sbatch.OPTIONS}
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


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch >= 0:
        raise UsageError(f"--watch {args.watch}: give seconds between scans, at least 0")
    target = _target(args.path)
    watcher = Watcher(submission.duration(args.stale_after))
    base = target.base_dir if isinstance(target, Sweep) else None
    while True:
        queue = slurm.collector_queue(base if base is not None else Path(str(target)), "status")
        report = watcher.scan(target, queue, full=args.full)
        used = efficiency.measure(target) if args.resources else None
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
    base = target.base_dir if isinstance(target, Sweep) else Path(str(target))
    built = overview.build(target, args.artifact or (),
                         slurm.collector_queue(base, "report"))
    name = target.name if isinstance(target, Sweep) else Path(str(target)).name
    out = args.output or (f"{name}-report.html" if args.format == "html"
                          else f"{name}-report")
    written = built.save(out, args.format)
    print(written[0] if args.format == "html" else f"{len(written)} files in {out}/")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    data = tabulate.rows(_target(args.path), args.artifact or (), args.status)
    form = args.format or ("text" if sys.stdout.isatty() else "csv")  # pipes keep csv
    write = {"csv": tabulate.to_csv, "json": tabulate.to_json_lines, "text": tabulate.to_text}
    sys.stdout.write(write[form](data))
    return 0


# -- main ----------------------------------------------------------------------------------------


#: Help for the sbatch options (:data:`notata.sbatch.OPTIONS`), which win over the
#: manifest's ``slurm:`` section.
_SBATCH_HELP = {
    "partition": "the partition to run in",
    "time": "each array task's time limit (60 is 60 minutes; 02:00:00, 1-00:00:00)",
    "mem": "memory per array task (4G, 500M)",
    "cpus_per_task": "CPUs per array task",
    "gpus": "GPUs per array task",
    "account": "the account to charge",
    "qos": "the quality of service",
    "job_name": "the job's name (default: the sweep's name)",
    "output": "SLURM's own output file (default: <base_dir>/.notata/slurm-%%A_%%a.out; "
              "each task's output is in its run's folder whatever this says)",
    "error": "SLURM's own error file (default: with --output)",
}

#: What the command's arguments may name, and where a task's output goes: said by
#: ``exec --help`` and ``submit --help``.
_PLACEHOLDERS = ("{param} in the command's arguments is replaced by the task's value of "
                 "that param (and {run_dir}, {run_id}, {task}, {attempt} by the run's); "
                 "no shell is involved, other braces are left alone.")
_OUTPUT = ("Each task's output goes to its run's folder under the manifest's base_dir "
           "(<base_dir>/log_<run_id>/): the command's stdout.txt and stderr.txt, and "
           "log.txt (notata's lines); notata logs MANIFEST --task N shows them.")


def _about(*paragraphs: str) -> str:
    """A subcommand's description, wrapped here (its formatter keeps the epilog's lines
    as written, and the description's too)."""
    return "\n\n".join(textwrap.fill(text, 79) for text in paragraphs)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_submit_options(p: argparse.ArgumentParser, again: bool = False) -> None:
    """The options of ``submit`` (``resubmit`` takes them too: ``again``)."""
    p.add_argument("--backend", choices=("slurm", "local"),
                   help="where the tasks run: slurm (an array job) or local (this machine); "
                        + ("default: the last submission's" if again else
                           "default: slurm where sbatch is found, else local"))
    p.add_argument("--tasks", metavar="LIST", help="only these indices, e.g. 3,7,10-12")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job scripts and sbatch commands; submit nothing")
    p.add_argument("-j", "--jobs", type=int, help="local: tasks at a time (default: CPU count)")
    g = p.add_argument_group("slurm options (flags win over the manifest's slurm: section)")
    for key, option in sbatch.OPTIONS.items():
        g.add_argument(option, dest=key, metavar=key.upper().replace("_", "-"),
                       help=_SBATCH_HELP[key])
    p.add_argument("--python", metavar="MODULE:FUNCTION",
                   help="instead of a command: call FUNCTION(params, log) as each task, in a "
                        "process forked from one that imported MODULE once (or "
                        "path/file.py:FUNCTION)")
    p.add_argument("--pack", type=int, metavar="N",
                   help="run N tasks one after another in each array task (locally: in "
                        "each process); each is still its own run")
    p.add_argument("--pack-parallel", type=int, metavar="P",
                   help="with --pack: P tasks at a time in each array task (at most its "
                        "--cpus-per-task)")
    p.add_argument("--pack-time", metavar="DURATION",
                   help="instead of --pack: as many tasks per array task as fill DURATION "
                        "(30m), from the runtimes of the sweep's complete runs")
    p.add_argument("--task-time", metavar="DURATION",
                   help="with --pack-time, before any run is complete: how long one task "
                        "takes (20s)")
    g.add_argument("--throttle", type=int, metavar="N", help="at most N tasks at once (%%N)")
    g.add_argument("--warn-before", type=int, metavar="SECS",
                   help="SIGUSR1 this long before the time limit (default 120; 0: none)")
    g.add_argument("--sbatch-line", action="append", metavar="LINE",
                   help="a raw #SBATCH line to add (repeatable)")


_MANIFEST = "the sweep's manifest (YAML or JSON)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notata", description="Parameter sweeps as plain run folders.",
                                epilog=_examples("notata sweep sweep.yaml",
                                                 "notata submit sweep.yaml -- python sim.py "
                                                 "{omega}",
                                                 "notata status sweep.yaml"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"notata {__version__}",
                   help="print notata's version and exit")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks for errors (also NOTATA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do (notata COMMAND --help says more)")
    raw = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser("sweep", help="show a manifest's tasks", formatter_class=raw,
                       description=_about("Print a sweep's name, task count and a few tasks "
                                          "(all of them up to 6), or one task, or every "
                                          "task, as JSON."),
                       epilog=_examples("notata sweep sweep.yaml",
                                        "notata sweep sweep.yaml --task 7",
                                        "notata sweep sweep.yaml --json | jq .params"))
    s.add_argument("manifest", help=_MANIFEST)
    s.add_argument("--task", type=int, metavar="I", help="print task I as JSON")
    s.add_argument("--json", action="store_true", help="print every task, one JSON object a line")
    s.set_defaults(func=cmd_sweep)

    e = sub.add_parser("exec", help="run a command as one task of a sweep",
                       usage="notata exec MANIFEST [--task I | --tasks LIST] [--heartbeat S] "
                             "-- CMD [ARGS...]", formatter_class=raw,
                       description=_about(
                           "Open task I's Logbook (lock, heartbeat, signals) and run CMD in "
                           "it; exit 0 when it completes, else CMD's exit status (75: "
                           "another process holds the run, and nothing ran). "
                           + _PLACEHOLDERS, _OUTPUT,
                           "With --tasks (or in an array submitted with --pack), each task "
                           "in turn, each its own run. A complete task is not run again: "
                           "move its run folder away to run it afresh."),
                       epilog=_examples("notata exec sweep.yaml --task 7 -- python sim.py "
                                        "--omega {omega} --out {run_dir}",
                                        "notata exec sweep.yaml --tasks 3,7,10-12 -- "
                                        "./run.sh {omega}"))
    e.add_argument("manifest", help=_MANIFEST)
    e.add_argument("--task", type=int, metavar="I",
                   help="the task index (default: SLURM_ARRAY_TASK_ID + NOTATA_TASK_OFFSET)")
    e.add_argument("--tasks", metavar="LIST",
                   help="run these tasks one after another, e.g. 3,7,10-12")
    e.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    e.add_argument("--queue-fd", type=int, help=argparse.SUPPRESS)
    e.add_argument("--pack-size", type=int, help=argparse.SUPPRESS)
    e.add_argument("--heartbeat", type=float, metavar="S",
                   help="seconds between heartbeats (default 30, or NOTATA_HEARTBEAT)")
    e.add_argument("--python", metavar="MODULE:FUNCTION",
                   help="instead of a command: call FUNCTION(params, log) as the task")
    e.set_defaults(func=cmd_exec)

    m = sub.add_parser("submit", help="run every task of a sweep",
                       usage="notata submit MANIFEST [options] -- CMD [ARGS...]",
                       formatter_class=raw,
                       description=_about(
                           "Run the sweep's tasks, each through notata exec: as a SLURM "
                           "array, or here (--backend local). " + _PLACEHOLDERS, _OUTPUT,
                           "Complete tasks, and tasks still queued or running, are left "
                           "out (a second submit never runs a task twice)."),
                       epilog=_examples("notata submit sweep.yaml --backend local -j 4 -- "
                                        "python sim.py --omega {omega} --out {run_dir}",
                                        "notata submit sweep.yaml --time 01:00:00 --mem 4G "
                                        "--retry 3 -- python sim.py {omega}"))
    m.add_argument("manifest", help=_MANIFEST)
    m.add_argument("--retry", type=int, metavar="N",
                   help="run each task up to N times in all, until it completes: on "
                        "SLURM a shepherd job resubmits what failed, with more time after a "
                        "timeout and more memory after an OOM kill (the manifest's retry: "
                        "section says more)")
    add_submit_options(m)
    m.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="count runs by status", formatter_class=raw,
                        description=_about(
                            "Count the runs by status, then list those that are not "
                            "complete (runs that share a status and a reason in one line of "
                            "task ranges). PATH is a manifest (tasks without a run are "
                            "'missing', or 'pending' while queued) or a base folder of "
                            "runs."),
                        epilog=_examples("notata status sweep.yaml",
                                         "notata status sweep.yaml --watch --logs",
                                         "notata status outputs/ --json | jq .counts"))
    st.add_argument("path", help="a manifest, or a base folder of runs (outputs/)")
    st.add_argument("--json", action="store_true",
                    help='print {"counts": {...}, "runs": [...]}, one record per task')
    st.add_argument("--stale-after", metavar="DURATION",
                    help="call a running run stale after this long without a heartbeat: "
                         "90s, 10m, 2h (default: 3 heartbeat intervals + 120 s)")
    st.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                    help="scan again every SECONDS (10) until no task is running or queued; "
                         "on a terminal the counts stay on screen")
    st.add_argument("--full", action="store_true",
                    help="read every run's metadata.json, not the sweep index (after runs "
                         "were deleted or edited by hand); also lists runs no task names")
    st.add_argument("--logs", action="store_true",
                    help="under each failed, timed-out or OOM task, the last lines of its "
                         "stderr (notata logs shows the rest)")
    st.add_argument("--resources", action="store_true",
                    help="what the complete runs used of the time, memory and CPUs they "
                         "asked for (50th and 95th percentiles) and the --time and --mem "
                         "to ask for next time (reads every run's metadata.json)")
    st.set_defaults(func=cmd_status)
    lg = sub.add_parser(
        "logs", help="show a run's output (one attempt), under a line saying how it ended",
        description="TARGET is a manifest (with --task or --run), a run folder (log_ID/), "
        "or a base folder of runs (with --run).",
        epilog="examples:\n  notata logs sweep.yaml --task 7\n"
               "  notata logs sweep.yaml --task 7 --attempt 1 --stderr --tail 0\n"
               "  notata logs outputs/log_omega0.5/ --slurm",
        formatter_class=raw)
    lg.add_argument("target", help="a manifest, a run folder, or a base folder of runs")
    lg.add_argument("--task", type=int, metavar="I", help="the sweep task (with a manifest)")
    lg.add_argument("--run", metavar="RUN_ID", help="the run id (with a manifest or a folder)")
    lg.add_argument("--attempt", type=int, metavar="N", help="which attempt (default: the last)")
    lg.add_argument("--tail", type=int, default=50, metavar="N",
                    help="the last N lines of each file (default 50; 0: all)")
    lg.add_argument("--stdout", action="store_true", help="only stdout.txt (with --stderr: both)")
    lg.add_argument("--stderr", action="store_true", help="only stderr.txt")
    lg.add_argument("--log", action="store_true", help="log.txt (notata's lines and yours)")
    lg.add_argument("--slurm", action="store_true",
                    help="also SLURM's own output file of the array task it ran as")
    lg.set_defaults(func=cmd_logs)

    tb = sub.add_parser("table", help="one row per run: status, params, results",
                        formatter_class=raw,
                        description=_about(
                            "Print one row per run: run_id, task, status, attempt, runtime, "
                            "exit code, job, failure reason, the params flattened, and the "
                            "scalar fields of each named JSON artifact (final_metrics gives "
                            "final_metrics.E). Aligned text on a terminal, csv otherwise."),
                        epilog=_examples("notata table sweep.yaml --artifact final_metrics",
                                         "notata table sweep.yaml --status failed --format csv "
                                         "> failed.csv"))
    tb.add_argument("path", help="a manifest or a base folder of runs")
    tb.add_argument("--artifact", action="append", metavar="NAME",
                    help="a JSON artifact under artifacts/ (repeatable)")
    tb.add_argument("--format", choices=("text", "csv", "json"),
                    help="text: aligned columns (the default on a terminal); csv (the "
                         "default otherwise, so pipes and scripts get csv); json: one "
                         "JSON object a line")
    tb.add_argument("--status", action="append", metavar="STATUS",
                    help="only runs with this status (repeatable): "
                         + ", ".join(SCAN_STATUSES))
    tb.set_defaults(func=cmd_table)

    rp = sub.add_parser(
        "report", help="one HTML file showing the sweep at a glance",
        description="Write one self-contained HTML file (figures inline, nothing loaded "
        "from the network): the status of every task on the sweep's grid, the named "
        "artifacts' results over the params, runtime and memory against what was asked "
        "for, the failures with the end of their output, and which code ran. Needs the "
        "report extra: pip install 'notata[report]'.",
        epilog="examples:\n  notata report sweep.yaml --artifact final_metrics\n"
               "  notata report sweep.yaml -o ~/www/osc.html\n"
               "  notata report sweep.yaml --format png -o figs/   # images, for the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("path", help="a manifest or a base folder of runs")
    rp.add_argument("-o", "--output", metavar="PATH",
                    help="the HTML file (default: SWEEP-report.html here), or the folder "
                         "for --format png (default: SWEEP-report/)")
    rp.add_argument("--artifact", action="append", metavar="NAME",
                    help="a JSON artifact under artifacts/ whose numbers are shown over the "
                         "params (repeatable)")
    rp.add_argument("--format", choices=("html", "png"), default="html",
                    help="html (default): one file; png: one image per figure and "
                         "summary.txt")
    rp.set_defaults(func=cmd_report)

    sh = sub.add_parser("shepherd", help="one round of a sweep's retries (what --retry queues)",
                        formatter_class=raw,
                        description=_about(
                            "Scan the sweep, resubmit what its retry policy retries (more "
                            "time after a timeout, more memory after an OOM kill), and queue "
                            "the next shepherd behind the new arrays, or the sweep's final "
                            "job. Run by hand, it resumes a chain that was cancelled. Its "
                            "decisions: <base_dir>/.notata/shepherd.log."),
                        epilog=_examples("notata shepherd sweep.yaml",
                                         "notata shepherd sweep.yaml --then"))
    sh.add_argument("manifest", help=_MANIFEST)
    sh.add_argument("--then", action="store_true",
                    help="run the sweep's then command and notify (the final job does)")
    sh.add_argument("--as-job", action="store_true", help=argparse.SUPPRESS)
    sh.set_defaults(func=cmd_shepherd)

    r = sub.add_parser("resubmit", help="submit failed, stale and missing tasks again",
                       usage="notata resubmit MANIFEST [selectors] [options] [-- CMD [ARGS...]]",
                       formatter_class=raw,
                       description=_about(
                           "Scan the sweep and submit exactly the tasks that need it, as the "
                           "next attempt of their runs. No selector: failed, timeout, "
                           "preempted, stale, missing and oom. Never a complete run, a task "
                           "still queued, or a run a live process holds. The command, "
                           "backend and options are the last submission's unless given."),
                       epilog=_examples("notata resubmit sweep.yaml --dry-run",
                                        "notata resubmit sweep.yaml --timeout --time 04:00:00",
                                        "notata resubmit sweep.yaml --failed -- python sim.py "
                                        "{omega} --fixed"))
    r.add_argument("manifest", help=_MANIFEST)
    for name in SELECTORS:
        r.add_argument(f"--{name}", action="store_true", help=f"take {name} tasks")
    r.add_argument("--max-attempts", type=int, metavar="K",
                   help="leave tasks that already had K attempts")
    r.add_argument("--stale-after", metavar="DURATION",
                   help="call a running run stale after this long without a heartbeat: 90s, "
                        "10m, 2h (default: 3 heartbeat intervals + 120 s)")
    r.add_argument("--full", action="store_true",
                   help="read every run's metadata.json, not the sweep index: after deleting "
                        "complete runs by hand to run them again")
    add_submit_options(r, again=True)
    r.set_defaults(func=cmd_resubmit)
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
    debug = args.debug or os.environ.get("NOTATA_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args))
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
