"""notata: structured filesystem logging for scientific runs, safe on a cluster.

One run is one directory of plain files (``<base_dir>/log_<run_id>/``)::

    from notata import Logbook

    with Logbook("omega1.0_dt0.01", params={"omega": 1.0, "dt": 0.01}) as log:
        log.save_numpy("x", xs)                       # data/x.npy
        log.save_json("final_state", {"x": 0.1})      # artifacts/final_state.json

Every write is atomic, the run is locked to one live writer, a heartbeat
thread records liveness, and SIGTERM from a scheduler is recorded as
``timeout``/``cancelled``/``preempted`` before the process exits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__version__ = "0.4.0.dev0"

from . import runinfo as _runinfo
from . import slurm as _slurm
from .array import task
from .collect import Report, scan
from .errors import (
    CorruptMetadataError,
    ManifestError,
    NotataError,
    RunCompleteError,
    RunLockedError,
    SchedulerError,
)
from .experiment import Experiment
from .logbook import Logbook
from .manifest import Sweep, Task
from .manifest import load as load_sweep
from .reader import ExperimentReader, LogReader
from .tabulate import table

_runinfo.register_scheduler(_slurm.SLURM)


def collect(target: Sweep | str, stale_after: float | None = None, *,
            full: bool = False) -> Report:
    """Scan a sweep (a manifest path or a :class:`Sweep`) or a base folder of runs.

    Asks SLURM's queue once when ``sbatch`` is here (not when it cannot answer). The
    report has ``counts``, ``runs`` (one record per task), ``indices(*statuses)`` and
    ``to_resubmit(statuses, max_attempts)``; resubmit those indices with
    ``notata resubmit`` or ``notata.submitit.submit_sweep(fn, manifest, executor,
    tasks=indices)``. ``full`` reads every run's metadata.json instead of taking complete
    tasks from the sweep index (after runs were deleted or edited by hand).
    """
    from .collect import Queue

    if isinstance(target, str) and not os.path.isdir(target):
        target = load_sweep(target, check_unique=True)
    queue = None
    if _slurm.available():
        try:
            queue = Queue(_slurm.queue())
        except SchedulerError:
            queue = None
    return scan(target, stale_after=stale_after, queue=queue, full=full)

__all__ = [
    "resubmit",
    "CorruptMetadataError",
    "Experiment",
    "ExperimentReader",
    "LogReader",
    "Logbook",
    "ManifestError",
    "NotataError",
    "RunCompleteError",
    "RunLockedError",
    "SchedulerError",
    "Sweep",
    "Task",
    "__version__",
    "collect",
    "load_sweep",
    "table",
    "task",
]


def resubmit(manifest: str | os.PathLike[str], *statuses: str,
             max_attempts: int | None = None, command: Sequence[str] = (),
             backend: str | None = None, dry_run: bool = False, full: bool = False,
             **sbatch: Any) -> int:
    """``notata resubmit`` from Python: submit again exactly the tasks that need it.

    ``statuses`` are the selectors (``"failed"``, ``"stale"``, ``"cancelled"``...; none:
    failed, timeout, preempted, stale and missing); ``sbatch`` takes the options of
    ``notata submit`` by their Python names (``time="01:00:00"``, ``mem="4G"``,
    ``throttle=50``, ``sbatch_line=["--constraint=x"]``); None means not given. Same
    rules, lock and submission record as the command; returns its exit status (0: the
    scan worked and what was chosen was submitted or ran). An unknown status or option
    (TypeError), or a value of the wrong form (ValueError: a non-integer throttle, an
    unknown backend, a bad duration) raises before anything runs; values only SLURM can
    judge (a time limit, a partition) come back as the command's exit status, 1.
    """
    from .cli import build_parser, main
    from .collect import SELECTORS, parse_duration

    bad = [s for s in statuses if s not in SELECTORS]
    if bad:
        raise ValueError(f"resubmit(): unknown status {bad[0]!r}; known: {', '.join(SELECTORS)}")
    argv = ["resubmit", os.fspath(manifest), *(f"--{s}" for s in statuses)]
    options = {**sbatch, "max_attempts": max_attempts, "backend": backend}
    known = {*_slurm.OPTIONS, "throttle", "warn_before", "sbatch_line", "jobs", "stale_after",
             "max_attempts", "backend"}
    for key, value in options.items():
        if key not in known:
            raise TypeError(f"resubmit() got an unknown option {key!r}; "
                            f"known: {', '.join(sorted(known))}")
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key.replace('_', '-')}={v}" for v in values if v is not None]
    argv += ["--dry-run"] * dry_run + ["--full"] * full
    try:
        build_parser().parse_args(argv)
    except SystemExit:  # argparse said what is wrong on stderr
        raise ValueError(f"resubmit(): invalid options {argv[2:]}") from None
    if sbatch.get("stale_after") is not None:
        try:
            parse_duration(str(sbatch["stale_after"]))
        except ValueError as err:
            raise ValueError(f"resubmit(): stale_after: {err}") from None
    return main([*argv, "--", *command] if command else argv)
