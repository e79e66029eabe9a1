"""The command line's arguments: every subcommand, option and help text, with examples
(:func:`build_parser`); :mod:`notata.cli` runs what they ask for."""

from __future__ import annotations

import argparse
import textwrap

from . import sbatch_options
from ._version import __version__
from .runstate import SCAN_STATUSES, SELECTORS

#: Help for the sbatch options (:data:`notata.sbatch_options.OPTIONS`), which win over the
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
    for key, option in sbatch_options.OPTIONS.items():
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
    return p
