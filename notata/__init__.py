"""notata: structured filesystem logging for scientific runs, safe on a cluster.

One run is one directory of plain files (``<base_dir>/log_<run_id>/``)::

    from notata import Logbook

    with Logbook("omega1.0_dt0.01", params={"omega": 1.0, "dt": 0.01}) as log:
        log.save_numpy("x", xs)                       # data/x.npy
        log.save_json("final_state", {"x": 0.1})      # artifacts/final_state.json

Every write is atomic, the run is locked to one live writer, a heartbeat
thread records liveness, and SIGTERM from a scheduler is recorded as
``timeout``/``cancelled``/``preempted`` before the process exits.

The code map, in layers from the bottom: a module imports only from its own layer or
lower ones, never in a cycle (tests/test_layers.py enforces it, and that only the
scheduler layer names a scheduler's variables, job states or metadata fields).

0. foundations: ``_version``; ``schema`` (statuses, metadata fields); ``errors`` (every
   exception); ``scheduler`` (the seam every scheduler implements, and the registry);
   ``runinfo`` (host, user, time); ``_convert`` (values as written); ``heartbeat``;
   ``taskspec`` (task lists as text: ``3,7,10-12``); ``resources`` (asked and used, the
   peak, the OOM rule).
1. files: ``_fs`` (atomic writes: the only writer); ``layout`` (every file name of a run
   and of a sweep's ``.notata/``); ``lock`` (the run lock, the sweep locks); ``index``
   (the sweep index); ``reader``; ``manifest`` (sweeps); ``submissions`` (the record of
   what was submitted); ``_signals`` (the process's signal dispatcher); ``_attach``.
2. the run: ``_attempt`` (what carries over between attempts); ``_run`` (a run this
   process owns: lock, metadata, heartbeat, status); ``_outputs`` (the writers and
   log.txt); ``logbook`` (the Logbook); ``experiment``.
3. tasks: ``array`` (a sweep task's Logbook); ``_command`` (a task's command's processes:
   start, warn, stop); ``_function`` (a Python function as each task: one import, a
   fork per task); ``runner`` (``notata exec``); ``pack``
   (several tasks one after another in one process); ``local`` (the local backend).
4. scanning: ``runstate`` (one run's state); ``queue`` (which tasks the queue holds);
   ``collector`` (the scan, the report); ``tabulate``; ``logs`` (a run's output, one
   attempt at a time).
5. schedulers: ``slurm`` (SLURM inside a job and its queue); ``sbatch`` (arrays, job
   scripts, submitting); ``sbatch_options`` (the options sbatch is given, SLURM's time
   and memory notations); ``submitit`` (the submitit bridge); ``chain`` (the retry
   shepherd's record, log and jobs).
6. submitting: ``submission`` (submit and resubmit: the Python API the CLI wraps);
   ``retry`` (a sweep's retry policy: which failures, how often, with what more);
   ``shepherd`` (one round of retries on the cluster: ``notata shepherd``); ``settle``
   (the chain's end: ``then`` once, the notification);
   ``efficiency`` (what runs used of what they asked for; what to ask next time).
7. interfaces: ``cli`` (the commands), ``parser`` (their arguments and help) and
   ``views`` (what they print); ``overview`` (``notata report``:
   the HTML report) and ``figures`` (its matplotlib figures); ``__main__`` and this module (the
   public names).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import scheduler as _scheduler
from . import slurm as _slurm
from ._version import __version__
from .array import task
from .collector import Report, scan
from .errors import (
    ChainRecordError,
    CorruptMetadataError,
    ManifestError,
    NotataError,
    RunCompleteError,
    RunLockedError,
    SchedulerError,
    UsageError,
)
from .experiment import Experiment
from .logbook import Logbook
from .manifest import Sweep, Task
from .manifest import load as load_sweep
from .reader import ExperimentReader, LogReader
from .tabulate import table

_scheduler.register(_slurm.SLURM)


def collect(target: Sweep | str | os.PathLike[str], stale_after: float | None = None, *,
            full: bool = False) -> Report:
    """Scan a sweep (a manifest path or a :class:`Sweep`) or a base folder of runs.

    Asks SLURM's queue once when ``sbatch`` is here (not when it cannot answer), for
    every user who submitted to the sweep. The report has ``counts``, ``runs`` (one record
    per task), ``indices(*statuses)`` and ``to_resubmit(statuses, max_attempts)``;
    resubmit those indices with :func:`resubmit` or ``notata.submitit.submit_sweep(fn,
    manifest, executor, tasks=indices)``. ``full`` reads every run's metadata.json
    instead of taking complete tasks from the sweep index (after runs were deleted or
    edited by hand). Raises :class:`ManifestError` for a manifest that cannot be used
    (tasks sharing a run id included).
    """
    from pathlib import Path

    if not isinstance(target, Sweep) and not os.path.isdir(target):
        target = load_sweep(target, check_unique=True)
    base = target.base_dir if isinstance(target, Sweep) else Path(target)
    return scan(target, stale_after=stale_after, full=full,
                queue=_slurm.collector_queue(base, "collect"))


def report(target: Sweep | str | os.PathLike[str], artifacts: Sequence[str] = (),
           output: str | os.PathLike[str] | None = None, format: str = "html") -> Any:
    """``notata report`` from Python: read a sweep (a manifest path or a :class:`Sweep`)
    or a folder of runs once and return its :class:`~notata.overview.SweepReport`:
    ``counts``, ``statuses`` (one per task), ``fields`` (each artifact field, one value per
    task), ``usage`` (what the runs used of what they asked for), ``failures``, ``code``;
    ``figures`` (matplotlib figures, for a notebook), ``html()``. With ``output``, also
    writes it there (``format`` "html", or "png": a folder of images). Needs matplotlib
    (``pip install 'notata[report]'``)."""
    from pathlib import Path

    from . import overview
    if not isinstance(target, Sweep) and not os.path.isdir(target):
        target = load_sweep(target, check_unique=True)
    base = target.base_dir if isinstance(target, Sweep) else Path(target)
    built = overview.build(target, artifacts, _slurm.collector_queue(base, "report"))
    if output is not None:
        built.save(output, format)
    return built


__all__ = [
    "report",
    "resubmit",
    "submit",
    "ChainRecordError",
    "CorruptMetadataError",
    "Experiment",
    "ExperimentReader",
    "LogReader",
    "Logbook",
    "ManifestError",
    "NotataError",
    "RunCompleteError",
    "Report",
    "RunLockedError",
    "SchedulerError",
    "Sweep",
    "UsageError",
    "Task",
    "__version__",
    "collect",
    "load_sweep",
    "table",
    "task",
]


def resubmit(manifest: str | os.PathLike[str] | Sweep, *statuses: str,
             max_attempts: int | None = None, command: Sequence[str] = (),
             backend: str | None = None, dry_run: bool = False, full: bool = False,
             tasks: Sequence[int] | None = None, jobs: int | None = None,
             stale_after: str | float | None = None, pack: int | None = None,
             **sbatch: Any) -> int:
    """``notata resubmit`` from Python: submit again exactly the tasks that need it.

    ``statuses`` are the selectors (``"failed"``, ``"stale"``, ``"cancelled"``...; none:
    failed, timeout, preempted, stale, missing and oom); ``tasks`` narrows the choice;
    ``command`` is a list of arguments (default: the last submission's); ``sbatch`` takes
    the options of ``notata submit`` by their Python names (``time="01:00:00"``,
    ``mem="4G"``, ``throttle=50``, ``sbatch_line=["--constraint=x"]``); None means not
    given, and what is not given comes from the sweep's last submission (backend and
    options alike). Same rules, lock and record as the command; returns its exit status
    (0: the scan worked and what was chosen was submitted, ran, or there was nothing to
    do). Raises before anything runs: TypeError for an unknown option;
    :class:`~notata.errors.UsageError` (a ValueError) for an unknown status or backend, a
    value of the wrong form, a bad duration, or a command given as one string;
    :class:`ManifestError` for the manifest. SLURM's own refusal (a bad partition) raises
    :class:`SchedulerError`.
    """
    from . import submission

    after = stale_after if isinstance(stale_after, (int, float)) or stale_after is None \
        else submission.duration(str(stale_after), "stale_after")
    options = _options("resubmit", command, backend, tasks, dry_run, jobs, sbatch)
    options.pack = pack
    return submission.resubmit(manifest, statuses, list(command), options,
                               max_attempts=max_attempts, stale_after=after, full=full).status


def submit(manifest: str | os.PathLike[str] | Sweep, command: Sequence[str], *,
           backend: str | None = None, dry_run: bool = False,
           tasks: Sequence[int] | None = None, jobs: int | None = None,
           retry: int | None = None, pack: int | None = None,
           pack_parallel: int | None = None, pack_time: str | float | None = None,
           task_time: str | float | None = None, **sbatch: Any) -> int:
    """``notata submit`` from Python: submit the sweep's tasks (all, or ``tasks``).

    ``command`` is a list of arguments (``{param}`` placeholders are filled per task, no
    shell is involved); ``backend`` "slurm" or "local" (None: slurm where sbatch is found);
    ``sbatch`` takes the options of ``notata submit`` by their Python names, as
    :func:`resubmit` does; ``retry`` runs each task up to that many times in all (see
    :mod:`notata.retry`; on SLURM a shepherd job retries, :mod:`notata.shepherd`; locally
    this call retries); ``pack`` runs that many tasks one after another in each array
    task (or local process), each its own run (:mod:`notata.pack`), ``pack_parallel`` of
    them at a time on SLURM, or ``pack_time``
    (seconds, or ``"30m"``) as many as fill it, from the runtimes of complete runs or
    ``task_time``. Complete tasks and tasks still queued
    or running are left out.
    Returns the command's exit status (0: submitted, or locally every task complete; 1: a
    local task failed). Raises as :func:`resubmit` does.
    """
    from . import submission

    options = _options("submit", command, backend, tasks, dry_run, jobs, sbatch)
    options.pack, options.pack_parallel = pack, pack_parallel
    options.pack_time, options.task_time = (
        t if isinstance(t, (int, float)) or t is None else submission.duration(t, name)
        for t, name in ((pack_time, "pack_time"), (task_time, "task_time")))
    options.retry = retry  # submit's own: resubmit has max_attempts
    return submission.submit(manifest, list(command), options).status


def _options(name: str, command: Sequence[str], backend: str | None,
             tasks: Sequence[int] | None, dry_run: bool, jobs: int | None,
             sbatch: dict[str, Any]) -> Any:
    """The typed options of :func:`submit` and :func:`resubmit`, checked before anything runs."""
    from . import submission

    unknown = sorted(set(sbatch) - set(submission.SCHEDULER_OPTIONS))
    if unknown:
        raise TypeError(f"{name}() got an unknown option {unknown[0]!r}; known: "
                        f"{', '.join(submission.SCHEDULER_OPTIONS)}, jobs, tasks"
                        + (", stale_after" if name == "resubmit" else ""))
    if isinstance(command, (str, bytes)):
        raise UsageError(f"{name}(): command {command!r} is one string; give a list of "
                         "arguments, e.g. ['python', 'sim.py'] (no shell is involved)")
    return submission.Options(backend=backend, tasks=list(tasks) if tasks is not None else None,
                              dry_run=dry_run, jobs=jobs, scheduler=dict(sbatch))
